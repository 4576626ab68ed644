"""Arms of an experiment compared on the same real test set: one table and one plot.

Each arm is an evaluation run (``evaluation.run.evaluate``) of one model on the same split; its
per-sample records (``evaluation/<split>_per_sample.csv``) are aligned by sample id, and every
arm's metrics and its difference from the baseline arm get bootstrap intervals from the same
resamples (paired: a sample drawn for one arm is drawn for all). This answers "does the
synthetic data help, by how much, with what uncertainty" for the gan-augmentation pipeline.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dermml.metrics.bootstrap import bootstrap_metrics
from dermml.orchestration import tracking


@dataclass
class Comparison:
    table: pd.DataFrame
    """One row per arm and metric: value, CI, difference from the baseline and its CI."""
    baseline: str
    metric: str
    run_id: str | None = None


def per_sample_records(evaluation_run_id: str, split: str = "test") -> pd.DataFrame:
    """The per-sample records an evaluation run logged for ``split``."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking.tracking_uri())
    path = client.download_artifacts(evaluation_run_id, f"evaluation/{split}_per_sample.csv")
    return pd.read_csv(path)


def compare_arms(task_name: str, arms: dict[str, pd.DataFrame], metric: str,
                 n_resamples: int = 1000, alpha: float = 0.05, seed: int = 0) -> Comparison:
    """Compare per-sample records of ``arms`` (name -> records; the first is the baseline;
    with one arm, its metrics and intervals alone).

    Every arm must have scored the same samples; the difference of each metric from the
    baseline is bootstrapped over the same resamples of samples."""
    from dermml.tasks import get_task

    task = get_task(task_name)
    if not arms:
        raise ValueError("no arms to compare")
    names = list(arms)
    ids = [set(df["sample_id"]) for df in arms.values()]
    if any(s != ids[0] for s in ids[1:]):
        raise ValueError("the arms were evaluated on different samples; evaluate every arm on "
                         "the same split of the same manifest")
    order = sorted(ids[0])
    aligned = {n: df.set_index("sample_id").loc[order].reset_index() for n, df in arms.items()}
    n = len(order)
    rows = []
    base = names[0]
    for name in names:
        def stats(idx, name=name):
            return task.aggregate(aligned[name].iloc[idx])

        def delta(idx, name=name):
            a, b = task.aggregate(aligned[base].iloc[idx]), task.aggregate(aligned[name].iloc[idx])
            return {k: b[k] - a[k] for k in b if k in a}

        point = stats(np.arange(n))
        change = delta(np.arange(n))
        intervals = bootstrap_metrics(stats, n, n_resamples, alpha, seed) if n_resamples else {}
        deltas = bootstrap_metrics(delta, n, n_resamples, alpha, seed) \
            if n_resamples and name != base else {}
        for key, value in point.items():
            if not np.isfinite(value):
                continue
            low, high = intervals.get(key, (np.nan, np.nan))
            d_low, d_high = deltas.get(key, (np.nan, np.nan))
            rows.append({"arm": name, "metric": key, "value": value, "ci_low": low,
                         "ci_high": high, "delta": change.get(key, np.nan),
                         "delta_ci_low": d_low, "delta_ci_high": d_high, "n": n})
    table = pd.DataFrame(rows)
    return Comparison(table, base, metric)


def comparison_figure(comparison: Comparison):
    """Bars of ``comparison.metric`` per arm with their intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison.table[comparison.table["metric"] == comparison.metric]
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(rows), 3.2))
    values = rows["value"].to_numpy()
    low = np.nan_to_num(values - rows["ci_low"].to_numpy())
    high = np.nan_to_num(rows["ci_high"].to_numpy() - values)
    ax.bar(rows["arm"], values, yerr=[low, high], capsize=4, color="#4c72b0")
    for i, (_, row) in enumerate(rows.iterrows()):
        if row["arm"] != comparison.baseline and np.isfinite(row["delta"]):
            ax.annotate(f"{row['delta']:+.3f}\n[{row['delta_ci_low']:+.3f}, "
                        f"{row['delta_ci_high']:+.3f}]", (i, row["value"]),
                        ha="center", va="bottom", fontsize=7, xytext=(0, 6),
                        textcoords="offset points")
    ax.set_ylabel(comparison.metric)
    ax.set_title(f"{comparison.metric} on the same real test set (n={int(rows['n'].iloc[0])})")
    fig.tight_layout()
    return fig


def log_comparison(comparison: Comparison, run_id: str, prefix: str = "comparison") -> None:
    """The table (CSV, Markdown), the plot and one metric per arm into run ``run_id``."""
    run = tracking.RunLog(run_id)
    buf = io.StringIO()
    comparison.table.to_csv(buf, index=False)
    run.text(buf.getvalue(), f"{prefix}/table.csv")
    run.text(comparison.table.to_markdown(index=False, floatfmt=".4f"), f"{prefix}/table.md")
    values = {}
    for _, row in comparison.table.iterrows():
        key = f"{prefix}_{row['arm']}_{row['metric']}".replace("/", "_").replace("+", "_")
        values[key] = float(row["value"])
        if np.isfinite(row["delta"]) and row["arm"] != comparison.baseline:
            values[f"{key}_delta"] = float(row["delta"])
    run.metrics(values, 0)
    with tracking.figure_guard(f"{prefix}/plot.png"):
        import matplotlib.pyplot as plt

        fig = comparison_figure(comparison)
        try:
            run.figure(fig, f"{prefix}/plot.png")
        finally:
            plt.close(fig)
