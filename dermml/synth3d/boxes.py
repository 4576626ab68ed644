"""Lesion boxes of a mask: one COCO [x, y, w, h] per 8-connected component."""

from __future__ import annotations

import numpy as np


def lesion_boxes(mask: np.ndarray) -> list[list[float]]:
    """COCO boxes [x, y, w, h] (pixels) of the 8-connected components of a boolean mask."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    boxes = []
    for rows, cols in ndimage.find_objects(labels)[:n]:
        boxes.append([float(cols.start), float(rows.start), float(cols.stop - cols.start),
                      float(rows.stop - rows.start)])
    return boxes
