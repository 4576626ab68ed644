"""Drift between a batch and a reference manifest: per-feature statistics, a table and a plot.

Numeric features (size, colour, lesion fraction) are compared with the two-sample
Kolmogorov-Smirnov statistic (the largest gap between the two cumulative distributions, 0..1),
label frequencies with the Jensen-Shannon distance (base 2, 0..1). Both are effect sizes, so
thresholds mean the same at 100 and at 100,000 samples; the KS p-value is reported alongside.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.spatial.distance import jensenshannon
from scipy.stats import ks_2samp

from dermml.validation.suite import Drift

LABELS = "label"


def _numeric(table: pd.DataFrame, feature: str) -> np.ndarray:
    if feature not in table.columns:
        return np.empty(0)
    return pd.to_numeric(table[feature], errors="coerce").dropna().to_numpy(dtype=float)


def drift_table(reference: pd.DataFrame, batch: pd.DataFrame, cfg: Drift) -> pd.DataFrame:
    """One row per feature: statistic, p-value, medians and counts (features absent are left
    out)."""
    rows = []
    for feature in cfg.features:
        ref, new = _numeric(reference, feature), _numeric(batch, feature)
        if not ref.size or not new.size:
            continue
        test = ks_2samp(ref, new)
        rows.append({"feature": feature, "kind": "numeric", "statistic_name": "KS",
                     "statistic": float(test.statistic), "ks_statistic": float(test.statistic),
                     "label_js_distance": np.nan, "p_value": float(test.pvalue),
                     "reference_median": _round(np.median(ref)),
                     "batch_median": _round(np.median(new)),
                     "n_reference": int(ref.size), "n_batch": int(new.size)})
    ref_freq, new_freq = label_frequencies(reference, batch)
    if ref_freq.sum() and new_freq.sum():
        distance = float(jensenshannon(ref_freq, new_freq, base=2))
        rows.append({"feature": LABELS, "kind": "labels", "statistic_name": "JS",
                     "statistic": distance, "ks_statistic": np.nan,
                     "label_js_distance": distance, "p_value": np.nan,
                     "reference_median": str(ref_freq.idxmax()),
                     "batch_median": str(new_freq.idxmax()),
                     "n_reference": int(reference["label"].notna().sum()),
                     "n_batch": int(batch["label"].notna().sum())})
    columns = ["feature", "kind", "statistic_name", "statistic", "ks_statistic",
               "label_js_distance", "p_value", "reference_median", "batch_median",
               "n_reference", "n_batch"]
    return pd.DataFrame(rows, columns=columns)


def _round(value: float) -> float:
    return float(round(value, 4))


def label_frequencies(reference: pd.DataFrame,
                      batch: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Label shares of both tables over the union of their labels."""
    ref = reference["label"].dropna().value_counts()
    new = batch["label"].dropna().value_counts()
    labels = sorted(set(ref.index) | set(new.index))
    ref, new = ref.reindex(labels, fill_value=0), new.reindex(labels, fill_value=0)
    return ref / max(ref.sum(), 1), new / max(new.sum(), 1)


def drift_summary(table: pd.DataFrame, cfg: Drift, reference_uri: str) -> dict:
    """The drift section of the report: per feature statistic, threshold and verdict."""
    features = []
    for row in table.to_dict("records"):
        limit = cfg.limit(row["kind"])
        features.append({"feature": row["feature"], "statistic": row["statistic_name"],
                         "value": round(row["statistic"], 4), "threshold": limit,
                         "p_value": None if pd.isna(row["p_value"]) else row["p_value"],
                         "reference_median": row["reference_median"],
                         "batch_median": row["batch_median"],
                         "drifted": bool(row["statistic"] > limit)})
    drifted = [f["feature"] for f in features if f["drifted"]]
    return {"reference_uri": reference_uri, "passed": not drifted, "drifted": drifted,
            "features": features}


def plot_drift(reference: pd.DataFrame, batch: pd.DataFrame, table: pd.DataFrame, cfg: Drift,
               path: str) -> str:
    """Histograms (reference vs. batch) per feature and label bars, verdicts in the titles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table.to_dict("records")
    cols = 4
    n_rows = max(1, -(-len(rows) // cols))
    fig, axes = plt.subplots(n_rows, cols, figsize=(4 * cols, 3 * n_rows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        limit = cfg.limit(row["kind"])
        drifted = row["statistic"] > limit
        if row["kind"] == "labels":
            ref, new = label_frequencies(reference, batch)
            x = np.arange(len(ref))
            ax.bar(x - 0.2, ref.to_numpy(), 0.4, label="reference")
            ax.bar(x + 0.2, new.to_numpy(), 0.4, label="batch")
            ax.set_xticks(x, [str(i) for i in ref.index], rotation=30, fontsize=7)
        else:
            ref, new = _numeric(reference, row["feature"]), _numeric(batch, row["feature"])
            lo, hi = min(ref.min(), new.min()), max(ref.max(), new.max())
            bins = np.linspace(lo, hi if hi > lo else lo + 1, 30)
            ax.hist(ref, bins, density=True, alpha=0.5, label="reference")
            ax.hist(new, bins, density=True, alpha=0.5, label="batch")
        ax.set_title(f"{row['feature']}: {row['statistic_name']} {row['statistic']:.3f} "
                     f"({'>' if drifted else '<='} {limit:g})", fontsize=9,
                     color="red" if drifted else "black")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
