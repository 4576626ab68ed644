"""Lesion boxes of a manifest row: the ``boxes`` column (COCO [x, y, w, h] in image pixels,
with ``box_labels``) or the connected components of the row's mask.

Where a row's boxes come from is the detection task's ``boxes`` setting (``BoxesConfig``):
``auto`` takes the column where the row has boxes and the mask otherwise (segmentation
manifests), ``column`` only the column (a row without boxes is an image without lesions), and
``mask`` always the mask. Boxes are in the pixels of the full-size image, as stored; datasets
scale them with the image.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from dermml.config import Section

LESION = "lesion"
"""The class of boxes without a label of their own (mask components of unlabelled rows)."""


class BoxesConfig(Section):
    """Where the ground-truth boxes of a manifest row come from, and their classes."""

    source: Literal["auto", "column", "mask"] = "auto"
    """auto: the ``boxes`` column where a row has boxes, else the connected components of its
    mask (segmentation manifests); column: the ``boxes`` column only (no boxes: an image
    without lesions); mask: always the mask's components."""
    min_area: int = Field(16, ge=0)
    """Mask components with fewer pixels (in the full-size mask) are not lesions (speckle)."""
    labels: Literal["manifest", "lesion"] = "manifest"
    """manifest: ``box_labels`` (mask boxes, and column boxes without a label: the row's
    ``label``, else ``lesion``); lesion: every box is a ``lesion`` (localisation only, as in
    DermSynth3D)."""


def mask_boxes(mask: np.ndarray, min_area: int = 0) -> list[list[float]]:
    """COCO boxes [x, y, w, h] (pixel edges: a component over columns 3..5 has x 3, w 3) of
    the 8-connected components of a boolean mask with at least ``min_area`` pixels."""
    from scipy import ndimage

    labels, n = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    areas = np.bincount(labels.ravel(), minlength=n + 1)
    boxes = []
    for k, (rows, cols) in enumerate(ndimage.find_objects(labels)[:n], start=1):
        if areas[k] >= max(1, min_area):
            boxes.append([float(cols.start), float(rows.start), float(cols.stop - cols.start),
                          float(rows.stop - rows.start)])
    return boxes


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and pd.isna(value))


def column_boxes(value) -> list[list[float]]:
    """The ``boxes`` cell of a row as a list of [x, y, w, h] floats (empty when missing)."""
    if not _present(value):
        return []
    return [[float(v) for v in box] for box in value]


def box_source(row: pd.Series, source: str) -> Literal["column", "mask"]:
    """Where ``row``'s boxes come from under the ``source`` setting (``mask`` on a row without
    a mask is an error: ``box_sources`` names every such row)."""
    if source == "column":
        return "column"
    has_mask = _present(row.get("mask_uri")) and bool(row.get("mask_uri"))
    if source == "mask":
        if not has_mask:
            raise ValueError(f"sample {row['sample_id']}: boxes.source is mask but the row has "
                             "no mask_uri")
        return "mask"
    return "column" if column_boxes(row.get("boxes")) or not has_mask else "mask"


def box_sources(rows: pd.DataFrame, source: str, where: str = "") -> list[str]:
    """``box_source`` of every row; rows that need a mask they lack are one error."""
    if source == "mask":
        missing = [s for s, m in zip(rows["sample_id"], rows["mask_uri"], strict=True)
                   if not (_present(m) and m)]
        if missing:
            raise ValueError(f"{where or 'manifest'}: boxes.source is mask but {len(missing)} "
                             f"samples have no mask_uri: {missing[:5]}; use boxes.source=auto "
                             "or column for rows with boxes")
    return [box_source(row, source) for _, row in rows.iterrows()]


def row_label(row: pd.Series) -> str:
    """The class of a row's unlabelled boxes: its ``label``, else ``lesion``."""
    label = row.get("label")
    return label if isinstance(label, str) and label.strip() else LESION


def box_labels(row: pd.Series, n: int, source: str, labels: str) -> list[str]:
    """The classes of the ``n`` boxes of ``row`` read from ``source`` (column or mask)."""
    if labels == LESION:
        return [LESION] * n
    fallback = row_label(row)
    given = list(row.get("box_labels")) if source == "column" and \
        _present(row.get("box_labels")) else []
    return [str(given[i]) if i < len(given) and _present(given[i]) and str(given[i]) else
            fallback for i in range(n)]


def valid_boxes(boxes: list[list[float]], labels: list[str]
                ) -> tuple[list[list[float]], list[str]]:
    """Boxes with positive width and height (and four numbers), with their labels."""
    kept = [(b, label) for b, label in zip(boxes, labels, strict=True)
            if len(b) == 4 and b[2] > 0 and b[3] > 0]
    return [b for b, _ in kept], [label for _, label in kept]


def split_classes(rows: pd.DataFrame, settings: BoxesConfig) -> list[str]:
    """The sorted box classes of ``rows`` (masks are not read: a mask's boxes take the row's
    class, so only rows whose boxes come from the column are looked into)."""
    if settings.labels == LESION:
        return [LESION]
    classes: set[str] = set()
    for (_, row), source in zip(rows.iterrows(), box_sources(rows, settings.source),
                                strict=True):
        if source == "mask":
            classes.add(row_label(row))
        else:
            boxes = column_boxes(row.get("boxes"))
            classes.update(valid_boxes(boxes, box_labels(row, len(boxes), source,
                                                         settings.labels))[1])
    return sorted(classes)


def truth_boxes(row: pd.Series, manifest, settings: BoxesConfig
                ) -> tuple[list[list[float]], list[str]]:
    """The ground-truth boxes (full-size image pixels) and classes of one manifest row."""
    from dermml.data.images import load_mask

    source = box_source(row, settings.source)
    if source == "mask":
        boxes = mask_boxes(load_mask(manifest.resolve(row["mask_uri"])), settings.min_area)
    else:
        boxes = column_boxes(row.get("boxes"))
    return valid_boxes(boxes, box_labels(row, len(boxes), source, settings.labels))


def scale_boxes(boxes, sx: float, sy: float) -> np.ndarray:
    """[x, y, w, h] boxes (N, 4) scaled by ``sx`` horizontally and ``sy`` vertically."""
    out = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    out[:, [0, 2]] *= sx
    out[:, [1, 3]] *= sy
    return out


def xywh_to_xyxy(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes) -> np.ndarray:
    b = np.asarray(boxes, np.float32).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)
