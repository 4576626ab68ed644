"""Placing lesions in a body's texture (DermSynth3D's SelectAndPaste, in texture space).

A placement looks at a random skin point from U(0.4, 0.6) m along its normal; the lesion crop
sits at the centre of that view. It is rejected when the dilated lesion would cover non-skin or
background (``not_skin``), when depth under it changes by more than 0.02 m (``depth_change``),
or when it would overlap an earlier lesion (``overlap``). An accepted lesion is written into
the texture texel by texel: every texel of every UV chart whose surface point the camera sees
inside the lesion takes the lesion's colour there, so a lesion crossing a UV seam is painted on
both sides of it (the seam padding of ``texture.py`` covers bilinear lookups at chart edges).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from dermml.synth3d.config import PasteConfig
from dermml.synth3d.lesions import LesionCrop
from dermml.synth3d.scene import BodyScene, View, sample_image

PLACEMENT_FOV = 30.0
VISIBILITY_TOLERANCE = 0.01
"""A texel counts as seen when its depth is within this (metres) of the pixel's depth."""


@dataclass
class Placement:
    """One accepted lesion: where it was looked at from and which texels it covers."""

    lesion_id: int
    sample_id: str
    face: int
    look_at: list[float]
    normal: list[float]
    distance: float
    max_depth_change: float
    attempts: int
    lesion_texels: np.ndarray = field(repr=False)
    dilated_texels: np.ndarray = field(repr=False)

    def record(self) -> dict:
        """The placement as a table row (lesion_params in DermSynth3D)."""
        return {"lesion_mask_id": self.lesion_id, "lesion_sample_id": self.sample_id,
                "face_idx": self.face, "look_at": [round(v, 5) for v in self.look_at],
                "normal": [round(v, 5) for v in self.normal],
                "normal_weight": round(self.distance, 5),
                "max_depth_diff": round(self.max_depth_change, 5), "attempts": self.attempts,
                "n_texels": int(len(self.lesion_texels))}


def centred_masks(crop: LesionCrop, size: int, dilation: int
                  ) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(lesion, dilated lesion) masks of the crop placed at the view's centre, and the crop's
    top-left pixel (column, row). The dilation stays inside the crop, as in the reference."""
    from scipy import ndimage

    h, w = crop.mask.shape
    row0, col0 = size // 2 - h // 2, size // 2 - w // 2
    dilated = ndimage.binary_dilation(crop.mask, iterations=dilation)
    lesion_view = np.zeros((size, size), dtype=bool)
    dilated_view = np.zeros((size, size), dtype=bool)
    lesion_view[row0:row0 + h, col0:col0 + w] = crop.mask
    dilated_view[row0:row0 + h, col0:col0 + w] = dilated
    return lesion_view, dilated_view, (col0, row0)


def poisson_blend(target: np.ndarray, source: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Gradient-domain blend: inside ``region`` the result has ``source``'s Laplacian and meets
    ``target`` on the region's border (Perez et al. 2003). (H, W, 3) float arrays."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.linalg import splu

    region = region.copy()
    region[[0, -1], :] = False
    region[:, [0, -1]] = False
    rows, cols = np.nonzero(region)
    if not len(rows):
        return target.copy()
    index = -np.ones(region.shape, dtype=np.int64)
    index[rows, cols] = np.arange(len(rows))
    entries_r, entries_c, values = [np.arange(len(rows))], [np.arange(len(rows))], \
        [np.full(len(rows), 4.0)]
    rhs = 4 * source[rows, cols]
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        nr, nc = rows + dr, cols + dc
        rhs -= source[nr, nc]
        inner = index[nr, nc] >= 0
        entries_r.append(np.nonzero(inner)[0])
        entries_c.append(index[nr[inner], nc[inner]])
        values.append(-np.ones(int(inner.sum())))
        rhs[~inner] += target[nr[~inner], nc[~inner]]
    matrix = coo_matrix((np.concatenate(values), (np.concatenate(entries_r),
                                                  np.concatenate(entries_c))),
                        shape=(len(rows), len(rows))).tocsc()
    solved = splu(matrix).solve(rhs.astype(np.float64))
    out = target.copy()
    out[rows, cols] = np.clip(solved, 0, 1)
    return out


def place_lesion(scene: BodyScene, next_crop: Callable[[int], LesionCrop], lesion_id: int,
                 cfg: PasteConfig, method: str, rng: np.random.Generator,
                 rejected: Counter) -> Placement | None:
    """Try up to ``cfg.attempts_per_lesion`` placements of the next lesion; None if all fail.
    ``next_crop(max_side)`` draws a lesion crop; reasons of rejected tries go to ``rejected``."""
    size = cfg.view_size
    max_side = max(2, int(size * cfg.max_size_fraction))
    for attempt in range(1, cfg.attempts_per_lesion + 1):
        point, normal, face = scene.sample_skin_point(rng)
        distance = float(rng.uniform(*cfg.distance))
        eye = point + normal * distance + 1e-4
        view = scene.view(eye, point, size, PLACEMENT_FOV)
        crop = next_crop(max_side)
        lesion_view, dilated_view, origin = centred_masks(crop, size, cfg.dilation)
        reason, depth_change = _check_site(scene, view, dilated_view, distance, cfg)
        if reason:
            rejected[reason] += 1
            continue
        placed = _paint(scene, view, crop, lesion_view, dilated_view, origin, distance,
                        lesion_id, method)
        if isinstance(placed, str):
            rejected[placed] += 1
            continue
        lesion_texels, dilated_texels = placed
        return Placement(lesion_id, crop.sample_id, face, point.tolist(), normal.tolist(),
                         distance, depth_change, attempt, lesion_texels, dilated_texels)
    rejected["gave_up"] += 1
    return None


def _check_site(scene: BodyScene, view: View, dilated_view: np.ndarray, distance: float,
                cfg: PasteConfig) -> tuple[str | None, float]:
    under = torch.from_numpy(dilated_view).to(scene.device)
    skin = scene.skin_mask(view)
    if not bool(skin[under].all()):
        return "not_skin", math.inf
    change = float((view.fragments.depth[under] - distance).abs().max())
    if change > cfg.max_depth_change:
        return "depth_change", change
    return None, change


def _paint(scene: BodyScene, view: View, crop: LesionCrop, lesion_view: np.ndarray,
           dilated_view: np.ndarray, origin: tuple[int, int], distance: float,
           lesion_id: int, method: str) -> tuple[np.ndarray, np.ndarray] | str:
    radius = distance * math.tan(math.radians(PLACEMENT_FOV) / 2) * 1.5
    texels, xy = scene.visible_texels(view, radius, VISIBILITY_TOLERANCE)
    device = scene.device
    masks = torch.from_numpy(np.stack([lesion_view, dilated_view], -1).astype(np.float32))
    inside = sample_image(masks.to(device), xy) > 0.5
    lesion_t, dilated_t = texels[inside[:, 0].cpu().numpy()], texels[inside[:, 1].cpu().numpy()]
    if not len(lesion_t):
        return "no_texels"
    if bool((scene.read_texels(scene.dilated_ids, dilated_t) > 0).any()):
        return "overlap"
    crop_image = torch.from_numpy(crop.image).to(device)
    dilated_xy = xy[inside[:, 1]]
    scene.write_texels(scene.dilated, dilated_t, sample_image(crop_image, dilated_xy, origin))
    if method == "poisson":
        current = scene.sample(view, scene.texture).cpu().numpy().astype(np.float64)
        source = current.copy()
        col0, row0 = origin
        h, w = crop.mask.shape
        source[row0:row0 + h, col0:col0 + w] = crop.image
        blended = torch.from_numpy(poisson_blend(current, source, dilated_view)).float()
        values = sample_image(blended.to(device), dilated_xy)
        scene.write_texels(scene.texture, dilated_t, values)
    else:
        lesion_xy = xy[inside[:, 0]]
        scene.write_texels(scene.texture, lesion_t, sample_image(crop_image, lesion_xy, origin))
    scene.write_texels(scene.lesion_ids, lesion_t,
                       torch.full((len(lesion_t), 1), float(lesion_id)))
    scene.write_texels(scene.dilated_ids, dilated_t,
                       torch.full((len(dilated_t), 1), float(lesion_id)))
    return lesion_t, dilated_t
