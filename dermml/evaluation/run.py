"""The evaluation stage: a model URI and a manifest in, metrics per split logged to MLflow.

The model is loaded as its MLflow pyfunc and predicts through the same code path as serving, so
thresholds and post-processing cannot differ between evaluation and production.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlflow

from dermml.data.images import load_image
from dermml.data.manifest import read_manifest
from dermml.orchestration import tracking
from dermml.visualization import image_grid, overlay_boundaries


@dataclass
class EvaluationResult:
    run_id: str
    task: str
    dataset_version: str
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """split -> metric -> value."""


def load_python_model(model_uri: str):
    """The ``DermmlModel`` behind a ``runs:/`` or ``models:/`` URI."""
    tracking.configure()
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def evaluate(model_uri: str, manifest_uri: str, splits: list[str] | None = None,
             parent_run_id: str | None = None) -> EvaluationResult:
    """Evaluate ``model_uri`` on each split of ``manifest_uri``; log metrics, tables, overlays."""
    from dermml.registry.gate import record_evaluation

    splits = splits or ["test"]
    manifest = read_manifest(manifest_uri)
    split_rows = {s: manifest.split(s) for s in splits}  # fail on an empty split before loading
    model = load_python_model(model_uri)
    task = model.task
    with tracking.stage_run(task.name, "evaluate", parent_run_id) as run:
        tracking.log_dataset(manifest.uri, manifest.version)
        mlflow.set_tag("dermml.model_uri", model_uri)
        result = EvaluationResult(run.info.run_id, task.name, manifest.version)
        for split, rows in split_rows.items():
            images = [load_image(manifest.resolve(u)) for u in rows["image_uri"]]
            predictions = model.predict_images(images)
            per_sample, summary = task.score(predictions, rows, manifest)
            result.metrics[split] = summary
            mlflow.log_metrics({f"{split}_{k}": v for k, v in summary.items()})
            tracking.log_table_csv(per_sample, f"evaluation/{split}_per_sample.csv")
            _log_overlays(task, images, predictions, rows, manifest, split)
        record_evaluation(model_uri, manifest.version, result.metrics, run.info.run_id)
    return result


def _log_overlays(task, images, predictions, rows, manifest, split: str, n: int = 8) -> None:
    """Worst-first prediction overlays: the cases a reviewer should look at."""
    if "mask_uri" not in rows or rows["mask_uri"].isna().all():
        return
    from dermml.data.datasets import resize_image, resize_mask
    from dermml.data.images import load_mask
    from dermml.metrics.segmentation import segmentation_scores

    scored = []
    for image, pred, uri in zip(images, predictions, rows["mask_uri"], strict=True):
        truth = load_mask(manifest.resolve(uri))
        scored.append((segmentation_scores(pred, truth)["dice"], image, truth, pred))
    scored.sort(key=lambda item: item[0])
    tiles = [overlay_boundaries(resize_image(img, 128), resize_mask(gt, 128),
                                resize_mask(pr, 128)) for _, img, gt, pr in scored[:n]]
    tracking.log_image(image_grid(tiles), f"evaluation/{split}_worst_overlays.png")
