"""Skin colours of procedural bodies by Individual Typology Angle (ITA) and Fitzpatrick type.

The ITA definition, the type table (Chardon et al. / Del Bino et al. thresholds) and the
sRGB <-> CIELAB conversion are the evaluation's (``dermml.metrics.skin_tone``): one table for
the skin tones synthesis draws and the skin tones evaluation measures.
"""

from __future__ import annotations

import math

import numpy as np

from dermml.metrics.skin_tone import (
    FITZPATRICK_TYPES,
    ITA_RANGES,
    fitzpatrick_from_ita,
    ita_from_lab,
    lab_to_srgb,
    srgb_to_lab,
)

__all__ = ["FITZPATRICK_TYPES", "ITA_RANGES", "draw_skin_tone", "fitzpatrick_from_ita",
           "ita_from_lab", "lab_to_srgb", "measure_skin_tone", "skin_colour", "srgb_to_lab"]


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
