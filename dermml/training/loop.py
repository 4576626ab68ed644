"""The one training loop every task uses: epochs, validation, checkpoints, AMP, early stopping.

It knows nothing of Ray or MLflow. Callers pass ``hooks`` (where metrics go) and a
``checkpointer`` (where state is saved and resumed from): in-process for tests and benchmarks,
Ray Train reporting in workers.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import Field
from torch import nn

from dermml.config import Section


class LoopConfig(Section):
    """Settings of the shared training loop (defaults suit the small demo task on CPU)."""

    epochs: int = Field(10, ge=0)
    """Number of passes over the training set; 0 validates and logs the starting weights as
    they are (e.g. a published checkpoint given with --pretrained)."""
    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 1e-4
    """Decoupled weight decay (AdamW) or L2 (SGD)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam/AdamW betas (DermoSegDiff: 0.7, 0.99)."""
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    """SGD momentum (DermSynth3D's detector: 0.95)."""
    optimizer: Literal["adamw", "adam", "sgd", "rmsprop"] = "adamw"
    """Optimizer; fused kernels are used on CUDA."""
    scheduler: Literal["cosine", "constant", "plateau"] = "cosine"
    """Learning-rate schedule after warm-up: cosine per step, constant, or plateau (divide by
    1/plateau_factor when the validation gate metric stalls for plateau_patience epochs)."""
    plateau_factor: float = 0.5
    """plateau: multiply the learning rate by this on a plateau."""
    plateau_patience: int = 5
    """plateau: epochs without improvement before reducing the learning rate."""
    warmup_epochs: float = 0.0
    """Linear warm-up length in epochs."""
    grad_accum_steps: int = 1
    """Optimizer step every N batches."""
    amp: bool = True
    """Mixed precision (autocast) on CUDA (ignored on CPU)."""
    amp_dtype: Literal["auto", "bfloat16", "float16"] = "auto"
    """Autocast dtype: auto = bfloat16 where the GPU has it (Ampere and newer), else float16
    with loss scaling (T4, V100: bfloat16 autocast fails there)."""
    channels_last: bool = True
    """channels_last memory format on CUDA (ignored on CPU, where it is slower)."""
    compile: bool | Literal["auto"] = "auto"
    """``torch.compile`` the training forward/backward (true/false); auto = on CUDA only (on
    CPU the compile time is rarely paid back in a run); validation and checkpoints use the
    eager module."""
    compile_backend: str = "inductor"
    """torch.compile backend (``aot_eager`` traces without generating kernels)."""
    early_stopping_patience: int = 0
    """Stop after N epochs without improving the gate metric (0 = never)."""
    log_every_steps: int = 20
    """Report training loss every N steps (the only host syncs in the hot loop)."""
    max_steps_per_epoch: int = 0
    """Cap on batches per epoch (0 = whole epoch); for smoke tests."""
    seed: int = 0
    """Seed of model initialisation and data order."""


class Checkpointer(Protocol):
    """Where training state is saved and resumed from."""

    def load(self) -> dict | None: ...

    def save(self, state: dict, metrics: dict[str, float]) -> None: ...


class NullCheckpointer:
    def load(self) -> dict | None:
        return None

    def save(self, state: dict, metrics: dict[str, float]) -> None:
        return None


@dataclass
class Hooks:
    """Callbacks of the loop; every one is optional."""

    on_step: Callable[[int, dict[str, float]], None] | None = None
    on_epoch_start: Callable[[int], None] | None = None
    on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
    on_image: Callable[[str, Any], None] | None = None
    """``(artifact path, RGB uint8 array)``: an image for humans (e.g. a GAN's fake grid)."""
    on_artifact: Callable[[str, bytes], None] | None = None
    """``(artifact path, bytes)``: a file for the run (e.g. a GAN's network snapshot)."""
    on_tags: Callable[[dict[str, str]], None] | None = None
    """Facts about the run found while training (e.g. the GAN metrics' feature extractor)."""


@dataclass
class FitResult:
    epochs_run: int
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    stopped_early: bool = False
    best_model: dict | None = None
    """CPU copy of the weights with the best validation gate metric (last epoch if none)."""


def build_optimizer(model: nn.Module, cfg: LoopConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    fused = {"fused": True} if device.type == "cuda" else {}
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                 betas=cfg.betas, **fused)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                betas=cfg.betas, **fused)
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, alpha=0.9, momentum=0.9, eps=1e-3,
                                   weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Multiplier of the peak learning rate at ``step``: linear warm-up, then cosine or flat."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind in ("constant", "plateau"):  # plateau reductions happen per epoch, on top
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def amp_dtype(cfg: LoopConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``cfg`` on ``device``; None: full precision."""
    if not cfg.amp or device.type != "cuda":
        return None
    if cfg.amp_dtype == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return getattr(torch, cfg.amp_dtype)


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


StepFn = Callable[[nn.Module, Any], torch.Tensor]
EvalFn = Callable[[nn.Module, Iterable, torch.device], dict[str, float]]


def fit(model: nn.Module, train_loader: Iterable, val_loader: Iterable | None, cfg: LoopConfig,
        loss_step: StepFn, evaluate: EvalFn | None, gate_metric: str, gate_mode: str = "max",
        device: torch.device | None = None, hooks: Hooks | None = None,
        checkpointer: Checkpointer | None = None, progress: bool = False,
        after_step: Callable[[nn.Module, int], None] | None = None) -> FitResult:
    """Train ``model``; resume from ``checkpointer`` if it holds state; return the history.

    ``loss_step(model, batch)`` returns the loss of one batch (already on device);
    ``evaluate(model, val_loader, device)`` returns validation metrics including ``gate_metric``;
    ``after_step(model, optimizer_step)`` runs after every optimizer step (e.g. an EMA update).
    """
    device = device or torch.device("cpu")
    hooks = hooks or Hooks()
    checkpointer = checkpointer or NullCheckpointer()
    torch.manual_seed(cfg.seed)
    use_cl = cfg.channels_last and device.type == "cuda"
    model.to(device, memory_format=torch.channels_last if use_cl else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg, device)
    dtype = amp_dtype(cfg, device)
    # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    # Compiled and eager modules share parameters: the optimizer, checkpoints, EMA and
    # validation keep using ``model``; only the training step runs through ``step_model``.
    step_model = model
    if cfg.compile is True or (cfg.compile == "auto" and device.type == "cuda"):
        step_model = torch.compile(model, backend=cfg.compile_backend)
    steps_per_epoch = _steps_per_epoch(train_loader, cfg)
    total_steps = max(1, cfg.epochs * steps_per_epoch // cfg.grad_accum_steps)
    warmup = int(cfg.warmup_epochs * steps_per_epoch / cfg.grad_accum_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, cfg.scheduler))
    plateau = None
    if cfg.scheduler == "plateau":
        # Scales the LambdaLR's base lrs, so warm-up and plateau reductions compose.
        plateau = PlateauScaler(scheduler, cfg.plateau_factor, cfg.plateau_patience)

    result = FitResult(epochs_run=0)
    start_epoch, since_best = 0, 0
    best_model: dict | None = None
    state = checkpointer.load()
    if state is not None:
        best_model = state.get("best_model")
        result.best_model = best_model
        result.epochs_run = state["epoch"] + 1
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if plateau is not None and "plateau" in state:
            plateau.load_state_dict(state["plateau"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch = state["epoch"] + 1
        result.history = state.get("history", [])
        result.best_metric = state.get("best_metric")
        since_best = state.get("since_best", 0)

    sign = 1.0 if gate_mode == "max" else -1.0
    global_step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, cfg.epochs):
        if hooks.on_epoch_start:
            hooks.on_epoch_start(epoch)
        started, first_step = time.perf_counter(), global_step
        train_loss, global_step = _train_epoch(
            model, train_loader, cfg, loss_step, optimizer, scheduler, device, hooks,
            global_step, progress, epoch, after_step, step_model, dtype, scaler)
        metrics = {"train_loss": train_loss, "lr": scheduler.get_last_lr()[0],
                   "epoch_seconds": time.perf_counter() - started,
                   "optimizer_steps": global_step - first_step}
        if evaluate is not None and val_loader is not None:
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                scores = evaluate(model, val_loader, device)
            metrics.update({f"val_{k}": v for k, v in scores.items()})
            model.train()
        metrics["epoch"] = epoch
        result.history.append(metrics)
        result.epochs_run = epoch + 1
        current = metrics.get(f"val_{gate_metric}")
        improved = current is not None and (
            result.best_metric is None or sign * current > sign * result.best_metric)
        if plateau is not None and current is not None:
            plateau.step(sign * current)
        if improved or best_model is None:
            best_model = _cpu_state(model)
        if improved:
            result.best_metric, since_best = current, 0
        else:
            since_best += 1
        result.best_model = best_model
        checkpointer.save({"model": _unwrap(model).state_dict(),
                           "optimizer": optimizer.state_dict(),
                           "scheduler": scheduler.state_dict(), "epoch": epoch,
                           "history": result.history, "best_metric": result.best_metric,
                           "best_model": best_model, "since_best": since_best,
                           "plateau": plateau.state_dict() if plateau else None,
                           "scaler": scaler.state_dict() if scaler else None,
                           "is_best": improved}, metrics)
        if hooks.on_epoch_end:
            hooks.on_epoch_end(epoch, metrics)
        if cfg.early_stopping_patience and since_best >= cfg.early_stopping_patience:
            result.stopped_early = True
            break
    if cfg.epochs == 0:  # no training: the starting weights, validated once, are the model
        result.best_model = _cpu_state(model)
        if evaluate is not None and val_loader is not None:
            model.eval()
            with torch.no_grad(), autocast(device, dtype):
                scores = {f"val_{k}": v for k, v in evaluate(model, val_loader, device).items()}
            result.history.append({**scores, "epoch": -1})
            result.best_metric = scores.get(f"val_{gate_metric}")
    return result


def with_hyperparameters(state: dict, cfg: LoopConfig) -> dict:
    """A checkpoint ``state`` of ``fit`` set to continue under ``cfg``'s optimizer settings.

    Population-based training restarts a trial from another trial's checkpoint with perturbed
    settings; the optimizer, LR schedule and plateau states would otherwise bring the old
    learning rate, weight decay, betas and (SGD) momentum back. The peak learning rate is
    replaced where the schedule keeps it (its base rates), and the current rate is scaled by
    the same factor, so warm-up, cosine decay and plateau reductions keep their place.
    Settings read from the config at every step (loss weights, augmentation) need nothing
    here; the optimizer kind and the network's shape cannot change (``load_state_dict`` would
    fail)."""
    state = dict(state)
    groups = [dict(g) for g in state["optimizer"]["param_groups"]]
    scales = []
    for group in groups:
        peak = group.get("initial_lr") or group["lr"]  # the schedule's peak: the old train.lr
        scale = cfg.lr / peak if peak else 1.0
        scales.append(scale)
        group["lr"] = group["lr"] * scale
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "nesterov" in group:  # SGD's (RMSprop's momentum is not the momentum setting)
            group["momentum"] = cfg.momentum
    state["optimizer"] = {**state["optimizer"], "param_groups": groups}
    for key in ("scheduler", "plateau"):  # both hold base rates (with plateau reductions)
        part = state.get(key)
        if part and part.get("base_lrs"):
            part = {**part, "base_lrs": [lr * s for lr, s in zip(part["base_lrs"], scales,
                                                                 strict=False)]}
            if part.get("_last_lr"):
                part["_last_lr"] = [g["lr"] for g in groups]
            state[key] = part
    return state


class PlateauScaler:
    """Multiplies the base learning rates by ``factor`` after ``patience`` epochs without a
    higher score (scores are signed so that larger is better)."""

    def __init__(self, scheduler, factor: float, patience: int):
        self.scheduler, self.factor, self.patience = scheduler, factor, patience
        self.best: float | None = None
        self.bad_epochs = 0

    def step(self, score: float) -> None:
        if self.best is None or score > self.best:
            self.best, self.bad_epochs = score, 0
            return
        self.bad_epochs += 1
        if self.bad_epochs > self.patience:
            self.scheduler.base_lrs = [lr * self.factor for lr in self.scheduler.base_lrs]
            for group, lr in zip(self.scheduler.optimizer.param_groups,
                                 self.scheduler.get_lr(), strict=True):
                group["lr"] = lr
            self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"best": self.best, "bad_epochs": self.bad_epochs,
                "base_lrs": list(self.scheduler.base_lrs)}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best, self.bad_epochs = state["best"], state["bad_epochs"]
            self.scheduler.base_lrs = list(state["base_lrs"])


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def _cpu_state(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in _unwrap(model).state_dict().items()}


def _steps_per_epoch(loader: Iterable, cfg: LoopConfig) -> int:
    n = len(loader)  # type: ignore[arg-type]
    return min(n, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else n


def _train_epoch(model, loader, cfg, loss_step, optimizer, scheduler, device, hooks,
                 global_step, progress, epoch, after_step=None,
                 step_model=None, dtype=None, scaler=None) -> tuple[float, int]:
    step_model = model if step_model is None else step_model
    model.train()
    limit = _steps_per_epoch(loader, cfg)
    running = torch.zeros((), device=device)
    seen = 0
    batches = _progress(loader, limit, progress, f"epoch {epoch + 1}/{cfg.epochs}")
    for i, batch in enumerate(batches):
        if i >= limit:
            break
        batch = _to_device(batch, device, cfg.channels_last and device.type == "cuda")
        with autocast(device, dtype):
            loss = loss_step(step_model, batch)
        scaled = loss / cfg.grad_accum_steps
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if (i + 1) % cfg.grad_accum_steps == 0 or i + 1 == limit:
            if scaler is not None:  # skips the step when float16 gradients overflowed
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if after_step is not None:
                after_step(_unwrap(model), scheduler.last_epoch)
        running += loss.detach()
        seen += 1
        global_step += 1
        if hooks.on_step and global_step % cfg.log_every_steps == 0:
            hooks.on_step(global_step, {"train_loss_step": float(loss.detach())})
    return float(running) / max(1, seen), global_step


def _progress(loader, total, enabled, desc):
    """A bar over the epoch's batches when ``enabled``, and only on a terminal (never in logs,
    pods or Ray workers)."""
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, total=total, desc=desc, leave=False, disable=None)


def _to_device(batch, device, channels_last):
    if isinstance(batch, torch.Tensor):
        fmt = torch.channels_last if channels_last and batch.dim() == 4 else torch.preserve_format
        return batch.to(device, non_blocking=True, memory_format=fmt)
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(b, device, channels_last) for b in batch)
    if isinstance(batch, dict):
        return {k: _to_device(v, device, channels_last) for k, v in batch.items()}
    return batch
