"""Building what the loop needs from a run's inputs: model, loaders, loss and metrics.

Shared by the in-process path and the Ray Train worker so both train exactly the same way; the
datasets and loaders come from ``training.inputs``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader

from dermml.tasks import get_task
from dermml.tasks.base import Task, TaskConfig
from dermml.training.inputs import TrainingInputs, build_loaders, sampler_epochs
from dermml.training.loop import Checkpointer, FitResult, Hooks


@dataclass
class TrainingParts:
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


def build_parts(inputs: TrainingInputs, device: torch.device | None = None,
                world_size: int = 1, rank: int = 0) -> TrainingParts:
    """The model and the loaders of data-parallel rank ``rank`` of ``world_size``."""
    task, cfg = get_task(inputs.task), inputs.cfg
    torch.manual_seed(cfg.train.seed)
    train_loader, val_loader = build_loaders(inputs, device, world_size, rank)
    # Weights of init_from replace the pretrained ones: no need to fetch those.
    model = task.build_to_load(cfg) if cfg.init_from else task.build_model(cfg)
    task.check_input_size(model, cfg)
    if cfg.init_from:
        model.load_state_dict(initial_weights(cfg.init_from))
    return TrainingParts(model, train_loader, val_loader)


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
    hooks.on_epoch_start = sampler_epochs(parts.train_loader, hooks.on_epoch_start)
    return task.fit(cfg, parts.model, parts.train_loader, parts.val_loader, device, hooks,
                    checkpointer, progress)


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
