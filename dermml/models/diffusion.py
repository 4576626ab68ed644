"""Gaussian diffusion for mask generation: noise schedules, the forward process q(x_t | x_0) and
its posterior, the sampling loop and ensemble averaging. The reverse steps are schedulers
(``dermml.models.schedulers``: DDPM, DDIM, DPM-Solver++ behind one ``step()``).

Nothing here knows a network: the sampling loop calls ``model_fn(x_t, t) -> ε``, so any ε-predictor
(DermoSegDiff with its guidance image bound in a closure, or another) plugs in. Masks live in
[-1, 1] in diffusion space (``mask_to_diffusion``), as in the reference DermoSegDiff code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

if TYPE_CHECKING:
    from dermml.models.schedulers import Scheduler

Schedule = Literal["linear", "quadratic", "cosine", "sigmoid"]
Timestep = int | torch.Tensor
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------- schedules

def beta_schedule(kind: Schedule, timesteps: int, beta_start: float = 0.0004,
                  beta_end: float = 0.08) -> torch.Tensor:
    """Betas (T,) float64, as the reference's ``src/modules/schedules.py`` defines them:

    - linear: ``linspace(beta_start, beta_end, T)``
    - quadratic: ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``
    - sigmoid: ``sigmoid(linspace(-6, 6, T)) * (beta_end - beta_start) + beta_start``
    - cosine: Nichol & Dhariwal (2021), ᾱ(t) = cos²(((t / T) + s) / (1 + s) · π/2) with
      s = 0.008, β_t = 1 - ᾱ(t + 1) / ᾱ(t), clipped to [beta_start, beta_end] like the
      reference; pass beta_start=0, beta_end=0.999 for the paper's clipping.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be at least 1, got {timesteps}")
    if not 0.0 <= beta_start <= beta_end < 1.0:
        raise ValueError(f"need 0 <= beta_start <= beta_end < 1, got beta_start={beta_start}, "
                         f"beta_end={beta_end}")
    f64 = torch.float64
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, timesteps, dtype=f64)
    if kind == "quadratic":
        return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=f64) ** 2
    if kind == "sigmoid":
        ramp = torch.sigmoid(torch.linspace(-6, 6, timesteps, dtype=f64))
        return ramp * (beta_end - beta_start) + beta_start
    if kind == "cosine":
        s = 0.008
        steps = torch.linspace(0, timesteps, timesteps + 1, dtype=f64)
        alphas_cumprod = torch.cos((steps / timesteps + s) / (1 + s) * math.pi * 0.5) ** 2
        betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
        return betas.clamp(beta_start, beta_end)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, quadratic, cosine or "
                     "sigmoid")


def mask_to_diffusion(mask01: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] -> diffusion space [-1, 1]."""
    return mask01.float() * 2 - 1


def diffusion_to_mask(x: torch.Tensor) -> torch.Tensor:
    """Diffusion space -> a mask probability in [0, 1] (values outside [-1, 1] are clipped)."""
    return (x.clamp(-1, 1) + 1) / 2


# ---------------------------------------------------------------------------------- diffusion

class GaussianDiffusion:
    """The forward process q(x_t | x_0) and its posterior for fixed betas: training noises
    masks with it, and its float64 tables feed the schedulers.

    Buffers are float64 tensors of shape (T,) on the CPU; each method reads them at timesteps
    ``t`` (an int, or an (N,) long tensor with one timestep per sample) and returns tensors of
    the dtype and device of its input.
    """

    def __init__(self, betas: torch.Tensor):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or len(betas) == 0:
            raise ValueError(f"betas must be a non-empty 1-D tensor, got shape "
                             f"{tuple(betas.shape)}")
        if (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("every beta must lie in (0, 1)")
        self.timesteps = len(betas)
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = F.pad(self.alphas_cumprod[:-1], (1, 0), value=1.0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        one_minus = 1.0 - self.alphas_cumprod
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / one_minus
        # The variance is 0 at t = 0; Ho et al. take its log at t = 1 there instead of -inf.
        log_variance = self.posterior_variance.clamp(min=1e-20).log()
        if self.timesteps > 1:
            log_variance[0] = log_variance[1]
        self.posterior_log_variance_clipped = log_variance
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / one_minus
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() \
            / one_minus

    # -- reading buffers at t

    def _timesteps_for(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(t):
            t = torch.full((like.shape[0],), int(t), dtype=torch.long)
        return t.to(like.device, torch.long)

    def _at(self, values: torch.Tensor, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` shaped (N, 1, ..., 1) to broadcast over ``like``."""
        t = self._timesteps_for(t, like)
        out = values.to(device=like.device, dtype=like.dtype)[t]
        return out.reshape(-1, *([1] * (like.dim() - 1)))

    # -- forward process

    def q_sample(self, x0: torch.Tensor, t: Timestep,
                 noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε."""
        noise = torch.randn_like(x0) if noise is None else noise
        return (self._at(self.sqrt_alphas_cumprod, t, x0) * x0
                + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def predict_x0_from_eps(self, x_t: torch.Tensor, t: Timestep,
                            eps: torch.Tensor) -> torch.Tensor:
        """x_0 = (x_t - sqrt(1 - ᾱ_t) ε) / sqrt(ᾱ_t)."""
        return (x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * eps) \
            / self._at(self.sqrt_alphas_cumprod, t, x_t)

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: Timestep
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x0
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return (mean, self._at(self.posterior_variance, t, x_t),
                self._at(self.posterior_log_variance_clipped, t, x_t))


# ----------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample(model_fn: ModelFn, shape: Sequence[int], scheduler: Scheduler, steps: int,
           generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
           trajectory_every: int | None = None, device: torch.device | str | None = None,
           progress: bool | None = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the reverse process from x_T ~ N(0, I) (or the given ``x_T``) to x_0 over the
    ``steps`` timesteps that ``scheduler`` picks (``schedulers.get_sampler(name)`` builds one
    and resolves the step count for a sampler name).

    ``model_fn(x_t, t)`` returns the predicted ε for an (N,) long tensor of timesteps. The
    trajectory holds x_T, then x after every ``trajectory_every``-th step, and always the final
    x_0, as CPU tensors; it is empty when ``trajectory_every`` is None.
    """
    if trajectory_every is not None and trajectory_every < 1:
        raise ValueError(f"trajectory_every must be at least 1, got {trajectory_every}")
    if x_T is None:
        x_T = torch.randn(tuple(shape), generator=generator, device=device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T of shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
    scheduler.set_timesteps(steps)
    timesteps = [int(t) for t in scheduler.timesteps]  # ints: no device syncs in the loop
    x = x_T * scheduler.init_noise_sigma
    trajectory = [x.detach().cpu()] if trajectory_every else []
    for i, t in enumerate(tqdm(timesteps, desc="sampling", leave=False,
                               disable=None if progress is None else not progress), start=1):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model_fn(scheduler.scale_model_input(x, t), t_batch)
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
        if trajectory_every and (i % trajectory_every == 0 or i == len(timesteps)):
            trajectory.append(x.detach().cpu())
    return x, trajectory


def ensemble_masks(samples: Sequence[torch.Tensor], threshold: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Average ensemble members (each (N, 1, H, W) in diffusion space [-1, 1]).

    Returns the mean lesion probability in [0, 1] and the binary mask ``mean > threshold``,
    with ``threshold`` in diffusion space: the default 0.0 is probability 0.5, the reference's
    ``torch.where(mean > 0, 1, 0)`` (``src/testing.py``).
    """
    if not samples:
        raise ValueError("no ensemble members to average")
    shapes = {tuple(s.shape) for s in samples}
    if len(shapes) > 1:
        raise ValueError(f"ensemble members differ in shape: {sorted(shapes)}")
    mean = torch.stack([s.float() for s in samples]).mean(dim=0)
    return diffusion_to_mask(mean), (mean > threshold).to(torch.uint8)
