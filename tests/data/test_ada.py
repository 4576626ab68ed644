"""Adaptive discriminator augmentation (dermml.data.ada): the augment pipe's transforms and
probabilities, and the controller that adjusts p from the discriminator's signs on reals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dermml.data.ada import AUGPIPE_SPECS, AdaController, AugmentPipe, augment_pipe

ALL = ["xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac", "brightness",
       "contrast", "lumaflip", "hue", "saturation"]


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    """Seeded, and one intra-op thread (tiny images; more threads only add contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def smooth_images(n: int, channels: int = 3, size: int = 16) -> torch.Tensor:
    low = torch.randn(n, channels, 4, 4)
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False).clamp(-1, 1)


@pytest.mark.parametrize("channels", [3, 1])
def test_p_zero_is_the_identity(channels):
    pipe = augment_pipe("bgc")
    assert pipe.p.item() == 0.0
    x = torch.randn(8, channels, 16, 16)
    assert torch.equal(pipe(x), x)


def test_p_one_changes_images_and_keeps_shape_and_dtype():
    pipe = augment_pipe("bgc", p=1.0)
    x = smooth_images(16)
    y = pipe(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    changed = (y - x).abs().amax(dim=[1, 2, 3]) > 1e-3
    assert changed.float().mean() > 0.9
    x64 = x.double()
    assert pipe(x64).dtype == torch.float64


def test_deterministic_under_a_seed():
    pipe = augment_pipe("bgc", p=0.7)
    x = smooth_images(6)
    torch.manual_seed(123)
    a = pipe(x)
    torch.manual_seed(123)
    b = pipe(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, pipe(x))


def test_xflip_and_rotate90_are_exact_pixel_permutations():
    x = smooth_images(32)
    flips = AugmentPipe(xflip=1, p=1.0)(x)
    for i in range(32):
        errors = [(flips[i] - x[i]).abs().max(), (flips[i] - x[i].flip(-1)).abs().max()]
        assert min(errors) < 1e-5
    rotated = AugmentPipe(rotate90=1, p=1.0)(x)
    seen = set()
    for i in range(32):
        errors = [(rotated[i] - torch.rot90(x[i], k, [1, 2])).abs().max() for k in range(4)]
        assert min(errors) < 1e-5
        seen.add(min(range(4), key=lambda k: errors[k]))
    assert seen == {0, 1, 2, 3}


def test_integer_translation_moves_pixels():
    pipe = AugmentPipe(xint=1, xint_max=0.25, p=1.0)
    x = smooth_images(8)
    g_inv = pipe.geometric_matrix(8, 16, 16, x.device)
    assert torch.equal(g_inv[:, :2, 2], g_inv[:, :2, 2].round())  # whole pixels
    torch.manual_seed(5)
    y = pipe(x)
    torch.manual_seed(5)
    t = pipe.geometric_matrix(8, 16, 16, x.device)[:, :2, 2].long()
    for i in range(8):  # interior pixels come from x shifted by -t
        tx, ty = t[i].tolist()
        ys, xs = slice(4, 12), slice(4, 12)
        src = x[i, :, 4 + ty:12 + ty, 4 + tx:12 + tx]
        assert torch.allclose(y[i, :, ys, xs], src, atol=1e-5)


def test_brightness_adds_one_offset_per_image():
    pipe = AugmentPipe(brightness=1, p=1.0)
    x = smooth_images(5)
    delta = pipe(x) - x
    assert torch.allclose(delta, delta[:, :1, :1, :1].expand_as(delta), atol=1e-6)
    assert delta[:, 0, 0, 0].abs().min() > 0


def test_color_keeps_luma_axis_for_hue_rotation():
    pipe = AugmentPipe(hue=1, p=1.0)
    grey = torch.full((4, 3, 8, 8), 0.3)  # on the luma axis: a hue rotation leaves it
    torch.testing.assert_close(pipe(grey), grey)
    x = smooth_images(4)
    y = pipe(x)
    torch.testing.assert_close(y.mean(1), x.mean(1), atol=1e-5, rtol=0)  # keeps the luma


def test_probability_scales_with_p():
    pipe = AugmentPipe(xflip=1, p=0.5)
    x = torch.arange(4.0).reshape(1, 1, 1, 4).expand(4000, 1, 1, 4).contiguous()
    flipped = (pipe(x)[:, 0, 0, 0] > 1.5).float().mean().item()
    assert flipped == pytest.approx(0.25, abs=0.03)  # p * multiplier * P(i = 1)


def test_gradients_of_gradients_through_the_pipe():
    pipe = augment_pipe("bgc", p=1.0)
    x = smooth_images(3).requires_grad_(True)
    a = torch.nn.Parameter(torch.ones(1))
    out = (a * pipe(x).square()).sum()
    grads, = torch.autograd.grad(out, x, create_graph=True)
    grads.square().sum().backward()
    assert torch.isfinite(a.grad).all() and a.grad.abs() > 0


def test_factory_specs():
    assert augment_pipe("noaug") is None
    bgc = augment_pipe("bgc")
    assert all(getattr(bgc, name) == 1 for name in ALL)
    assert (bgc.xint_max, bgc.scale_std, bgc.rotate_max, bgc.aniso_std, bgc.xfrac_std) == \
        (0.125, 0.2, 1, 0.2, 0.125)
    assert (bgc.brightness_std, bgc.contrast_std, bgc.hue_max, bgc.saturation_std) == \
        (0.2, 0.5, 1, 1)
    assert set(AUGPIPE_SPECS) >= {"b", "g", "c", "gc", "bg", "bgc", "blit", "geom", "color"}
    bg = augment_pipe("bg")
    assert bg.rotate == 1 and bg.brightness == 0
    gc = augment_pipe("gc")
    assert gc.xflip == 0 and gc.scale == 1 and gc.hue == 1
    assert augment_pipe("c", rotate_max=0.5).rotate_max == 0.5
    with pytest.raises(ValueError, match="not implemented"):
        augment_pipe("bgcf")
    with pytest.raises(ValueError, match="unknown augment pipe"):
        augment_pipe("xyz")
    with pytest.raises(ValueError, match="1 or 3 channels"):
        augment_pipe("c", p=1.0)(torch.zeros(2, 5, 8, 8))


def test_a_mask_channel_moves_with_the_image_and_keeps_its_values():
    torch.manual_seed(0)
    image = torch.rand(4, 3, 16, 16)
    mask = (torch.rand(4, 1, 16, 16) > 0.5).float()
    torch.manual_seed(1)
    out = augment_pipe("bgc", p=1.0)(torch.cat([image, mask], 1))
    torch.manual_seed(1)
    geom_only = augment_pipe("bg", p=1.0)(torch.cat([image, mask], 1))
    assert out.shape == (4, 4, 16, 16)
    assert torch.allclose(out[:, 3], geom_only[:, 3])  # colour leaves the mask alone


# ----------------------------------------------------------------------------- the controller

def test_controller_raises_p_when_d_overfits_and_lowers_it_otherwise():
    pipe = augment_pipe("bgc")
    ada = AdaController(pipe, target=0.6, interval=4, kimg=500, batch_size=32)
    step = 32 * 4 / (500 * 1000)
    assert ada.adjustment == pytest.approx(step)
    for _ in range(4):
        ada.accumulate(torch.tensor([1.0, 1.0, 1.0, -1.0]))  # r_t = 0.5 < 0.6
    assert ada.step() == 0.0 and ada.rt == pytest.approx(0.5)  # falls, clamped at 0
    for _ in range(3):
        for _ in range(4):
            ada.accumulate(torch.ones(8))  # r_t = 1: D is confident on reals
        ada.step()
    assert ada.p == pytest.approx(3 * step) and ada.rt == 1.0
    ada.accumulate(-torch.ones(8))
    assert ada.step() == pytest.approx(2 * step)
    assert ada.step() == pytest.approx(2 * step)  # nothing accumulated: p kept
    assert pipe.p.item() == pytest.approx(2 * step)


def test_controller_state_round_trip():
    pipe = augment_pipe("bgc")
    ada = AdaController(pipe, batch_size=8)
    ada.accumulate(torch.ones(4))
    ada.step()
    ada.accumulate(torch.tensor([1.0, -1.0, 1.0]))
    state = ada.state_dict()
    other = AdaController(augment_pipe("bgc"), batch_size=8)
    other.load_state_dict(state)
    assert other.p == ada.p and other.rt == ada.rt == 1.0
    assert other.step() == ada.step()  # the pending signs travelled too
    with pytest.raises(ValueError):
        AdaController(pipe, interval=0, batch_size=8)
