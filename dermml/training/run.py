"""The training stage: config + manifest URI in, a tracked MLflow run with a logged model out."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dermml.config import dermml_home, load_config
from dermml.orchestration import tracking
from dermml.orchestration.training_hooks import log_loss_curve, training_hooks
from dermml.tasks import get_task
from dermml.tasks.base import TaskConfig
from dermml.training.checkpoint import FolderCheckpointer
from dermml.training.inputs import TrainingInputs, training_inputs
from dermml.training.loop import FitResult
from dermml.training.setup import build_parts, default_device, run_loop

if TYPE_CHECKING:
    from dermml.orchestration.platform import PlatformConfig

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    run_id: str
    model_uri: str
    metrics: dict[str, float]


def resolve_config(task_name: str, config_path: str | None = None,
                   overrides: list[str] | None = None,
                   resume_run_id: str | None = None,
                   synthetic_manifest: str = "") -> TaskConfig:
    """Defaults < the resumed run's config (when no file is given) < file < overrides.

    ``synthetic_manifest`` (e.g. the synthesis pipeline's output) is mixed into training
    through the task's ``mix`` settings."""
    task = get_task(task_name)
    base: dict = {"task": task_name}
    if resume_run_id and not config_path:
        base = tracking.config_from_run(resume_run_id)
    overrides = list(overrides or [])
    if synthetic_manifest:
        overrides.append(f"mix.synthetic_manifest={synthetic_manifest}")
    return load_config(task.config_cls, config_path, overrides, base=base)


def train(task_name: str, cfg: TaskConfig, parent_run_id: str | None = None,
          resume_run_id: str | None = None, progress: bool = True,
          platform: PlatformConfig | None = None) -> TrainOutcome:
    """Train ``task_name`` with ``cfg`` (through Ray unless ``cfg.ray.enabled`` is false).

    ``platform`` (the train stage's, or ``dermml train --platform``): the workers must fit its
    pools, and with ``ray_job.enabled`` training is submitted as a KubeRay RayJob. None trains
    here.
    """
    task = get_task(task_name)
    as_rayjob = platform is not None and platform.ray_job.enabled
    if platform is not None:
        from dermml.orchestration.platform import check_training_fits

        check_training_fits(platform, cfg.ray, f"task {task_name!r}")
    if as_rayjob:
        from dermml.orchestration.rayjob import check_config

        check_config(cfg)
    # The manifest is read and the datasets built here, once (see training/inputs.py); a
    # resumed run keeps the config it was logged with.
    inputs = training_inputs(task, cfg, prepare=resume_run_id is None)
    inputs.check_files()
    cfg, manifest = inputs.cfg, inputs.manifest
    if getattr(cfg.model, "pretrained", ""):
        task.build_model(cfg)  # a missing or mismatched weights file fails here, not in a worker
    tracking_uri = tracking.configure()
    with tracking.stage_run(task_name, "train", parent_run_id, run_id=resume_run_id,
                            system_metrics=True) as run:
        run_id = run.info.run_id
        if resume_run_id is None:
            # Placement (pools, images, RayJob) is the platform config's, not logged here.
            tracking.log_config(cfg)
            counts = manifest.df["split"].value_counts().to_dict()
            tracking.log_dataset(manifest.uri, manifest.version, counts, context="training")
            tracking.log_params({"seed": cfg.train.seed})
        if as_rayjob:
            return _train_as_rayjob(task_name, cfg, run_id, platform)
        # The checkpoint location is derived from the MLflow run, so rerunning with
        # --resume RUN_ID continues from the last checkpoint of that run.
        if cfg.ray.enabled:
            from dermml.orchestration.ray_train import fit_with_ray

            result = fit_with_ray(inputs, run_name=f"{task_name}-{run_id}",
                                  tracking_uri=tracking_uri, mlflow_run_id=run_id)
        else:
            result = _fit_in_process(inputs, run_id, progress)
        metrics = _final_metrics(result)
        tracking.log_metrics(metrics)
        log_loss_curve(tracking.RunLog(run_id, tracking_uri), task.gate_metric)
        model_uri = _log_model_and_preview(inputs, result)
        tracking.set_tags({"dermml.model_uri": model_uri})
    return TrainOutcome(run_id=run_id, model_uri=model_uri, metrics=metrics)


def _train_as_rayjob(task_name: str, cfg: TaskConfig, run_id: str,
                     platform: PlatformConfig) -> TrainOutcome:
    """The RayJob trains inside this run (``--resume``); read back what it logged."""
    from dermml.orchestration.rayjob import train_as_rayjob

    train_as_rayjob(task_name, cfg, run_id, platform)
    run = tracking.get_run(run_id)
    if "dermml.model_uri" not in run.data.tags:
        raise RuntimeError(f"RayJob for run {run_id} succeeded but logged no model")
    return TrainOutcome(run_id, run.data.tags["dermml.model_uri"], dict(run.data.metrics))


def _fit_in_process(inputs: TrainingInputs, run_id: str, progress: bool) -> FitResult:
    task, cfg = get_task(inputs.task), inputs.cfg
    device = default_device(cfg.ray.use_gpu)
    parts = build_parts(inputs, device)
    hooks = training_hooks(run_id, cfg.train.epochs, task.gate_metric)
    checkpoints = FolderCheckpointer(str(dermml_home() / "checkpoints" / run_id))
    return run_loop(task, cfg, parts, device, hooks, checkpoints, progress=progress)


def _final_metrics(result: FitResult) -> dict[str, float]:
    metrics = {"epochs_run": float(result.epochs_run)}
    if result.best_metric is not None:
        metrics["best_val_gate"] = float(result.best_metric)
    if result.history:
        metrics.update({f"final_{k}": float(v) for k, v in result.history[-1].items()
                        if k.startswith("val_")})
    return metrics


def _log_model_and_preview(inputs: TrainingInputs, result: FitResult) -> str:
    from dermml.serving.pyfunc import log_task_model

    task, cfg = get_task(inputs.task), inputs.cfg
    model = task.build_to_load(cfg)
    if result.best_model is None:
        raise RuntimeError("training produced no model state")
    model.load_state_dict(result.best_model)
    model.eval()
    val_ds = inputs.val_set
    with tracking.figure_guard("previews/val_predictions.png"):  # never sinks the training run
        tracking.log_image(task.preview(model, val_ds, cfg), "previews/val_predictions.png")
    example = task.request_example(cfg)
    if example is None:
        example = val_ds.load(0)[0]
    return log_task_model(inputs.task, cfg, result.best_model, example)
