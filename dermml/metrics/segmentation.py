"""Binary segmentation metrics from per-image confusion counts, and the HD95 boundary distance.

Conventions: an empty prediction of an empty mask scores Dice = IoU = 1 (nothing to find, nothing
found); sensitivity of an empty mask and specificity of an all-lesion mask are 1 for the same
reason.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "sensitivity", "specificity", "precision", "accuracy")


def confusion(pred: np.ndarray, target: np.ndarray) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of two boolean masks of the same shape."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from mask shape {target.shape}")
    pred = pred.astype(bool)
    target = target.astype(bool)
    tp = int(np.count_nonzero(pred & target))
    fp = int(np.count_nonzero(pred & ~target))
    fn = int(np.count_nonzero(~pred & target))
    tn = int(pred.size - tp - fp - fn)
    return tp, fp, fn, tn


def _ratio(num: float, den: float) -> float:
    return 1.0 if den == 0 else num / den


def scores_from_confusion(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "precision": _ratio(tp, tp + fp),
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def segmentation_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice (F1), IoU (Jaccard), sensitivity (recall), specificity, precision and accuracy of
    one predicted mask."""
    return scores_from_confusion(*confusion(pred, target))


# ------------------------------------------------- the reference works' pooled metrics

REFERENCE_SIZE = 128
"""DermoSegDiff scores its test masks at its input size, 128 x 128."""
POOLED_REF_METRICS = ("f1", "accuracy", "dice", "precision", "specificity", "recall",
                      "jaccard")


def nearest_resize(mask: np.ndarray, size: int) -> np.ndarray:
    """``mask`` resized to ``size`` x ``size`` as PyTorch's ``interpolate(mode="nearest")``
    (and torchvision's ``Resize(NEAREST)`` of a tensor) does: output pixel i reads input pixel
    floor(i * in / out). PIL's NEAREST samples pixel centres instead, a pixel off at places."""
    rows = np.minimum((np.arange(size) * (mask.shape[0] / size)).astype(np.int64),
                      mask.shape[0] - 1)
    cols = np.minimum((np.arange(size) * (mask.shape[1] / size)).astype(np.int64),
                      mask.shape[1] - 1)
    return mask[np.ix_(rows, cols)]


def reference_confusion(pred: np.ndarray, target: np.ndarray,
                        size: int = REFERENCE_SIZE) -> tuple[int, int, int, int]:
    """(tp, fp, fn, tn) of two masks at ``size`` x ``size``, both resized the way DermoSegDiff
    resizes its ground truth (``nearest_resize``)."""
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from mask shape {target.shape}")
    return confusion(nearest_resize(pred, size), nearest_resize(target, size))


def _or_zero(num: float, den: float) -> float:
    return 0.0 if den == 0 else num / den


def reference_pooled_scores(tp: int, fp: int, fn: int, tn: int) -> dict[str, float]:
    """DermoSegDiff's test metrics from pixel counts pooled over a whole test set: its
    ``get_binary_metrics`` (src/metrics.py; torchmetrics F1Score, Accuracy, Dice, Precision,
    Specificity, Recall and JaccardIndex, binary, global average) accumulated over every test
    batch (src/testing.py). As in torchmetrics, a ratio whose denominator is 0 is 0, where this
    module's per-image conventions say 1. F1 and Dice are the same number."""
    f1 = _or_zero(2 * tp, 2 * tp + fp + fn)
    return {
        "f1": f1,
        "accuracy": _or_zero(tp + tn, tp + fp + fn + tn),
        "dice": f1,
        "precision": _or_zero(tp, tp + fp),
        "specificity": _or_zero(tn, tn + fp),
        "recall": _or_zero(tp, tp + fn),
        "jaccard": _or_zero(tp, tp + fp + fn),
    }


def mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over images (the per-image average the reference works report)."""
    if not per_image:
        raise ValueError("no images to average")
    return {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}


def _boundary(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a 4-neighbour outside the mask (pixels on the image edge included)."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def hd95(pred: np.ndarray, target: np.ndarray,
         spacing: float | Sequence[float] = 1.0) -> float:
    """95th percentile of the symmetric boundary distances between two masks (HD95, as MedPy:
    the distances from each boundary to the other, pooled), in units of ``spacing``.

    Both masks empty: 0.0. Exactly one empty: NaN, since no distance exists; average with
    ``np.nanmean`` and report how many images were NaN.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from mask shape {target.shape}")
    pred, target = pred.astype(bool), target.astype(bool)
    if not pred.any() and not target.any():
        return 0.0
    if not pred.any() or not target.any():
        return float("nan")
    # Every boundary pixel lies in the union's bounding box, so distances there are exact.
    box = ndimage.find_objects((pred | target).astype(np.uint8))[0]
    pred_edge, target_edge = _boundary(pred[box]), _boundary(target[box])
    to_target = ndimage.distance_transform_edt(~target_edge, sampling=spacing)[pred_edge]
    to_pred = ndimage.distance_transform_edt(~pred_edge, sampling=spacing)[target_edge]
    return float(np.percentile(np.concatenate([to_target, to_pred]), 95))
