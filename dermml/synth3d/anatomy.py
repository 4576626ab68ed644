"""DermSynth3D's anatomy labels: 17 per-vertex body parts and their 8-class simplification."""

from __future__ import annotations

import numpy as np

ANATOMY_LABELS = (
    "background", "head", "upper_torso", "lower_torso", "hips",
    "upper_leg_left", "upper_leg_right", "lower_leg_left", "lower_leg_right",
    "feet_left", "feet_right", "upper_arm_left", "upper_arm_right",
    "lower_arm_left", "lower_arm_right", "hand_left", "hand_right",
)
"""Label id -> name, as in DermSynth3D's ``Anatomy`` (0 is background, 1..16 body parts)."""
ANATOMY_ID = {name: i for i, name in enumerate(ANATOMY_LABELS)}

SIMPLE_ANATOMY_LABELS = ("background", "head", "torso", "hips", "legs", "feet", "arms", "hands")
"""The 8-class simplification (DermSynth3D's ``SimpleAnatomy``)."""
SIMPLE_ANATOMY_ID = {name: i for i, name in enumerate(SIMPLE_ANATOMY_LABELS)}

TO_SIMPLE = np.array([
    0,  # background
    1,  # head
    2, 2,  # upper / lower torso -> torso
    3,  # hips
    4, 4, 4, 4,  # upper / lower legs -> legs
    5, 5,  # feet
    6, 6, 6, 6,  # upper / lower arms -> arms
    7, 7,  # hands
], dtype=np.uint8)
"""Lookup table: 17-label id -> 8-class id."""


def to_simple_anatomy(labels: np.ndarray) -> np.ndarray:
    """The 8-class labels of an array of 17-class labels (any shape)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(ANATOMY_LABELS)):
        raise ValueError(f"anatomy labels must lie in 0..{len(ANATOMY_LABELS) - 1}, "
                         f"got {labels.min()}..{labels.max()}")
    return TO_SIMPLE[labels]
