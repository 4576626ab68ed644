"""StyleGAN2 networks and losses (dermml.models.stylegan2, dermml.losses.gan): the building blocks
against explicit formulations, the networks' shapes, conditioning, truncation and parameter
counts (those of NVlabs/stylegan2-ada-pytorch for the same settings), and the loss phases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dermml.data.ada import augment_pipe
from dermml.losses.gan import StyleGAN2Loss, r1_penalty
from dermml.models.stylegan2 import (
    Conv2dLayer,
    Discriminator,
    FullyConnectedLayer,
    Generator,
    MinibatchStdLayer,
    StyleGAN2,
    StyleGAN2Config,
    conv2d_resample,
    downsample2d,
    modulated_conv2d,
    one_hot,
    setup_filter,
    upsample2d,
)

TINY = dict(z_dim=16, w_dim=16, mapping_layers=2, channel_base=128, channel_max=16)


def tiny_cfg(**overrides) -> StyleGAN2Config:
    return StyleGAN2Config(**{**TINY, **overrides})


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread: these networks are tiny, and on a small shared machine
    more threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------------- the blocks

def naive_upsample2x(x: torch.Tensor, pad: int = 0) -> torch.Tensor:
    """Zero insertion, zero padding, then the [1,3,3,1] filter (x4 gain) as a plain 4x4
    convolution: size 2H + 2 * pad (the convolution's padding is applied to the upsampled image
    before filtering, as the reference's conv2d_resample does)."""
    n, c, h, w = x.shape
    up = torch.zeros(n, c, 2 * h, 2 * w, dtype=x.dtype)
    up[:, :, ::2, ::2] = x
    taps = torch.tensor([1.0, 3, 3, 1], dtype=x.dtype)
    kernel = torch.outer(taps, taps) / 64 * 4
    up = F.pad(up, [2 + pad, 1 + pad, 2 + pad, 1 + pad])
    return F.conv2d(up, kernel[None, None].repeat(c, 1, 1, 1), groups=c)


@pytest.mark.parametrize("up", [1, 2])
@pytest.mark.parametrize("demodulate", [True, False])
def test_modulated_conv_equals_per_sample_weights(up, demodulate):
    n, cin, cout, size = 3, 5, 4, 6
    x = torch.randn(n, cin, size, size, dtype=torch.float64)
    weight = torch.randn(cout, cin, 3, 3, dtype=torch.float64)
    styles = torch.randn(n, cin, dtype=torch.float64)
    out = modulated_conv2d(x, weight, styles, demodulate=demodulate, padding=1, up=up,
                           resample_filter=setup_filter().double())
    for i in range(n):
        w = weight * styles[i][None, :, None, None]  # w' = w * s
        if demodulate:
            w = w / (w.square().sum(dim=[1, 2, 3], keepdim=True) + 1e-8).sqrt()
        if up == 1:  # correlation, as F.conv2d
            expected = F.conv2d(x[i:i + 1], w, padding=1)
        else:  # upsample with the FIR filter, then a true convolution (flipped kernel)
            expected = F.conv2d(naive_upsample2x(x[i:i + 1], pad=1), w.flip([2, 3]))
        assert out[i:i + 1].shape == expected.shape == (1, cout, size * up, size * up)
        torch.testing.assert_close(out[i:i + 1], expected, rtol=1e-10, atol=1e-10)


def test_conv2d_resample_up_with_correlation_and_down():
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    f = setup_filter().double()
    up = conv2d_resample(x, w, f=f, up=2, padding=1, flip_weight=True)
    torch.testing.assert_close(up, F.conv2d(naive_upsample2x(x, pad=1), w))
    # down: low-pass with the filter (padding 2 for a 3x3 kernel), strided correlation
    taps = torch.tensor([1.0, 3, 3, 1], dtype=torch.float64)
    kernel = (torch.outer(taps, taps) / 64)[None, None].repeat(3, 1, 1, 1)
    low = F.conv2d(F.pad(x, [2, 2, 2, 2]), kernel, groups=3)
    down = conv2d_resample(x, w, f=f, down=2, padding=1)
    torch.testing.assert_close(down, F.conv2d(low, w, stride=2))
    assert down.shape == (2, 4, 4, 4)


def test_fir_resampling_keeps_a_constant_image():
    f = setup_filter()
    x = torch.full((1, 2, 8, 8), 3.0)
    assert torch.allclose(upsample2d(x, f)[..., 2:-2, 2:-2], torch.tensor(3.0))
    assert torch.allclose(downsample2d(x, f)[..., 1:-1, 1:-1], torch.tensor(3.0))
    assert upsample2d(x, f).shape[-1] == 16 and downsample2d(x, f).shape[-1] == 4


def test_equalised_lr_fully_connected():
    fan_in, lr = 64, 0.01
    layer = FullyConnectedLayer(fan_in, 32, lr_multiplier=lr, bias_init=0.5)
    # stored ~N(0,1)/lr; effective = stored * lr / sqrt(fan_in) has std 1/sqrt(fan_in)
    assert layer.weight.std().item() == pytest.approx(1 / lr, rel=0.1)
    assert layer.weight_gain == pytest.approx(lr / math.sqrt(fan_in))
    assert (layer.weight * layer.weight_gain).std().item() == pytest.approx(
        1 / math.sqrt(fan_in), rel=0.1)
    assert torch.allclose(layer.bias, torch.tensor(0.5))
    x = torch.randn(8, fan_in)
    out = layer(x)
    expected = x @ (layer.weight * lr / math.sqrt(fan_in)).t() + layer.bias * lr
    torch.testing.assert_close(out, expected)
    # gradients w.r.t. the stored parameters carry the runtime gains
    out.sum().backward()
    torch.testing.assert_close(layer.weight.grad,
                               (lr / math.sqrt(fan_in)) * x.sum(0).expand(32, fan_in))
    torch.testing.assert_close(layer.bias.grad, torch.full((32,), lr * 8))


def test_equalised_lr_lrelu_gain_and_conv():
    fc = FullyConnectedLayer(8, 4, activation="lrelu")
    x = torch.randn(5, 8)
    pre = x @ (fc.weight / math.sqrt(8)).t() + fc.bias
    torch.testing.assert_close(fc(x), F.leaky_relu(pre, 0.2) * math.sqrt(2))
    conv = Conv2dLayer(3, 6, kernel_size=3, activation="lrelu", conv_clamp=0.5)
    img = torch.randn(2, 3, 8, 8)
    out = conv(img)
    ref = F.conv2d(img, conv.weight / math.sqrt(3 * 9), conv.bias, padding=1)
    torch.testing.assert_close(out, (F.leaky_relu(ref, 0.2) * math.sqrt(2)).clamp(-0.5, 0.5))
    conv.weight.grad = None
    F.conv2d(img, conv.weight * conv.weight_gain, padding=1).sum().backward()
    direct = conv.weight.grad.clone()
    conv.weight.grad = None
    torch.nn.functional.conv2d(img, conv.weight, padding=1).sum().backward()
    torch.testing.assert_close(direct, conv.weight.grad / math.sqrt(27))


def test_mapping_lr_multiplier_in_generator():
    G = Generator(tiny_cfg(), 8, num_classes=2)
    assert G.mapping.fc0.weight_gain == pytest.approx(0.01 / math.sqrt(16 + 16))
    assert G.mapping.fc0.weight.std().item() > 50  # stored scaled up by 1/0.01
    assert G.mapping.embed.weight_gain == pytest.approx(1 / math.sqrt(2))  # embed: lr 1


# ------------------------------------------------------------------------------ the generator

def test_generator_shapes_range_and_conditioning():
    G = Generator(tiny_cfg(), 16, num_classes=3)
    assert (G.z_dim, G.c_dim, G.w_dim, G.num_ws, G.img_resolution, G.img_channels) == \
        (16, 3, 16, 6, 16, 3)
    z = torch.randn(4, 16)
    c = one_hot(torch.tensor([0, 1, 2, 0]), 3)
    img = G(z, c, noise_mode="const")
    assert img.shape == (4, 3, 16, 16) and img.dtype == torch.float32
    assert torch.isfinite(img).all() and 0.05 < img.std().item() < 3
    torch.testing.assert_close(G(z, c, noise_mode="const"), img)  # deterministic
    torch.testing.assert_close(G(z, torch.tensor([0, 1, 2, 0]), noise_mode="const"), img)
    other = G(z, one_hot(torch.tensor([1, 2, 0, 1]), 3), noise_mode="const")
    assert (other - img).abs().amax(dim=[1, 2, 3]).min() > 1e-3  # the class changes each image
    ws = G.mapping(z, c)
    assert ws.shape == (4, G.num_ws, 16)
    torch.testing.assert_close(G.synthesis(ws, noise_mode="const"), img)


def test_noise_modes():
    G = Generator(tiny_cfg(), 8, num_classes=0)
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise_strength"):
                p.fill_(0.5)
    z = torch.randn(2, 16)
    assert not torch.equal(G(z, None), G(z, None))
    assert torch.equal(G(z, None, noise_mode="const"), G(z, None, noise_mode="const"))
    assert not torch.equal(G(z, None, noise_mode="none"), G(z, None, noise_mode="const"))


def test_orig_architecture_and_num_ws():
    G = Generator(tiny_cfg(architecture_g="orig"), 32, num_classes=0)
    assert G.num_ws == 8 and not hasattr(G.synthesis.b16, "torgb")
    assert G(torch.randn(2, 16), None).shape == (2, 3, 32, 32)
    assert Generator(tiny_cfg(), 8, 0, img_channels=1)(torch.randn(1, 16), None).shape == \
        (1, 1, 8, 8)


def test_truncation_psi_zero_gives_w_avg():
    G = Generator(tiny_cfg(), 8, num_classes=2)
    G.mapping.w_avg.normal_()
    z, c = torch.randn(5, 16), one_hot(torch.tensor([0, 1, 0, 1, 1]), 2)
    ws = G.mapping(z, c, truncation_psi=0)
    torch.testing.assert_close(ws, G.mapping.w_avg.expand_as(ws))
    half = G.mapping(z, c, truncation_psi=0.5, truncation_cutoff=2)
    full = G.mapping(z, c)
    torch.testing.assert_close(half[:, :2], G.mapping.w_avg.lerp(full[:, :2], 0.5))
    torch.testing.assert_close(half[:, 2:], full[:, 2:])


def test_w_avg_tracks_with_beta():
    G = Generator(tiny_cfg(), 8, num_classes=0)
    z = torch.randn(6, 16)
    before = G.mapping.w_avg.clone()
    G.mapping(z, None)
    assert torch.equal(G.mapping.w_avg, before)  # no update unless asked
    w = G.mapping(z, None, update_emas=True)[:, 0]
    torch.testing.assert_close(G.mapping.w_avg, w.mean(0) + (before - w.mean(0)) * 0.995)


def test_bad_shapes_and_config():
    with pytest.raises(ValueError, match="power of 2"):
        Generator(tiny_cfg(), 12, 0)
    with pytest.raises(ValueError, match="power of 2"):
        Discriminator(tiny_cfg(), 4, 0)
    with pytest.raises(ValueError, match=r"z must be \[N, 16\]"):
        Generator(tiny_cfg(), 8, 0)(torch.randn(2, 8), None)
    with pytest.raises(ValueError, match="pass c"):
        Generator(tiny_cfg(), 8, 2)(torch.randn(2, 16), None)
    with pytest.raises(Exception, match="extra"):
        StyleGAN2Config(resolution=32)
    cfg = StyleGAN2Config()
    assert (cfg.z_dim, cfg.w_dim, cfg.mapping_layers, cfg.channel_base, cfg.channel_max,
            cfg.conv_clamp, cfg.architecture_g, cfg.architecture_d) == \
        (512, 512, 8, 32768, 512, 256, "skip", "resnet")


def test_one_hot():
    assert one_hot(torch.tensor([2, 0]), 3).tolist() == [[0, 0, 1], [1, 0, 0]]
    empty = one_hot(torch.tensor([0, 0, 0]), 0)
    assert empty.shape == (3, 0) and empty.dtype == torch.float32


# -------------------------------------------------------------------------- the discriminator

def test_discriminator_logits_with_and_without_classes():
    img = torch.randn(6, 3, 16, 16)
    D0 = Discriminator(tiny_cfg(), 16, num_classes=0)
    assert D0(img, None).shape == (6, 1)
    assert not hasattr(D0, "mapping") and D0.cmap_dim == 0
    D = Discriminator(tiny_cfg(), 16, num_classes=4)
    assert D.cmap_dim == 16  # the reference's default: channels at 4x4
    a = D(img, one_hot(torch.tensor([0, 1, 2, 3, 0, 1]), 4))
    b = D(img, one_hot(torch.tensor([1, 2, 3, 0, 1, 2]), 4))
    assert a.shape == (6, 1) and not torch.allclose(a, b)
    assert Discriminator(tiny_cfg(cmap_dim=8, architecture_d="orig"), 8, 2)(
        torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 1])).shape == (3, 1)


def _group_std(x: torch.Tensor, members: list[int]) -> torch.Tensor:
    group = x[members]
    return (group.var(dim=0, unbiased=False) + 1e-8).sqrt().mean()


def test_minibatch_std_groups():
    layer = MinibatchStdLayer(group_size=4)
    x = torch.randn(8, 3, 4, 4)
    out = layer(x)
    assert out.shape == (8, 4, 4, 4) and torch.equal(out[:, :3], x)
    for i in range(8):  # divisible: groups {i : i mod 2 == j}, as the reference's reshape
        members = [k for k in range(8) if k % 2 == i % 2]
        assert torch.allclose(out[i, 3], _group_std(x, members).expand(4, 4), atol=1e-6)


@pytest.mark.parametrize("n", [6, 5, 3])
def test_minibatch_std_with_batch_not_divisible_by_group(n):
    x = torch.randn(n, 4, 2, 2, requires_grad=True)
    out = MinibatchStdLayer(group_size=4, num_channels=2)(x)
    groups = -(-n // 4)
    assert out.shape == (n, 6, 2, 2)
    for i in range(n):
        members = [k for k in range(n) if k % groups == i % groups]
        for f in range(2):
            expected = _group_std(x.detach()[:, 2 * f:2 * f + 2], members)
            assert torch.allclose(out[i, 4 + f], expected.expand(2, 2), atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    D = Discriminator(tiny_cfg(mbstd_group=4), 8, 2)
    assert D(torch.randn(n, 3, 8, 8), torch.zeros(n, dtype=torch.long)).shape == (n, 1)


# ---------------------------------------------------------------- parameter counts (reference)

# Parameter counts of NVlabs/stylegan2-ada-pytorch's training.networks Generator and
# Discriminator built with these settings (img_channels 3).
REFERENCE_COUNTS = [
    # z, w, classes, resolution, mapping layers, channel_base, channel_max, D arch, G, D
    (512, 512, 10, 32, 2, 16384, 512, "orig", 20_215_315, 23_089_664),   # cifar
    (512, 512, 0, 256, 8, 16384, 512, "resnet", 24_767_458, 24_001_089),  # paper256
    (512, 512, 7, 64, 8, 32768, 512, "resnet", 27_298_840, 28_856_320),
    (32, 32, 7, 16, 2, 512, 64, "resnet", 158_190, 248_928),
]


@pytest.mark.parametrize("z, w, classes, res, layers, base, cmax, arch_d, n_g, n_d",
                         REFERENCE_COUNTS)
def test_parameter_counts_match_reference(z, w, classes, res, layers, base, cmax, arch_d,
                                          n_g, n_d):
    cfg = StyleGAN2Config(z_dim=z, w_dim=w, mapping_layers=layers, channel_base=base,
                          channel_max=cmax, architecture_d=arch_d)
    with torch.device("meta"):  # shapes only
        G, D = Generator(cfg, res, classes), Discriminator(cfg, res, classes)
    assert sum(p.numel() for p in G.parameters()) == n_g
    assert sum(p.numel() for p in D.parameters()) == n_d


def test_parameter_count_by_hand():
    """8 px, 1 class-free, channels 16 everywhere, z = w = 16, 2 mapping layers."""
    G = Generator(tiny_cfg(), 8, num_classes=0)
    fc = 16 * 16 + 16
    mapping = 2 * fc
    layer = lambda cin, cout: (16 * cin + cin) + cout * cin * 9 + cout + 1  # noqa: E731
    torgb = (16 * 16 + 16) + 3 * 16 + 3
    synthesis = 16 * 4 * 4 + layer(16, 16) + torgb + 2 * layer(16, 16) + torgb
    assert sum(p.numel() for p in G.parameters()) == mapping + synthesis
    D = Discriminator(tiny_cfg(), 8, num_classes=0)
    conv = lambda cin, cout, k, bias=True: cout * cin * k * k + (cout if bias else 0)  # noqa: E731
    block = conv(3, 16, 1) + conv(16, 16, 3) + conv(16, 16, 3) + conv(16, 16, 1, bias=False)
    epilogue = conv(17, 16, 3) + (16 * 16 * 16 + 16) + (16 + 1)
    assert sum(p.numel() for p in D.parameters()) == block + epilogue


# ------------------------------------------------------------------------------ the model

def test_stylegan2_module_and_ema():
    model = StyleGAN2(tiny_cfg(), 8, num_classes=2)
    keys = model.state_dict().keys()
    assert any(k.startswith("G.") for k in keys) and any(k.startswith("G_ema.") for k in keys)
    assert any(k.startswith("D.") for k in keys)
    assert not any(p.requires_grad for p in model.G_ema.parameters())
    model.train()
    assert model.G.training and not model.G_ema.training
    with torch.no_grad():
        for p in model.G.parameters():
            p.add_(1.0)
        model.G.mapping.w_avg.fill_(2.0)
    before = [p.clone() for p in model.G_ema.parameters()]
    model.update_ema(0.75)
    for b, p_ema, p in zip(before, model.G_ema.parameters(), model.G.parameters(), strict=True):
        torch.testing.assert_close(p_ema, 0.75 * b + 0.25 * p)
    assert torch.equal(model.G_ema.mapping.w_avg, model.G.mapping.w_avg)
    model.update_ema(0.0)
    assert all(torch.equal(a, b) for a, b in zip(model.G_ema.parameters(),
                                                 model.G.parameters(), strict=True))


# ----------------------------------------------------------------------------------- the loss

def test_r1_penalty_matches_analytic_gradient():
    a = torch.nn.Parameter(torch.randn(1, 2, 3, 3))

    def toy_d(x, c):  # D(x) = sum(a * x^2), dD/dx = 2 a x
        return (a * x.square()).sum(dim=[1, 2, 3]).unsqueeze(1)

    x = torch.randn(4, 2, 3, 3)
    penalty = r1_penalty(toy_d, x, None)
    torch.testing.assert_close(penalty, (2 * a * x).square().sum(dim=[1, 2, 3]))
    penalty.sum().backward()  # d/da sum_n sum(4 a^2 x^2) = 8 a sum_n x^2
    torch.testing.assert_close(a.grad, 8 * a.detach() * x.square().sum(0, keepdim=True))
    # the same penalty by hand with autograd
    xr = x.clone().requires_grad_(True)
    grads, = torch.autograd.grad(toy_d(xr, None).sum(), xr)
    torch.testing.assert_close(penalty.detach(), grads.square().sum(dim=[1, 2, 3]))


def _tiny_pair(resolution=16, classes=3, **cfg):
    cfg = tiny_cfg(**cfg)
    return Generator(cfg, resolution, classes), Discriminator(cfg, resolution, classes)


def _batch(n=4, resolution=16, classes=3):
    return (torch.randn(n, 3, resolution, resolution).clamp(-1, 1),
            one_hot(torch.randint(0, classes, (n,)), classes), torch.randn(n, 16),
            one_hot(torch.randint(0, classes, (n,)), classes))


@pytest.mark.parametrize("with_aug", [False, True])
def test_loss_phases_give_finite_grads(with_aug):
    G, D = _tiny_pair()
    pipe = augment_pipe("bgc", p=1.0) if with_aug else None
    loss = StyleGAN2Loss(G, D, augment_pipe=pipe, r1_gamma=1.0)
    real, real_c, z, gen_c = _batch()
    expected = {
        "Gmain": {"Loss/G/loss", "Loss/scores/fake", "Loss/signs/fake"},
        "Greg": {"Loss/pl_penalty", "Loss/G/reg"},
        "Dmain": {"Loss/D/loss", "Loss/scores/fake", "Loss/signs/fake", "Loss/scores/real",
                  "Loss/signs/real"},
        "Dreg": {"Loss/r1_penalty", "Loss/D/reg", "Loss/scores/real", "Loss/signs/real"},
    }
    for phase, keys in expected.items():
        trained, frozen = (G, D) if phase.startswith("G") else (D, G)
        trained.requires_grad_(True)
        frozen.requires_grad_(False)
        G.zero_grad(set_to_none=True)
        D.zero_grad(set_to_none=True)
        stats = loss.accumulate_gradients(phase, real, real_c, z, gen_c, gain=4)
        assert set(stats) == keys, phase
        assert all(v.ndim == 0 and torch.isfinite(v) and not v.requires_grad
                   for v in stats.values())
        grads = [p.grad for p in trained.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), phase
        assert sum(g.abs().sum() for g in grads) > 0, phase
        assert all(p.grad is None for p in frozen.parameters()), phase
    assert -1 <= stats["Loss/signs/real"] <= 1
    assert loss.pl_mean.item() > 0  # Greg moved it from 0
    assert loss.state_dict()["pl_mean"] == loss.pl_mean


def test_path_length_mean_update_and_both_phases():
    G, D = _tiny_pair(resolution=8, classes=0)
    loss = StyleGAN2Loss(G, D, pl_decay=0.5, style_mixing_prob=0.0)
    real, _, z, _ = _batch(4, 8, 1)
    D.requires_grad_(False)
    loss.accumulate_gradients("Greg", real, None, z, None)
    first = loss.pl_mean.item()
    assert first > 0
    torch.manual_seed(1)
    stats = loss.accumulate_gradients("Gboth", real, None, z, None)
    assert loss.pl_mean.item() != first and "Loss/G/loss" in stats and "Loss/G/reg" in stats
    D.requires_grad_(True)
    G.requires_grad_(False)
    stats = loss.accumulate_gradients("Dboth", real, None, z, None)
    assert {"Loss/D/loss", "Loss/r1_penalty"} <= set(stats)
    with pytest.raises(ValueError, match="unknown phase"):
        loss.accumulate_gradients("Gfoo", real, None, z, None)


def test_style_mixing_mixes_ws():
    G, D = _tiny_pair(resolution=16, classes=0)
    z = torch.randn(3, 16)
    _, ws = StyleGAN2Loss(G, D, style_mixing_prob=1.0).run_G(z, None)
    assert not torch.allclose(ws[:, 0], ws[:, -1])  # the last layer always comes from z2
    _, ws = StyleGAN2Loss(G, D, style_mixing_prob=0.0).run_G(z, None)
    assert torch.allclose(ws[:, 0], ws[:, -1])


def test_tiny_discriminator_learns_real_from_fake():
    G, D = _tiny_pair(resolution=8, classes=0, mbstd_group=4)
    G.requires_grad_(False)
    loss = StyleGAN2Loss(G, D, r1_gamma=0)
    opt = torch.optim.Adam(D.parameters(), lr=0.0025, betas=(0.0, 0.99))
    real = torch.linspace(-1, 1, 8).expand(8, 3, 8, 8).contiguous()  # one fixed "real" image
    z = torch.randn(8, 16)
    losses = []
    for _ in range(30):
        opt.zero_grad(set_to_none=True)
        losses.append(loss.accumulate_gradients("Dmain", real, None, z, None)["Loss/D/loss"])
        opt.step()
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
