"""The DermoSegDiff U-Net: reference-sized shapes, training on the ε objective, and a tiny model
that learns to segment one demo image by sampling."""

import numpy as np
import pytest
import torch

from dermml.data.demo import render_sample
from dermml.losses.diffusion import boundary_proximity, boundary_weight_map, diffusion_loss
from dermml.models.dermosegdiff import DermoSegDiffConfig, DermoSegDiffUNet
from dermml.models.diffusion import (
    GaussianDiffusion,
    beta_schedule,
    ensemble_masks,
    mask_to_diffusion,
    sample,
)

# Parameters of the reference DermoSegDiff(dim_x=128, dim_g=64, dim_x_mults=[1..6],
# dim_g_mults=[1, 2, 4, ..., 32], resnet_block_groups=8), counted on the reference code.
REFERENCE_ISIC2018_PARAMETERS = 321_181_377


@pytest.fixture(autouse=True)
def one_cpu_thread():
    """Tiny convolutions gain nothing from threads, and on a busy 2-core machine OpenMP
    workers waiting on each other made the overfitting test ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_config(**overrides) -> DermoSegDiffConfig:
    values = dict(dim_x=8, dim_g=8, dim_x_mults=[1, 2], dim_g_mults=[1, 2],
                  resnet_block_groups=4)
    return DermoSegDiffConfig(**{**values, **overrides})


def test_reference_isic2018_config_predicts_noise_shaped_like_the_mask_with_321m_parameters():
    torch.manual_seed(0)
    model = DermoSegDiffUNet(DermoSegDiffConfig()).eval()
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_ISIC2018_PARAMETERS
    x_t, g = torch.randn(1, 1, 128, 128), torch.rand(1, 3, 128, 128)
    with torch.inference_mode():
        eps = model(x_t, torch.tensor([249]), g)
    assert eps.shape == (1, 1, 128, 128) and torch.isfinite(eps).all()


def test_tiny_model_output_depends_on_the_image_and_the_timestep():
    torch.manual_seed(0)
    model = DermoSegDiffUNet(tiny_config()).eval()
    x_t, g = torch.randn(2, 1, 32, 32), torch.rand(2, 3, 32, 32)
    t = torch.tensor([3, 40])
    with torch.no_grad():
        eps = model(x_t, t, g)
        assert eps.shape == (2, 1, 32, 32)
        assert not torch.allclose(eps, model(x_t, t, torch.rand_like(g)))
        assert not torch.allclose(eps, model(x_t, t + 100, g))


def test_inputs_of_the_wrong_shape_are_rejected_with_what_was_expected():
    model = DermoSegDiffUNet(tiny_config())
    x_t, g, t = torch.randn(1, 1, 31, 31), torch.rand(1, 3, 31, 31), torch.tensor([1])
    with pytest.raises(ValueError, match="must be a multiple of 2"):
        model(x_t, t, g)
    with pytest.raises(ValueError, match=r"image g of shape \(1, 1, 32, 32\)"):
        model(torch.randn(1, 1, 32, 32), t, torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="as many levels"):
        tiny_config(dim_g_mults=[1, 2, 4])


def _demo_lesion(size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """One demo image in [0, 1] (as the reference feeds images) and its lesion mask."""
    sample_ = render_sample(np.random.default_rng([0, 0]), size, "melanoma", 2)
    image = torch.from_numpy(sample_.image).permute(2, 0, 1)[None].float() / 255
    return image, torch.from_numpy(sample_.mask)[None, None].float()


def test_one_adam_step_reduces_the_hybrid_boundary_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    image, mask = _demo_lesion()
    model = DermoSegDiffUNet(tiny_config())
    diffusion = GaussianDiffusion(beta_schedule("linear", 250))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x0, g = mask_to_diffusion(mask).repeat(4, 1, 1, 1), image.repeat(4, 1, 1, 1)
    t, noise = torch.tensor([1, 60, 130, 249]), torch.randn(4, 1, 32, 32)
    weights = boundary_weight_map(mask.repeat(4, 1, 1, 1), t, 250, gamma=0.25,
                                  proximity=boundary_proximity(mask).repeat(4, 1, 1, 1))

    def loss() -> torch.Tensor:
        eps = model(diffusion.q_sample(x0, t, noise), t, g)
        return diffusion_loss(eps, noise, "hybrid", weights, boundary_weight=0.25)

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    assert loss().item() < before.item()


def test_tiny_model_overfits_one_demo_image_and_samples_its_lesion_mask():
    torch.manual_seed(0)
    image, mask = _demo_lesion()
    assert 0.05 < mask.mean() < 0.5  # a lesion, not a speck or the image
    timesteps, batch = 50, 4
    model = DermoSegDiffUNet(tiny_config(attn_heads=2, attn_dim_head=8))
    diffusion = GaussianDiffusion(beta_schedule("linear", timesteps))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    x0, g = mask_to_diffusion(mask).repeat(batch, 1, 1, 1), image.repeat(batch, 1, 1, 1)
    for _ in range(200):
        t = torch.randint(0, timesteps, (batch,))
        noise = torch.randn_like(x0)
        loss = diffusion_loss(model(diffusion.q_sample(x0, t, noise), t, g), noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    model.eval()
    members, _ = sample(lambda x_t, t: model(x_t, t, image.expand(len(x_t), -1, -1, -1)),
                        (5, 1, 32, 32), diffusion, "ddim", steps=10,
                        generator=torch.Generator().manual_seed(1))
    probability, predicted = ensemble_masks(list(members.unsqueeze(1)))
    assert probability.shape == mask.shape
    dice = 2 * (predicted * mask).sum() / (predicted.sum() + mask.sum())
    assert dice > 0.9, f"Dice {dice:.3f} of the 5-sample DDIM ensemble"


# --------------------------------------------------------------- weight standardisation (item 5)

def test_weight_standardisation_is_the_same_in_fp32_and_under_bf16_autocast():
    from dermml.models.dermosegdiff import WeightStandardizedConv2d

    torch.manual_seed(0)
    conv = WeightStandardizedConv2d(4, 6, 3, padding=1)
    with torch.no_grad():  # small kernels: eps 1e-3 instead of 1e-5 would shrink them ~3x
        conv.weight.mul_(1e-2 / conv.weight.std())
    x = torch.randn(2, 4, 8, 8)
    fp32_weight, fp32_out = conv.standardized_weight(), conv(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16_weight, bf16_out = conv.standardized_weight(), conv(x.bfloat16())
    torch.testing.assert_close(bf16_weight, fp32_weight, rtol=0, atol=0)
    w = conv.weight.detach().double()
    closed_form = (w - w.mean(dim=(1, 2, 3), keepdim=True)) / (
        w.var(dim=(1, 2, 3), unbiased=False, keepdim=True) + 1e-5).sqrt()
    torch.testing.assert_close(fp32_weight.detach().double(), closed_form)  # eps 1e-5
    torch.testing.assert_close(bf16_out.float(), fp32_out, rtol=0.02, atol=0.05)
    half = WeightStandardizedConv2d(4, 6, 3).to(torch.bfloat16)  # bf16 weights: fp32 maths
    with torch.no_grad():
        half.weight.copy_(conv.weight)
    torch.testing.assert_close(half.standardized_weight().float(), fp32_weight, rtol=1e-2,
                               atol=1e-2)

