"""Image grids for humans take tiles of any size, grayscale or colour (PH2, original ISIC)."""

import numpy as np
import pytest

from dermml.visualization import image_grid


def cell(grid: np.ndarray, r: int, c: int, h: int, w: int, pad: int = 2) -> np.ndarray:
    y, x = pad + r * (h + pad), pad + c * (w + pad)
    return grid[y : y + h, x : x + w]


def test_tiles_of_one_size_are_copied_unchanged():
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (5, 7, 3), dtype=np.uint8) for _ in range(5)]
    grid = image_grid(tiles, columns=4)
    assert grid.shape == (2 * 7 + 2, 4 * 9 + 2, 3) and grid.dtype == np.uint8
    for i, tile in enumerate(tiles):
        assert np.array_equal(cell(grid, *divmod(i, 4), 5, 7), tile)
    assert (cell(grid, 1, 1, 5, 7) == 255).all()  # no tile there: white


def test_mixed_odd_sizes_fit_one_cell_keeping_their_aspect():
    # The PH2 / original-ISIC failure: square display tiles of 576 and 575 px side, and
    # non-square ones of odd sizes.
    tiles = [np.full((576, 576, 3), 10, np.uint8), np.full((575, 575, 3), 20, np.uint8),
             np.full((287, 383, 3), 30, np.uint8), np.full((101, 33, 3), 40, np.uint8)]
    grid = image_grid(tiles, columns=2, max_cell=1000)
    h, w = 576, 576  # tallest x widest
    assert grid.shape == (2 * (h + 2) + 2, 2 * (w + 2) + 2, 3)
    assert (cell(grid, 0, 0, h, w) == 10).all()
    assert (cell(grid, 0, 1, h, w) == 20).all()  # 575 scaled up to fill the cell
    wide = cell(grid, 1, 0, h, w)
    rows = np.flatnonzero((wide == 30).all(axis=(1, 2)))
    assert len(rows) == round(287 * 576 / 383)  # full width, height scaled alike
    assert (wide[: rows[0]] == 255).all() and (wide[rows[-1] + 1 :] == 255).all()  # centred
    tall = cell(grid, 1, 1, h, w)
    cols = np.flatnonzero((tall == 40).all(axis=(0, 2)))
    assert len(cols) == round(33 * 576 / 101) and abs(cols[0] - (w - 1 - cols[-1])) <= 1


def test_grayscale_bool_rgba_and_rgb_tiles_mix():
    gray = np.full((9, 9), 100, np.uint8)
    single = np.full((9, 9, 1), 150, np.uint8)
    mask = np.ones((9, 9), bool)
    rgba = np.zeros((9, 9, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 7
    rgb = np.zeros((9, 9, 3), np.uint8)
    rgb[..., 2] = 50
    grid = image_grid([gray, single, mask, rgba, rgb], columns=5)
    assert grid.shape == (13, 5 * 11 + 2, 3)
    assert (cell(grid, 0, 0, 9, 9) == 100).all()
    assert (cell(grid, 0, 1, 9, 9) == 150).all()
    assert (cell(grid, 0, 2, 9, 9) == 255).all()
    assert (cell(grid, 0, 3, 9, 9) == [200, 0, 0]).all()  # alpha dropped
    assert (cell(grid, 0, 4, 9, 9) == [0, 0, 50]).all()


def test_large_tiles_are_scaled_down_to_the_cell_limit():
    tiles = [np.zeros((3000, 4000, 3), np.uint8), np.zeros((574, 764, 3), np.uint8)]
    grid = image_grid(tiles, columns=2, max_cell=400)
    assert grid.shape == (300 + 4, 2 * 402 + 2, 3)


@pytest.mark.parametrize("tile, message", [
    (np.zeros((4, 4, 3), np.float32), "tile 1 has dtype float32"),
    (np.zeros((4, 4, 2), np.uint8), r"tile 1 has shape \(4, 4, 2\)"),
    (np.zeros((0, 4, 3), np.uint8), "tile 1 has shape"),
])
def test_tiles_it_cannot_draw_are_named(tile, message):
    with pytest.raises(ValueError, match=message):
        image_grid([np.zeros((4, 4, 3), np.uint8), tile])
    with pytest.raises(ValueError, match="no tiles"):
        image_grid([])
