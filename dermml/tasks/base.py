"""The task interface: what training, evaluation, registry, serving and pipelines need of a task.

Everything outside ``dermml/tasks`` looks a task up by name and talks to it only through this
interface; a new task is a new module plus one registration line in ``dermml/tasks/__init__.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import nn
from torch.utils.data import Dataset

from dermml.config import ConfigError, Moved, Section
from dermml.data.augment import AugmentConfig
from dermml.data.manifest import Manifest, read_manifest
from dermml.data.sampling import MixConfig, ProgressiveResizeConfig
from dermml.data.splits import with_split_policy
from dermml.training.loop import FitResult, Hooks, LoopConfig, fit


class DataConfig(Section):
    """Which data a task trains and validates on."""

    manifest: str = ""
    """Manifest URI (Parquet file or dataset folder); required for training."""
    train_split: str = "train"
    """Split(s) to train on, comma-separated."""
    val_split: str = "val"
    """Split(s) for per-epoch validation and the best checkpoint."""
    test_split: str = "test"
    """Split(s) for evaluation and the promotion gate."""
    split_policy: Literal["manifest", "reference"] = "manifest"
    """Where the splits come from: the manifest's ``split`` column, or DermoSegDiff's fixed index
    splits (reference: ISIC2018 1815/259/520, PH2 80/20/100, HAM10000 7200/1800/1015 images in
    file-name order; see docs/segdiff.md). Training and evaluation of the model both use it."""
    reference_order: str = ""
    """split_policy reference: a text file listing the image file names in the order the
    reference's ``glob`` listed them, one per line; empty = sorted by file name."""
    image_size: int = 64
    """Square input size in pixels (the reference works use 128 or 256)."""
    batch_size: int = 16
    """Batch size per worker."""
    loader_workers: int = 0
    """DataLoader worker processes per training worker."""
    oversample: bool = False
    """Draw training samples with probability inversely proportional to their class size."""
    progressive_resize: ProgressiveResizeConfig = ProgressiveResizeConfig()
    """Train at growing sizes (validation stays at image_size); empty = fixed size."""


PLATFORM_KEYS = {
    "enabled": "ray_job.enabled", "namespace": "ray_job.namespace",
    "helm_release": "ray_job.helm_release", "cluster_selector": "ray_job.cluster_selector",
    "image": "images.gpu (ray_job.image names the flavour)",
    "service_account": "ray_job.service_account", "head_cpu": "ray_job.head_cpu",
    "head_memory": "ray_job.head_memory", "shm_size": "ray_job.shm_size",
    "worker_cpu": "pools.<ray_job.worker_pool>.cpu_request",
    "worker_memory": "pools.<ray_job.worker_pool>.memory_request",
    "worker_gpus": "pools.<ray_job.worker_pool>.accelerator_limit",
    "worker_node_selector": "pools.<ray_job.worker_pool>.node_selector",
    "worker_tolerations": "pools.<ray_job.worker_pool>.tolerations", "secrets": "secrets",
    "backoff_limit": "ray_job.backoff_limit",
    "active_deadline_seconds": "ray_job.active_deadline_seconds",
    "poll_seconds": "ray_job.poll_seconds"}
"""The former ``ray.kubernetes.*`` task keys and their keys in the platform config."""


class RayConfig(Section):
    """How training is distributed (Ray Train) and what each worker needs. Where the workers
    run (images, pools, RayJobs) is the platform config's (configs/platform/*.yaml)."""

    moved: ClassVar[dict[str, Moved]] = {"kubernetes": Moved(
        "the platform config, as where training runs is not a task setting "
        "(configs/platform/*.yaml; pass yours with --platform to `dermml train` and `dermml "
        "pipeline compile/submit/schedule`)", PLATFORM_KEYS)}

    enabled: bool = True
    """Train through Ray Train's TorchTrainer; false runs the same loop in-process."""
    address: str = ""
    """Ray cluster address (``ray://head:10001`` or ``auto``); empty starts a local Ray."""
    num_workers: int = 1
    """Training workers (data-parallel)."""
    use_gpu: bool = False
    """One GPU per worker."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker."""
    storage_path: str = ""
    """Where Ray keeps checkpoints (local path or s3://); empty = $DERMML_HOME/ray_results."""
    max_failures: int = 2
    """Worker-group restarts from the last checkpoint before the run fails."""


class ServingConfig(Section):
    """Post-processing applied identically in evaluation and serving."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Probability above which a pixel (or class score) counts as positive, in [0, 1]."""


class TaskConfig(Section):
    """Settings shared by every task; a task subclasses it to add model and loss sections."""

    task: str = ""
    init_from: str = ""
    """Model URI (runs:/.../model, models:/name/version) whose weights start training;
    used to fine-tune (weak-label rounds)."""
    data: DataConfig = DataConfig()
    mix: MixConfig = MixConfig()
    """A second (e.g. synthetic) manifest mixed into training, as in DermSynth3D."""
    augment: AugmentConfig = AugmentConfig()
    train: LoopConfig = LoopConfig()
    ray: RayConfig = RayConfig()
    serving: ServingConfig = ServingConfig()


def read_task_manifest(cfg: TaskConfig, uri: str | None = None) -> Manifest:
    """The manifest at ``uri`` (default ``cfg.data.manifest``) with the splits of
    ``cfg.data.split_policy``: what training and evaluation split. A StyleGAN2-ADA dataset
    ZIP (``.zip`` with ``dataset.json``) is imported once, next to DermML's other state."""
    uri = uri or cfg.data.manifest
    if uri.endswith(".zip"):
        uri = imported_zip(uri)
    return with_split_policy(read_manifest(uri), cfg.data.split_policy,
                             cfg.data.reference_order)


def imported_zip(zip_uri: str) -> str:
    """The manifest of a StyleGAN dataset ZIP, imported under ``$DERMML_HOME/imports`` on
    first use (keyed by the ZIP's content) and reused after."""
    import hashlib

    from dermml import storage
    from dermml.config import dermml_home
    from dermml.data.importers.stage import import_dataset
    from dermml.data.manifest import MANIFEST_FILENAME

    digest = hashlib.sha256(storage.read_bytes(zip_uri)).hexdigest()[:12]
    stem = zip_uri.rstrip("/").split("/")[-1][:-4]
    out = str(dermml_home() / "imports" / f"{stem}-{digest}")
    manifest = storage.join(out, MANIFEST_FILENAME)
    if not storage.exists(manifest):
        import_dataset("stylegan", zip_uri, out)
    return manifest


class Task(ABC):
    """One trainable, servable task. Subclasses set the class attributes and implement methods."""

    name: ClassVar[str]
    config_cls: ClassVar[type[TaskConfig]]
    gate_metric: ClassVar[str]
    """Metric compared by the promotion gate and used to pick the best checkpoint."""
    gate_mode: ClassVar[str] = "max"
    """``max`` when larger is better."""

    @abstractmethod
    def build_model(self, cfg: TaskConfig) -> nn.Module: ...

    def build_to_load(self, cfg: TaskConfig) -> nn.Module:
        """The network, to load trained weights into: built without its pretrained weights, so
        a logged model serves without the training machine's weights file or the hub cache."""
        model_cfg = getattr(cfg, "model", None)
        if getattr(model_cfg, "pretrained", ""):
            cfg = cfg.model_copy(update={"model": model_cfg.model_copy(
                update={"pretrained": ""})})
        return self.build_model(cfg)

    def check_input_size(self, model: nn.Module, cfg: TaskConfig) -> None:
        """Fail before training when the smallest training size is too small for the network.

        A dry forward of one blank image: encoders such as Inception-v3 shrink a small input to
        less than their kernels, which torch reports deep inside the first step.
        """
        side = min([cfg.data.image_size, *cfg.data.progressive_resize.sizes])
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                model(torch.zeros(1, 3, side, side))
        except RuntimeError as exc:
            if not any(w in str(exc).lower() for w in ("size", "shape", "divisible")):
                raise
            raise ConfigError(
                f"data.image_size / progressive_resize.sizes: {side} px is too small for this "
                f"network ({type(model).__name__}: {str(exc).splitlines()[0]}); use a larger "
                "size, a multiple of 32 for smp U-Nets and 8 for DeepLabV3 (Inception-v3 "
                "encoders need at least 75 px; the reference works use 128 or 256)") from None
        finally:
            model.train(was_training)

    def min_image_size(self, cfg: TaskConfig) -> int:
        """Smallest image side (px) the model predicts on, in serving and evaluation alike: the
        network's downsampling factor. A smaller image holds less than one pixel per cell of
        the deepest feature map, so what the model sees after resizing is interpolation, not
        skin (a 1x1 image came back as "all lesion"). Default 32: the factor of the timm
        classification backbones (ResNet, EfficientNet, Inception-v3)."""
        return 32

    def serving_state(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """The weights the logged model keeps (all of them unless a task needs fewer)."""
        return state_dict

    def load_serving_state(self, model: nn.Module, state_dict: dict[str, Any]) -> None:
        """Load what ``serving_state`` kept into a freshly built model."""
        model.load_state_dict(state_dict)

    def merge_serving(self, cfg: TaskConfig, params: dict[str, Any]) -> dict[str, Any]:
        """The serving settings of a request: the trained defaults, then the request's params."""
        return {**cfg.serving.model_dump(), **params}

    def check_serving(self, cfg: TaskConfig) -> None:
        """Raise ValueError when ``cfg.serving`` (request params applied) cannot be served
        with this model (answered as HTTP 400). Every setting is servable by default."""
        return None

    def prepare(self, cfg: TaskConfig, manifest: Manifest) -> TaskConfig:
        """Fill data-dependent settings (class names, class weights) before training.

        The result is what gets logged and stored with the model, so serving needs no data.
        """
        return cfg

    @abstractmethod
    def dataset(self, cfg: TaskConfig, manifest: Manifest, rows: pd.DataFrame,
                train: bool) -> Dataset:
        """A dataset over ``rows`` of ``manifest`` (augmented when ``train``)."""

    def datasets(self, cfg: TaskConfig, manifest: Manifest) -> tuple[Dataset, Dataset]:
        """Training and validation sets of ``manifest`` (``cfg.data.train_split`` and
        ``val_split``). A training run builds them once (``training.inputs``), which also
        mixes in synthetic data and chooses the samplers."""
        train = self.dataset(cfg, manifest, manifest.split(*cfg.data.train_split.split(",")),
                             True)
        val = self.dataset(cfg, manifest, manifest.split(*cfg.data.val_split.split(",")),
                           False)
        return train, val

    def collate_fn(self, cfg: TaskConfig):
        """How the loaders batch samples, or None for torch's default (stacked tensors). A task
        whose samples differ in shape returns a picklable module-level function (detection:
        lists of images and of box targets)."""
        return None

    @abstractmethod
    def loss_step(self, cfg: TaskConfig):
        """``f(model, batch) -> loss`` for the training loop."""

    wrap_for_data_parallel: ClassVar[bool] = True
    """Ray Train wraps the model in DistributedDataParallel with several workers; a task whose
    ``fit`` averages gradients itself (the GAN: two networks, phase by phase) says False."""

    def fit(self, cfg: TaskConfig, model: nn.Module, train_loader: Iterable,
            val_loader: Iterable, device: torch.device, hooks: Hooks, checkpointer: Any,
            progress: bool = False) -> FitResult:
        """Train ``model``: the shared loop (``training.loop.fit``) with this task's loss,
        validation and after-step hook. A task with a loop of its own overrides this (the
        GAN's kimg schedule); it reports through the same ``hooks`` and ``checkpointer``."""
        return fit(model, train_loader, val_loader, cfg.train, loss_step=self.loss_step(cfg),
                   evaluate=lambda m, loader, dev: self.validate(m, loader, dev, cfg),
                   gate_metric=self.gate_metric, gate_mode=self.gate_mode, device=device,
                   hooks=hooks, checkpointer=checkpointer, progress=progress,
                   after_step=self.after_optimizer_step(cfg))

    def after_optimizer_step(self, cfg: TaskConfig):
        """``f(model, optimizer_step)`` to run after each optimizer step (EMA), or None."""
        return None

    @abstractmethod
    def validate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 cfg: TaskConfig) -> dict[str, float]:
        """Validation metrics (must include ``gate_metric``)."""

    @abstractmethod
    def predict(self, model: nn.Module, images: list[np.ndarray], cfg: TaskConfig) -> list[Any]:
        """Post-processed predictions for RGB uint8 images of any size."""

    @abstractmethod
    def score(self, predictions: list[Any], rows: pd.DataFrame,
              manifest: Manifest) -> pd.DataFrame:
        """Per-sample records (scores, and whatever ``aggregate`` needs) vs. ground truth."""

    @abstractmethod
    def aggregate(self, per_sample: pd.DataFrame) -> dict[str, float]:
        """Dataset-level metrics from per-sample records (bootstrapped for CIs)."""

    def figures(self, per_sample: pd.DataFrame, images: list[np.ndarray],
                predictions: list[Any], rows: pd.DataFrame, manifest: Manifest) -> dict:
        """Plots for humans: name -> matplotlib Figure or RGB image."""
        return {}

    @abstractmethod
    def encode_predictions(self, predictions: list[Any]) -> pd.DataFrame:
        """Serving response rows for predictions (one row per input image)."""

    @abstractmethod
    def preview(self, model: nn.Module, dataset: Dataset, cfg: TaskConfig,
                n: int = 8) -> np.ndarray:
        """An RGB image grid comparing predictions with ground truth, for humans."""

    def relabel(self, predictions: list[Any], rows: pd.DataFrame, out_dir: str) -> pd.DataFrame:
        """``rows`` with their labels (or masks, written under ``out_dir``) replaced by
        ``predictions``: the weak-label loop's relabelling step."""
        raise ValueError(f"task {self.name!r} does not support weak-label relabelling")

    scores_per_sample: ClassVar[bool] = True
    """Evaluation scores each test sample and bootstraps the aggregate; False: the task
    scores the split as a set (``evaluate_set``: a GAN's FID against the real images)."""

    def evaluate_set(self, model: nn.Module, images: list[np.ndarray], cfg: TaskConfig,
                     device: torch.device) -> dict[str, float]:
        """Metrics of ``model`` against the split's ``images`` as one set."""
        raise NotImplementedError(f"task {self.name!r} is scored per sample")

    def evaluation_tags(self, cfg: TaskConfig) -> dict[str, str]:
        """Tags an evaluation run records with its metrics (e.g. which feature extractor)."""
        return {}

    request_columns: ClassVar[list[tuple[str, str]]] = [("image", "string")]
    """(column, mlflow type) pairs of a serving request: base64 images by default; a task
    with other columns (the GAN: class, seed) implements ``decode_request``."""

    def decode_request(self, frame: pd.DataFrame, cfg: TaskConfig) -> list[Any]:
        """Rows of a request with ``request_columns`` -> the inputs of ``predict``; raise
        ValueError (HTTP 400) naming the row and what is wrong."""
        raise NotImplementedError(f"task {self.name!r} takes images")

    def request_example(self, cfg: TaskConfig) -> pd.DataFrame | None:
        """The input example logged with a model of a task with ``request_columns``."""
        return None

    def response_schema(self) -> list[tuple[str, str]]:
        """(column, mlflow type) pairs of the serving response."""
        return []

    def response_schema_for(self, cfg: TaskConfig) -> list[tuple[str, str]]:
        """The response columns of a model trained with ``cfg`` (the signature's outputs): all
        of ``response_schema`` unless the config leaves some out (multitask: its heads)."""
        return self.response_schema()


_REGISTRY: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def task_names() -> list[str]:
    return sorted(_REGISTRY)
