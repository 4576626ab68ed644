"""The evaluation stage: a model URI and a manifest in, metrics with bootstrap CIs per split out.

The model is loaded as its MLflow pyfunc and predicts through the same code path as serving, so
thresholds and post-processing cannot differ between evaluation and production. Confidence
intervals resample samples (with replacement) and recompute the task's dataset-level metrics.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermml.data.images import load_image
from dermml.data.manifest import read_manifest
from dermml.data.splits import with_split_policy
from dermml.metrics.bootstrap import bootstrap_metrics
from dermml.orchestration import tracking


@dataclass
class EvaluationResult:
    run_id: str
    task: str
    dataset_version: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """split -> metric -> value."""
    intervals: dict[str, dict[str, tuple[float, float]]] = field(default_factory=dict)
    """split -> metric -> (low, high) bootstrap percentile interval."""
    model_uri: str = ""
    """The model evaluated (``runs:/`` or ``models:/``)."""
    params: dict = field(default_factory=dict)
    """Serving params the model predicted with (empty: as it serves by default)."""

    def flat_metrics(self) -> dict[str, float]:
        """``{split}_{metric}`` -> value for every finite metric (NaN: undefined, e.g. the
        precision of a class never predicted); names safe for MLflow and KFP."""
        return {metric_key(split, name): float(value)
                for split, values in self.metrics.items() for name, value in values.items()
                if np.isfinite(value)}

    def table(self) -> pd.DataFrame:
        rows = []
        for split, values in self.metrics.items():
            for metric, value in values.items():
                low, high = self.intervals.get(split, {}).get(metric, (np.nan, np.nan))
                rows.append({"split": split, "metric": metric, "value": value,
                             "ci_low": low, "ci_high": high})
        return pd.DataFrame(rows)


def evaluate(model_uri: str, manifest_uri: str, splits: list[str] | None = None,
             parent_run_id: str | None = None, n_resamples: int = 1000,
             alpha: float = 0.05, seed: int = 0,
             params: dict | None = None) -> EvaluationResult:
    """Evaluate ``model_uri`` on each split of ``manifest_uri``; log metrics, CIs, plots.

    The result is returned, not stored on the model version: the caller records it for the
    promotion gate (``dermml.registry.gate.record_evaluation``).
    """
    splits = splits or ["test"]
    manifest = read_manifest(manifest_uri)  # an unreadable manifest fails before loading
    model = tracking.load_python_model(model_uri)
    task = model.task
    # The splits of the model's data.split_policy (DermoSegDiff's fixed ones, or the manifest's).
    manifest = with_split_policy(manifest, model.cfg.data.split_policy,
                                 model.cfg.data.reference_order)
    split_rows = {s: manifest.split(*s.split("+")) for s in splits}  # "a+b": one pooled set
    with tracking.stage_run(task.name, "evaluate", parent_run_id) as run:
        tracking.log_dataset(manifest.uri, manifest.version)
        tracking.set_tags({"dermml.model_uri": model_uri})
        tracking.log_params({"n_resamples": n_resamples, "alpha": alpha, "splits": ",".join(splits),
                           **{f"serving.{k}": v for k, v in (params or {}).items()}})
        result = EvaluationResult(run.info.run_id, task.name, manifest.version,
                                  model_uri=model_uri, params=dict(params or {}))
        for split, rows in split_rows.items():
            images = [load_image(manifest.resolve(u)) for u in rows["image_uri"]]
            if not task.scores_per_sample:  # a generator: its samples against the split's
                result.metrics[split] = model.evaluate_set(images, params)
                result.intervals[split] = {}
                tracking.set_tags(task.evaluation_tags(model.cfg))
                _log_split(split, result, pd.DataFrame({"sample_id": rows["sample_id"]}))
                continue
            predictions = model.predict_images(images, params)
            per_sample = task.score(predictions, rows, manifest)
            result.metrics[split] = task.aggregate(per_sample)
            result.intervals[split] = bootstrap_metrics(
                lambda idx, ps=per_sample: task.aggregate(ps.iloc[idx]), len(per_sample),
                n_resamples, alpha, seed) if n_resamples else {}
            _log_split(split, result, per_sample)
            # Figures are for humans: one that cannot be drawn never sinks the evaluation.
            with tracking.figure_guard(f"evaluation/{split} figures"):
                figures = task.figures(per_sample, images, predictions, rows, manifest)
                for name, figure in figures.items():
                    with tracking.figure_guard(f"evaluation/{split}_{name}"):
                        _log_figure(figure, f"evaluation/{split}_{name}")
        table = result.table()
        tracking.log_table_csv(table, "evaluation/metrics.csv")
        tracking.log_text(table.to_markdown(index=False, floatfmt=".4f"), "evaluation/metrics.md")
    return result


def compare_settings(model_uri: str, manifest_uri: str, settings: list[dict],
                     split: str = "test", parent_run_id: str | None = None) -> pd.DataFrame:
    """Evaluate ``model_uri`` once per serving-param set on the same split, in one MLflow run:
    a table of every metric plus seconds per image, so users can pick their speed/quality
    point (e.g. DDPM-250 x 5 vs. DDIM-25 x 5 for segdiff)."""
    if not settings:
        raise ValueError("give at least one setting to compare, e.g. sampler=ddim,steps=25")
    manifest = read_manifest(manifest_uri)
    model = tracking.load_python_model(model_uri)
    task = model.task
    manifest = with_split_policy(manifest, model.cfg.data.split_policy,
                                 model.cfg.data.reference_order)
    rows = manifest.split(split)
    images = [load_image(manifest.resolve(u)) for u in rows["image_uri"]]
    records = []
    with tracking.stage_run(task.name, "compare", parent_run_id):
        tracking.log_dataset(manifest.uri, manifest.version)
        tracking.set_tags({"dermml.model_uri": model_uri, "dermml.split": split})
        for params in settings:
            label = ",".join(f"{k}={v}" for k, v in params.items()) or "defaults"
            started = time.perf_counter()
            predictions = model.predict_images(images, params)
            seconds = (time.perf_counter() - started) / max(1, len(images))
            metrics = task.aggregate(task.score(predictions, rows, manifest))
            records.append({"setting": label, **metrics, "seconds_per_image": seconds})
            key = re.sub(r"[^\w.-]+", "_", label)
            tracking.log_metrics({f"{key}/{k}".replace("/", "_"): float(v)
                                for k, v in records[-1].items()
                                if k != "setting" and np.isfinite(v)})
        table = pd.DataFrame(records)
        tracking.log_table_csv(table, "evaluation/compare.csv")
        tracking.log_text(table.to_markdown(index=False, floatfmt=".4f"), "evaluation/compare.md")
    return table


def metric_key(split: str, name: str) -> str:
    """MLflow/KFP-safe metric name of ``name`` on ``split`` (``a+b`` pooled splits: ``a.b``)."""
    return f"{split}_{name}".replace("/", "_").replace("+", ".")


def _log_split(split: str, result: EvaluationResult, per_sample: pd.DataFrame) -> None:
    values = {metric_key(split, k): v for k, v in result.metrics[split].items() if np.isfinite(v)}
    for metric, (low, high) in result.intervals[split].items():
        if np.isfinite(low) and np.isfinite(high):
            values[metric_key(split, f"{metric}_ci_low")] = low
            values[metric_key(split, f"{metric}_ci_high")] = high
    tracking.log_metrics(values)
    flat = per_sample.drop(columns=[c for c in per_sample if per_sample[c].dtype == object
                                    and c != "sample_id"], errors="ignore")
    tracking.log_table_csv(flat, f"evaluation/{split}_per_sample.csv")


def _log_figure(figure, artifact_file: str) -> None:
    if isinstance(figure, np.ndarray):
        tracking.log_image(figure, artifact_file)
        return
    import matplotlib.pyplot as plt

    try:
        tracking.log_figure(figure, artifact_file)
    finally:
        plt.close(figure)
