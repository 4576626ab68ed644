"""The DermoSegDiff U-Net: reference-sized shapes, training on the ε objective, and a tiny model
that learns to segment one demo image by sampling."""

from pathlib import Path

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
from dermml.models.schedulers import get_sampler

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
                        (5, 1, 32, 32), get_sampler("ddim").build(diffusion, 0.0), steps=10,
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


# -------------------------------------------------------------- reference checkpoints (item 1)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "segdiff"
REFERENCE_CONFIGS = {
    "isic2018": DermoSegDiffConfig(),  # PH2 too
    "ham10000": DermoSegDiffConfig(dim_x_mults=[2, 2, 2, 2, 2, 2]),
    "tiny": tiny_config(),
}


def reference_layout(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) of a state dict of the reference code, from the fixtures (made by
    instantiating the reference's DermoSegDiff; see each file's header)."""
    layout = {}
    for line in (FIXTURES / f"{name}.txt").read_text().splitlines():
        if line.startswith("#"):
            continue
        key, shape, dtype = line.split("\t")
        layout[key] = (tuple(int(n) for n in shape.split(",") if n), getattr(torch, dtype))
    return layout


@pytest.mark.parametrize("preset", ["isic2018", "ham10000", "tiny"])
def test_reference_keys_of_each_preset_map_one_to_one_onto_ours_with_their_shapes(preset):
    from dermml.models.dermosegdiff import from_reference, is_reference_layout

    reference = {k: shape for k, (shape, _) in reference_layout(f"reference_keys_{preset}")
                 .items()}
    with torch.device("meta"):  # the 321M-parameter presets cost no memory
        ours = {k: tuple(v.shape) for k, v in
                DermoSegDiffUNet(REFERENCE_CONFIGS[preset]).state_dict().items()}
    assert len(reference) == len(ours) == (632 if preset != "tiny" else 252)
    assert is_reference_layout(reference) and not is_reference_layout(ours)
    assert from_reference(reference) == ours


# One key per rename rule and module kind, written out by hand from the two codes.
SAME_TENSOR = {
    "time_mlp_x.1.weight": "time_mlp_x.1.weight",
    "init_conv_g.weight": "init_conv_g.weight",
    "encoder_blocks.0.0.rb_x1.rb.mlp.1.weight": "encoder.0.level.rb_x1.time_proj.1.weight",
    "encoder_blocks.1.0.rb_g2.rb.block1.proj.weight": "encoder.1.level.rb_g2.block1.proj.weight",
    "encoder_blocks.0.0.rb_g2.rb.res_conv.weight": "encoder.0.level.rb_g2.res_conv.weight",
    "encoder_blocks.1.0.g_feedback.bias": "encoder.1.level.g_to_x_gate.bias",
    "encoder_blocks.0.0.att_x.att.fn.norm.weight": "encoder.0.level.attn_x.fn.norm.weight",
    "encoder_blocks.1.0.att_g.att.fn.fn.to_out.1.bias":
        "encoder.1.level.attn_g.fn.fn.to_out.1.bias",
    "encoder_blocks.0.1.1.weight": "encoder.0.down_g.1.weight",
    "encoder_blocks.0.2.1.bias": "encoder.0.down_x.1.bias",
    "encoder_blocks.1.1.weight": "encoder.1.down_g.weight",
    "bottleneck.rb_before.rb.block2.norm.weight": "bottleneck.rb_before.block2.norm.weight",
    "bottleneck.ls_attn.s_attn.fn.fn.to_qkv.weight": "bottleneck.self_attn.fn.fn.to_qkv.weight",
    "bottleneck.ls_attn.l_attn.att.fn.fn.to_out.0.weight":
        "bottleneck.linear_attn.fn.fn.to_out.0.weight",
    "bottleneck.rb_after.rb.res_conv.bias": "bottleneck.rb_after.res_conv.bias",
    "decoder_blocks.0.0.rb_d1.rb.block1.proj.bias":
        "decoder.0.level.rb_second_skip.block1.proj.bias",
    "decoder_blocks.1.0.rb_d2.rb.mlp.1.bias": "decoder.1.level.rb_first_skip.time_proj.1.bias",
    "decoder_blocks.1.0.att_x.att.fn.fn.to_qkv.weight": "decoder.1.level.attn.fn.fn.to_qkv.weight",
    "decoder_blocks.0.1.1.weight": "decoder.0.up.1.weight",
    "decoder_blocks.1.1.bias": "decoder.1.up.bias",
    "final_rb.rb.block1.norm.bias": "final_block.block1.norm.bias",
    "final_conv.weight": "final_conv.weight",
}


def _random_state(layout, generator: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: (torch.randn(shape, generator=generator) if dtype.is_floating_point
                else torch.zeros(shape, dtype=dtype)) for k, (shape, dtype) in layout.items()}


def test_a_checkpoint_saved_as_the_reference_does_loads_through_pretrained(tmp_path):
    from dermml.tasks import get_task
    from dermml.training.run import resolve_config

    generator = torch.Generator().manual_seed(0)
    online = _random_state(reference_layout("reference_keys_tiny"), generator)
    ema = _random_state(reference_layout("reference_ema_keys_tiny"), generator)
    assert {k[len("online_model."):] for k in ema if k.startswith("online_model.")} == set(online)
    ema.update({f"online_model.{k}": v for k, v in online.items()})  # EMA wraps the same model
    ema["initted"], ema["step"] = torch.tensor([1.0]), torch.tensor([1234])
    path = tmp_path / "dsd_i01.pth"
    torch.save({"model": online, "epoch": 41, "epochs": 500,  # as src/training.py saves it
                "optimizer": torch.optim.Adam([torch.zeros(1)], lr=1e-4).state_dict(),
                "ema": ema, "vl_loss": np.mean([0.25, 0.5])}, path)
    cfg = resolve_config("segdiff", None, [
        "model.dim_x=8", "model.dim_g=8", "model.dim_x_mults=[1,2]", "model.dim_g_mults=[1,2]",
        "model.resnet_block_groups=4", f"model.pretrained={path}"])  # what --pretrained sets
    model = get_task("segdiff").build_model(cfg)
    ours = model.state_dict()

    for ref_key, our_key in SAME_TENSOR.items():
        torch.testing.assert_close(ours[f"unet.{our_key}"], online[ref_key], rtol=0, atol=0)
        torch.testing.assert_close(ours[f"ema_unet.{our_key}"], ema[f"ema_model.{ref_key}"],
                                   rtol=0, atol=0)
    # Every reference tensor landed somewhere, each exactly once (all values are distinct).
    for prefix, source in (("unet.", online), ("ema_unet.", {k[len("ema_model."):]: v for k, v
                                                             in ema.items()
                                                             if k.startswith("ema_model.")})):
        loaded = sorted(tuple(v.flatten().tolist()) for k, v in ours.items()
                        if k.startswith(prefix))
        assert loaded == sorted(tuple(v.flatten().tolist()) for v in source.values())
    assert int(model.ema_step) == 1234 and bool(model.ema_initted)


def test_reference_network_alone_and_our_own_layouts_load_too(tmp_path):
    from dermml.models.dermosegdiff import from_reference
    from dermml.tasks.segdiff import SegDiffConfig, SegDiffNet, load_segdiff_weights

    cfg = SegDiffConfig(model=tiny_config())
    generator = torch.Generator().manual_seed(1)
    network = _random_state(reference_layout("reference_keys_tiny"), generator)
    torch.save(network, tmp_path / "network.pt")
    model = SegDiffNet(cfg)
    load_segdiff_weights(model, str(tmp_path / "network.pt"))
    expected = from_reference(network)
    for key, value in expected.items():  # no EMA in the file: both copies, fresh EMA
        assert torch.equal(model.unet.state_dict()[key], value)
        assert torch.equal(model.ema_unet.state_dict()[key], value)
    assert int(model.ema_step) == 0 and not bool(model.ema_initted)

    torch.save({"model": model.state_dict(), "epoch": 3}, tmp_path / "dermml.pt")
    again = SegDiffNet(cfg)
    load_segdiff_weights(again, str(tmp_path / "dermml.pt"))
    for key, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[key], value)

    from dermml.tasks import get_task

    with torch.no_grad():
        model.ema_unet.final_conv.bias.add_(1.0)  # EMA and online networks differ
    bundle = {"task": "segdiff", "config": cfg.model_dump(mode="json"),
              "state_dict": get_task("segdiff").serving_state(model.state_dict())}
    torch.save(bundle, tmp_path / "model.pt")  # a logged model's bundle: EMA network only
    served = SegDiffNet(cfg)
    load_segdiff_weights(served, str(tmp_path / "model.pt"))
    for key, value in model.ema_unet.state_dict().items():
        assert torch.equal(served.unet.state_dict()[key], value)
        assert torch.equal(served.ema_unet.state_dict()[key], value)


def test_a_checkpoint_that_does_not_fit_names_the_file_and_the_keys(tmp_path):
    from dermml.models.pretrained import PretrainedWeightsError
    from dermml.tasks.segdiff import SegDiffConfig, SegDiffNet, load_segdiff_weights

    network = _random_state(reference_layout("reference_keys_tiny"), torch.Generator())
    network.pop("final_conv.bias")
    network["encoder_blocks.0.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "odd.pth"
    torch.save(network, path)
    with pytest.raises(PretrainedWeightsError) as err:
        load_segdiff_weights(SegDiffNet(SegDiffConfig(model=tiny_config())), str(path))
    message = str(err.value)
    assert str(path) in message
    assert "encoder.0.level.extra.weight" in message and "unet.final_conv.bias" in message
    wide = SegDiffNet(SegDiffConfig(model=tiny_config(dim_x=16)))
    torch.save(_random_state(reference_layout("reference_keys_tiny"), torch.Generator()), path)
    with pytest.raises(PretrainedWeightsError, match="shapes differ.*model section"):
        load_segdiff_weights(wide, str(path))
