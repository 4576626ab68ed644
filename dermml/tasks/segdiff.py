"""Diffusion lesion segmentation (DermoSegDiff): a dual-path U-Net denoises the lesion mask
conditioned on the image, trained with ε-prediction and a boundary-aware loss; masks are sampled
with ancestral DDPM (reference), DDIM or DPM-Solver++ (faster) and an ensemble of samples is
averaged.

It is a segmentation task: data, scoring, overlays, post-processing and the serving response
are the segmentation task's; only the network, the loss, validation and sampling differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import field_validator, model_validator
from torch import nn
from torch.utils.data import Dataset

from dermml.config import ConfigError, Section
from dermml.data.augment import build_augment
from dermml.data.datasets import SegmentationDataset, image_to_tensor, resize_image
from dermml.data.manifest import Manifest
from dermml.data.sampling import subset_indices
from dermml.losses.diffusion import boundary_weight_map, diffusion_loss, mask_proximity
from dermml.models.dermosegdiff import (
    DermoSegDiffConfig,
    DermoSegDiffUNet,
    from_reference,
    is_reference_layout,
)
from dermml.models.diffusion import (
    GaussianDiffusion,
    beta_schedule,
    diffusion_to_mask,
    ensemble_masks,
    mask_to_diffusion,
    sample,
)
from dermml.models.pretrained import PretrainedWeightsError, read_checkpoint
from dermml.models.schedulers import SAMPLERS, get_sampler
from dermml.tasks.base import ServingConfig, register_task
from dermml.tasks.postprocess import PostprocessConfig
from dermml.tasks.segmentation import SegmentationConfig, SegmentationTask
from dermml.training.ema import EMA
from dermml.training.loop import LoopConfig
from dermml.visualization import image_grid, overlay_boundaries

DATA_SCALE = {"full": 1, "medium": 2, "lite": 5, "ultra-lite": 10}
"""Reference ``data_scale``: keep 1/k of the training set (validation untouched)."""


class NoiseSchedule(Section):
    """Forward process."""

    timesteps: int = 250
    """Diffusion steps T."""
    schedule: Literal["linear", "quadratic", "cosine", "sigmoid"] = "linear"
    """Beta schedule."""
    beta_start: float = 0.0004
    """First beta."""
    beta_end: float = 0.08
    """Last beta."""


class SegDiffLoss(Section):
    """ε-prediction loss."""

    kind: Literal["l1", "l2", "huber", "boundary", "hybrid"] = "l2"
    """hybrid = l2 + boundary_weight * boundary (PH2, HAM10000 presets)."""
    boundary_weight: float = 0.25
    """Coefficient of the boundary term in hybrid."""
    gamma: float = 1.5
    """Boundary map exponent scale (reference default 1.5; PH2 0.25, HAM10000 0.2)."""


class EMAConfig(Section):
    """Exponential moving average of the weights (ema-pytorch semantics); sampling uses it."""

    beta: float = 0.9999
    """Maximum decay."""
    update_after_step: int = 500
    """Copy the weights exactly until this optimizer step."""
    update_every: int = 1
    """Update every N optimizer steps."""
    inv_gamma: float = 1.0
    """Warm-up: inverse multiplicative factor."""
    power: float = 0.9
    """Warm-up: exponential factor."""


class SegDiffServing(ServingConfig):
    """Sampling settings; request params at serving time, defaults = the reference."""

    sampler: str = "ddpm"
    """ddpm: ancestral sampling over all T steps (reference); ddim: DDIM, ``steps`` steps;
    dpm: DPM-Solver++ (2nd order), ``steps`` steps (``dermml.models.schedulers.SAMPLERS``)."""
    steps: int = 0
    """Sampling steps K (0: the sampler's default, T for ddim, 20 for dpm); ddpm always runs
    all T steps."""
    ensemble: int = 5
    """Samples averaged per image before thresholding."""
    eta: float = 0.0
    """DDIM stochasticity (0: deterministic given the initial noise); ddpm and dpm ignore it."""
    seed: int = 0
    """Seed of the noise (the same request gives the same masks)."""

    @field_validator("sampler")
    @classmethod
    def _registered(cls, name: str) -> str:
        get_sampler(name)
        return name

    @model_validator(mode="after")
    def _positive(self) -> SegDiffServing:
        if self.ensemble < 1 or self.steps < 0:
            raise ValueError("ensemble must be >= 1 and steps >= 0")
        return self


class SegDiffConfig(SegmentationConfig):
    task: str = "segdiff"
    model: DermoSegDiffConfig = DermoSegDiffConfig()
    diffusion: NoiseSchedule = NoiseSchedule()
    loss: SegDiffLoss = SegDiffLoss()
    ema: EMAConfig = EMAConfig()
    data_scale: Literal["full", "medium", "lite", "ultra-lite"] = "full"
    """Fraction of the training set (reference: 1, 1/2, 1/5, 1/10)."""
    validation_steps: int = 10
    """DDIM steps of the per-epoch validation (one sample per image)."""
    serving: SegDiffServing = SegDiffServing()
    postprocess: PostprocessConfig = PostprocessConfig()
    train: LoopConfig = LoopConfig(optimizer="adam", lr=1e-4, betas=(0.7, 0.99), weight_decay=0.0,
                                   scheduler="constant")
    """The reference's optimiser and learning rate, constant: it builds ReduceLROnPlateau but
    never steps it."""


class SegDiffNet(nn.Module):
    """The denoiser, its EMA copy and the EMA step counter: one state dict, so checkpoints
    and resumed runs carry the EMA weights and step."""

    def __init__(self, cfg: SegDiffConfig):
        super().__init__()
        self.unet = DermoSegDiffUNet(cfg.model)
        c = cfg.ema
        self._ema = EMA(self.unet, c.beta, c.update_after_step, c.update_every, c.inv_gamma,
                        c.power)
        self.ema_unet = self._ema.ema_model  # registered: saved and restored with the model
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("ema_initted", torch.zeros((), dtype=torch.bool))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.unet(x_t, t, image)

    @torch.no_grad()
    def update_ema(self) -> None:
        # The counters live in buffers so a resumed run continues the same EMA schedule.
        self._ema.step, self._ema.initted = int(self.ema_step), bool(self.ema_initted)
        self._ema.update()
        self.ema_step.fill_(self._ema.step)
        self.ema_initted.fill_(self._ema.initted)


# ------------------------------------------------------------------------- pretrained weights

def _network(state: Mapping[str, Any]) -> dict[str, Any]:
    """A bare U-Net state dict with this code's key names (reference names are translated)."""
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return from_reference(state) if is_reference_layout(state) else state


def _with_prefix(prefix: str, state: Mapping[str, Any]) -> dict[str, Any]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def _ema_counters(step: Any, initted: Any) -> dict[str, torch.Tensor]:
    return {"ema_step": torch.as_tensor(step).reshape(()).long(),
            "ema_initted": torch.as_tensor(initted).reshape(()).bool()}


def _from_ema_pytorch(ema: Mapping[str, Any]) -> dict[str, Any]:
    """An ``ema_pytorch.EMA`` state dict (``online_model.*``, ``ema_model.*``, ``step``,
    ``initted``; the reference saves one as ``checkpoint['ema']``) as a SegDiffNet state."""
    online = {k[len("online_model."):]: v for k, v in ema.items()
              if k.startswith("online_model.")}
    averaged = {k[len("ema_model."):]: v for k, v in ema.items() if k.startswith("ema_model.")}
    return {**_with_prefix("unet.", _network(online or averaged)),
            **_with_prefix("ema_unet.", _network(averaged)),
            **_ema_counters(ema.get("step", 0), ema.get("initted", False))}


def segdiff_state(checkpoint: Any) -> dict[str, Any]:
    """The SegDiffNet state dict (``unet.*``, ``ema_unet.*``, ``ema_step``, ``ema_initted``)
    held by a weights file, whichever of these it is:

    - a checkpoint of the reference's src/training.py: ``{"model": <network>, "ema":
      <ema_pytorch EMA state or None>, "optimizer": ..., "epoch": ...}``;
    - an ``ema_pytorch.EMA`` state dict alone;
    - a network state dict alone, named as the reference or as ``DermoSegDiffUNet``;
    - a DermML SegDiffNet state dict, a training checkpoint holding one (``{"model": ...}``)
      or a serving bundle's (EMA network only).

    A network without EMA weights starts both copies, with a fresh EMA (step 0).
    """
    if not isinstance(checkpoint, Mapping):
        return {}
    if isinstance(checkpoint.get("state_dict"), Mapping):
        checkpoint = checkpoint["state_dict"]
    if isinstance(checkpoint.get("model"), Mapping):
        ema = checkpoint.get("ema")
        if isinstance(ema, Mapping) and any(k.startswith("ema_model.") for k in ema):
            return {**_from_ema_pytorch(ema),
                    **_with_prefix("unet.", _network(checkpoint["model"]))}
        return segdiff_state(checkpoint["model"])
    if any(k.startswith("ema_model.") for k in checkpoint):
        return _from_ema_pytorch(checkpoint)
    if any(k.startswith(("unet.", "ema_unet.")) for k in checkpoint):
        state = dict(checkpoint)
        if not any(k.startswith("unet.") for k in state):  # a serving bundle: EMA network only
            state.update({f"unet.{k[len('ema_unet.'):]}": v for k, v in checkpoint.items()
                          if k.startswith("ema_unet.")})
        return state
    network = _network(checkpoint)
    return {**_with_prefix("unet.", network), **_with_prefix("ema_unet.", network),
            **_ema_counters(0, False)}


def _listed(keys: list[str], limit: int = 5) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_segdiff_weights(model: SegDiffNet, path: str) -> None:
    """Load a weights file (see ``segdiff_state``) into ``model``: every tensor must find its
    parameter with the same shape, or nothing is loaded."""
    state = segdiff_state(read_checkpoint(path))
    target = model.state_dict()
    unmatched = sorted(k for k in state if k not in target)
    missing = sorted(k for k in target if k not in state)
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}" for k in sorted(state)
             if k in target and tuple(state[k].shape) != tuple(target[k].shape)]
    if not state or unmatched or missing or wrong:
        problems = []
        if unmatched:
            problems.append(f"{len(unmatched)} tensors of the file match no parameter "
                            f"({_listed(unmatched)})")
        if missing:
            problems.append(f"{len(missing)} parameters get no tensor ({_listed(missing)})")
        if wrong:
            problems.append(f"{len(wrong)} shapes differ, file vs model ({_listed(wrong, 3)})")
        found = "; ".join(problems) or "no state dict inside"
        raise PretrainedWeightsError(
            f"pretrained weights {path}: does not fit this segdiff model: {found}. Use a "
            "checkpoint of the reference code (src/training.py) or of DermML, and set the model "
            "section to the config it was trained with (the reference's ISIC2018/PH2 or HAM10000 "
            "sizes: configs/segdiff/*.yaml)")
    model.load_state_dict(state)


def diffusion_of(cfg: SegDiffConfig) -> GaussianDiffusion:
    d = cfg.diffusion
    return GaussianDiffusion(beta_schedule(d.schedule, d.timesteps, d.beta_start, d.beta_end))


class SegDiffTask(SegmentationTask):
    name = "segdiff"
    config_cls = SegDiffConfig
    gate_metric = "dice"
    gate_mode = "max"

    def build_model(self, cfg: SegDiffConfig) -> nn.Module:
        model = SegDiffNet(cfg)
        if cfg.model.pretrained:
            load_segdiff_weights(model, cfg.model.pretrained)
        return model

    def serving_state(self, state_dict: dict) -> dict:
        """Only the EMA network (sampling uses it) and its counters: half the bundle size
        (the ISIC2018 preset's 321M parameters once, not twice)."""
        return {k: v for k, v in state_dict.items() if not k.startswith("unet.")}

    def load_serving_state(self, model: nn.Module, state_dict: dict) -> None:
        ema = {k[len("ema_unet."):]: v for k, v in state_dict.items()
               if k.startswith("ema_unet.")}
        if not any(k.startswith("unet.") for k in state_dict):  # a serving bundle
            state_dict = {**state_dict, **{f"unet.{k}": v for k, v in ema.items()}}
        model.load_state_dict(state_dict)

    def merge_serving(self, cfg: SegDiffConfig, params: dict) -> dict:
        merged = super().merge_serving(cfg, params)
        spec = SAMPLERS.get(params.get("sampler"))  # an unknown name fails validation next
        if spec is not None and spec.all_steps and "steps" not in params:
            merged["steps"] = 0  # a model served with DDIM-K defaults: DDPM runs all T steps
        return merged

    def check_serving(self, cfg: SegDiffConfig) -> None:
        s = cfg.serving
        get_sampler(s.sampler).steps(s.steps or None, cfg.diffusion.timesteps)

    def min_image_size(self, cfg: SegDiffConfig) -> int:
        return cfg.model.downsampling_factor

    def check_input_size(self, model: nn.Module, cfg: SegDiffConfig) -> None:
        """The dual-path U-Net halves the size per level: sizes must divide by 2**(levels-1)
        (checked without a forward pass, which costs seconds for the reference presets)."""
        factor = cfg.model.downsampling_factor
        bad = [s for s in [cfg.data.image_size, *cfg.data.progressive_resize.sizes] if s % factor]
        if bad:
            raise ConfigError(
                f"data.image_size / progressive_resize.sizes {bad}: the segdiff U-Net has "
                f"{len(cfg.model.dim_x_mults)} levels, so sizes must be multiples of {factor}")

    def dataset(self, cfg: SegDiffConfig, manifest: Manifest, rows, train: bool):
        if train and DATA_SCALE[cfg.data_scale] > 1:
            keep = subset_indices(len(rows), 1 / DATA_SCALE[cfg.data_scale], cfg.train.seed)
            rows = rows.iloc[keep].reset_index(drop=True)
        augment = build_augment(cfg.augment, seed=cfg.train.seed) if train else None
        dataset = SegmentationDataset(manifest, rows, cfg.data.image_size, augment)
        if train and cfg.loss.kind in ("boundary", "hybrid"):
            return WithBoundaryProximity(dataset)
        return dataset

    def loss_step(self, cfg: SegDiffConfig):
        diffusion = diffusion_of(cfg)
        T, loss_cfg = cfg.diffusion.timesteps, cfg.loss
        needs_map = loss_cfg.kind in ("boundary", "hybrid")

        def step(model: nn.Module, batch) -> torch.Tensor:
            images, masks, *extra = batch  # + boundary proximity from the loader workers
            x0 = mask_to_diffusion(masks)
            t = torch.randint(1, T, (x0.shape[0],), device=x0.device)  # reference: [1, T-1]
            noise = torch.randn_like(x0)
            eps = model(diffusion.q_sample(x0, t, noise).float(), t, images)
            weight = boundary_weight_map(masks, t, T, loss_cfg.gamma,
                                         extra[0] if extra else None) if needs_map else None
            return diffusion_loss(eps.float(), noise, loss_cfg.kind, weight,
                                  loss_cfg.boundary_weight)

        return step

    def after_optimizer_step(self, cfg: SegDiffConfig):
        return lambda model, step: model.update_ema()

    @torch.no_grad()
    def sample_masks(self, model: SegDiffNet, images: torch.Tensor, cfg: SegDiffConfig,
                     sampler: str, steps: int | None, ensemble: int, eta: float, seed: int,
                     trajectory_every: int | None = None, progress: bool | None = False):
        """Mean lesion probability (N, 1, H, W) over ``ensemble`` samples, and a trajectory.
        ``progress=None`` shows a bar on a terminal only (not in servers or logs)."""
        net = model.ema_unet.eval()
        spec = get_sampler(sampler)
        scheduler = spec.build(diffusion_of(cfg), eta)
        n = images.shape[0]
        g = images.repeat(ensemble, 1, 1, 1)
        generator = torch.Generator(device=images.device).manual_seed(seed)
        x0, trajectory = sample(lambda x, t: net(x, t, g), (n * ensemble, 1, *images.shape[2:]),
                                scheduler, spec.steps(steps, cfg.diffusion.timesteps),
                                generator=generator, trajectory_every=trajectory_every,
                                device=images.device, progress=progress)
        probability, _ = ensemble_masks(list(x0.split(n)))
        return probability, trajectory

    def validate(self, model, loader, device, cfg: SegDiffConfig) -> dict[str, float]:
        dice_sum, n = 0.0, 0
        for images, masks in loader:
            probability, _ = self.sample_masks(_unwrap(model), images.to(device), cfg, "ddim",
                                               cfg.validation_steps, 1, 0.0, 0)
            pred, target = probability > 0.5, masks.to(device) > 0.5
            tp = (pred & target).flatten(1).sum(1).double()
            den = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
            dice_sum += float(torch.where(den > 0, 2 * tp / den.clamp(min=1), 1.0).sum())
            n += images.shape[0]
        return {"dice": dice_sum / max(1, n)}

    def probabilities(self, model, images, cfg: SegDiffConfig) -> list[np.ndarray]:
        """Mean lesion probability per image at its own size. Images are sampled together,
        ``data.batch_size`` at a time with their whole ensemble in one batch (the network runs
        T x ensemble times per batch, not per image)."""
        self.check_serving(cfg)
        s = cfg.serving
        device = next(model.parameters()).device
        steps = s.steps or None
        out = []
        chunk = max(1, cfg.data.batch_size)
        for start in range(0, len(images), chunk):
            batch = images[start:start + chunk]
            x = torch.stack([image_to_tensor(resize_image(image, cfg.data.image_size))
                             for image in batch]).to(device)
            probability, _ = self.sample_masks(model, x, cfg, s.sampler, steps, s.ensemble,
                                               s.eta, s.seed, progress=None)
            for image, p in zip(batch, probability, strict=True):
                p = F.interpolate(p[None], size=image.shape[:2], mode="bilinear",
                                  align_corners=False)
                out.append(p[0, 0].cpu().numpy())
        return out

    def preview(self, model, dataset: SegmentationDataset, cfg: SegDiffConfig,
                n: int = 4) -> np.ndarray:
        """Overlays of DDIM predictions, then the denoising trajectory (8 steps) of the first."""
        fast = cfg.model_copy(update={"serving": cfg.serving.model_copy(
            update={"sampler": "ddim", "steps": cfg.validation_steps, "ensemble": 1})})
        pairs = [dataset.load(i) for i in range(min(n, len(dataset)))]
        preds = self.predict(model, [img for img, _ in pairs], fast)
        side = max(128, cfg.data.image_size)
        tiles = [overlay_boundaries(*_display(img, gt, pred, side))
                 for (img, gt), pred in zip(pairs, preds, strict=True)]
        device = next(model.parameters()).device
        x = image_to_tensor(pairs[0][0])[None].to(device)
        steps = max(8, cfg.validation_steps)
        _, trajectory = self.sample_masks(model, x, cfg, "ddim", steps, 1, 0.0, 0,
                                          trajectory_every=1)
        # 8 frames evenly over the reverse process: x_T (pure noise) first, x_0 last.
        picked = np.linspace(0, len(trajectory) - 1, 8).round().astype(int)
        frames = [diffusion_to_mask(trajectory[i][0, 0]).clamp(0, 1).numpy() for i in picked]
        tiles += [np.repeat((resize_image((f * 255).astype(np.uint8)[..., None].repeat(3, -1),
                                          side)), 1, axis=-1) for f in frames]
        return image_grid(tiles, columns=max(4, len(frames)))


class WithBoundaryProximity(Dataset):
    """(image, mask, boundary proximity) of a segmentation dataset: the distance transform of
    the boundary-aware loss runs in the DataLoader workers on the augmented mask, so the
    training step needs no CPU round trip (``boundary_weight_map(..., proximity=...)``)."""

    def __init__(self, dataset: SegmentationDataset):
        self.dataset = dataset  # also how progressive resizing finds the leaf dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str):  # load, files, augment, sample_ids, image_size, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.dataset[index]
        proximity = torch.from_numpy(mask_proximity(mask[0].numpy() > 0.5))[None]
        return image, mask, proximity


def _display(image, truth, pred, side):
    from dermml.data.datasets import resize_mask

    return resize_image(image, side), resize_mask(truth, side), resize_mask(pred, side)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


register_task(SegDiffTask())
