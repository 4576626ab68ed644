"""Losses against hand-computed values on tiny tensors, their special cases, and the registry."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dermml.losses.catalog import LOSSES, LossTerm, build_loss, inverse_frequency_weights
from dermml.losses.classification import cross_entropy, focal_loss, soft_target_cross_entropy
from dermml.losses.segmentation import (
    bce_dice_loss,
    bce_loss,
    dice_loss,
    focal_tversky_loss,
    generalized_dice_loss,
    soft_dice_loss,
    tversky_loss,
)

LN2, LN3 = math.log(2), math.log(3)


def two_pixel_case():
    """One image of two pixels, two classes. Logits (0, ln 3) -> p(class 1) = 0.75 at pixel 0;
    (0, 0) -> 0.5 at pixel 1. Targets: pixel 0 is class 1, pixel 1 is class 0."""
    logits = torch.tensor([[[0.0, 0.0], [LN3, 0.0]]])  # (N=1, C=2, S=2)
    target = torch.tensor([[1, 0]])
    return logits, target


def binary_case():
    """Two pixels, one channel: p = 0.75 (lesion) and 0.5 (background)."""
    return torch.tensor([[[LN3, 0.0]]]), torch.tensor([[[1.0, 0.0]]])


# --- classification losses ------------------------------------------------------------------


def test_cross_entropy_hand_value():
    logits, target = two_pixel_case()
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(cross_entropy(logits, target)) == pytest.approx(expected)


def test_weighted_cross_entropy_is_the_weighted_mean():
    logits, target = two_pixel_case()
    w = torch.tensor([1.0, 3.0])
    expected = (3 * -math.log(0.75) + 1 * -math.log(0.5)) / (3 + 1)
    assert float(cross_entropy(logits, target, weight=w)) == pytest.approx(expected)


def test_label_smoothing_hand_value():
    logits, target = two_pixel_case()
    # smoothing 0.2 over 2 classes: target (0.1, 0.9) at pixel 0, (0.9, 0.1) at pixel 1
    expected = ((-0.1 * math.log(0.25) - 0.9 * math.log(0.75)) + -math.log(0.5)) / 2
    assert float(cross_entropy(logits, target, label_smoothing=0.2)) == pytest.approx(expected)


def test_label_smoothing_zero_equals_cross_entropy():
    logits, target = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5))
    assert float(LOSSES["label_smoothing"](logits, target, label_smoothing=0.0)) == pytest.approx(
        float(F.cross_entropy(logits, target)))


def test_binary_cross_entropy_of_one_channel_hand_value():
    logits, target = binary_case()
    expected = (-math.log(0.75) - math.log(0.5)) / 2
    assert float(cross_entropy(logits, target)) == pytest.approx(expected)
    assert float(bce_loss(logits, target[:, 0])) == pytest.approx(expected)  # (N, H, W) target


def test_focal_loss_hand_value():
    logits, target = two_pixel_case()
    # -(1 - p_t)^2 log p_t with p_t = 0.75 and 0.5
    expected = (0.25**2 * -math.log(0.75) + 0.5**2 * -math.log(0.5)) / 2
    assert float(focal_loss(logits, target, gamma=2.0)) == pytest.approx(expected)


def test_focal_loss_alpha_weights_each_pixel_by_its_class():
    logits, target = two_pixel_case()
    alpha = torch.tensor([0.25, 1.0])
    expected = (1.0 * 0.25**2 * -math.log(0.75) + 0.25 * 0.5**2 * -math.log(0.5)) / 2
    assert float(focal_loss(logits, target, alpha=alpha)) == pytest.approx(expected)


def test_binary_focal_loss_hand_value_with_scalar_alpha():
    logits, target = binary_case()
    # alpha 0.25 for lesion pixels, 0.75 for background (Lin et al.)
    expected = (0.25 * 0.25**2 * -math.log(0.75) + 0.75 * 0.5**2 * -math.log(0.5)) / 2
    assert float(focal_loss(logits, target, alpha=0.25)) == pytest.approx(expected)


@pytest.mark.parametrize("channels", [1, 4])
def test_focal_loss_with_gamma_zero_equals_cross_entropy(channels):
    torch.manual_seed(0)
    logits = torch.randn(3, channels, 6, 6)
    target = (torch.rand(3, 1, 6, 6) > 0.5).float() if channels == 1 else torch.randint(
        0, channels, (3, 6, 6))
    assert float(focal_loss(logits, target, gamma=0.0)) == pytest.approx(
        float(cross_entropy(logits, target)), rel=1e-5)


def test_soft_target_cross_entropy_hand_value():
    logits = torch.tensor([[0.0, LN3]])  # p = (0.25, 0.75)
    soft = torch.tensor([[0.4, 0.6]])
    expected = -0.4 * math.log(0.25) - 0.6 * math.log(0.75)
    assert float(soft_target_cross_entropy(logits, soft)) == pytest.approx(expected)


def test_soft_target_cross_entropy_of_one_hot_equals_cross_entropy():
    logits, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    onehot = F.one_hot(target, 3).float()
    assert float(soft_target_cross_entropy(logits, onehot)) == pytest.approx(
        float(F.cross_entropy(logits, target)))


# --- segmentation losses --------------------------------------------------------------------


def test_multiclass_dice_hand_value():
    logits, target = two_pixel_case()
    # class 0: p = (0.25, 0.5), t = (0, 1): (2*0.5 + 1) / (0.75 + 1 + 1) = 2 / 2.75
    # class 1: p = (0.75, 0.5), t = (1, 0): (2*0.75 + 1) / (1.25 + 1 + 1) = 2.5 / 3.25
    expected = 1 - (2 / 2.75 + 2.5 / 3.25) / 2
    assert float(dice_loss(logits, target)) == pytest.approx(expected)
    assert float(dice_loss(logits, target, ignore_background=True)) == pytest.approx(
        1 - 2.5 / 3.25)


def test_binary_dice_matches_soft_dice_loss():
    logits, target = binary_case()
    # (2*0.75 + 1) / (1.25 + 1 + 1)
    assert float(dice_loss(logits, target)) == pytest.approx(1 - 2.5 / 3.25)
    assert float(dice_loss(logits, target)) == pytest.approx(float(soft_dice_loss(logits, target)))


def test_dice_accepts_one_hot_targets_like_class_indices():
    logits, target = two_pixel_case()
    onehot = F.one_hot(target, 2).permute(0, 2, 1).float()
    assert float(dice_loss(logits, onehot)) == pytest.approx(float(dice_loss(logits, target)))


def test_generalized_dice_hand_value():
    logits, target = two_pixel_case()
    # each class has volume 1 -> equal weights; intersections 0.5 and 0.75; p + t sums 1.75, 2.25
    expected = 1 - 2 * (0.5 + 0.75) / (1.75 + 2.25)
    assert float(generalized_dice_loss(logits, target, eps=0.0)) == pytest.approx(expected)


def test_generalized_dice_weights_small_classes_more():
    # 3 pixels: class 0 volume 2 (weight 1/4), class 1 volume 1 (weight 1)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [LN3, 0.0, 0.0]]])
    target = torch.tensor([[1, 0, 0]])
    w0, w1 = 0.25, 1.0
    inter0, inter1 = 0.5 + 0.5, 0.75
    denom0, denom1 = (0.25 + 0.5 + 0.5) + 2, (0.75 + 0.5 + 0.5) + 1
    expected = 1 - 2 * (w0 * inter0 + w1 * inter1) / (w0 * denom0 + w1 * denom1)
    assert float(generalized_dice_loss(logits, target, eps=0.0)) == pytest.approx(expected)


@pytest.mark.parametrize("channels", [1, 3])
def test_generalized_dice_of_a_perfect_prediction_is_zero(channels):
    target = torch.randint(0, max(channels, 2), (2, 8, 8))
    if channels == 1:
        logits = (target[:, None].float() * 2 - 1) * 50
    else:
        logits = F.one_hot(target, channels).permute(0, 3, 1, 2).float() * 50
    assert float(generalized_dice_loss(logits, target)) == pytest.approx(0.0, abs=1e-5)


def test_generalized_dice_with_a_class_absent_from_the_image_is_finite():
    logits, target = torch.randn(1, 3, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long)
    assert math.isfinite(float(generalized_dice_loss(logits, target)))


def test_tversky_hand_value():
    logits, target = binary_case()
    # TP = 0.75, FP = 0.5, FN = 0.25
    expected = 1 - (0.75 + 1) / (0.75 + 0.3 * 0.5 + 0.7 * 0.25 + 1)
    assert float(tversky_loss(logits, target)) == pytest.approx(expected)


def test_tversky_with_equal_weights_equals_dice():
    logits, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    # TI(0.5, 0.5) = (TP + e) / ((2TP + FP + FN)/2 + e) = Dice with smoothing 2e
    assert float(tversky_loss(logits, target, alpha=0.5, beta=0.5, eps=0.5)) == pytest.approx(
        float(dice_loss(logits, target, eps=1.0)))


def test_tversky_penalises_misses_more_than_false_alarms_with_beta_above_alpha():
    target = torch.tensor([[[1.0, 1.0, 0.0, 0.0]]])
    misses = torch.tensor([[[5.0, -5.0, -5.0, -5.0]]])
    false_alarm = torch.tensor([[[5.0, 5.0, 5.0, -5.0]]])
    assert float(tversky_loss(misses, target)) > float(tversky_loss(false_alarm, target))


def test_focal_tversky_hand_value():
    logits, target = binary_case()
    ti = (0.75 + 1) / (0.75 + 0.3 * 0.5 + 0.7 * 0.25 + 1)
    assert float(focal_tversky_loss(logits, target)) == pytest.approx((1 - ti) ** 0.75)
    assert float(focal_tversky_loss(logits, target, gamma=1.0)) == pytest.approx(
        float(tversky_loss(logits, target)))


# --- every loss: gradients, float32 under autocast --------------------------------------------


def loss_inputs(name):
    torch.manual_seed(0)
    binary = name == "bce"
    logits = torch.randn(2, 1 if binary else 3, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float() if binary else torch.randint(0, 3, (2, 8, 8))
    return logits, target


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_gives_finite_gradients(name):
    logits, target = loss_inputs(name)
    weights = torch.tensor([0.5, 1.0, 2.0])
    loss = build_loss([LossTerm(name=name)], class_weights=weights)(logits, target)
    loss.backward()
    assert loss.dim() == 0 and torch.isfinite(loss)
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["focal", "focal_tversky"])
def test_focal_losses_have_finite_gradients_at_a_perfect_prediction(name):
    target = torch.randint(0, 3, (1, 4, 4))
    logits = (F.one_hot(target, 3).permute(0, 3, 1, 2).float() * 200).requires_grad_()
    LOSSES[name](logits, target, gamma=0.5).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_is_float32_under_bf16_autocast(name):
    logits, target = loss_inputs(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = build_loss([LossTerm(name=name)], torch.ones(3))(logits.bfloat16(), target)
    assert loss.dtype == torch.float32


# --- registry -------------------------------------------------------------------------------


def test_build_loss_weighted_sum_equals_the_manual_sum():
    logits, target = torch.randn(2, 3, 6, 6), torch.randint(0, 3, (2, 6, 6))
    w = torch.tensor([1.0, 2.0, 3.0])
    loss = build_loss([LossTerm(name="weighted_ce", weight=0.5),
                       LossTerm(name="focal", weight=2.0, params={"gamma": 1.0}),
                       LossTerm(name="tversky", params={"alpha": 0.4, "beta": 0.6})],
                      class_weights=w)
    manual = (0.5 * cross_entropy(logits, target, weight=w)
              + 2.0 * focal_loss(logits, target, gamma=1.0, alpha=w)
              + tversky_loss(logits, target, alpha=0.4, beta=0.6))
    assert float(loss(logits, target)) == pytest.approx(float(manual))
    assert set(loss.components(logits, target)) == {"weighted_ce", "focal", "tversky"}


def test_build_loss_params_lists_become_class_weight_tensors():
    logits, target = torch.randn(2, 2, 4, 4), torch.randint(0, 2, (2, 4, 4))
    loss = build_loss([LossTerm(name="weighted_ce", params={"weight": [1.0, 4.0]})])
    expected = cross_entropy(logits, target, weight=torch.tensor([1.0, 4.0]))
    assert float(loss(logits, target)) == pytest.approx(float(expected))


def test_unknown_loss_name_is_an_error_listing_known_names():
    with pytest.raises(ValueError, match="unknown loss 'dcie'.*generalized_dice"):
        LossTerm(name="dcie")
    with pytest.raises(ValueError, match="unknown loss 'dcie'.*tversky"):
        build_loss([LossTerm.model_construct(name="dcie", weight=1.0, params={})])


def test_bad_loss_params_are_an_error_naming_the_term():
    with pytest.raises(ValueError, match="loss term 'tversky'.*valid params: alpha, beta"):
        build_loss([LossTerm(name="tversky", params={"gama": 2})])


def test_weighted_ce_without_class_weights_is_an_error():
    with pytest.raises(ValueError, match="'weighted_ce' needs class weights"):
        build_loss([LossTerm(name="weighted_ce")])


def test_inverse_frequency_weights_values():
    # 1/counts = (1/10, 1/30, 1/60) = (6, 2, 1)/60 -> mean 3/60 -> (2, 2/3, 1/3)
    assert inverse_frequency_weights([10, 30, 60]).tolist() == pytest.approx([2, 2 / 3, 1 / 3])
    assert inverse_frequency_weights([10, 30, 60], normalize=False).tolist() == pytest.approx(
        [0.1, 1 / 30, 1 / 60])


def test_inverse_frequency_weights_give_zero_to_absent_classes():
    w = inverse_frequency_weights(np.array([0, 5, 20]))
    assert w.tolist() == pytest.approx([0.0, 1.6, 0.4])
    assert torch.isfinite(w).all()


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
