"""Losses on predicted diffusion noise, and DermoSegDiff's boundary-aware pixel weights.

The boundary weight follows the reference ``calc_boundary_att`` (xmindflow/DermoSegDiff,
``src/utils/helper_funcs.py``) and ``BoundaryLoss`` (``src/loss.py``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

LossKind = Literal["l1", "l2", "huber", "boundary", "hybrid"]

# Masks with at most this fraction of lesion pixels get uniform weights, as in the reference.
MIN_FOREGROUND_FRACTION = 0.01


def lesion_boundary(mask: np.ndarray) -> np.ndarray:
    """One-pixel lesion contour of a boolean (H, W) mask: lesion pixels with a 4-neighbour
    outside the lesion. The image border is not a boundary (the lesion may run off the image),
    unlike ``dermml.metrics.segmentation._boundary`` which closes contours for HD95."""
    structure = ndimage.generate_binary_structure(2, 1)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=1)


def boundary_proximity(mask01: torch.Tensor) -> torch.Tensor:
    """Closeness to the lesion boundary, 1 - d / max(d), per image; d is the Euclidean distance
    of each pixel to the nearest boundary pixel. Shape (N, 1, H, W) float32 on the mask's
    device; NaN for masks that get uniform weights (at most 1% lesion, or no boundary).

    Runs on the CPU (scipy's exact distance transform): compute it in data-loader workers and
    pass it to ``boundary_weight_map`` to keep the training step free of host round trips.
    """
    if mask01.dim() != 4 or mask01.shape[1] != 1:
        raise ValueError(f"mask of shape {tuple(mask01.shape)}: expected (N, 1, H, W)")
    masks = (mask01.detach().float().cpu().numpy()[:, 0] > 0.5)
    out = np.stack([mask_proximity(mask) for mask in masks])
    return torch.from_numpy(out[:, None]).to(mask01.device)


def mask_proximity(mask: np.ndarray) -> np.ndarray:
    """``boundary_proximity`` of one boolean (H, W) mask, as float32 numpy (NaN: uniform)."""
    edge = lesion_boundary(mask)
    if mask.sum() <= MIN_FOREGROUND_FRACTION * mask.size or not edge.any():
        return np.full(mask.shape, np.nan, dtype=np.float32)
    dist = ndimage.distance_transform_edt(~edge)
    return (1.0 - dist / max(dist.max(), 1.0)).astype(np.float32)


def boundary_weight_map(mask01: torch.Tensor, t: torch.Tensor, timesteps: int, gamma: float,
                        proximity: torch.Tensor | None = None) -> torch.Tensor:
    """DermoSegDiff's boundary-aware weight of each pixel's noise error, (N, 1, H, W) in [0, 1]:

        w = p ** e(t),   p = 1 - d / max(d),   e(t) = (gamma * (T - t) / T) ** gamma

    d is the distance of a pixel to the lesion boundary (``boundary_proximity``) and T =
    ``timesteps``. The boundary has weight 1 and the farthest pixel 0 for t < T; the exponent
    grows as t -> 0, so the weight concentrates on the boundary for nearly clean masks and
    flattens towards uniform (w = 1 everywhere at t = T) for noisy ones. Masks with at most 1%
    lesion pixels, or no boundary, weigh every pixel 1.

    Differences from the reference: its contour is OpenCV's Canny edge of the mask (one pixel on
    either side of the step), ours the inner 4-neighbour contour; both are one pixel thick.
    """
    if not torch.is_tensor(t) or t.shape != (mask01.shape[0],):
        raise ValueError(f"t must be a tensor of shape ({mask01.shape[0]},), one timestep per "
                         "mask")
    if gamma < 0:
        raise ValueError(f"gamma must be non-negative, got {gamma}")
    if proximity is None:
        proximity = boundary_proximity(mask01)
    elif proximity.shape != mask01.shape:
        raise ValueError(f"proximity of shape {tuple(proximity.shape)} does not match the mask "
                         f"{tuple(mask01.shape)}")
    proximity = proximity.to(mask01.device, torch.float32)
    exponent = (gamma * (timesteps - t.to(mask01.device).float()) / timesteps) ** gamma
    weights = proximity.clamp(0, 1) ** exponent.reshape(-1, 1, 1, 1)
    return torch.where(proximity.isnan(), torch.ones_like(weights), weights)


def diffusion_loss(eps_pred: torch.Tensor, eps: torch.Tensor, kind: LossKind = "l2",
                   weight_map: torch.Tensor | None = None,
                   boundary_weight: float = 0.25) -> torch.Tensor:
    """Loss of the predicted noise ``eps_pred`` against the true ``eps``:

    - l1, l2, huber (smooth L1, beta 1): mean over pixels;
    - boundary: mean of ``weight_map * (eps_pred - eps) ** 2``;
    - hybrid: l2 + boundary_weight * boundary (reference PH2 / HAM10000: 0.25).
    """
    if eps_pred.shape != eps.shape:
        raise ValueError(f"predicted noise {tuple(eps_pred.shape)} and noise "
                         f"{tuple(eps.shape)} differ in shape")
    eps_pred, eps = eps_pred.float(), eps.float()
    if kind == "l1":
        return F.l1_loss(eps_pred, eps)
    if kind == "l2":
        return F.mse_loss(eps_pred, eps)
    if kind == "huber":
        return F.smooth_l1_loss(eps_pred, eps)
    if kind not in ("boundary", "hybrid"):
        raise ValueError(f"unknown diffusion loss {kind!r}; choose l1, l2, huber, boundary or "
                         "hybrid")
    if weight_map is None:
        raise ValueError(f"the {kind} loss needs weight_map (see boundary_weight_map)")
    if torch.broadcast_shapes(weight_map.shape, eps.shape) != eps.shape:
        raise ValueError(f"weight_map of shape {tuple(weight_map.shape)} does not broadcast to "
                         f"the noise {tuple(eps.shape)}")
    boundary = (weight_map.float() * (eps_pred - eps) ** 2).mean()
    if kind == "boundary":
        return boundary
    return F.mse_loss(eps_pred, eps) + boundary_weight * boundary
