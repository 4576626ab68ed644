"""What a training run reports while it trains, in-process or from Ray's rank 0: metrics into
its MLflow run, one console line per epoch, and the loss-curve plot, rewritten every epoch so
that a killed run still has one. Under Ray the epoch's speed is also a Ray metric, which Ray's
metrics agent exports to Prometheus (``ray_dermml_*``, the training panels of the Grafana
dashboard in charts/dermml/dashboards/)."""

from __future__ import annotations

import logging
import sys

from dermml.orchestration import tracking
from dermml.training.loop import Hooks

log = logging.getLogger(__name__)

LOSS_CURVE_ARTIFACT = "plots/loss_curve.png"

RAY_GAUGES = {
    "epoch_seconds": "Wall-clock seconds of the last training epoch (a GAN: of the last tick).",
    "steps_per_second": "Optimizer steps per second in the last epoch.",
    "sec_per_kimg": "GAN training: seconds per thousand real images shown, last tick.",
    "kimg": "GAN training: thousands of real images shown so far.",
    "epoch": "Index of the last finished epoch.",
}
"""Exported as ray_dermml_<name>{mlflow_run_id=...} by the node's Ray metrics agent (:8080)."""


def ray_gauges(run_id: str):
    """A function that sets DermML's training gauges from an epoch's metrics, when this process
    is part of a Ray cluster (a Ray Train worker); None otherwise."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.util.metrics import Gauge

        gauges = {name: Gauge(f"dermml_{name}", description=text, tag_keys=("mlflow_run_id",))
                  for name, text in RAY_GAUGES.items()}
    except Exception as exc:  # metrics are never worth a training run
        log.warning("no Ray training metrics: %s", exc)
        return None
    tags = {"mlflow_run_id": run_id}

    def record(metrics: dict[str, float]) -> None:
        values = dict(metrics)
        if metrics.get("optimizer_steps") and metrics.get("epoch_seconds"):
            values["steps_per_second"] = metrics["optimizer_steps"] / metrics["epoch_seconds"]
        for name, gauge in gauges.items():
            if name in values:
                gauge.set(float(values[name]), tags=tags)

    return record


def epoch_line(epoch: int, epochs: int, metrics: dict[str, float], gate_metric: str) -> str:
    """``epoch 3/10  train_loss 0.4123  val_dice 0.7812  12.3 s``"""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    if "kimg" in metrics:  # a GAN's epoch is a tick of its kimg schedule
        parts.append(f"kimg {metrics['kimg']:.1f}")
    parts.append(f"train_loss {metrics['train_loss']:.4f}")
    gate = metrics.get(f"val_{gate_metric}")
    if gate is not None:
        parts.append(f"val_{gate_metric} {gate:.4f}")
    parts.append(f"{metrics['epoch_seconds']:.1f} s")
    return "  ".join(parts)


def training_hooks(run_id: str, epochs: int, gate_metric: str, uri: str = "",
                   console: bool = True) -> Hooks:
    """Hooks of the training loop that report into the MLflow run ``run_id`` (``uri``: its
    tracking URI, for processes whose environment does not name it) and, with ``console``,
    print one line per epoch to stderr (stdout stays the command's result)."""
    run = tracking.RunLog(run_id, uri)
    gauges = ray_gauges(run_id)

    def on_step(step: int, metrics: dict[str, float]) -> None:
        run.metrics(metrics, step)

    def on_epoch_end(epoch: int, metrics: dict[str, float]) -> None:
        run.metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        if console:  # not print(): Ray Train's worker print() logs it a second time
            sys.stderr.write(epoch_line(epoch, epochs, metrics, gate_metric) + "\n")
            sys.stderr.flush()
        log_loss_curve(run, gate_metric)
        if gauges is not None:
            try:
                gauges(metrics)
            except Exception as exc:
                log.warning("could not export the epoch's Ray metrics: %s", exc)

    def on_image(artifact_file: str, image) -> None:
        try:
            run.image(image, artifact_file)
        except Exception as exc:  # an image is never worth a training run
            log.warning("could not log %s to run %s: %s", artifact_file, run.run_id, exc)

    def on_artifact(artifact_file: str, data: bytes) -> None:
        try:
            run.file(data, artifact_file)
        except Exception as exc:  # a snapshot upload is never worth a training run
            log.warning("could not log %s to run %s: %s", artifact_file, run.run_id, exc)

    return Hooks(on_step=on_step, on_epoch_end=on_epoch_end, on_image=on_image,
                 on_artifact=on_artifact, on_tags=run.tags)


def log_loss_curve(run: tracking.RunLog, gate_metric: str) -> None:
    """Draw the run's train loss and validation gate metric per epoch, as logged so far, into
    ``plots/loss_curve.png``. A plot is never worth a training run: failures only warn."""
    from dermml.visualization import loss_curve_figure

    val_name = f"val_{gate_metric}"
    try:
        figure = loss_curve_figure(run.history("train_loss"), run.history(val_name), val_name)
        run.figure(figure, LOSS_CURVE_ARTIFACT)
    except Exception as exc:  # an artifact store hiccup must not stop training
        log.warning("could not update %s of run %s: %s", LOSS_CURVE_ARTIFACT, run.run_id, exc)
