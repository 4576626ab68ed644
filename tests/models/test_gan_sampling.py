"""Using a generator: seeds name images, style mixing swaps the chosen layers, projection
finds a W that reproduces a generated image better than the average W does."""

import numpy as np
import pytest
import torch

from dermml.models.gan_sampling import (
    generate,
    noise_buffers,
    noise_regularisation,
    project,
    style_mix,
)
from dermml.models.stylegan2 import Generator, StyleGAN2Config

CFG = StyleGAN2Config(z_dim=16, w_dim=16, mapping_layers=2, channel_base=256, channel_max=16)


@pytest.fixture()
def G():
    torch.manual_seed(0)
    return Generator(CFG, 16, 2).eval()


def test_generate_is_deterministic_by_seed_and_class(G):
    a = generate(G, [0, 1, 0], [5, 5, 6], 1.0)
    b = generate(G, [0, 1, 0], [5, 5, 6], 1.0)
    assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], a[2])
    mixed_psi = generate(G, [0, 0], [5, 5], [1.0, 0.0])
    assert np.array_equal(mixed_psi[0], a[0]) and not np.array_equal(mixed_psi[1], a[0])


def test_style_mixing_rows_columns_and_layers(G):
    rows = style_mix(G, [1, 2], [3, 4, 5], class_index=1, styles=[0, 1])
    assert len(rows) == 3 and all(len(r) == 4 for r in rows)
    sources = generate(G, [1] * 5, [1, 2, 3, 4, 5])
    assert np.array_equal(rows[1][0], sources[0]) and np.array_equal(rows[0][1], sources[2])
    assert not np.array_equal(rows[1][1], rows[1][0])  # layers 0-1 came from seed 3
    with pytest.raises(ValueError, match="outside"):
        style_mix(G, [1], [2], styles=[G.num_ws])


def test_projection_reproduces_a_generated_image_better_than_the_average_w(G):
    torch.manual_seed(0)
    target = generate(G, [1], [7], 1.0)[0]
    before = {k: v.clone() for k, v in noise_buffers(G).items()}
    w, image, losses = project(G, target, class_index=1, steps=120, w_avg_samples=500)
    assert w.shape == (G.num_ws, G.w_dim) and image.shape == target.shape
    average = generate(G, [1], [7], 0.0)[0]  # psi 0: the class's average W
    err = np.mean((image.astype(float) - target) ** 2)
    assert err < 0.5 * np.mean((average.astype(float) - target) ** 2)
    assert losses[-1] < losses[0]
    for name, buf in noise_buffers(G).items():  # the generator keeps its own noise maps
        assert torch.equal(buf, before[name]) and not buf.requires_grad
    with pytest.raises(ValueError, match="resize"):
        project(G, np.zeros((8, 8, 3), np.uint8), steps=1)


def test_noise_regularisation_is_zero_for_uncorrelated_and_large_for_smooth_noise():
    torch.manual_seed(0)
    white = [torch.randn(1, 1, 32, 32)]
    smooth = [torch.ones(1, 1, 32, 32)]
    assert noise_regularisation(white) < 0.01 < noise_regularisation(smooth)
