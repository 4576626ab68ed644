"""Building what the loop needs from a task and its config: model, loaders, loss and metrics.

Shared by the in-process path and the Ray Train worker so both train exactly the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from dermml.data.manifest import read_manifest
from dermml.tasks.base import Task, TaskConfig
from dermml.training.loop import Checkpointer, FitResult, Hooks, fit


@dataclass
class TrainingParts:
    model: nn.Module
    train_loader: DataLoader
    val_loader: DataLoader


def build_parts(task: Task, cfg: TaskConfig, device: torch.device | None = None) -> TrainingParts:
    manifest = read_manifest(cfg.data.manifest)
    train_ds, val_ds = task.datasets(cfg, manifest)
    torch.manual_seed(cfg.train.seed)
    pin = device is not None and device.type == "cuda"
    loader_kw: dict[str, Any] = {"batch_size": cfg.data.batch_size,
                                 "num_workers": cfg.data.loader_workers, "pin_memory": pin,
                                 "persistent_workers": cfg.data.loader_workers > 0}
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(train_ds, shuffle=True, drop_last=len(train_ds) > cfg.data.batch_size,
                              generator=generator, **loader_kw)
    val_loader = DataLoader(val_ds, shuffle=False, **loader_kw)
    return TrainingParts(task.build_model(cfg), train_loader, val_loader)


def run_loop(task: Task, cfg: TaskConfig, parts: TrainingParts, device: torch.device,
             hooks: Hooks | None = None, checkpointer: Checkpointer | None = None,
             progress: bool = False) -> FitResult:
    return fit(parts.model, parts.train_loader, parts.val_loader, cfg.train,
               loss_step=task.loss_step(cfg), evaluate=task.validate,
               gate_metric=task.gate_metric, gate_mode=task.gate_mode, device=device,
               hooks=hooks, checkpointer=checkpointer, progress=progress)


def default_device(use_gpu: bool) -> torch.device:
    return torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
