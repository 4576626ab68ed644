"""Metrics of the multitask heads from per-sample sums, so that validation (summed on device),
evaluation (per-sample records, bootstrapped) and every resample share one definition.

Per sample: lesion Dice and IoU (per-image mean, as the segmentation task); per class of the
lesion / skin / non-skin map and of the anatomy map, intersections and unions (Jaccard over
the whole set, as ``metrics.attributes``) and pixel counts; for depth over the pixels of known
depth, sums of the absolute relative error, the squared error and the pixels within a factor
1.25 of the truth (Eigen et al.'s abs-rel, RMSE and delta < 1.25).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from dermml.metrics.attributes import jaccard_from_counts, mean_jaccard

DEPTH_SUMS = ("abs_rel_sum", "sq_sum", "delta1", "n")


def class_counts(pred: np.ndarray, truth: np.ndarray, n_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(intersection, union) per class of two label maps of the same shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target {truth.shape}")
    pred, truth = pred.astype(np.int64).ravel(), truth.astype(np.int64).ravel()
    inter = np.bincount(pred[pred == truth], minlength=n_classes)[:n_classes]
    union = np.bincount(pred, minlength=n_classes)[:n_classes] + \
        np.bincount(truth, minlength=n_classes)[:n_classes] - inter
    return inter, union


def depth_sums(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Error sums of predicted depth against the truth over the pixels of known truth (> 0)."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from target {truth.shape}")
    valid = truth > 0
    p, t = np.maximum(pred[valid].astype(np.float64), 1e-6), truth[valid].astype(np.float64)
    return {"abs_rel_sum": float((np.abs(p - t) / t).sum()),
            "sq_sum": float(((p - t) ** 2).sum()),
            "delta1": float((np.maximum(p / t, t / p) < 1.25).sum()),
            "n": float(valid.sum())}


def class_metrics(prefix: str, names: Sequence[str], inter: Sequence[float],
                  union: Sequence[float], pixels: float) -> dict[str, float]:
    """``<prefix>_miou`` (mean over the classes present), ``<prefix>_pixel_accuracy`` and
    ``<prefix>_iou/<name>`` per class present, from summed counts."""
    inter, union = np.asarray(inter, float), np.asarray(union, float)
    per_class = jaccard_from_counts(inter, union, ignore=())
    out = {f"{prefix}_miou": mean_jaccard(per_class),
           f"{prefix}_pixel_accuracy": float(inter.sum() / pixels) if pixels else float("nan")}
    out.update({f"{prefix}_iou/{name}": value for name, value in zip(names, per_class.values(),
                                                                       strict=True)
                if np.isfinite(value)})
    return out


def depth_metrics(sums: Mapping[str, float]) -> dict[str, float]:
    """abs-rel, RMSE (metres) and delta < 1.25 of summed ``depth_sums``."""
    n = float(sums["n"])
    if not n:
        return {}
    return {"depth_abs_rel": float(sums["abs_rel_sum"]) / n,
            "depth_rmse": float(np.sqrt(float(sums["sq_sum"]) / n)),
            "depth_delta1": float(sums["delta1"]) / n}
