"""Building what the loop needs from a task and its config: model, loaders, loss and metrics.

Shared by the in-process path and the Ray Train worker so both train exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dermml.tasks.base import Task, TaskConfig, read_task_manifest
from dermml.training.loop import Checkpointer, FitResult, Hooks, fit


@dataclass
class TrainingParts:
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader
    custom_sampling: bool = False
    """The training loader uses its own sampler (oversampling, mixed batches)."""


def build_parts(task: Task, cfg: TaskConfig, device: torch.device | None = None) -> TrainingParts:
    manifest = read_task_manifest(cfg)
    train_ds, val_ds = task.datasets(cfg, manifest)
    torch.manual_seed(cfg.train.seed)
    pin = device is not None and device.type == "cuda"
    # Persistent workers keep their own dataset copy: progressive resizing needs fresh ones.
    persistent = cfg.data.loader_workers > 0 and not cfg.data.progressive_resize.sizes
    loader_kw: dict[str, Any] = {"batch_size": cfg.data.batch_size,
                                 "num_workers": cfg.data.loader_workers, "pin_memory": pin,
                                 "persistent_workers": persistent}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    options = task.loader_options(cfg, train_ds)
    if "batch_sampler" in options:  # the sampler composes batches itself (mixed data)
        train_kw = {k: v for k, v in loader_kw.items() if k != "batch_size"}
        train_loader = DataLoader(train_ds, **train_kw, **options)
    else:
        train_loader = DataLoader(train_ds, drop_last=len(train_ds) > cfg.data.batch_size,
                                  generator=generator, **loader_kw, **options)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    # Weights of init_from replace the pretrained ones: no need to fetch those.
    model = task.build_to_load(cfg) if cfg.init_from else task.build_model(cfg)
    task.check_input_size(model, cfg)
    if cfg.init_from:
        model.load_state_dict(initial_weights(cfg.init_from))
    return TrainingParts(model, train_loader, val_loader, custom_sampling="shuffle" not in options)


def initial_weights(model_uri: str) -> dict:
    """State dict of a logged DermML model, to fine-tune from."""
    from dermml.orchestration import tracking

    return tracking.load_python_model(model_uri).model.state_dict()


def run_loop(task: Task, cfg: TaskConfig, parts: TrainingParts, device: torch.device,
             hooks: Hooks | None = None, checkpointer: Checkpointer | None = None,
             progress: bool = False) -> FitResult:
    hooks = hooks or Hooks()
    if cfg.data.progressive_resize.sizes:
        hooks.on_epoch_start = _progressive_resize(cfg, parts, hooks.on_epoch_start)
    hooks.on_epoch_start = _sampler_epochs(parts.train_loader, hooks.on_epoch_start)
    return fit(parts.model, parts.train_loader, parts.val_loader, cfg.train,
               loss_step=task.loss_step(cfg),
               evaluate=lambda model, loader, device: task.validate(model, loader, device, cfg),
               gate_metric=task.gate_metric, gate_mode=task.gate_mode, device=device,
               hooks=hooks, checkpointer=checkpointer, progress=progress,
               after_step=task.after_optimizer_step(cfg))


def _sampler_epochs(loader, then):
    """Tell epoch-aware samplers the epoch: a DistributedSampler (Ray, several workers) would
    otherwise repeat epoch 0's order every epoch, and a resumed run would restart the mixed
    batch sampler's stream at epoch 0."""
    samplers = []
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch") and all(sampler is not s for s in samplers):
            samplers.append(sampler)

    def on_epoch_start(epoch: int) -> None:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        if then:
            then(epoch)

    return on_epoch_start


def _progressive_resize(cfg: TaskConfig, parts: TrainingParts, then):
    """Grow the training image size on schedule (fastai-style progressive resizing)."""
    from dermml.data.sampling import size_for_epoch

    def on_epoch_start(epoch: int) -> None:
        size = size_for_epoch(cfg.data.progressive_resize, epoch, cfg.data.image_size)
        for ds in _leaf_datasets(parts.train_loader.dataset):
            ds.image_size = size
        if then:
            then(epoch)

    return on_epoch_start


def _leaf_datasets(ds):
    """The datasets under Subset/ConcatDataset wrappers."""
    if hasattr(ds, "datasets"):
        return [leaf for d in ds.datasets for leaf in _leaf_datasets(d)]
    if hasattr(ds, "dataset"):
        return _leaf_datasets(ds.dataset)
    return [ds]


def default_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
