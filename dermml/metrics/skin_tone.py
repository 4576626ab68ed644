"""Skin tone of an image: the Individual Typology Angle (ITA) of its healthy skin and its group.

ITA = atan((L* - 50) / b*) in degrees (CIELAB, D65 white, sRGB input). The groups are the ITA
skin categories of Chardon et al. (1991) / Del Bino et al. (2013): very light > 55° > light > 41°
> intermediate > 28° > tan > 10° > brown > -30° > dark, read as Fitzpatrick-like types I..VI.
``ITA_TABLE`` is the one table of these thresholds (3D synthesis draws its skin colours from it
too, ``dermml.synth3d.skin_tone``).

``image_ita`` measures an image: it keeps the pixels that are most likely healthy skin (outside
the lesion mask grown by a margin, inside the dermoscope's field of view, no hair) and returns
the ITA of their median L* and median b*. See docs/evaluation.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# ------------------------------------------------------------------------ the ITA table

ITA_TABLE = (
    # (group, Fitzpatrick-like type, lower ITA bound, upper bound drawn by synthesis)
    ("very_light", "I", 55.0, 70.0),
    ("light", "II", 41.0, 55.0),
    ("intermediate", "III", 28.0, 41.0),
    ("tan", "IV", 10.0, 28.0),
    ("brown", "V", -30.0, 10.0),
    ("dark", "VI", -60.0, -30.0),
)
"""The ITA categories, lightest first. A group holds ITA in (lower, next group's lower]; the
ends are open (very light: any ITA > 55°, dark: any ITA <= -30°). The closed ends (70°, -60°)
are only the bounds 3D synthesis draws skin colours from."""

ITA_GROUPS = tuple(row[0] for row in ITA_TABLE)
FITZPATRICK_TYPES = tuple(row[1] for row in ITA_TABLE)
ITA_RANGES = {row[1]: (row[2], row[3]) for row in ITA_TABLE}
"""Fitzpatrick-like type -> (low, high) ITA interval (I and VI open-ended; drawn bounds)."""
GROUP_OF_TYPE = {row[1]: row[0] for row in ITA_TABLE}
UNKNOWN = "unknown"
"""The group of an image whose skin could not be measured (e.g. the lesion fills it)."""


def ita_index(ita: float) -> int:
    """Row of ``ITA_TABLE`` holding ``ita`` (0: very light ... 5: dark); -1 for NaN."""
    if not np.isfinite(ita):
        return -1
    for k, row in enumerate(ITA_TABLE[:-1]):
        if ita > row[2]:
            return k
    return len(ITA_TABLE) - 1


def ita_group(ita: float) -> str:
    """The ITA category of ``ita`` (``very_light`` ... ``dark``), ``unknown`` for NaN."""
    k = ita_index(ita)
    return ITA_TABLE[k][0] if k >= 0 else UNKNOWN


def fitzpatrick_from_ita(ita: float) -> str:
    """The Fitzpatrick-like type (I..VI) whose ITA interval holds ``ita``."""
    k = ita_index(ita)
    if k < 0:
        raise ValueError("ITA is NaN: no skin type")
    return ITA_TABLE[k][1]


# ----------------------------------------------------------------------- sRGB <-> CIELAB

_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])
_EPS = (6 / 29) ** 3


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65, 2° observer), as skimage's ``rgb2lab``."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((np.clip(rgb, 0, None) + 0.055) / 1.055)
                      ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    f = np.where(xyz > _EPS, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) -> sRGB in [0, 1] (D65), clipped: the inverse of ``srgb_to_lab``."""
    lab = np.asarray(lab, dtype=np.float64)
    fy = (lab[..., 0] + 16) / 116
    fx = fy + lab[..., 1] / 500
    fz = fy - lab[..., 2] / 200
    f = np.stack([fx, fy, fz], -1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29)) * _D65
    rgb = xyz @ np.linalg.inv(_SRGB_TO_XYZ).T
    rgb = np.where(rgb <= 0.0031308, 12.92 * rgb, 1.055 * np.clip(rgb, 0, None) ** (1 / 2.4)
                   - 0.055)
    return np.clip(rgb, 0, 1)


def ita_from_lab(lab: np.ndarray) -> float:
    """ITA in degrees of one CIELAB colour (L*, a*, b*)."""
    lightness, _, b = (float(v) for v in np.asarray(lab).reshape(3))
    return math.degrees(math.atan2(lightness - 50.0, b))


# ------------------------------------------------------------------- the ITA of an image


@dataclass(frozen=True)
class SkinToneSettings:
    """How ``image_ita`` picks healthy-skin pixels (lengths are fractions of the shorter
    side of the analysed image, so they mean the same at every resolution)."""

    max_side: int = 256
    """Images are box-downsampled to at most this many pixels on the longer side first: ITA
    is a colour statistic, and this bounds the cost on 6000 x 4000 px dermoscopy images."""
    margin: float = 0.03
    """The lesion mask is grown by this much: the lesion border is imprecise, and pigment
    and erythema fade out into the skin around it."""
    field_of_view: float = 0.92
    """Pixels outside the ellipse inscribed in the image, scaled by this, are left out: the
    dark corners and ring of a dermoscope's circular field of view and its light fall-off."""
    dark_fraction: float = 0.5
    """Pixels darker than this fraction of the candidates' 90th percentile L* that connect to
    the image border are the vignette (a field of view smaller than the image) and are left
    out, grown by half of ``hair_size``."""
    hair_size: float = 0.03
    """Width of the black top-hat (grey closing minus image, on L*) that finds hair: dark
    lines thinner than this."""
    hair_depth: float = 8.0
    """Top-hat response (L* units) above which a pixel is hair."""
    outlier_mads: float = 3.0
    """Of the pixels left, those further than this many robust SDs (1.4826 MAD, at least 2 L*
    / b* units) from the median L* or b* are left out (glare, residual hair, shadows)."""
    min_pixels: int = 25
    """Fewer skin pixels than this: without the margin, then unknown (NaN)."""


DEFAULT_SETTINGS = SkinToneSettings()


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] < 3:
        raise ValueError(f"expected an RGB image (H x W x 3), got shape {image.shape}")
    return image[..., :3]


def _downsample(rgb: np.ndarray, mask: np.ndarray | None,
                max_side: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``rgb`` as float64 in [0, 1], box-averaged by the integer factor that brings it to
    ``max_side`` (before any float copy of a large image); a mask: any lesion pixel in a box
    makes the box lesion."""
    scale = 255.0 if np.issubdtype(rgb.dtype, np.integer) else 1.0
    factor = math.ceil(max(rgb.shape[:2]) / max_side)
    if factor > 1:
        h, w = (rgb.shape[0] // factor) * factor, (rgb.shape[1] // factor) * factor
        rgb = rgb[:h, :w].reshape(h // factor, factor, w // factor, factor, 3).mean(
            (1, 3), dtype=np.float64)
        if mask is not None:
            mask = mask[:h, :w].reshape(h // factor, factor, w // factor, factor).any((1, 3))
    return np.clip(np.asarray(rgb, dtype=np.float64) / scale, 0.0, 1.0), mask


def _fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A lesion mask as booleans of the image's size (nearest neighbour if they differ)."""
    mask = np.asarray(mask)
    if mask.ndim == 3:
        mask = mask.any(axis=2)
    mask = mask > 0
    if mask.shape != shape:
        rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0],
                          mask.shape[0] - 1).astype(int)
        cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1],
                          mask.shape[1] - 1).astype(int)
        mask = mask[rows][:, cols]
    return mask


def _odd(pixels: float) -> int:
    return max(3, 2 * int(round(pixels / 2)) + 1)


def _robust_inliers(values: np.ndarray, mads: float) -> np.ndarray:
    median = np.median(values)
    spread = max(1.4826 * np.median(np.abs(values - median)), 2.0 / mads)
    return np.abs(values - median) <= mads * spread


def skin_pixels(image: np.ndarray, lesion_mask: np.ndarray | None = None,
                settings: SkinToneSettings = DEFAULT_SETTINGS,
                ) -> tuple[np.ndarray, np.ndarray]:
    """(CIELAB image, boolean map of the healthy-skin pixels ``image_ita`` measures), both at
    the analysed (downsampled) size. ``lesion_mask`` (any size; resized by nearest neighbour)
    marks the lesion; None: the whole image is a candidate."""
    rgb = _as_rgb(image)
    mask = None if lesion_mask is None else _fit_mask(lesion_mask, rgb.shape[:2])
    rgb, mask = _downsample(rgb, mask, settings.max_side)
    lab = srgb_to_lab(rgb)
    lightness = lab[..., 0]
    h, w = lightness.shape
    side = min(h, w)

    # The field of view: an ellipse inscribed in the image.
    y, x = np.mgrid[0:h, 0:w]
    radius = np.hypot((x + 0.5 - w / 2) / (w / 2), (y + 0.5 - h / 2) / (h / 2))
    keep = radius <= settings.field_of_view

    lesion = np.zeros((h, w), bool) if mask is None else mask
    grown = lesion
    if lesion.any() and settings.margin > 0:
        grown = ndimage.distance_transform_edt(~lesion) <= settings.margin * side
    candidates = keep & ~grown
    if candidates.sum() < settings.min_pixels:  # a lesion filling the view: no margin
        candidates = keep & ~lesion
    if candidates.sum() < settings.min_pixels:
        return lab, np.zeros((h, w), bool)

    # Hair: thin dark lines, a black top-hat on L*.
    size = _odd(settings.hair_size * side)
    tophat = ndimage.grey_closing(lightness, size=(size, size)) - lightness
    hair = tophat > settings.hair_depth

    # The vignette: very dark regions that reach the image border.
    # (Relative to the bright end of the candidates: the vignette can cover most of them.)
    clear = candidates & ~hair
    reference = np.percentile(lightness[clear] if clear.any() else lightness[candidates], 90)
    dark = lightness < settings.dark_fraction * reference
    labels, _ = ndimage.label(dark)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    vignette = np.isin(labels, border[border > 0])
    if vignette.any():
        vignette = ndimage.binary_dilation(vignette, iterations=max(1, size // 2))

    skin = candidates & ~hair & ~vignette
    if skin.sum() < settings.min_pixels:
        return lab, skin
    # Robust trimming of what is left, on L* and b*.
    inliers = _robust_inliers(lightness[skin], settings.outlier_mads) & \
        _robust_inliers(lab[..., 2][skin], settings.outlier_mads)
    out = np.zeros((h, w), bool)
    out[skin] = inliers
    return lab, out


def image_ita(image: np.ndarray, lesion_mask: np.ndarray | None = None,
              settings: SkinToneSettings = DEFAULT_SETTINGS) -> float:
    """ITA (degrees) of the healthy skin of an RGB image (uint8, or float in [0, 1]): the ITA
    of the median L* and median b* of ``skin_pixels``. NaN when fewer than
    ``settings.min_pixels`` skin pixels are left (the lesion or the vignette fills the image)."""
    lab, skin = skin_pixels(image, lesion_mask, settings)
    if skin.sum() < settings.min_pixels:
        return float("nan")
    lightness = float(np.median(lab[..., 0][skin]))
    b = float(np.median(lab[..., 2][skin]))
    return math.degrees(math.atan2(lightness - 50.0, b))
