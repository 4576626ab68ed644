"""Segmentation metrics on known cases and losses against hand-computed values."""

import numpy as np
import pytest
import torch

from dermml.losses.segmentation import bce_dice_loss, soft_dice_loss
from dermml.metrics.segmentation import mean_scores, segmentation_scores


def square(size=8, lo=2, hi=6):
    m = np.zeros((size, size), bool)
    m[lo:hi, lo:hi] = True
    return m


def test_perfect_prediction_scores_one():
    s = segmentation_scores(square(), square())
    assert s == pytest.approx({"dice": 1, "iou": 1, "sensitivity": 1, "specificity": 1,
                               "precision": 1, "accuracy": 1})


def test_disjoint_prediction_scores_zero_overlap():
    pred = np.zeros((8, 8), bool)
    pred[0, 0] = True
    s = segmentation_scores(pred, square())
    assert s["dice"] == 0 and s["iou"] == 0 and s["sensitivity"] == 0 and s["precision"] == 0


def test_empty_prediction_of_empty_mask_is_perfect():
    empty = np.zeros((4, 4), bool)
    assert segmentation_scores(empty, empty)["dice"] == 1.0


def test_half_overlap_matches_hand_computation():
    truth = square(8, 0, 4)  # 16 px
    pred = np.zeros((8, 8), bool)
    pred[0:4, 2:6] = True  # 16 px, 8 overlapping
    s = segmentation_scores(pred, truth)
    assert s["dice"] == pytest.approx(2 * 8 / 32)
    assert s["iou"] == pytest.approx(8 / 24)
    assert s["specificity"] == pytest.approx(40 / 48)
    assert s["precision"] == pytest.approx(8 / 16)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        segmentation_scores(np.zeros((3, 3), bool), np.zeros((4, 4), bool))


def test_mean_scores_average_per_image():
    assert mean_scores([{"dice": 1.0}, {"dice": 0.0}])["dice"] == 0.5


def test_soft_dice_loss_hand_value():
    logits = torch.tensor([[[[0.0, 0.0]]]])  # p = 0.5, 0.5
    target = torch.tensor([[[[1.0, 0.0]]]])
    # dice = (2*0.5 + 1) / (1 + 1 + 1) = 2/3 with eps 1
    assert float(soft_dice_loss(logits, target)) == pytest.approx(1 - 2 / 3)


def test_bce_dice_loss_is_weighted_sum():
    logits = torch.tensor([[[[2.0, -1.0]]]])
    target = torch.tensor([[[[1.0, 0.0]]]])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    total = bce_dice_loss(logits, target, bce_weight=2.0, dice_weight=0.5)
    assert float(total) == pytest.approx(float(2 * bce + 0.5 * soft_dice_loss(logits, target)))
