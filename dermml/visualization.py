"""Pictures for humans: mask boundaries and boxes drawn over images and image grids (numpy and
PIL only), and the training loss curve (matplotlib, imported only when drawn)."""

from __future__ import annotations

import numpy as np
from PIL import Image
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


BOX_TRUTH_RGB = (0, 220, 0)
BOX_PREDICTION_RGB = (230, 0, 0)


def draw_boxes(image: np.ndarray, truth=(), predicted=(), scores=(), labels=(),
               side: int = 192, max_side: int = 512) -> np.ndarray:
    """``image`` with ground-truth boxes in green and predicted ones in red, each prediction
    with its score (and class, when ``labels`` are given) above it. Boxes are COCO [x, y, w, h]
    in ``image``'s pixels; the picture is scaled to a shorter side of at least ``side`` px (a
    longer side of at most ``max_side``) so 1-px lines and the text stay readable."""
    from PIL import ImageDraw

    h, w = image.shape[:2]
    scale = side / min(h, w) if min(h, w) < side else 1.0
    if max(h, w) * scale > max_side:
        scale = max_side / max(h, w)
    picture = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if scale != 1.0:
        picture = picture.resize((max(1, round(w * scale)), max(1, round(h * scale))),
                                 Image.BILINEAR)
    pen = ImageDraw.Draw(picture)

    def corners(box):
        x, y, bw, bh = (float(v) * scale for v in box)
        return [x, y, x + bw, y + bh]

    for box in truth:
        pen.rectangle(corners(box), outline=BOX_TRUTH_RGB, width=2)
    labels = list(labels) or [""] * len(predicted)
    for box, score, label in zip(predicted, scores, labels, strict=True):
        x0, y0, x1, y1 = corners(box)
        pen.rectangle([x0, y0, x1, y1], outline=BOX_PREDICTION_RGB, width=2)
        text = f"{label} {score:.2f}".strip()
        ty = y0 - 11 if y0 >= 11 else y1 + 1
        left, top, right, bottom = pen.textbbox((x0, ty), text)
        pen.rectangle([left - 1, top - 1, right + 1, bottom + 1], fill=(0, 0, 0))
        pen.text((x0, ty), text, fill=BOX_PREDICTION_RGB)
    return np.asarray(picture)


def image_grid(tiles: list[np.ndarray], columns: int = 4, pad: int = 2,
               max_cell: int = 512) -> np.ndarray:
    """Tiles laid out in a grid with a white gap, as one RGB uint8 image.

    Tiles may differ in size and be RGB, RGBA, grayscale (H, W) / (H, W, 1), uint8 or bool.
    Every cell is the largest tile's height by the largest width (scaled down so that neither
    exceeds ``max_cell``); a tile of another size is scaled to fit its cell, keeping its aspect
    ratio, and centred on white. Tiles that all have the cell's size are copied unchanged.
    """
    if not tiles:
        raise ValueError("no tiles to lay out")
    rgb = [_as_rgb(tile, i) for i, tile in enumerate(tiles)]
    h = max(t.shape[0] for t in rgb)
    w = max(t.shape[1] for t in rgb)
    shrink = min(1.0, max_cell / max(h, w))
    h, w = max(1, round(h * shrink)), max(1, round(w * shrink))
    rows = (len(rgb) + columns - 1) // columns
    cols = min(columns, len(rgb))
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, tile in enumerate(rgb):
        tile = _fit(tile, h, w)
        r, c = divmod(i, columns)
        y = pad + r * (h + pad) + (h - tile.shape[0]) // 2
        x = pad + c * (w + pad) + (w - tile.shape[1]) // 2
        grid[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    return grid


def _as_rgb(tile: np.ndarray, index: int) -> np.ndarray:
    """``tile`` as RGB uint8 (H, W, 3)."""
    tile = np.asarray(tile)
    if tile.dtype == bool:
        tile = tile.astype(np.uint8) * 255
    if tile.dtype != np.uint8:
        raise ValueError(f"image_grid: tile {index} has dtype {tile.dtype}; give uint8 images "
                         "(0-255) or bool masks")
    if tile.ndim == 2:
        tile = tile[..., None]
    if tile.ndim != 3 or tile.shape[2] not in (1, 3, 4) or 0 in tile.shape[:2]:
        raise ValueError(f"image_grid: tile {index} has shape {tile.shape}; give (H, W) "
                         "grayscale or (H, W, 1|3|4) images")
    if tile.shape[2] == 1:
        return np.repeat(tile, 3, axis=2)
    return tile[..., :3]


def _fit(tile: np.ndarray, h: int, w: int) -> np.ndarray:
    """``tile`` scaled to fit an ``h`` x ``w`` cell, keeping its aspect ratio."""
    th, tw = tile.shape[:2]
    if (th, tw) == (h, w):
        return tile
    scale = min(h / th, w / tw)
    size = (min(w, max(1, round(tw * scale))), min(h, max(1, round(th * scale))))
    return np.asarray(Image.fromarray(np.ascontiguousarray(tile)).resize(size, Image.BILINEAR))


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


def parallel_coordinates_figure(rows: list[dict], columns: list[str], metric: str,
                                log_columns: tuple[str, ...] = ()):
    """One line per trial through one vertical axis per searched value and the metric, coloured
    by the metric (a hyper-parameter search at a glance). Numbers are scaled to each axis's
    range (log-scaled for ``log_columns``); text values are spread evenly in sorted order.
    Rows without the metric (failed trials) are drawn grey. A bare ``Figure``."""
    import math

    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    axes_names = [*columns, metric]
    positions: dict[str, list[float | None]] = {}
    labels: dict[str, list[tuple[float, str]]] = {}
    for name in axes_names:
        values = [row.get(name) for row in rows]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool)
                      for v in values if v is not None)
        if numeric:
            def scale(v, log=name in log_columns):
                return math.log10(v) if log and v > 0 else float(v)
            present = [scale(v) for v in values if v is not None]
            low, high = (min(present), max(present)) if present else (0.0, 1.0)
            span = (high - low) or 1.0
            positions[name] = [None if v is None else (scale(v) - low) / span for v in values]
            ends = [v for v in values if v is not None]
            labels[name] = [(0.0, f"{min(ends):.3g}"), (1.0, f"{max(ends):.3g}")] if ends else []
        else:
            options = sorted({str(v) for v in values if v is not None})
            step = 1 / max(1, len(options) - 1)
            where = {o: i * step if len(options) > 1 else 0.5 for i, o in enumerate(options)}
            positions[name] = [None if v is None else where[str(v)] for v in values]
            labels[name] = [(where[o], o) for o in options]
    scores = [row.get(metric) for row in rows]
    known = [s for s in scores if s is not None]
    norm = Normalize(min(known), max(known)) if known else Normalize(0, 1)
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(max(5.0, 1.6 * len(axes_names)), 4), dpi=100)
    ax = fig.subplots()
    xs = list(range(len(axes_names)))
    for i, score in enumerate(scores):
        ys = [positions[name][i] for name in axes_names]
        if any(y is None for y in ys[:-1]):
            continue
        ys[-1] = 0.0 if ys[-1] is None else ys[-1]
        ax.plot(xs, ys, color="0.7" if score is None else cmap(norm(score)), alpha=0.9, lw=1.5)
    for x, name in zip(xs, axes_names, strict=True):
        ax.axvline(x, color="0.3", lw=0.8)
        for y, text in labels[name]:
            ax.text(x + 0.03, y, text, fontsize=7, va="center")
    ax.set_xticks(xs, axes_names, fontsize=8, rotation=15)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_names) - 0.6)
    ax.set_ylim(-0.05, 1.05)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=metric)
    fig.tight_layout()
    return fig
