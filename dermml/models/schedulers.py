"""Reverse-process schedulers for mask diffusion behind one ``step()`` interface, and the one
registry that maps a sampler name (``ddpm``, ``ddim``, ``dpm``) to a scheduler factory.

A scheduler knows nothing of models (diffusers' rule): ``set_timesteps(k)`` picks the timesteps
to visit, ``step(eps, t, x_t, generator=...)`` returns ``.prev_sample``; ``diffusion.sample``
wires it to an ε-predictor. DDPM and DPM-Solver++ are diffusers' schedulers; DDIM is ours
(``DDIMScheduler`` says why).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from dermml.models.diffusion import GaussianDiffusion


class StepOutput(Protocol):
    prev_sample: torch.Tensor


class Scheduler(Protocol):
    """What ``diffusion.sample`` needs of a scheduler: diffusers' scheduler interface."""

    timesteps: torch.Tensor
    init_noise_sigma: float

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None: ...

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput: ...


# ---------------------------------------------------------------------------------------- DDIM

@dataclass
class DDIMStepOutput:
    prev_sample: torch.Tensor
    """x at the previous timestep (x_0 after the last step)."""
    pred_original_sample: torch.Tensor
    """The x_0 predicted at this step (clipped when the scheduler clips)."""


class DDIMScheduler:
    """DDIM (Song et al. 2021) over K timesteps evenly spaced from T - 1 down to 0
    (``round(linspace(T - 1, 0, K))``), stepping from each to the next listed one and from the
    last to the clean data (ᾱ = 1).

    Not diffusers' ``DDIMScheduler``: that one always steps from t to t - T // K, whichever
    timesteps it lists, so it cannot visit this grid (T 250, K 25: 249, 239, 228, ..., 0) and
    would change which timesteps DermML's DDIM samples; its ᾱ table is also float32. This
    class keeps DermML's DDIM as it was, with diffusers' interface. Its ᾱ table is float64 and
    read per step in the sample's dtype.
    """

    init_noise_sigma = 1.0

    def __init__(self, alphas_cumprod: torch.Tensor, eta: float = 0.0, clip_x0: bool = True):
        self.alphas_cumprod = torch.as_tensor(alphas_cumprod, dtype=torch.float64).cpu()
        self.num_train_timesteps = len(self.alphas_cumprod)
        self.eta, self.clip_x0 = eta, clip_x0
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._previous = {t: t - 1 for t in range(self.num_train_timesteps)}

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        T, k = self.num_train_timesteps, num_inference_steps
        if not 1 <= k <= T:
            raise ValueError(f"DDIM steps must be in [1, {T}], got {k}")
        ts = [T - 1] if k == 1 else \
            torch.linspace(T - 1, 0, k, dtype=torch.float64).round().long().tolist()
        self.timesteps = torch.tensor(ts, dtype=torch.long, device=device)
        self._previous = dict(zip(ts, [*ts[1:], -1], strict=True))

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def _alpha_bar(self, t: int, like: torch.Tensor) -> torch.Tensor:
        """ᾱ_t in the dtype of ``like``, with ᾱ_{-1} = 1 (the clean data)."""
        value = self.alphas_cumprod[t] if t >= 0 else torch.ones((), dtype=torch.float64)
        return value.to(device=like.device, dtype=like.dtype)

    def sigma(self, t: int, t_prev: int, like: torch.Tensor) -> torch.Tensor:
        """σ_t(η) = η sqrt((1 - ᾱ_prev) / (1 - ᾱ_t)) sqrt(1 - ᾱ_t / ᾱ_prev) (eq. 16)."""
        a_t, a_prev = self._alpha_bar(t, like), self._alpha_bar(t_prev, like)
        return self.eta * ((1 - a_prev) / (1 - a_t)).sqrt() \
            * (1 - a_t / a_prev).clamp(min=0).sqrt()

    def step(self, model_output: torch.Tensor, timestep: Any, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> DDIMStepOutput:
        """x_t -> x_prev = sqrt(ᾱ_prev) x̂_0 + sqrt(1 - ᾱ_prev - σ²) ε + σ z (eq. 12), ε
        re-derived from the clipped x̂_0 when clipping; η = 0 draws no noise."""
        t = int(timestep)
        if t not in self._previous:
            raise ValueError(f"timestep {t} is not one of this scheduler's timesteps "
                             f"{self.timesteps.tolist()}; call set_timesteps first")
        t_prev, eps, x_t = self._previous[t], model_output, sample
        a_t, a_prev = self._alpha_bar(t, x_t), self._alpha_bar(t_prev, x_t)
        x0 = (x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if self.clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
        sigma = self.sigma(t, t_prev, x_t)
        x_prev = a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.eta > 0:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device,
                                dtype=x_t.dtype)
            x_prev = x_prev + sigma * noise
        return DDIMStepOutput(prev_sample=x_prev, pred_original_sample=x0)


# ----------------------------------------------------------------------- scheduler factories

def ddpm_scheduler(diffusion: GaussianDiffusion, eta: float = 0.0) -> Scheduler:
    """Ancestral DDPM (Ho et al. 2020) over all T steps, as the reference samples: ε
    prediction, the posterior variance β̃_t ("fixed_small"), x_0 not clipped. ``eta`` is
    ignored."""
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        num_train_timesteps=diffusion.timesteps, trained_betas=diffusion.betas.numpy(),
        prediction_type="epsilon", variance_type="fixed_small", clip_sample=False,
        thresholding=False, timestep_spacing="leading", steps_offset=0)
    # diffusers keeps its tables in float32 (ᾱ a cumprod of T float32 alphas), which moves a
    # step up to 1e-4 from the reference's (float64 tables cast per step); the same float64
    # tables keep it within 5e-7 (tests/models/test_diffusion_core.py checks every schedule).
    scheduler.betas, scheduler.alphas = diffusion.betas, diffusion.alphas
    scheduler.alphas_cumprod = diffusion.alphas_cumprod
    return scheduler


def ddim_scheduler(diffusion: GaussianDiffusion, eta: float = 0.0) -> Scheduler:
    """DDIM with stochasticity ``eta``; x_0 clipped to [-1, 1], since DDIM's large jumps
    amplify x_0 errors."""
    return DDIMScheduler(diffusion.alphas_cumprod, eta=eta, clip_x0=True)


def dpm_scheduler(diffusion: GaussianDiffusion, eta: float = 0.0) -> Scheduler:
    """DPM-Solver++ (Lu et al. 2022), 2nd-order multistep, deterministic; x_0 clipped to
    [-1, 1] like DDIM. ``eta`` is ignored."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=diffusion.timesteps, trained_betas=diffusion.betas.numpy(),
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2,
        # Dynamic thresholding with sample_max_value 1 clamps its scale s to [1, 1]: it is
        # plain clipping of x_0 to [-1, 1].
        thresholding=True, sample_max_value=1.0,
        # Trailing spacing starts at T - 1 and has no repeated timestep for any K <= T.
        timestep_spacing="trailing", final_sigmas_type="zero", lower_order_final=True)


# ------------------------------------------------------------------------------------ registry

@dataclass(frozen=True)
class SamplerSpec:
    """A sampler name: its scheduler factory and the step counts it runs."""

    name: str
    """What configs, request params and the CLI call it."""
    build: Callable[[GaussianDiffusion, float], Scheduler]
    """(noise schedule, eta) -> a fresh scheduler (schedulers keep per-run state)."""
    default_steps: int | None
    """Steps run when none are asked for; None: all T."""
    all_steps: bool = False
    """Always runs all T steps (ancestral DDPM): another step count is refused."""

    def steps(self, requested: int | None, timesteps: int) -> int:
        """The step count to run for ``requested`` (None: the default) with a T-step model;
        ValueError (answered as HTTP 400 when served) if the sampler cannot run it."""
        if self.all_steps and requested not in (None, timesteps):
            fewer = " or ".join(s.name for s in SAMPLERS.values() if not s.all_steps)
            raise ValueError(f"steps={requested} with sampler={self.name}: "
                             f"{self.name.upper()} always runs all {timesteps} steps; use "
                             f"sampler={fewer} for fewer")
        if requested is None:
            return timesteps if self.default_steps is None else \
                min(self.default_steps, timesteps)
        if requested > timesteps:
            raise ValueError(f"steps={requested} is more than the model's {timesteps} "
                             f"diffusion steps; ask for at most {timesteps}")
        if requested < 1:
            raise ValueError(f"steps={requested}: a sampler needs at least 1 step")
        return requested


SAMPLERS: dict[str, SamplerSpec] = {spec.name: spec for spec in (
    SamplerSpec("ddpm", ddpm_scheduler, default_steps=None, all_steps=True),
    SamplerSpec("ddim", ddim_scheduler, default_steps=None),
    SamplerSpec("dpm", dpm_scheduler, default_steps=20),
)}
"""Every sampler by name: the one place a sampler name means something."""


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler ``name``, or ValueError naming the choices."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
