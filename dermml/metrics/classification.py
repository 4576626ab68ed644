"""Multi-class classification metrics from labels and predicted probabilities.

A per-class score that is undefined on the data (recall of a class with no samples, precision of
a class never predicted, AUC of a class absent from the labels) is NaN, and macro averages skip
NaN classes instead of counting them as 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from sklearn.metrics import roc_auc_score


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(n_classes, n_classes) counts, rows = true class, columns = predicted class."""
    y_true, y_pred = np.asarray(y_true).ravel(), np.asarray(y_pred).ravel()
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{y_true.size} labels but {y_pred.size} predictions")
    for name, y in (("label", y_true), ("prediction", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= n_classes):
            raise ValueError(f"{name} {y.min() if y.min() < 0 else y.max()} is outside "
                             f"0..{n_classes - 1} ({n_classes} classes)")
    flat = n_classes * y_true.astype(np.int64) + y_pred.astype(np.int64)
    return np.bincount(flat, minlength=n_classes**2).reshape(n_classes, n_classes)


def nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values; NaN (without a warning) when there are none."""
    values = np.asarray(values, dtype=np.float64)
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    num, den = num.astype(np.float64), den.astype(np.float64)
    out = np.full_like(num, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def one_vs_rest_auc(y_true: np.ndarray, probs: np.ndarray, n_classes: int,
                    classes: Iterable[int] | None = None) -> np.ndarray:
    """ROC-AUC of ``probs[:, c]`` separating class c from the rest, for ``classes`` (default
    all; the others stay NaN); NaN where only one side exists (class absent, or every sample of
    that class)."""
    aucs = np.full(n_classes, np.nan)
    for c in range(n_classes) if classes is None else classes:
        positive = y_true == c
        if 0 < positive.sum() < positive.size:
            aucs[c] = roc_auc_score(positive, probs[:, c])
    return aucs


def _check_inputs(y_true: np.ndarray, probs: np.ndarray, class_names: list[str]) -> None:
    if probs.ndim != 2 or probs.shape[1] != len(class_names):
        raise ValueError(f"probabilities of shape {probs.shape} do not match "
                         f"{len(class_names)} classes {class_names}; expected (N, C)")
    if y_true.shape != (probs.shape[0],):
        raise ValueError(f"labels of shape {y_true.shape} do not match {probs.shape[0]} "
                         "rows of probabilities")
    if y_true.size == 0:
        raise ValueError("no samples to score")


def classification_metrics(y_true: np.ndarray, probs: np.ndarray,
                           class_names: list[str]) -> dict[str, float]:
    """Accuracy, balanced accuracy, macro F1, macro one-vs-rest ROC-AUC, and per class
    ``precision/<name>``, ``recall/<name>``, ``f1/<name>``, ``specificity/<name>``,
    ``roc_auc/<name>``. The prediction is the argmax of ``probs``."""
    y_true, probs = np.asarray(y_true).astype(np.int64), np.asarray(probs)
    _check_inputs(y_true, probs, class_names)
    n = len(class_names)
    cm = confusion_matrix(y_true, probs.argmax(1), n)
    tp = np.diag(cm)
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    tn = cm.sum() - tp - fp - fn
    recall = _ratio(tp, tp + fn)
    per_class = {
        "precision": _ratio(tp, tp + fp),
        "recall": recall,
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "specificity": _ratio(tn, tn + fp),
        "roc_auc": one_vs_rest_auc(y_true, probs, n),
    }
    out = {
        "accuracy": float(tp.sum() / cm.sum()),
        "balanced_accuracy": nanmean(recall),
        "macro_f1": nanmean(per_class["f1"]),
        "roc_auc_macro": nanmean(per_class["roc_auc"]),
    }
    for metric, values in per_class.items():
        out.update({f"{metric}/{name}": float(v) for name, v in zip(class_names, values,
                                                                      strict=True)})
    return out
