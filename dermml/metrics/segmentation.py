"""Binary segmentation metrics from per-image confusion counts.

Conventions: an empty prediction of an empty mask scores Dice = IoU = 1 (nothing to find, nothing
found); sensitivity of an empty mask and specificity of an all-lesion mask are 1 for the same
reason.
"""

from __future__ import annotations

import numpy as np

METRICS = ("dice", "iou", "sensitivity", "specificity", "accuracy")


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
        "accuracy": _ratio(tp + tn, tp + fp + fn + tn),
    }


def segmentation_scores(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Dice, IoU, sensitivity, specificity and accuracy of one predicted mask."""
    return scores_from_confusion(*confusion(pred, target))


def mean_scores(per_image: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over images (the per-image average the reference works report)."""
    if not per_image:
        raise ValueError("no images to average")
    return {k: float(np.mean([s[k] for s in per_image])) for k in per_image[0]}
