"""The StyleGAN2-ADA training loop: the reference's schedule in images shown, in plain PyTorch.

It follows NVlabs/stylegan2-ada-pytorch ``training/training_loop.py``: every iteration draws one
batch of reals and runs the phases ``Gmain``, ``Greg`` (every ``g_reg_interval`` iterations),
``Dmain`` and ``Dreg`` (every ``d_reg_interval``), each with its own optimizer step; lazy
regularisation scales the learning rate and betas of each optimizer by
``interval / (interval + 1)``; G_ema follows G with a half-life of ``ema_kimg`` thousand images
(ramped up over the first ``ema_rampup`` of training); ADA adjusts ``p`` every
``ada_interval`` iterations from the sign of D's outputs on reals. Progress is counted in
thousands of real images (kimg) and reported per *tick* of ``tick_kimg``: a tick is what the
shared loop calls an epoch (metrics, console line, checkpoint), so the same hooks, checkpoints
and Ray Train worker serve both loops. Metrics (FID, ...) run every ``snapshot_ticks`` ticks and
the snapshot with the best ``gate_metric`` is the model that is kept.

With several data-parallel workers (``torch.distributed`` initialised), every worker draws its
own shard of reals and the phases' gradients are averaged across workers before each optimizer
step, as the reference's DDP does. Like ``training.loop``, nothing here knows of Ray or MLflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from dermml.config import Section
from dermml.training.loop import Checkpointer, FitResult, Hooks, NullCheckpointer


class GanTrainConfig(Section):
    """The GAN's training schedule and regularisation (the reference's ``train.py`` options)."""

    kimg: float = Field(20.0, gt=0)
    """Training length in thousands of real images shown to D (the reference: 25000)."""
    tick_kimg: float = Field(4.0, gt=0)
    """Progress report interval in kimg: one tick is one line, one metrics point and one
    checkpoint (the reference: 4)."""
    auto: bool = False
    """The reference's ``--cfg auto``: batch size, minibatch-std group, feature maps, learning
    rate, R1 gamma and EMA half-life derived from the resolution and the number of workers
    (the values set here and in ``model`` are replaced)."""
    lr_g: float = 0.0025
    """Generator learning rate (Adam)."""
    lr_d: float = 0.0025
    """Discriminator learning rate (Adam)."""
    betas: tuple[float, float] = (0.0, 0.99)
    """Adam betas of both networks."""
    eps: float = 1e-8
    """Adam epsilon."""
    r1_gamma: float = 0.0
    """R1 regularisation weight; 0 = the auto value 0.0002 * resolution^2 / batch."""
    pl_weight: float = 2.0
    """Path-length regularisation weight (0 = off; the reference's cifar config)."""
    pl_batch_shrink: int = 2
    """Path-length regularisation runs on batch / N samples."""
    pl_decay: float = 0.01
    """Decay of the path-length running mean."""
    style_mixing_prob: float = 0.9
    """Probability of mixing two latents in a generated batch (0 = off)."""
    g_reg_interval: int = 4
    """Lazy regularisation: the path-length term every N iterations (0 = never)."""
    d_reg_interval: int = 16
    """Lazy regularisation: R1 every N iterations."""
    ema_kimg: float = 10.0
    """Half-life of G_ema in kimg (auto: batch * 10 / 32)."""
    ema_rampup: float | None = 0.05
    """G_ema's half-life is at most this fraction of the images shown so far (None = off)."""
    aug: Literal["noaug", "ada", "fixed"] = "ada"
    """Discriminator augmentation: none, adaptive (ADA), or a fixed probability ``p``."""
    augpipe: Literal["blit", "geom", "color", "bg", "bgc", "b", "g", "c", "gc"] = "bgc"
    """Augmentations of the pipeline (the reference's ``--augpipe``; its image-space filter,
    noise and cutout specs bgcf/bgcfn/bgcfnc are not built)."""
    p: float = Field(0.0, ge=0.0, le=1.0)
    """aug=fixed: the augmentation probability; aug=ada: its starting value."""
    ada_target: float = 0.6
    """ADA's target for the mean sign of D's outputs on reals (overfitting heuristic r_t)."""
    ada_interval: int = 4
    """ADA adjusts p every N iterations."""
    ada_kimg: float = 500.0
    """ADA can move p from 0 to 1 within this many kimg."""
    mirror: bool = False
    """Double the training set with horizontally flipped copies (the reference's --mirror)."""
    conditional: bool = True
    """Condition G and D on the class (needs at least two classes)."""
    with_masks: bool = False
    """Generate image + lesion-mask pairs: the manifest's masks train as a fourth channel
    (geometric augmentation moves both, colour only the image), and generated samples carry
    a mask, so they train segmentation too."""
    class_column: str = "label"
    """Manifest column holding the class of each image."""
    grid_seeds: int = 8
    """Columns of the fake-image grid (fixed seeds; one row per class)."""
    tf32: bool = True
    """CUDA: TensorFloat-32 matmuls and convolutions (Ampere and newer; ~10 mantissa bits in
    the products, float32 accumulation). The reference turns it off; benchmarks/gan.py
    measures what it buys."""
    max_iterations: int = 0
    """Stop after N iterations whatever kimg says (0 = no cap); for smoke tests."""


def auto_spec(resolution: int, workers: int) -> dict:
    """The reference's ``--cfg auto`` values (``train.py``: ``cfg_specs['auto']``)."""
    batch = max(min(workers * min(4096 // resolution, 32), 64), workers)
    return {"batch": batch, "batch_per_worker": batch // workers,
            "mbstd_group": min(batch // workers, 4),
            "channel_base": int((1 if resolution >= 512 else 0.5) * 32768),
            "lr": 0.002 if resolution >= 1024 else 0.0025,
            "r1_gamma": 0.0002 * resolution ** 2 / batch,
            "ema_kimg": batch * 10 / 32, "ema_rampup": 0.05, "mapping_layers": 2}


@dataclass
class Phase:
    name: str
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    interval: int


def build_phases(model, cfg: GanTrainConfig) -> list[Phase]:
    """The reference's phases with lazy regularisation (``training_loop.py``)."""
    phases = []
    for name, module, lr, reg_interval in (("G", model.G, cfg.lr_g, cfg.g_reg_interval),
                                           ("D", model.D, cfg.lr_d, cfg.d_reg_interval)):
        if reg_interval:
            ratio = reg_interval / (reg_interval + 1)
            betas = tuple(b ** ratio for b in cfg.betas)
            optimizer = torch.optim.Adam(module.parameters(), lr=lr * ratio, betas=betas,
                                         eps=cfg.eps)
            phases += [Phase(f"{name}main", module, optimizer, 1),
                       Phase(f"{name}reg", module, optimizer, reg_interval)]
        else:
            optimizer = torch.optim.Adam(module.parameters(), lr=lr, betas=cfg.betas,
                                         eps=cfg.eps)
            phases.append(Phase(f"{name}both", module, optimizer, 1))
    return phases


def ema_beta(cfg: GanTrainConfig, batch: int, cur_nimg: int) -> float:
    """G_ema's decay for one iteration of ``batch`` images at ``cur_nimg`` images shown."""
    ema_nimg = cfg.ema_kimg * 1000
    if cfg.ema_rampup is not None:
        ema_nimg = min(ema_nimg, cur_nimg * cfg.ema_rampup)
    return 0.5 ** (batch / max(ema_nimg, 1e-8))


def _endless(loader: Iterable) -> Iterator:
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _average_gradients(module: torch.nn.Module, world: int) -> None:
    if world == 1:
        return
    for param in module.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad /= world


def _sanitize_gradients(module: torch.nn.Module) -> None:
    for param in module.parameters():
        if param.grad is not None:
            torch.nan_to_num(param.grad, nan=0, posinf=1e5, neginf=-1e5, out=param.grad)


def fit_gan(model, train_loader: Iterable, cfg: GanTrainConfig, num_classes: int,
            class_probs: list[float] | None, device: torch.device, seed: int = 0,
            evaluate: Callable[[torch.nn.Module, torch.device], dict[str, float]] | None = None,
            grid: Callable[[torch.nn.Module], np.ndarray] | None = None,
            gate_metric: str = "fid", gate_mode: str = "min", snapshot_ticks: int = 1,
            hooks: Hooks | None = None,
            checkpointer: Checkpointer | None = None, progress: bool = False) -> FitResult:
    """Train ``model`` (a ``StyleGAN2``: G, D, G_ema) for ``cfg.kimg`` thousand images.

    ``train_loader`` yields ``(images in [0, 1], class index)`` batches of this worker;
    ``class_probs`` is the class frequency of the training set (generated classes are drawn
    from it, as the reference draws labels from the dataset); ``evaluate(G_ema, device)``
    returns the metrics of a snapshot, every ``snapshot_ticks`` ticks and at the end
    (``gate_metric`` among them: the best snapshot is the model kept); ``grid(G_ema)`` draws the
    fake-image grid (one row per class, fixed seeds) handed to ``hooks.on_image``. Resumes
    from ``checkpointer`` with the image counter, ADA's p and the optimizers' states.
    """
    from dermml.data.ada import AdaController, augment_pipe
    from dermml.losses.gan import StyleGAN2Loss
    from dermml.models.stylegan2 import one_hot

    hooks = hooks or Hooks()
    checkpointer = checkpointer or NullCheckpointer()
    world, rank = _world()
    torch.manual_seed(seed + rank)
    generator = torch.Generator(device="cpu").manual_seed(seed * 1000 + rank)
    model.to(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.tf32
        torch.backends.cudnn.allow_tf32 = cfg.tf32
    pipe = None if cfg.aug == "noaug" else augment_pipe(cfg.augpipe)
    if pipe is not None:
        pipe.to(device)
        pipe.p.copy_(torch.as_tensor(cfg.p))
    batch = _batch_size(train_loader)
    ada = AdaController(pipe, cfg.ada_target, cfg.ada_interval, cfg.ada_kimg,
                        batch_size=batch * world) if pipe is not None and cfg.aug == "ada" else None
    loss = StyleGAN2Loss(model.G, model.D, augment_pipe=pipe,
                         style_mixing_prob=cfg.style_mixing_prob, r1_gamma=cfg.r1_gamma,
                         pl_batch_shrink=cfg.pl_batch_shrink, pl_decay=cfg.pl_decay,
                         pl_weight=cfg.pl_weight)
    phases = build_phases(model, cfg)
    probs = torch.tensor(class_probs if class_probs else [1.0] * max(num_classes, 1))
    ticks = max(1, math.ceil(cfg.kimg / cfg.tick_kimg))

    result = FitResult(epochs_run=0)
    cur_nimg, batch_idx, start_tick = 0, 0, 0
    best_model: dict | None = None
    state = checkpointer.load()
    if state is not None:
        model.load_state_dict(state["model"])
        for phase, opt_state in zip(_unique_optimizers(phases), state["optimizers"],
                                    strict=True):
            phase.load_state_dict(opt_state)
        if pipe is not None and state.get("augment_p") is not None:
            pipe.p.copy_(torch.as_tensor(state["augment_p"]))
        if ada is not None and state.get("ada"):
            ada.load_state_dict(state["ada"])
        if state.get("loss"):
            loss.load_state_dict(state["loss"])
        cur_nimg, batch_idx = state["cur_nimg"], state["batch_idx"]
        start_tick = state["epoch"] + 1
        result.history = state.get("history", [])
        result.best_metric = state.get("best_metric")
        best_model = state.get("best_model")
        result.best_model, result.epochs_run = best_model, start_tick
        if "rng" in state:
            generator.set_state(state["rng"])

    sign = 1.0 if gate_mode == "max" else -1.0
    reals = _endless(train_loader)
    total_nimg = int(cfg.kimg * 1000)
    for tick in range(start_tick, ticks):
        if cur_nimg >= total_nimg:
            break
        if hooks.on_epoch_start:
            hooks.on_epoch_start(tick)
        started, tick_start_nimg = time.perf_counter(), cur_nimg
        tick_end_nimg = min(total_nimg, int((tick + 1) * cfg.tick_kimg * 1000))
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        bar = _bar(progress, tick_end_nimg - cur_nimg, f"tick {tick + 1}/{ticks}")
        while cur_nimg < tick_end_nimg:
            real_img, real_labels = next(reals)
            real_img = real_img.to(device, non_blocking=True).float() * 2 - 1
            real_c = one_hot(real_labels.to(device).long(), num_classes)
            n = real_img.shape[0]
            for phase in phases:
                if batch_idx % phase.interval != 0:
                    continue
                gen_z = torch.randn(n, model.G.z_dim, generator=generator).to(device)
                gen_labels = torch.multinomial(probs, n, replacement=True, generator=generator)
                gen_c = one_hot(gen_labels.to(device), num_classes)
                phase.optimizer.zero_grad(set_to_none=True)
                for module in (model.G, model.D):
                    module.requires_grad_(module is phase.module)
                stats = loss.accumulate_gradients(phase.name, real_img, real_c, gen_z, gen_c,
                                                  gain=phase.interval)
                _average_gradients(phase.module, world)
                _sanitize_gradients(phase.module)
                phase.optimizer.step()
                for key, value in stats.items():
                    value = float(value)
                    if math.isfinite(value):
                        sums[key] = sums.get(key, 0.0) + value
                        counts[key] = counts.get(key, 0) + 1
                if ada is not None and phase.name in ("Dmain", "Dboth") \
                        and "Loss/signs/real" in stats:
                    ada.accumulate(torch.as_tensor(stats["Loss/signs/real"]).reshape(1)
                                   .expand(n))
            for module in (model.G, model.D):
                module.requires_grad_(False)
            model.update_ema(ema_beta(cfg, n * world, cur_nimg))
            cur_nimg += n * world
            batch_idx += 1
            if ada is not None and batch_idx % cfg.ada_interval == 0:
                ada.step()
            if bar is not None:
                bar.update(n * world)
            if hooks.on_step and batch_idx % max(1, cfg.ada_interval * 5) == 0:
                hooks.on_step(batch_idx, {"loss_g_step": sums.get("Loss/G/loss", 0.0)
                                          / max(1, counts.get("Loss/G/loss", 1))})
            if cfg.max_iterations and batch_idx >= cfg.max_iterations:
                total_nimg = cur_nimg
                break
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - started
        shown = max(1, cur_nimg - tick_start_nimg)
        metrics = {_metric_name(k): v / counts[k] for k, v in sums.items()}
        metrics.update({"train_loss": metrics.get("loss_g", float("nan")),
                        "kimg": cur_nimg / 1000, "epoch_seconds": seconds,
                        "sec_per_kimg": seconds / shown * 1000,
                        "augment_p": float(pipe.p) if pipe is not None else 0.0})
        if ada is not None and ada.rt is not None:
            metrics["ada_rt"] = float(ada.rt)
        last_tick = cur_nimg >= total_nimg or tick == ticks - 1
        snapshot = last_tick or bool(snapshot_ticks and (tick + 1) % snapshot_ticks == 0)
        improved = False
        if snapshot:
            model.G_ema.eval()
            if evaluate is not None and snapshot_ticks:  # 0: no metrics while training
                with torch.no_grad():
                    metrics.update({f"val_{k}": v
                                    for k, v in evaluate(model.G_ema, device).items()})
            if grid is not None and hooks.on_image is not None and rank == 0:
                with torch.no_grad():
                    hooks.on_image(f"fakes/fakes_{cur_nimg:010d}img.png",
                                   grid(model.G_ema))
            if hooks.on_artifact is not None and rank == 0:  # the reference's snapshot pickles
                hooks.on_artifact(f"snapshots/G_ema_{cur_nimg:010d}img.pt",
                                  _state_bytes(model.G_ema))
            current = metrics.get(f"val_{gate_metric}")
            improved = current is not None and math.isfinite(current) and (
                result.best_metric is None or sign * current > sign * result.best_metric)
            if improved:
                result.best_metric = current
            if improved or best_model is None:
                best_model = _cpu_state(model)
        metrics["epoch"] = tick
        result.history.append(metrics)
        result.epochs_run = tick + 1
        result.best_model = best_model
        checkpointer.save({"model": _cpu_state(model),
                           "optimizers": [o.state_dict() for o in _unique_optimizers(phases)],
                           "augment_p": float(pipe.p) if pipe is not None else None,
                           "ada": ada.state_dict() if ada is not None else None,
                           "loss": loss.state_dict(),
                           "cur_nimg": cur_nimg, "batch_idx": batch_idx, "epoch": tick,
                           "rng": generator.get_state(), "history": result.history,
                           "best_metric": result.best_metric, "best_model": best_model,
                           "is_best": improved}, metrics)
        if hooks.on_epoch_end:
            hooks.on_epoch_end(tick, metrics)
        if cur_nimg >= total_nimg:
            break
    if result.best_model is None:
        result.best_model = _cpu_state(model)
    return result


def _state_bytes(module: torch.nn.Module) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in module.state_dict().items()}, buf)
    return buf.getvalue()


def _unique_optimizers(phases: list[Phase]) -> list[torch.optim.Optimizer]:
    seen: list[torch.optim.Optimizer] = []
    for phase in phases:
        if not any(phase.optimizer is o for o in seen):
            seen.append(phase.optimizer)
    return seen


def _metric_name(key: str) -> str:
    """``Loss/G/loss`` -> ``loss_g``; ``Loss/r1_penalty`` -> ``r1_penalty``; others
    lower-cased with ``/`` as ``_``."""
    names = {"Loss/G/loss": "loss_g", "Loss/D/loss": "loss_d", "Loss/r1_penalty": "r1_penalty",
             "Loss/pl_penalty": "pl_penalty", "Loss/scores/real": "scores_real",
             "Loss/scores/fake": "scores_fake", "Loss/signs/real": "signs_real",
             "Loss/signs/fake": "signs_fake"}
    return names.get(key, key.replace("Loss/", "").replace("/", "_").lower())


def _batch_size(loader: Iterable) -> int:
    size = getattr(loader, "batch_size", None)
    if size:
        return int(size)
    sampler = getattr(loader, "batch_sampler", None)
    return int(getattr(sampler, "batch_size", 1) or 1)


def _cpu_state(model: torch.nn.Module) -> dict:
    module = model.module if hasattr(model, "module") else model
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=None)

