"""Dataset-level metrics of multi-class attribute label maps (ISIC 2018 task 2 style): Jaccard
accumulated over all images, and pixel-level one-vs-rest ROC-AUC on a seeded pixel sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dermml.metrics.classification import one_vs_rest_auc


def _class_counts(labels: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    labels = np.asarray(labels).ravel()
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{what} has label {labels.max() if labels.min() >= 0 else labels.min()} "
                         f"outside 0..{n_classes - 1} ({n_classes} classes)")
    return np.bincount(labels.astype(np.int64), minlength=n_classes)


def per_class_jaccard(preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_classes: int,
                      ignore: Sequence[int] = (0,)) -> dict[int, float]:
    """Jaccard of each class over the whole dataset: sum of intersections / sum of unions.

    Summing before dividing (as the ISIC 2018 task 2 leaderboard) lets images without an
    attribute count through their false positives only. A class absent from every target and
    every prediction is NaN. Classes in ``ignore`` (background) are left out.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions but {len(targets)} targets")
    inter = np.zeros(n_classes, np.int64)
    union = np.zeros(n_classes, np.int64)
    for i, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        if pred.shape != target.shape:
            raise ValueError(f"image {i}: prediction shape {pred.shape} differs from target "
                             f"shape {target.shape}")
        p = _class_counts(pred, n_classes, f"prediction {i}")
        t = _class_counts(target, n_classes, f"target {i}")
        both = _class_counts(pred[pred == target], n_classes, f"prediction {i}")
        inter += both
        union += p + t - both
    return jaccard_from_counts(inter, union, ignore)


def jaccard_from_counts(inter: Sequence[float], union: Sequence[float],
                        ignore: Sequence[int] = (0,)) -> dict[int, float]:
    """Jaccard per class from summed intersections and unions; NaN for a class absent from every
    target and prediction (union 0). The one definition training, evaluation and the metric
    functions share."""
    return {c: float(inter[c] / union[c]) if union[c] else float("nan")
            for c in range(len(union)) if c not in ignore}


def mean_jaccard(per_class: dict[int, float] | Sequence[float]) -> float:
    """Mean over the classes that occur (NaN ones left out); NaN when none occurs."""
    values = np.asarray(list(per_class.values() if isinstance(per_class, dict) else per_class),
                        dtype=float)
    values = values[np.isfinite(values)]
    return float(values.mean()) if values.size else float("nan")


def _pixel_sample(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_classes: int,
                  max_pixels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels, C) scores and (pixels,) labels, a uniform sample of at most ~max_pixels over the
    dataset, taken image by image so the full set is never held in memory."""
    total = sum(t.size for t in targets)
    fraction = min(1.0, max_pixels / max(total, 1))
    rng = np.random.default_rng(seed)
    scores, labels = [], []
    for i, (prob, target) in enumerate(zip(probs, targets, strict=True)):
        if prob.shape != (n_classes, *target.shape):
            raise ValueError(f"image {i}: probabilities of shape {prob.shape} do not match "
                             f"{n_classes} classes of a {target.shape} target; expected (C, H, W)")
        flat_prob, flat_target = prob.reshape(n_classes, -1), target.ravel()
        if fraction < 1.0:
            keep = rng.choice(target.size, int(round(fraction * target.size)), replace=False)
            flat_prob, flat_target = flat_prob[:, keep], flat_target[keep]
        scores.append(flat_prob.T.astype(np.float32))
        labels.append(flat_target.astype(np.int64))
    return np.concatenate(scores), np.concatenate(labels)


def per_class_auc(probs: Sequence[np.ndarray], targets: Sequence[np.ndarray], n_classes: int,
                  max_pixels: int = 200_000, seed: int = 0,
                  ignore: Sequence[int] = (0,)) -> dict[int, float]:
    """Pixel-level one-vs-rest ROC-AUC of each class's probability map, on a seeded uniform
    sample of at most ``max_pixels`` pixels of the dataset.

    The sample is uniform over pixels (not stratified by class): the "rest" of a class is then
    the same mixture as in the data. A class absent from the sampled pixels is NaN. Classes in
    ``ignore`` (background) are left out.
    """
    if len(probs) != len(targets):
        raise ValueError(f"{len(probs)} probability maps but {len(targets)} targets")
    if not probs:
        raise ValueError("no images to score")
    scores, labels = _pixel_sample(probs, targets, n_classes, max_pixels, seed)
    classes = [c for c in range(n_classes) if c not in ignore]
    aucs = one_vs_rest_auc(labels, scores, n_classes, classes)
    return {c: float(aucs[c]) for c in classes}
