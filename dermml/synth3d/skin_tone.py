"""Skin tones by Individual Typology Angle (ITA) and their Fitzpatrick types I-VI.

ITA = atan((L* - 50) / b*) in degrees (CIELAB, D65). The type boundaries are the ITA skin
categories of Chardon et al. / Del Bino et al. (very light > 55 > light > 41 > intermediate > 28
> tan > 10 > brown > -30 > dark), read as Fitzpatrick I..VI.
"""

from __future__ import annotations

import math

import numpy as np

FITZPATRICK_TYPES = ("I", "II", "III", "IV", "V", "VI")
ITA_RANGES = {"I": (55.0, 70.0), "II": (41.0, 55.0), "III": (28.0, 41.0), "IV": (10.0, 28.0),
              "V": (-30.0, 10.0), "VI": (-60.0, -30.0)}
"""ITA interval drawn from for each type (I and VI are open-ended; these are the drawn bounds)."""


def fitzpatrick_from_ita(ita: float) -> str:
    """The Fitzpatrick type whose ITA interval holds ``ita``."""
    for name in FITZPATRICK_TYPES[:-1]:
        if ita > ITA_RANGES[name][0]:
            return name
    return "VI"


def ita_from_lab(lab: np.ndarray) -> float:
    """ITA in degrees of a CIELAB colour (L*, a*, b*)."""
    lightness, _, b = (float(v) for v in np.asarray(lab).reshape(3))
    return math.degrees(math.atan2(lightness - 50.0, b))


_D65 = np.array([0.95047, 1.0, 1.08883])
_SRGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]])


def lab_to_srgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (..., 3) -> sRGB in [0, 1] (D65), clipped."""
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


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (D65)."""
    rgb = np.asarray(rgb, dtype=np.float64)
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _SRGB_TO_XYZ.T / _D65
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]),
                     200 * (f[..., 1] - f[..., 2])], -1)


def skin_colour(ita: float, rng: np.random.Generator) -> np.ndarray:
    """An sRGB skin colour with the given ITA: b* and a* drawn from typical skin values, L*
    from the ITA definition."""
    b = rng.uniform(11.0, 16.0)
    a = rng.uniform(8.0, 14.0)
    lightness = 50.0 + b * math.tan(math.radians(ita))
    return lab_to_srgb(np.array([lightness, a, b]))


def draw_skin_tone(rng: np.random.Generator,
                   types: tuple[str, ...] = FITZPATRICK_TYPES) -> tuple[str, float]:
    """A Fitzpatrick type drawn uniformly from ``types`` and an ITA uniform in its interval."""
    unknown = [t for t in types if t not in ITA_RANGES]
    if unknown or not types:
        raise ValueError(f"skin types must be among {', '.join(FITZPATRICK_TYPES)}, got "
                         f"{list(types)}")
    name = types[int(rng.integers(len(types)))]
    low, high = ITA_RANGES[name]
    return name, float(rng.uniform(low + 0.5, high - 0.5))


def measure_skin_tone(texture: np.ndarray, nonskin: np.ndarray) -> tuple[str | None, float | None]:
    """(Fitzpatrick type, ITA) of the median skin texel; texels near black (unused atlas space)
    are left out. (None, None) when the texture shows no skin."""
    skin = (~nonskin) & (texture.sum(axis=-1) > 0.15)
    if skin.sum() < 16:
        return None, None
    colour = np.median(texture[skin], axis=0)
    ita = ita_from_lab(srgb_to_lab(colour))
    return fitzpatrick_from_ita(ita), round(float(ita), 2)
