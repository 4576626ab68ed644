"""Each post-processing step on a tiny mask, and the multi-class fallback to background."""

import numpy as np
import pytest
from pydantic import ValidationError

from dermml.data.manifest import ATTRIBUTES
from dermml.tasks.postprocess import (
    ATTRIBUTE_POSTPROCESS,
    PostprocessConfig,
    postprocess_binary,
    postprocess_multiclass,
)


def prob_of(mask: np.ndarray) -> np.ndarray:
    return np.where(mask, 0.9, 0.1)


def block(size=12, top=3, left=3, side=6):
    m = np.zeros((size, size), bool)
    m[top:top + side, left:left + side] = True
    return m


def test_threshold_is_strictly_greater():
    prob = np.array([[0.5, 0.51], [0.2, 0.9]])
    assert postprocess_binary(prob, PostprocessConfig()).tolist() == [[False, True],
                                                                      [False, True]]
    assert postprocess_binary(prob, PostprocessConfig(threshold=0.3)).sum() == 3


def test_defaults_only_threshold():
    mask = block()
    mask[0, 0] = True
    assert (postprocess_binary(prob_of(mask), PostprocessConfig()) == mask).all()


def test_opening_removes_a_one_pixel_speck_and_keeps_the_lesion():
    mask = block()
    mask[0, 11] = True
    out = postprocess_binary(prob_of(mask), PostprocessConfig(opening_radius=1))
    assert not out[0, 11]
    assert (out == block()).sum() >= block().size - 4  # only the square's corners may go


def test_closing_fills_a_one_pixel_gap():
    mask = block()
    mask[4:8, 6] = False  # a one-pixel-wide crack inside the lesion
    out = postprocess_binary(prob_of(mask), PostprocessConfig(closing_radius=1))
    assert out[4:8, 6].all()
    assert (out == block()).all()


def test_closing_keeps_a_lesion_that_touches_the_image_border():
    mask = np.zeros((8, 8), bool)
    mask[:, :4] = True
    out = postprocess_binary(prob_of(mask), PostprocessConfig(closing_radius=2))
    assert (out == mask).all()


def test_fill_holes_fills_a_hole():
    mask = block()
    mask[5:7, 5:7] = False
    out = postprocess_binary(prob_of(mask), PostprocessConfig(fill_holes=True))
    assert (out == block()).all()


def test_min_component_px_drops_small_blobs():
    mask = block()
    mask[0:2, 10:12] = True  # 4 px blob
    cfg = PostprocessConfig(min_component_px=5)
    assert (postprocess_binary(prob_of(mask), cfg) == block()).all()
    assert postprocess_binary(prob_of(mask), PostprocessConfig(min_component_px=4))[0, 10]


def test_keep_largest_keeps_only_the_largest_component():
    mask = block(size=16, top=1, left=1, side=5)
    mask |= block(size=16, top=9, left=9, side=6)
    out = postprocess_binary(prob_of(mask), PostprocessConfig(keep_largest=True))
    assert (out == block(size=16, top=9, left=9, side=6)).all()


def test_empty_prediction_stays_empty_through_every_step():
    cfg = PostprocessConfig(opening_radius=1, closing_radius=1, fill_holes=True,
                            min_component_px=3, keep_largest=True)
    assert not postprocess_binary(np.zeros((8, 8)), cfg).any()


def test_negative_radius_is_a_config_error():
    with pytest.raises(ValidationError, match="opening_radius"):
        PostprocessConfig(opening_radius=-1)


def one_hot_probs(labels: np.ndarray, n_classes: int) -> np.ndarray:
    return np.eye(n_classes)[labels].transpose(2, 0, 1) * 0.8 + 0.1


def test_multiclass_without_settings_is_the_argmax():
    labels = np.random.default_rng(0).integers(0, 3, (6, 6))
    assert (postprocess_multiclass(one_hot_probs(labels, 3), None) == labels).all()


def test_multiclass_pixels_removed_from_a_class_fall_back_to_background():
    labels = np.zeros((10, 10), int)
    labels[2:7, 2:7] = 1
    labels[9, 9] = 2  # a one-pixel speck of class 2
    labels[0, 9] = 1  # and of class 1
    cfg = {2: PostprocessConfig(opening_radius=1)}
    out = postprocess_multiclass(one_hot_probs(labels, 3), cfg)
    assert out[9, 9] == 0
    assert out[0, 9] == 1  # class 1 has no settings: untouched
    assert (out[2:7, 2:7] == 1).all()


def test_multiclass_growth_takes_only_background_pixels():
    labels = np.zeros((7, 7), int)
    labels[1:6, 1:6] = 1
    labels[3, 1:6] = 2  # class 2 cuts class 1 in two: closing class 1 must not take it
    labels[2, 3] = 0  # a background hole inside class 1's top half
    cfg = {1: PostprocessConfig(closing_radius=1, fill_holes=True)}
    out = postprocess_multiclass(one_hot_probs(labels, 3), cfg)
    assert (out[3, 1:6] == 2).all()
    assert out[2, 3] == 1


def test_multiclass_settings_for_background_are_an_error():
    with pytest.raises(ValueError, match="class 0"):
        postprocess_multiclass(np.zeros((2, 3, 3)), {0: PostprocessConfig()})


def test_attribute_defaults_cover_the_five_attributes():
    assert len(ATTRIBUTES) == 5 and sorted(ATTRIBUTE_POSTPROCESS) == [1, 2, 3, 4, 5]
    milia, globules = ATTRIBUTE_POSTPROCESS[4], ATTRIBUTE_POSTPROCESS[5]
    assert ATTRIBUTES[3] == "milia_like_cyst" and milia.opening_radius == 1
    assert ATTRIBUTES[4] == "globules" and globules.min_component_px > 0
