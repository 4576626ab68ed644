"""Ray Train adapter: runs the shared training loop in TorchTrainer workers.

Checkpoints go to ``ray.storage_path`` (local or s3://); a restarted worker group resumes from the
latest one (``FailureConfig``), and rerunning with the same run name resumes a killed run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from dermml import storage
from dermml.config import dermml_home
from dermml.orchestration.training_hooks import training_hooks
from dermml.tasks import get_task
from dermml.tasks.base import TaskConfig
from dermml.training.checkpoint import state_from_bytes
from dermml.training.inputs import TrainingInputs
from dermml.training.loop import FitResult, Hooks
from dermml.training.setup import build_parts, run_loop

STATE_FILE = "state.pt"


class RayCheckpointer:
    """Reports every epoch to Ray Train; rank 0 attaches the training state as a checkpoint.

    ``start_state`` (an object ref of a state's bytes) is where a new run starts when Ray has no
    checkpoint of its own: a Tune trial restored from its, or another trial's, checkpoint.
    """

    def __init__(self, start_state: Any = None):
        self.start_state = start_state

    def load(self) -> dict | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.start_state is None:
                return None
            import ray

            return state_from_bytes(ray.get(self.start_state))
        with checkpoint.as_directory() as folder:
            return state_from_bytes(Path(folder, STATE_FILE).read_bytes())

    def save(self, state: dict, metrics: dict[str, float]) -> None:
        import ray.train
        import torch

        with tempfile.TemporaryDirectory() as folder:
            if ray.train.get_context().get_world_rank() == 0:
                torch.save(state, Path(folder, STATE_FILE))
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
            else:
                ray.train.report(metrics)


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function: ordinary PyTorch over the shared loop.

    ``config["inputs"]``: the driver's ``TrainingInputs`` (datasets included, see
    ``training/inputs.py``); this worker only assembles its rank's loaders from them."""
    import ray.train
    import ray.train.torch

    inputs: TrainingInputs = config["inputs"]
    task, cfg = get_task(inputs.task), inputs.cfg
    device = ray.train.torch.get_device()
    context = ray.train.get_context()
    parts = build_parts(inputs, device, context.get_world_size(), context.get_world_rank())
    # Our loaders already shard the training set (training/inputs.py); Ray only moves
    # batches to the device. Every worker validates the whole validation set.
    parts.train_loader = ray.train.torch.prepare_data_loader(parts.train_loader,
                                                             add_dist_sampler=False)
    parts.val_loader = ray.train.torch.prepare_data_loader(parts.val_loader,
                                                           add_dist_sampler=False)
    if task.wrap_for_data_parallel:
        parts.model = ray.train.torch.prepare_model(parts.model)
    else:  # the task's own loop averages gradients across workers
        parts.model = parts.model.to(device)
    hooks = Hooks()
    if context.get_world_rank() == 0 and config.get("mlflow_run_id"):
        # Rank 0 reports into the stage's MLflow run and prints the epoch line (Ray forwards
        # it to the driver's console).
        hooks = training_hooks(config["mlflow_run_id"], cfg.train.epochs, task.gate_metric,
                               uri=config["tracking_uri"])
    run_loop(task, cfg, parts, device, hooks=hooks,
             checkpointer=_with_fault_injection(RayCheckpointer(config.get("start_state"))))


def _with_fault_injection(checkpointer: RayCheckpointer) -> RayCheckpointer:
    """Chaos knob for fault-tolerance drills: ``DERMML_FAULT_KILL_AT_EPOCH=N`` kills this worker
    right after epoch N's checkpoint, once (a marker file in ``DERMML_FAULT_MARKER_DIR`` records
    the kill), as a lost spot node would."""
    kill_at = os.environ.get("DERMML_FAULT_KILL_AT_EPOCH")
    marker_dir = os.environ.get("DERMML_FAULT_MARKER_DIR")
    if kill_at is None or marker_dir is None:
        return checkpointer
    marker = Path(marker_dir, "killed")
    save = checkpointer.save

    def save_then_die(state: dict, metrics: dict[str, float]) -> None:
        save(state, metrics)
        if state["epoch"] == int(kill_at) and not marker.exists():
            marker.write_text(str(state["epoch"]))
            os._exit(1)

    checkpointer.save = save_then_die  # type: ignore[method-assign]
    return checkpointer


def storage_path(cfg: TaskConfig) -> str:
    return cfg.ray.storage_path or str(dermml_home() / "ray_results")


def ray_storage(path: str) -> tuple[str, dict[str, Any]]:
    """A storage path as Ray's RunConfig takes it: ``s3://`` paths as a key plus the pyarrow
    filesystem with DermML's endpoint and credentials (the same as every other s3 read)."""
    if path.startswith("s3://"):
        fs, key = storage._filesystem(path)
        return key, {"storage_filesystem": fs}
    return path, {}


def ensure_ray(address: str = "") -> None:
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    address = address or os.environ.get("RAY_ADDRESS", "")  # set by KubeRay in a RayJob
    # A module that imports nothing heavy: the hook runs in every worker process at start.
    hook = {"worker_process_setup_hook": "dermml.orchestration.ray_logging.quiet_worker_logs"}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=hook)
    else:
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": _forwarded_env(), **hook})


def shutdown_ray() -> None:
    """Stop the Ray instance this process started or joined, if any (a command ends)."""
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def _forwarded_env() -> dict[str, str]:
    keys = ("DERMML_HOME", "MLFLOW_TRACKING_URI", "DERMML_S3_ENDPOINT", "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "DERMML_FAULT_KILL_AT_EPOCH", "DERMML_FAULT_MARKER_DIR",
            # model.pretrained=imagenet: workers read the cache the driver filled
            "HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "HF_ENDPOINT")
    return {k: os.environ[k] for k in keys if k in os.environ}


def _input_error(exc: BaseException) -> BaseException | None:
    """The first worker failure caused by input (an unreadable image, a bad mask), if any."""
    from dermml.errors import input_errors

    user_errors = input_errors()
    for failure in getattr(exc, "worker_failures", {}).values():
        seen = set()
        while failure is not None and id(failure) not in seen:
            seen.add(id(failure))
            if isinstance(failure, user_errors):
                return failure
            failure = getattr(failure, "cause", None) or failure.__cause__
    return None


def fit_with_ray(inputs: TrainingInputs, run_name: str, tracking_uri: str = "",
                 mlflow_run_id: str = "", callbacks: list | None = None,
                 start_state: Any = None, gpus_per_worker: float | None = None) -> FitResult:
    """Train on ``inputs`` with ``TorchTrainer``; the run named ``run_name`` resumes if it
    exists already. Each worker gets a pickled copy of the inputs (``for_workers``).

    Hooks for Ray Tune trials (``orchestration/ray_tune.py``): ``callbacks`` (Ray Train
    callbacks, run by the controller), ``start_state`` (see ``RayCheckpointer``) and
    ``gpus_per_worker`` (a fraction of a GPU per worker).
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = inputs.cfg
    ensure_ray(cfg.ray.address)
    path, fs_kwargs = ray_storage(storage_path(cfg))
    loop_config = {"inputs": inputs.for_workers(), "tracking_uri": tracking_uri,
                   "mlflow_run_id": mlflow_run_id}
    if start_state is not None:
        loop_config["start_state"] = start_state
    resources: dict[str, float] = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu and gpus_per_worker is not None:
        resources["GPU"] = gpus_per_worker
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
            resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=path, **fs_kwargs, callbacks=callbacks,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            failure_config=ray.train.FailureConfig(max_failures=cfg.ray.max_failures)),
    )
    try:
        result = trainer.fit()
    except ray.train.WorkerGroupError as exc:
        cause = _input_error(exc)
        if cause is not None:  # bad data found mid-training: the one-line error, not Ray's
            raise cause from None
        raise
    if result.error:
        raise RuntimeError(f"Ray training failed: {result.error}")
    if result.checkpoint is None:
        raise RuntimeError("Ray training finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state = state_from_bytes(Path(folder, STATE_FILE).read_bytes())
    return FitResult(epochs_run=state["epoch"] + 1, history=state["history"],
                     best_metric=state["best_metric"], best_model=state["best_model"])
