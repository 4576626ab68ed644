"""The evaluation stage: a model URI and a manifest in, metrics with bootstrap CIs per split out.

The model is loaded as its MLflow pyfunc and predicts through the same code path as serving, so
thresholds and post-processing cannot differ between evaluation and production. Confidence
intervals resample samples (with replacement) and recompute the task's dataset-level metrics.
Every metric is also reported per skin-tone group (``evaluation.skin_tone``).
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
from dermml.evaluation.skin_tone import (
    ITA,
    ITA_COLUMN,
    MIN_GROUP_SIZE,
    GroupScores,
    group_figure,
    group_label,
    group_markdown,
    group_metrics,
    group_table,
    sample_skin_tones,
    skin_type_column,
    stratify,
)
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
    groups: dict[str, list[GroupScores]] = field(default_factory=dict)
    """split -> the metrics per skin-tone group (ITA groups, and the manifest's skin-type
    column when it has one); empty for tasks scored as a set (the GAN)."""
    min_group_size: int = MIN_GROUP_SIZE
    """Groups with fewer images are reported as too few (count, no metrics)."""

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

    def group_table(self) -> pd.DataFrame:
        """Every split's metrics per skin-tone group: split, stratifier, group, n, status
        (reported / too few), metric, value, ci_low, ci_high."""
        tables = [group_table(split, scores, list(self.metrics.get(split, {})))
                  for split, scores in self.groups.items()]
        return pd.concat(tables, ignore_index=True) if tables else group_table("", [], [])


def evaluate(model_uri: str, manifest_uri: str, splits: list[str] | None = None,
             parent_run_id: str | None = None, n_resamples: int = 1000,
             alpha: float = 0.05, seed: int = 0,
             params: dict | None = None, min_group_size: int = MIN_GROUP_SIZE,
             skin_type: str | None = None) -> EvaluationResult:
    """Evaluate ``model_uri`` on each split of ``manifest_uri``; log metrics, CIs, plots.

    Each metric is also reported per ITA skin-tone group of the test images and per value of
    the manifest's skin-type column (``skin_type``, default: the first of
    ``evaluation.skin_tone.SKIN_TYPE_COLUMNS`` present); groups with fewer than
    ``min_group_size`` images are reported as too few.

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
    skin_column = skin_type_column(manifest, skin_type) if task.scores_per_sample else None
    with tracking.stage_run(task.name, "evaluate", parent_run_id) as run:
        tracking.log_dataset(manifest.uri, manifest.version)
        tracking.set_tags({"dermml.model_uri": model_uri})
        tracking.log_params({"n_resamples": n_resamples, "alpha": alpha, "splits": ",".join(splits),
                           "min_group_size": min_group_size, "skin_type_column": skin_column or "",
                           **{f"serving.{k}": v for k, v in (params or {}).items()}})
        result = EvaluationResult(run.info.run_id, task.name, manifest.version,
                                  model_uri=model_uri, params=dict(params or {}),
                                  min_group_size=min_group_size)
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
            # The skin tone of each test image, for the metrics per group.
            tones = sample_skin_tones(images, rows, manifest)
            per_sample["ita"] = tones["ita"].to_numpy()
            per_sample[ITA_COLUMN] = tones[ITA_COLUMN].to_numpy()
            stratifiers = {ITA: ITA_COLUMN}
            if skin_column:
                per_sample[skin_column] = [group_label(v) for v in rows[skin_column]]
                stratifiers[skin_column] = skin_column
            result.metrics[split] = task.aggregate(per_sample)
            result.intervals[split] = bootstrap_metrics(
                lambda idx, ps=per_sample: task.aggregate(ps.iloc[idx]), len(per_sample),
                n_resamples, alpha, seed) if n_resamples else {}
            result.groups[split] = stratify(per_sample, task.aggregate, stratifiers,
                                            min_group_size, n_resamples, alpha, seed)
            _log_split(split, result, per_sample)
            _log_groups(split, result, task.gate_metric)
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
    # Columns of arrays (the attributes task's AUC pixels) stay out; text (groups) stays in.
    flat = per_sample.drop(columns=[c for c in per_sample if per_sample[c].dtype == object
                                    and not per_sample[c].map(_is_text).all()],
                           errors="ignore")
    tracking.log_table_csv(flat, f"evaluation/{split}_per_sample.csv")


def _is_text(value) -> bool:
    return value is None or isinstance(value, str)


def _log_groups(split: str, result: EvaluationResult, gate_metric: str) -> None:
    """The metrics per skin-tone group of ``split``: MLflow metrics, a CSV and Markdown table,
    and a figure of the gate metric by group."""
    scores, metrics = result.groups[split], list(result.metrics[split])
    tracking.log_metrics(group_metrics(split, scores, metric_key))
    tracking.log_table_csv(group_table(split, scores, metrics),
                           f"evaluation/{split}_by_skin_tone.csv")
    tracking.log_text(group_markdown(scores, metrics, result.min_group_size),
                      f"evaluation/{split}_by_skin_tone.md")
    artifact = f"evaluation/{split}_{gate_metric.replace('/', '_')}_by_skin_tone.png"
    with tracking.figure_guard(artifact):
        _log_figure(group_figure(split, scores, gate_metric, result.min_group_size), artifact)


def _log_figure(figure, artifact_file: str) -> None:
    if isinstance(figure, np.ndarray):
        tracking.log_image(figure, artifact_file)
        return
    import matplotlib.pyplot as plt

    try:
        tracking.log_figure(figure, artifact_file)
    finally:
        plt.close(figure)
