"""Percentile bootstrap confidence intervals over samples (images, patients, cases)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

# Index matrices are drawn in chunks of about this many entries: fast, and bounded in memory.
_CHUNK_ENTRIES = 4_000_000


def resample_indices(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Chunks of rows, each row ``n`` indices drawn with replacement; ``n_resamples`` rows in
    all. The rows depend only on (n, n_resamples, seed)."""
    rng = np.random.default_rng(seed)
    rows = max(1, _CHUNK_ENTRIES // n)
    for start in range(0, n_resamples, rows):
        yield rng.integers(0, n, size=(min(rows, n_resamples - start), n))


def _check(n: int, n_resamples: int, alpha: float) -> None:
    if n < 1:
        raise ValueError("bootstrap needs at least one sample, got n=0")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha} (0.05 gives a 95% interval)")


def _interval(point: float, stats: np.ndarray, alpha: float) -> tuple[float, float, float]:
    stats = stats[~np.isnan(stats)]
    if not stats.size:
        return point, float("nan"), float("nan")
    lo, hi = np.percentile(stats, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return point, float(lo), float(hi)


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, n_resamples: int = 1000,
                 alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
    """(point estimate, lower, upper): ``statistic`` of all indices, and the percentile
    (1 - alpha) interval of ``statistic`` over index resamples with replacement.

    ``statistic`` takes an index array into the caller's data, so paired or multi-array
    statistics (AUC of labels and scores) resample whole samples. Resamples where it is NaN
    (e.g. AUC of a resample with one class) are skipped; none left gives a NaN interval.
    """
    _check(n, n_resamples, alpha)
    point = float(statistic(np.arange(n)))
    stats = [float(statistic(row)) for chunk in resample_indices(n, n_resamples, seed)
             for row in chunk]
    return _interval(point, np.asarray(stats), alpha)


def mean_ci(values: np.ndarray, n_resamples: int = 1000, alpha: float = 0.05,
            seed: int = 0) -> tuple[float, float, float]:
    """Bootstrap CI of the mean of ``values``, vectorised. NaN values (e.g. HD95 of an image
    with an empty mask) are dropped first; none left gives (NaN, NaN, NaN). Equals
    ``bootstrap_ci(lambda i: values[i].mean(), len(values), ...)`` on NaN-free values."""
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    if not values.size:
        return float("nan"), float("nan"), float("nan")
    _check(values.size, n_resamples, alpha)
    means = np.concatenate([values[chunk].mean(1)
                            for chunk in resample_indices(values.size, n_resamples, seed)])
    return _interval(float(values.mean()), means, alpha)


def bootstrap_metrics(statistics: Callable[[np.ndarray], dict[str, float]], n: int,
                      n_resamples: int = 1000, alpha: float = 0.05,
                      seed: int = 0) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every metric a dataset-level scorer returns, from the same index
    resamples (so the intervals of different metrics are paired).

    A metric missing from a resample's result, or NaN there, is skipped for that resample; a
    metric never defined gets (NaN, NaN). Keys are those of ``statistics`` on all samples.
    """
    _check(n, n_resamples, alpha)
    keys = list(statistics(np.arange(n)))
    stats: dict[str, list[float]] = {k: [] for k in keys}
    for chunk in resample_indices(n, n_resamples, seed):
        for row in chunk:
            result = statistics(row)
            for k in keys:
                stats[k].append(float(result.get(k, np.nan)))
    return {k: _interval(np.nan, np.asarray(v), alpha)[1:] for k, v in stats.items()}
