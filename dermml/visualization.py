"""Pictures for humans: mask boundaries drawn over images and image grids (numpy only), and the
training loss curve (matplotlib, imported only when drawn)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

GROUND_TRUTH_RGB = (0, 255, 0)
PREDICTION_RGB = (255, 0, 255)


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` that touch the background (a 1-px inner contour)."""
    mask = mask.astype(bool)
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def overlay_boundaries(image: np.ndarray, ground_truth: np.ndarray | None,
                       prediction: np.ndarray | None) -> np.ndarray:
    """``image`` with the ground-truth contour in green and the predicted one in magenta."""
    out = image.copy()
    if ground_truth is not None:
        out[mask_boundary(ground_truth)] = GROUND_TRUTH_RGB
    if prediction is not None:
        out[mask_boundary(prediction)] = PREDICTION_RGB
    return out


def image_grid(tiles: list[np.ndarray], columns: int = 4, pad: int = 2) -> np.ndarray:
    """Tiles (same size, RGB uint8) laid out in a grid with a white gap."""
    if not tiles:
        raise ValueError("no tiles to lay out")
    h, w = tiles[0].shape[:2]
    rows = (len(tiles) + columns - 1) // columns
    cols = min(columns, len(tiles))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        y, x = pad + r * (h + pad), pad + c * (w + pad)
        grid[y : y + h, x : x + w] = tile if tile.ndim == 3 else tile[..., None]
    return grid


def loss_curve_figure(train_loss: list[tuple[int, float]], val_metric: list[tuple[int, float]],
                      val_name: str):
    """Train loss (left axis) and the validation gate metric (right axis) per epoch, from
    (0-based epoch, value) pairs. A bare ``Figure``: no pyplot state, safe in any thread."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot([e + 1 for e, _ in train_loss], [v for _, v in train_loss], "o-", color="C0",
            markersize=3, label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss", color="C0")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    other = ax.twinx()
    other.plot([e + 1 for e, _ in val_metric], [v for _, v in val_metric], "s-", color="C1",
               markersize=3, label=val_name)
    other.set_ylabel(val_name, color="C1")
    fig.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return fig
