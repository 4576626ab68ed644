"""Gaussian diffusion for mask generation: noise schedules, the forward process q(x_t | x_0),
DDPM and DDIM reverse steps, a sampling loop and ensemble averaging.

Nothing here knows a network: a sampler calls ``model_fn(x_t, t) -> ε``, so any ε-predictor
(DermoSegDiff with its guidance image bound in a closure, or another) plugs in. Masks live in
[-1, 1] in diffusion space (``mask_to_diffusion``), as in the reference DermoSegDiff code.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from tqdm import tqdm

Schedule = Literal["linear", "quadratic", "cosine", "sigmoid"]
Sampler = Literal["ddpm", "ddim"]
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
    """The forward process and its posteriors for fixed betas, with DDPM and DDIM steps.

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

    def _alpha_bar_at(self, t: Timestep, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t, with ᾱ_{-1} = 1 (the clean data) for DDIM's last step."""
        t = self._timesteps_for(t, like)
        alpha_bar = self._at(self.alphas_cumprod, t.clamp(min=0), like)
        before_start = (t < 0).reshape(alpha_bar.shape)
        return torch.where(before_start, torch.ones_like(alpha_bar), alpha_bar)

    def _check_t(self, t: Timestep, allow_minus_one: bool = False) -> None:
        low = -1 if allow_minus_one else 0
        t_min, t_max = (int(t.min()), int(t.max())) if torch.is_tensor(t) else (int(t), int(t))
        if t_min < low or t_max >= self.timesteps:
            raise ValueError(f"timestep out of range [{low}, {self.timesteps - 1}]: "
                             f"min {t_min}, max {t_max}")

    @staticmethod
    def _noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

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

    # -- reverse steps

    def ddpm_step(self, eps: torch.Tensor, x_t: torch.Tensor, t: Timestep,
                  generator: torch.Generator | None = None,
                  clip_x0: bool = False) -> torch.Tensor:
        """One ancestral step x_t -> x_{t-1} ~ N(posterior mean, posterior variance) given the
        predicted ε (Ho et al. 2020, Algorithm 2); no noise is added where t == 0."""
        self._check_t(t)
        x0 = self.predict_x0_from_eps(x_t, t, eps)
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
        mean, _, log_var = self.q_posterior(x0, x_t, t)
        noise = self._noise_like(x_t, generator)
        not_last = (self._timesteps_for(t, x_t) > 0).reshape(mean.shape[0], *[1] * (x_t.dim() - 1))
        return mean + not_last.to(x_t.dtype) * (0.5 * log_var).exp() * noise

    def ddim_timesteps(self, k: int) -> list[int]:
        """K evenly spaced timesteps from T - 1 down to 0 (all of them when K = T)."""
        if not 1 <= k <= self.timesteps:
            raise ValueError(f"DDIM steps must be in [1, {self.timesteps}], got {k}")
        if k == 1:
            return [self.timesteps - 1]
        return torch.linspace(self.timesteps - 1, 0, k, dtype=torch.float64).round().long() \
            .tolist()

    def ddim_sigma(self, t: Timestep, t_prev: Timestep, eta: float,
                   like: torch.Tensor) -> torch.Tensor:
        """σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev) (Song et al. 2021,
        eq. 16); t_prev = -1 means ᾱ_prev = 1."""
        a_t, a_prev = self._alpha_bar_at(t, like), self._alpha_bar_at(t_prev, like)
        return eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).clamp(min=0).sqrt()

    def ddim_step(self, eps: torch.Tensor, x_t: torch.Tensor, t: Timestep, t_prev: Timestep,
                  eta: float = 0.0, generator: torch.Generator | None = None,
                  clip_x0: bool = False) -> torch.Tensor:
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12):
        x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z, with σ from ``ddim_sigma``.
        η = 0 draws no noise (deterministic); η = 1 with t_prev = t - 1 is the DDPM step."""
        self._check_t(t)
        self._check_t(t_prev, allow_minus_one=True)
        a_t, a_prev = self._alpha_bar_at(t, x_t), self._alpha_bar_at(t_prev, x_t)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = self.ddim_sigma(t, t_prev, eta, x_t)
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0:
            x_prev = x_prev + sigma * self._noise_like(x_t, generator)
        return x_prev


# ----------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample(model_fn: ModelFn, shape: Sequence[int], diffusion: GaussianDiffusion,
           sampler: Sampler = "ddpm", steps: int | None = None, eta: float = 0.0,
           generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
           trajectory_every: int | None = None, clip_x0: bool = False,
           device: torch.device | str | None = None, progress: bool | None = False
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Run the reverse process from x_T ~ N(0, I) (or the given ``x_T``) to x_0.

    ``model_fn(x_t, t)`` returns the predicted ε for an (N,) long tensor of timesteps.
    DDPM runs all T steps (``steps`` must be None or T); DDIM runs ``steps`` (default T)
    evenly spaced ones with stochasticity ``eta``. The trajectory holds x_T, then x after every
    ``trajectory_every``-th step, and always the final x_0, as CPU tensors; it is empty when
    ``trajectory_every`` is None.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"unknown sampler {sampler!r}; choose ddpm or ddim")
    if trajectory_every is not None and trajectory_every < 1:
        raise ValueError(f"trajectory_every must be at least 1, got {trajectory_every}")
    if x_T is None:
        x_T = torch.randn(tuple(shape), generator=generator, device=device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T of shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
    T = diffusion.timesteps
    if sampler == "ddpm":
        if steps not in (None, T):
            raise ValueError(f"DDPM samples all {T} steps, got steps={steps}; use "
                             "sampler='ddim' for fewer")
        pairs = [(t, t - 1) for t in range(T - 1, -1, -1)]
    else:
        ts = diffusion.ddim_timesteps(T if steps is None else steps)
        pairs = list(zip(ts, [*ts[1:], -1], strict=True))

    x = x_T
    trajectory = [x.detach().cpu()] if trajectory_every else []
    for i, (t, t_prev) in enumerate(tqdm(pairs, desc=f"{sampler} sampling", leave=False,
                                         disable=None if progress is None else not progress),
                            start=1):
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model_fn(x, t_batch)
        if sampler == "ddpm":
            x = diffusion.ddpm_step(eps, x, t, generator=generator, clip_x0=clip_x0)
        else:
            x = diffusion.ddim_step(eps, x, t, t_prev, eta=eta, generator=generator,
                                    clip_x0=clip_x0)
        if trajectory_every and (i % trajectory_every == 0 or i == len(pairs)):
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
