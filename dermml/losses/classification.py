"""Classification losses over logits (N, C, ...): cross-entropy, focal and soft-target CE.

One channel (C == 1) means binary with a sigmoid and 0-1 targets; more channels mean softmax
over class-index targets. Everything is computed in float32, also under autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dermml.losses.segmentation import binary_target


def _class_weights(weight: torch.Tensor | None, logits: torch.Tensor) -> torch.Tensor | None:
    if weight is None:
        return None
    weight = torch.as_tensor(weight, dtype=torch.float32, device=logits.device)
    n_classes = max(logits.shape[1], 2)
    if weight.shape != (n_classes,):
        raise ValueError(f"class weights of shape {tuple(weight.shape)} do not match {n_classes} "
                         f"classes of logits {tuple(logits.shape)}; one weight per class "
                         "(background, foreground for one-channel logits)")
    return weight


def _binary_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                          weight: torch.Tensor | None, label_smoothing: float) -> torch.Tensor:
    target = binary_target(logits, target)
    # Smoothing toward 0.5 is what softmax smoothing over two classes does.
    target = target * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    if weight is None:
        return loss.mean()
    # Per-pixel weight of the (hard) class, normalised like F.cross_entropy's weighted mean.
    w = torch.where(target > 0.5, weight[1], weight[0])
    return (w * loss).sum() / w.sum()


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy, optionally class-weighted (weighted mean, as ``F.cross_entropy``) and
    label-smoothed. For one-channel logits: binary CE, ``weight`` = (background, foreground)."""
    logits = logits.float()
    weight = _class_weights(weight, logits)
    if logits.shape[1] == 1:
        return _binary_cross_entropy(logits, target, weight, label_smoothing)
    return F.cross_entropy(logits, target.long(), weight=weight, label_smoothing=label_smoothing)


def _focal_term(log_pt: torch.Tensor, gamma: float) -> torch.Tensor:
    """-(1 - p_t)^gamma * log p_t; the clamp keeps the gradient finite at p_t = 1 for gamma < 1."""
    if gamma == 0:
        return -log_pt
    return -(1 - log_pt.exp()).clamp(min=1e-12).pow(gamma) * log_pt


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: torch.Tensor | float | None = None) -> torch.Tensor:
    """Focal loss (Lin et al. 2017), mean over samples / pixels.

    Multi-class: softmax, ``alpha`` per-class weights (C,). One channel: sigmoid binary focal,
    ``alpha`` either (background, foreground) weights or one number a, meaning (1 - a, a) as in
    the paper. The mean is over all elements, not normalised by alpha, so with alpha None and
    gamma 0 it equals cross-entropy.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        target = binary_target(logits, target)
        # log p_t for soft targets too: t log p + (1 - t) log(1 - p).
        log_pt = -F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = _focal_term(log_pt, gamma)
        if alpha is not None:
            a = torch.as_tensor(alpha, dtype=torch.float32, device=logits.device).flatten()
            if a.numel() == 1:
                a = torch.cat([1 - a, a])
            a = _class_weights(a, logits)
            loss = loss * (a[1] * target + a[0] * (1 - target))
        return loss.mean()
    target = target.long()
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    loss = _focal_term(log_pt, gamma)
    if alpha is not None:
        loss = loss * _class_weights(alpha, logits)[target]
    return loss.mean()


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against probability targets shaped like ``logits`` (MixUp / CutMix): the
    mean over samples of -sum_c q_c log p_c. One channel: binary CE with a soft target."""
    logits = logits.float()
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, binary_target(logits, soft_targets))
    if soft_targets.shape != logits.shape:
        raise ValueError(f"soft targets of shape {tuple(soft_targets.shape)} do not match "
                         f"logits {tuple(logits.shape)}")
    return -(soft_targets.float() * F.log_softmax(logits, dim=1)).sum(1).mean()
