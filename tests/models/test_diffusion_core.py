"""Noise schedules, the forward process, DDPM/DDIM steps, ensembling and the boundary-aware
loss of DermoSegDiff, checked against closed forms computed here independently."""

import math

import numpy as np
import pytest
import torch

from dermml.losses.diffusion import boundary_proximity, boundary_weight_map, diffusion_loss
from dermml.models.diffusion import (
    GaussianDiffusion,
    beta_schedule,
    diffusion_to_mask,
    ensemble_masks,
    mask_to_diffusion,
    sample,
)
from dermml.models.schedulers import SAMPLERS, DDIMScheduler, get_sampler

T = 10
START, END = 0.0004, 0.08


def expected_betas(kind: str, start: float = START, end: float = END) -> np.ndarray:
    i = np.arange(T, dtype=np.float64)
    if kind == "linear":
        return start + (end - start) * i / (T - 1)
    if kind == "quadratic":
        return (math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (T - 1)) ** 2
    if kind == "sigmoid":
        return 1 / (1 + np.exp(-(-6 + 12 * i / (T - 1)))) * (end - start) + start
    s = 0.008
    f = [math.cos((k / T + s) / (1 + s) * math.pi / 2) ** 2 for k in range(T + 1)]
    return np.array([min(max(1 - f[k + 1] / f[k], start), end) for k in range(T)])


@pytest.mark.parametrize("kind", ["linear", "quadratic", "sigmoid", "cosine"])
def test_beta_schedules_and_alphas_match_their_closed_forms(kind):
    betas = expected_betas(kind)
    got = beta_schedule(kind, T, START, END)
    assert got.dtype == torch.float64 and got.shape == (T,)
    np.testing.assert_allclose(got.numpy(), betas, rtol=1e-12, atol=1e-15)

    d = GaussianDiffusion(got)
    alphas = 1 - betas
    alphas_cumprod = np.array([np.prod(alphas[: k + 1]) for k in range(T)])
    prev = np.concatenate([[1.0], alphas_cumprod[:-1]])
    np.testing.assert_allclose(d.alphas.numpy(), alphas, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), alphas_cumprod, rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev.numpy(), prev, rtol=1e-12)
    np.testing.assert_allclose(d.sqrt_one_minus_alphas_cumprod.numpy(),
                               np.sqrt(1 - alphas_cumprod), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_variance.numpy(),
                               betas * (1 - prev) / (1 - alphas_cumprod), rtol=1e-12, atol=1e-18)


def test_cosine_schedule_with_paper_clipping_reaches_pure_noise():
    betas = beta_schedule("cosine", T, 0.0, 0.999)
    np.testing.assert_allclose(betas.numpy(), expected_betas("cosine", 0.0, 0.999), rtol=1e-12)
    assert GaussianDiffusion(betas).alphas_cumprod[-1] < 1e-3


def test_unknown_schedule_and_bad_betas_are_rejected():
    with pytest.raises(ValueError, match="unknown beta schedule 'exp'"):
        beta_schedule("exp", T)
    with pytest.raises(ValueError, match="beta_start"):
        beta_schedule("linear", T, 0.5, 0.1)


def test_q_sample_has_the_forward_marginal_mean_and_variance():
    d = GaussianDiffusion(beta_schedule("linear", 250))
    draws = 20000
    x0 = torch.tensor([-1.0, 0.5, 1.0]).repeat(draws, 1).reshape(draws, 1, 1, 3)
    gen = torch.Generator().manual_seed(0)
    for t in (0, 60, 249):
        noise = torch.randn(x0.shape, generator=gen)
        x_t = d.q_sample(x0, t, noise)
        a = float(d.alphas_cumprod[t])
        np.testing.assert_allclose(x_t.mean(0).flatten().numpy(),
                                   math.sqrt(a) * np.array([-1.0, 0.5, 1.0]), atol=0.03)
        np.testing.assert_allclose(x_t.var(0).flatten().numpy(), [1 - a] * 3, atol=0.05)


def test_predicted_x0_and_posterior_invert_the_forward_process():
    d = GaussianDiffusion(beta_schedule("linear", 50))
    x0 = torch.rand(4, 1, 6, 6, dtype=torch.float64) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 7, 30, 49])
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(d.predict_x0_from_eps(x_t, t, noise), x0)
    mean, var, log_var = d.q_posterior(x0, x_t, t)
    assert mean.shape == x0.shape and var.shape == (4, 1, 1, 1)
    torch.testing.assert_close(log_var[1:], var[1:].log())
    # Ho et al. eq. 7: mean = sqrt(ᾱ_prev) β_t / (1 - ᾱ_t) x0 + sqrt(α_t)(1 - ᾱ_prev)/(1 - ᾱ_t) x_t
    k = 2
    a_bar, a_prev = d.alphas_cumprod[30], d.alphas_cumprod[29]
    beta = d.betas[30]
    expected = (a_prev.sqrt() * beta / (1 - a_bar)) * x0[k] \
        + ((1 - beta).sqrt() * (1 - a_prev) / (1 - a_bar)) * x_t[k]
    torch.testing.assert_close(mean[k], expected)


def test_masks_map_to_diffusion_space_and_back():
    m = torch.tensor([0.0, 1.0, 0.25])
    torch.testing.assert_close(mask_to_diffusion(m), torch.tensor([-1.0, 1.0, -0.5]))
    torch.testing.assert_close(diffusion_to_mask(torch.tensor([-3.0, 0.0, 1.0])),
                               torch.tensor([0.0, 0.5, 1.0]))


# --------------------------------------------------------------------- DDPM, DDIM and DPM steps

SCHEDULES = ["linear", "quadratic", "cosine", "sigmoid"]


def reference_ddpm_step(d: GaussianDiffusion, eps: torch.Tensor, x_t: torch.Tensor, t: int,
                        noise: torch.Tensor, clip_x0: bool = False) -> torch.Tensor:
    """DermML's hand-written DDPM step before schedulers (equal to the reference DermoSegDiff
    step): the posterior mean at the predicted x_0 plus exp(½ clipped log-variance) z, no noise
    at t = 0."""
    x0 = d.predict_x0_from_eps(x_t, t, eps)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
    mean, _, log_var = d.q_posterior(x0, x_t, t)
    return mean + (t > 0) * (0.5 * log_var).exp() * noise


def reference_ddim_step(d: GaussianDiffusion, eps: torch.Tensor, x_t: torch.Tensor, t: int,
                        t_prev: int, eta: float, noise: torch.Tensor) -> torch.Tensor:
    """Song et al. eq. 12 with x_0 clipped to [-1, 1] and ε re-derived from it."""
    a_t = d.alphas_cumprod[t].to(x_t.dtype)
    a_prev = d.alphas_cumprod[t_prev].to(x_t.dtype) if t_prev >= 0 else torch.tensor(1.0)
    x0 = ((x_t - (1 - a_t).sqrt() * eps) / a_t.sqrt()).clamp(-1, 1)
    eps = (x_t - a_t.sqrt() * x0) / (1 - a_t).sqrt()
    sigma = eta * ((1 - a_prev) / (1 - a_t)).sqrt() * (1 - a_t / a_prev).sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps + sigma * noise


def scheduler(name: str, d: GaussianDiffusion, eta: float = 0.0):
    return get_sampler(name).build(d, eta)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_ddpm_scheduler_step_equals_the_reference_step_unclipped(kind):
    """diffusers' DDPMScheduler with our float64 tables is the reference's step to 7e-7 at
    every timestep of the task's schedules; like the reference it does not clip x_0."""
    d = GaussianDiffusion(beta_schedule(kind, 250))
    ddpm = scheduler("ddpm", d)
    ddpm.set_timesteps(250)
    assert [int(t) for t in ddpm.timesteps] == list(range(249, -1, -1))
    g = torch.Generator().manual_seed(0)
    worst, clipping_shows = 0.0, False
    for t in range(249, -1, -1):
        x_t, eps = torch.randn(4, 1, 16, 16, generator=g), torch.randn(4, 1, 16, 16, generator=g)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        ours = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        expected = reference_ddpm_step(d, eps, x_t, t, noise)
        worst = max(worst, float((ours - expected).abs().max()))
        clipped = reference_ddpm_step(d, eps, x_t, t, noise, clip_x0=True)
        clipping_shows |= not torch.allclose(ours, clipped, atol=1e-4)
    assert worst <= 7e-7, f"{kind}: the DDPM step is {worst:.2e} from the reference"
    assert clipping_shows  # the draws predict x_0 outside [-1, 1]: clipping would differ


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_scheduler_step_clips_x0_and_follows_eq_12(kind, eta):
    d = GaussianDiffusion(beta_schedule(kind, 250))
    ddim = scheduler("ddim", d, eta)
    ddim.set_timesteps(25)
    ts = [int(t) for t in ddim.timesteps]
    g = torch.Generator().manual_seed(1)
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        x_t, eps = torch.randn(3, 1, 8, 8, generator=g), torch.randn(3, 1, 8, 8, generator=g)
        noise = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(t))
        out = ddim.step(eps, t, x_t, generator=torch.Generator().manual_seed(t))
        assert out.pred_original_sample.abs().max() <= 1
        torch.testing.assert_close(out.prev_sample,
                                   reference_ddim_step(d, eps, x_t, t, t_prev, eta, noise),
                                   rtol=1e-5, atol=1e-5)


def test_ddim_timesteps_are_evenly_spaced_descending_to_zero():
    ddim = DDIMScheduler(GaussianDiffusion(beta_schedule("linear", 50)).alphas_cumprod)
    for k, expected in ((50, list(range(49, -1, -1))), (5, [49, 37, 24, 12, 0]), (1, [49])):
        ddim.set_timesteps(k)
        assert ddim.timesteps.tolist() == expected
    with pytest.raises(ValueError, match=r"DDIM steps must be in \[1, 50\]"):
        ddim.set_timesteps(51)
    with pytest.raises(ValueError, match="timestep 48 is not one of"):
        ddim.step(torch.zeros(1), 48, torch.zeros(1))


def test_ddim_with_eta_one_and_all_steps_is_the_ddpm_step():
    d = GaussianDiffusion(beta_schedule("linear", 20))
    ddpm, ddim = scheduler("ddpm", d), DDIMScheduler(d.alphas_cumprod, eta=1.0, clip_x0=False)
    ddpm.set_timesteps(20)
    ddim.set_timesteps(20)
    like = torch.zeros(1, dtype=torch.float64)
    for t in range(19, -1, -1):
        torch.testing.assert_close(ddim.sigma(t, t - 1, like) ** 2, d.posterior_variance[t],
                                   rtol=1e-10, atol=1e-15)
        x_t = torch.randn(2, 1, 4, 4, dtype=torch.float64)
        eps = torch.randn_like(x_t)
        a = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        b = ddim.step(eps, t, x_t, generator=torch.Generator().manual_seed(t)).prev_sample
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9)


def test_ddpm_adds_no_noise_at_the_last_step():
    d = GaussianDiffusion(beta_schedule("linear", 20))
    ddpm = scheduler("ddpm", d)
    ddpm.set_timesteps(20)
    x_t, eps = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    a = ddpm.step(eps, 0, x_t, generator=torch.Generator().manual_seed(0)).prev_sample
    b = ddpm.step(eps, 0, x_t, generator=torch.Generator().manual_seed(1)).prev_sample
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, d.predict_x0_from_eps(x_t, 0, eps))


def test_ddpm_step_is_the_reference_epsilon_form_of_algorithm_2():
    d = GaussianDiffusion(beta_schedule("linear", 20))
    ddpm = scheduler("ddpm", d)
    ddpm.set_timesteps(20)
    x_t = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    eps = torch.randn_like(x_t)
    t = 7
    step = ddpm.step(eps, t, x_t, generator=torch.Generator().manual_seed(3)).prev_sample
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(3), dtype=x_t.dtype)
    beta, a_bar = d.betas[t], d.alphas_cumprod[t]
    mean = (x_t - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()
    torch.testing.assert_close(step, mean + d.posterior_variance[t].sqrt() * z)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]


def test_dpm_visits_k_distinct_timesteps_from_t_minus_one_and_ends_at_the_clean_data():
    d = GaussianDiffusion(beta_schedule("linear", 250))
    dpm = scheduler("dpm", d)
    for k in (10, 20, 250):
        dpm.set_timesteps(k)
        ts = dpm.timesteps.tolist()
        assert len(ts) == k and ts[0] == 249 and ts == sorted(set(ts), reverse=True)
        assert float(dpm.sigmas[-1]) == 0.0  # the last step lands on x_0


# ---------------------------------------------------------------------------- sampling loop

def _toy_eps_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return 0.3 * x + 0.01 * t.float().view(-1, 1, 1, 1)


def _sample(name: str, d: GaussianDiffusion, model_fn, shape, steps: int | None = None,
            eta: float = 0.0, **kwargs):
    spec = get_sampler(name)
    return sample(model_fn, shape, spec.build(d, eta), spec.steps(steps, d.timesteps), **kwargs)


def test_ddim_with_eta_zero_is_deterministic_given_the_initial_noise():
    d = GaussianDiffusion(beta_schedule("linear", 50))
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    runs = [_sample("ddim", d, _toy_eps_model, x_T.shape, 10, x_T=x_T,
                    generator=torch.Generator().manual_seed(seed))[0] for seed in (1, 2)]
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)
    other = _sample("ddim", d, _toy_eps_model, x_T.shape, 10, x_T=torch.randn_like(x_T))[0]
    assert not torch.allclose(other, runs[0])
    noisy = [_sample("ddim", d, _toy_eps_model, x_T.shape, 10, eta=1.0, x_T=x_T,
                     generator=torch.Generator().manual_seed(seed))[0] for seed in (1, 2)]
    assert not torch.allclose(noisy[0], noisy[1])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_is_reproducible_from_its_seed(name):
    d = GaussianDiffusion(beta_schedule("linear", 30))

    def run(seed: int) -> torch.Tensor:
        return _sample(name, d, _toy_eps_model, (2, 1, 8, 8), None if name == "ddpm" else 6,
                       eta=0.5, generator=torch.Generator().manual_seed(seed))[0]

    first = run(7)
    assert torch.isfinite(first).all()
    torch.testing.assert_close(run(7), first, rtol=0, atol=0)
    assert not torch.allclose(run(8), first)


def test_samplers_recover_x0_from_an_exact_noise_predictor_and_record_the_trajectory():
    d = GaussianDiffusion(beta_schedule("linear", 50))
    x0 = torch.sign(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))

    def oracle(x, t):
        a = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    x, trajectory = _sample("ddpm", d, oracle, x0.shape, generator=torch.Generator(),
                            trajectory_every=10)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
    assert len(trajectory) == 1 + 5 and torch.equal(trajectory[-1], x)
    x, trajectory = _sample("ddim", d, oracle, x0.shape, 7, trajectory_every=3)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
    assert len(trajectory) == 1 + 2 + 1  # x_T, after steps 3 and 6, and the final x_0
    x, _ = _sample("dpm", d, oracle, x0.shape, 10)
    torch.testing.assert_close(x, x0, atol=1e-4, rtol=0)


def test_ddim_and_dpm_clip_x0_to_the_mask_range_and_ddpm_does_not():
    d = GaussianDiffusion(beta_schedule("linear", 50))
    far = 3 * torch.sign(torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)))

    def oracle(x, t):  # predicts an x_0 outside [-1, 1]
        a = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
        return (x - a.sqrt() * far) / (1 - a).sqrt()

    unclipped, _ = _sample("ddpm", d, oracle, far.shape, generator=torch.Generator())
    torch.testing.assert_close(unclipped, far, atol=1e-4, rtol=0)
    for name in ("ddim", "dpm"):
        x, _ = _sample(name, d, oracle, far.shape, 10, generator=torch.Generator())
        torch.testing.assert_close(x, far.sign(), atol=1e-4, rtol=0, msg=name)


def test_sampler_registry_resolves_step_counts_and_refuses_what_a_sampler_cannot_run():
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpm"]
    ddpm, ddim, dpm = (get_sampler(n) for n in ("ddpm", "ddim", "dpm"))
    assert (ddpm.steps(None, 250), ddpm.steps(250, 250)) == (250, 250)
    assert (ddim.steps(None, 250), ddim.steps(25, 250)) == (250, 25)
    assert (dpm.steps(None, 250), dpm.steps(None, 12), dpm.steps(15, 250)) == (20, 12, 15)
    with pytest.raises(ValueError, match="DDPM always runs all 50 steps; use sampler=ddim or"
                                         " dpm for fewer"):
        ddpm.steps(10, 50)
    with pytest.raises(ValueError, match="steps=51 is more than the model's 50"):
        dpm.steps(51, 50)
    with pytest.raises(ValueError, match="unknown sampler 'euler'; choose ddpm, ddim, dpm"):
        get_sampler("euler")


def test_ensemble_averages_members_and_thresholds_the_mean_like_the_reference():
    members = [torch.tensor([1.0, -1.0, 1.0, 0.2]), torch.tensor([1.0, 1.0, -1.0, -0.2]),
               torch.tensor([-1.0, -1.0, 0.0, 0.0])]
    members = [m.view(1, 1, 1, 4) for m in members]
    prob, binary = ensemble_masks(members)
    torch.testing.assert_close(prob.flatten(), torch.tensor([2 / 3, 1 / 3, 0.5, 0.5]))
    assert binary.flatten().tolist() == [1, 0, 0, 0]  # a mean of exactly 0 is background
    _, strict = ensemble_masks(members, threshold=0.5)
    assert strict.flatten().tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="differ in shape"):
        ensemble_masks([members[0], torch.zeros(1, 1, 2, 2)])


def test_segdiff_defaults_are_the_reference_schedule_and_sampler():
    from dermml.tasks.segdiff import SegDiffConfig, diffusion_of

    cfg = SegDiffConfig()
    d = diffusion_of(cfg)
    assert (cfg.diffusion.timesteps, cfg.diffusion.schedule, cfg.serving.ensemble) == (
        250, "linear", 5)
    assert cfg.serving.sampler == "ddpm"
    assert float(d.betas[0]) == pytest.approx(0.0004) and float(d.betas[-1]) == pytest.approx(0.08)


@pytest.mark.parametrize("preset", ["isic2018", "ph2", "ham10000"])
def test_reference_presets_keep_the_learning_rate_constant_as_the_reference_does(preset):
    """The reference builds ReduceLROnPlateau but never steps it, and has no warm-up."""
    from pathlib import Path

    from dermml.tasks.segdiff import SegDiffConfig
    from dermml.training.loop import lr_factor
    from dermml.training.run import resolve_config

    config = Path(__file__).resolve().parents[2] / "configs" / "segdiff" / f"{preset}.yaml"
    for train in (resolve_config("segdiff", str(config)).train, SegDiffConfig().train):
        assert (train.optimizer, train.lr, train.betas) == ("adam", 1e-4, (0.7, 0.99))
        assert train.scheduler == "constant" and train.warmup_epochs == 0
        assert {lr_factor(s, 10_000, 0, train.scheduler) for s in (0, 1, 5_000, 9_999)} == {1.0}


# ------------------------------------------------------------------------- boundary-aware loss

def _disk(size: int = 32, radius: float = 9.0) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = (size - 1) / 2
    return (((yy - centre) ** 2 + (xx - centre) ** 2) <= radius**2).float()[None, None]


def _inner_contour(mask: torch.Tensor) -> torch.Tensor:
    """Lesion pixels with a 4-neighbour outside the lesion (pixels off the image count as
    lesion)."""
    m = torch.nn.functional.pad(mask.bool(), (1, 1, 1, 1), value=True)
    outside_neighbour = ~m[:-2, 1:-1] | ~m[2:, 1:-1] | ~m[1:-1, :-2] | ~m[1:-1, 2:]
    return mask.bool() & outside_neighbour


def test_boundary_weights_pixels_near_the_edge_more_than_far_inside_or_outside():
    mask = _disk()  # centre (15.5, 15.5), radius 9: row 15 runs from column 7 to 24
    w = boundary_weight_map(mask, torch.tensor([10]), timesteps=250, gamma=1.5)[0, 0]
    contour = _inner_contour(mask[0, 0])
    assert contour[15, 7] and contour.sum() > 20
    torch.testing.assert_close(w[contour], torch.ones_like(w[contour]))
    assert w[15, 15] < 0.5  # the centre, 8 px from the edge
    assert w[0, 0] < 0.2  # a corner, the farthest pixel
    assert w[15, 8] > w[15, 11] > w[15, 15]  # inside: weight falls away from the edge
    assert w[15, 5] > w[15, 2]  # outside too


def test_boundary_weight_is_the_closed_form_on_a_half_plane_lesion():
    mask = torch.zeros(1, 1, 8, 32)
    mask[..., :16] = 1  # boundary: column 15; the image border is not a boundary
    T, gamma = 250, 0.25
    for t in (1, 100, 249):
        w = boundary_weight_map(mask, torch.tensor([t]), T, gamma)[0, 0]
        exponent = (gamma * (T - t) / T) ** gamma
        cols = np.arange(32)
        expected = (1 - np.abs(cols - 15) / 16) ** exponent
        np.testing.assert_allclose(w.numpy(), np.tile(expected, (8, 1)), rtol=1e-5, atol=1e-6)


def test_boundary_weight_sharpens_as_t_goes_to_zero_and_is_uniform_at_t_equal_T():
    mask = _disk().repeat(4, 1, 1, 1)
    T = 250
    w = boundary_weight_map(mask, torch.tensor([1, 100, 249, T]), T, gamma=0.2)
    assert torch.all(w[0] <= w[1] + 1e-6) and torch.all(w[1] <= w[2] + 1e-6)
    assert w[0].mean() < w[2].mean()
    torch.testing.assert_close(w[3], torch.ones_like(w[3]))


def test_masks_without_a_lesion_boundary_weigh_every_pixel_equally():
    empty = torch.zeros(1, 1, 32, 32)
    speck = torch.zeros(1, 1, 32, 32)
    speck[..., 10, 10:20] = 1  # 10 pixels: under 1% of 1024 is at most 10
    full = torch.ones(1, 1, 32, 32)
    masks = torch.cat([empty, speck, full])
    w = boundary_weight_map(masks, torch.tensor([1, 1, 1]), 250, gamma=1.5)
    torch.testing.assert_close(w, torch.ones_like(w))


def test_precomputed_proximity_gives_the_same_weights():
    mask = _disk()
    t = torch.tensor([30])
    proximity = boundary_proximity(mask)
    torch.testing.assert_close(boundary_weight_map(mask, t, 250, 0.25, proximity=proximity),
                               boundary_weight_map(mask, t, 250, 0.25))


def test_diffusion_losses_on_a_hand_example():
    pred = torch.tensor([1.0, 3.0]).view(1, 1, 1, 2)
    eps = torch.zeros_like(pred)
    weights = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    assert diffusion_loss(pred, eps, "l1").item() == pytest.approx(2.0)
    assert diffusion_loss(pred, eps, "l2").item() == pytest.approx(5.0)
    assert diffusion_loss(pred, eps, "huber").item() == pytest.approx((0.5 + 2.5) / 2)
    assert diffusion_loss(pred, eps, "boundary", weights).item() == pytest.approx(0.5)
    assert diffusion_loss(pred, eps, "hybrid", weights).item() == pytest.approx(5 + 0.25 * 0.5)
    with pytest.raises(ValueError, match="needs weight_map"):
        diffusion_loss(pred, eps, "hybrid")
    with pytest.raises(ValueError, match="unknown diffusion loss 'l3'"):
        diffusion_loss(pred, eps, "l3")
