"""Segmentation losses over logits: soft Dice, generalized Dice, Tversky and focal Tversky for
binary (one channel, sigmoid) and multi-class (softmax) outputs, plus BCE and BCE + Dice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice per image, averaged; ``eps`` keeps empty masks from dividing by zero."""
    prob = torch.sigmoid(logits.float()).flatten(1)
    target = target.float().flatten(1)
    intersection = (prob * target).sum(1)
    denom = prob.sum(1) + target.sum(1)
    return (1.0 - (2.0 * intersection + eps) / (denom + eps)).mean()


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, bce_weight: float = 1.0,
                  dice_weight: float = 1.0) -> torch.Tensor:
    """``bce_weight * BCE + dice_weight * (1 - Dice)``."""
    bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
    return bce_weight * bce + dice_weight * soft_dice_loss(logits, target)


def binary_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A 0-1 target of a one-channel output as float32 shaped like ``logits``: (N, 1, ...) or
    (N, ...) are both accepted."""
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    if target.shape != logits.shape:
        raise ValueError(f"binary target of shape {tuple(target.shape)} does not match logits "
                         f"{tuple(logits.shape)}; expected (N, 1, ...) or (N, ...)")
    return target.float()


def bce_loss(logits: torch.Tensor, target: torch.Tensor,
             pos_weight: float | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits of a one-channel output; ``pos_weight`` scales the
    positive (lesion) term."""
    logits = logits.float()
    pw = None if pos_weight is None else torch.tensor(pos_weight, device=logits.device)
    return F.binary_cross_entropy_with_logits(logits, binary_target(logits, target),
                                              pos_weight=pw)


def probs_and_onehot(logits: torch.Tensor, target: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class probabilities and one-hot targets, both (N, C, S) float32 with S the flattened
    spatial size.

    One channel is binary (sigmoid, 0-1 target); more channels are softmax over class-index
    targets (N, ...), or over targets already one-hot / soft and shaped like ``logits``.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits).flatten(2), binary_target(logits, target).flatten(2)
    probs = torch.softmax(logits, dim=1).flatten(2)
    if target.shape == logits.shape:
        return probs, target.float().flatten(2)
    if target.dim() != logits.dim() - 1 or target.shape[1:] != logits.shape[2:]:
        raise ValueError(f"class-index target of shape {tuple(target.shape)} does not match "
                         f"logits {tuple(logits.shape)}; expected (N, ...) without the class axis")
    onehot = F.one_hot(target.long().flatten(1), logits.shape[1])  # (N, S, C)
    return probs, onehot.transpose(1, 2).float()


def _overlaps(logits: torch.Tensor, target: torch.Tensor, ignore_background: bool
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft (TP, FP, FN) per image and class, each (N, C)."""
    probs, onehot = probs_and_onehot(logits, target)
    if ignore_background and probs.shape[1] > 1:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    tp = (probs * onehot).sum(2)
    fp = (probs * (1 - onehot)).sum(2)
    fn = ((1 - probs) * onehot).sum(2)
    return tp, fp, fn


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0,
              ignore_background: bool = False) -> torch.Tensor:
    """1 - soft Dice per image and class, averaged over both.

    ``eps`` smooths numerator and denominator so a class absent from an image and not predicted
    scores Dice 1. ``ignore_background`` leaves class 0 out of the average (multi-class only).
    """
    tp, fp, fn = _overlaps(logits, target, ignore_background)
    return (1.0 - (2 * tp + eps) / (2 * tp + fp + fn + eps)).mean()


def generalized_dice_loss(logits: torch.Tensor, target: torch.Tensor,
                          eps: float = 1e-6) -> torch.Tensor:
    """Generalized Dice loss (Sudre et al. 2017), per image then averaged.

    Class weights are 1 / (target volume)^2 so small structures count as much as large ones. A
    class absent from an image would get an infinite weight; like MONAI it gets the largest
    finite weight of that image instead. A one-channel output is scored as two classes
    (background, foreground), as in the paper. Weights are normalised to sum to 1 per image:
    the ratio is unchanged, but ``eps`` then means the same at every image size.
    """
    probs, onehot = probs_and_onehot(logits, target)
    if probs.shape[1] == 1:
        probs, onehot = torch.cat([1 - probs, probs], 1), torch.cat([1 - onehot, onehot], 1)
    volume = onehot.sum(2)
    weight = 1.0 / volume.square()
    finite = torch.isfinite(weight)
    largest = torch.where(finite, weight, torch.zeros_like(weight)).amax(1, keepdim=True)
    weight = torch.where(finite, weight, largest)
    weight = weight / weight.sum(1, keepdim=True)
    intersection = (weight * (probs * onehot).sum(2)).sum(1)
    denom = (weight * (probs + onehot).sum(2)).sum(1)
    return (1.0 - (2 * intersection + eps) / (denom + eps)).mean()


def _tversky_index(logits: torch.Tensor, target: torch.Tensor, alpha: float, beta: float,
                   eps: float, ignore_background: bool) -> torch.Tensor:
    tp, fp, fn = _overlaps(logits, target, ignore_background)
    return (tp + eps) / (tp + alpha * fp + beta * fn + eps)


def tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3,
                 beta: float = 0.7, eps: float = 1.0,
                 ignore_background: bool = False) -> torch.Tensor:
    """1 - Tversky index (Salehi et al. 2017) per image and class, averaged.

    ``alpha`` weights false positives and ``beta`` false negatives; beta > alpha favours recall
    of small structures. alpha = beta = 0.5 is soft Dice with smoothing ``2 * eps``.
    """
    return (1.0 - _tversky_index(logits, target, alpha, beta, eps, ignore_background)).mean()


def focal_tversky_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.3,
                       beta: float = 0.7, gamma: float = 0.75, eps: float = 1.0,
                       ignore_background: bool = False) -> torch.Tensor:
    """(1 - Tversky index)^gamma per image and class, averaged (Abraham & Khan 2019).

    The paper writes the exponent as 1/gamma with gamma = 4/3; ``gamma`` here is the exponent
    itself (0.75). Below 1 it raises the loss of well-segmented classes less than that of hard
    ones, so training keeps pushing on the hard classes late in training.
    """
    index = _tversky_index(logits, target, alpha, beta, eps, ignore_background)
    # x**0.75 has an infinite slope at 0: clamp so a perfect prediction gives a zero gradient.
    return (1.0 - index).clamp(min=1e-6).pow(gamma).mean()
