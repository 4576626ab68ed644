"""Morphological post-processing of predicted masks, shared by evaluation and serving so the
masks that are scored are the masks that are served."""

from __future__ import annotations

import numpy as np
from pydantic import Field
from scipy import ndimage

from dermml.config import Section

# 8-connectivity: a diagonal touch joins two pixels into one lesion component.
_CONNECTIVITY = np.ones((3, 3), bool)


class PostprocessConfig(Section):
    """Clean-up of one binary mask, applied in the order of the fields below."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Foreground where probability > threshold (binary masks only; multi-class uses argmax)."""
    opening_radius: int = Field(0, ge=0)
    """Opening with a disk of this radius removes specks and thin spurs (0 = off)."""
    closing_radius: int = Field(0, ge=0)
    """Closing with a disk of this radius bridges gaps and notches (0 = off)."""
    fill_holes: bool = False
    """Fill holes enclosed by the mask (a lesion has no holes)."""
    min_component_px: int = Field(0, ge=0)
    """Drop connected components (8-connected) smaller than this many pixels (0 = off)."""
    keep_largest: bool = False
    """Keep only the largest connected component (one lesion per image)."""


def disk(radius: int) -> np.ndarray:
    """Disk structuring element of the given radius, (2r+1, 2r+1) bool."""
    y, x = np.ogrid[-radius:radius + 1, -radius:radius + 1]
    return x * x + y * y <= radius * radius


def _closing(mask: np.ndarray, radius: int) -> np.ndarray:
    # scipy erodes from the image border after dilating, which would eat lesions that touch the
    # border; padding by the radius makes the closing only ever add pixels.
    padded = np.pad(mask, radius)
    closed = ndimage.binary_closing(padded, structure=disk(radius))
    return closed[radius:-radius, radius:-radius]


def _remove_small(mask: np.ndarray, min_px: int) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _largest(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == sizes.argmax()


def clean_mask(mask: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The morphology steps of ``cfg`` (everything but the threshold) on a bool (H, W) mask."""
    mask = mask.astype(bool)
    if cfg.opening_radius:
        mask = ndimage.binary_opening(mask, structure=disk(cfg.opening_radius))
    if cfg.closing_radius:
        mask = _closing(mask, cfg.closing_radius)
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if cfg.min_component_px:
        mask = _remove_small(mask, cfg.min_component_px)
    if cfg.keep_largest:
        mask = _largest(mask)
    return mask


def postprocess_binary(prob: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """Probability map (H, W) -> bool mask: threshold, opening, closing, fill holes, remove
    small components, keep the largest."""
    if prob.ndim != 2:
        raise ValueError(f"expected an (H, W) probability map, got shape {prob.shape}")
    return clean_mask(prob > cfg.threshold, cfg)


def postprocess_multiclass(probs: np.ndarray,
                           per_class: dict[int, PostprocessConfig] | None = None) -> np.ndarray:
    """Probability maps (C, H, W) -> label map (H, W): argmax, then each configured class's
    morphology on its own argmax mask (``threshold`` is not used).

    Every class is cleaned against the argmax map, so the result does not depend on the order
    of the classes, except: pixels a class loses become background 0, and pixels a class gains
    (closing, hole filling) are taken only from argmax background, the lower class index winning
    when two classes grow into the same pixel. Classes without settings are left as they are.
    """
    if probs.ndim != 3:
        raise ValueError(f"expected (C, H, W) probability maps, got shape {probs.shape}")
    labels = probs.argmax(0)
    out = labels.copy()
    for c, cfg in sorted((per_class or {}).items()):
        if not 0 < c < probs.shape[0]:
            raise ValueError(f"post-processing set for class {c}, but classes are "
                             f"1..{probs.shape[0] - 1} (0 is background and is not cleaned)")
        own = labels == c
        cleaned = clean_mask(own, cfg)
        out[own & ~cleaned] = 0
        out[cleaned & (labels == 0) & (out == 0)] = c
    return out


# Starting points for the five dermoscopic attributes (class index 1..5, background 0) at
# 256-512 px: networks are thin meshes broken up by thresholding, so a small closing reconnects
# them; milia-like cysts and globules are small round dots, so an opening removes single-pixel
# noise and a size floor drops what is left of it. Tune per dataset on validation Jaccard.
ATTRIBUTE_POSTPROCESS: dict[int, PostprocessConfig] = {
    1: PostprocessConfig(closing_radius=2, min_component_px=20),  # pigment_network
    2: PostprocessConfig(closing_radius=2, min_component_px=20),  # negative_network
    3: PostprocessConfig(closing_radius=1, min_component_px=10),  # streaks
    4: PostprocessConfig(opening_radius=1, min_component_px=8),  # milia_like_cyst
    5: PostprocessConfig(opening_radius=1, min_component_px=8),  # globules
}
