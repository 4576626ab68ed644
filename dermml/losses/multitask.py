"""Losses of the multitask heads, each over the samples that have its target (a sample without
anatomy or depth contributes nothing to those heads).

- Lesion head (3 classes: non-skin, skin, lesion; softmax): the negative log-likelihood of what
  is known of each pixel. A synth3d view knows the class (cross-entropy); a real image knows
  only lesion / not lesion, so a non-lesion pixel's likelihood is p(skin) + p(non-skin).
  Optionally plus the soft Dice of the lesion class.
- Anatomy head (8 classes): cross-entropy.
- Depth head (log-depth in metres): masked L1 of the depth, or Eigen et al.'s scale-invariant
  log loss, over pixels of known depth.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from dermml.data.multitask import LESION

LOG_DEPTH_RANGE = (-8.0, 5.0)
"""Log-depth outputs are clamped to this range (0.3 mm .. 148 m) before ``exp``."""


def depth_from_log(log_depth: torch.Tensor) -> torch.Tensor:
    """Depth in metres of the depth head's output (log-depth)."""
    return torch.exp(log_depth.float().clamp(*LOG_DEPTH_RANGE))


def _nothing(output: torch.Tensor) -> torch.Tensor:
    # Zero, but still a function of the output: every parameter gets a (zero) gradient, as
    # DistributedDataParallel expects from each step.
    return output.float().sum() * 0.0


def lesion_head_loss(logits: torch.Tensor, lesion: torch.Tensor, has_lesion: torch.Tensor,
                     seg: torch.Tensor, has_seg: torch.Tensor,
                     dice_weight: float = 0.0) -> torch.Tensor:
    """Loss of the (N, 3, H, W) lesion-head logits: per pixel, -log of the probability of the
    classes the pixel may be (its class where ``has_seg``; lesion, or skin or non-skin, where
    only ``has_lesion``), averaged over the pixels of samples with either; plus
    ``dice_weight`` x (1 - soft Dice of the lesion class) averaged over those samples."""
    rows = has_seg | has_lesion
    if not bool(rows.any()):
        return _nothing(logits)
    logits, seg = logits[rows].float(), seg[rows]
    is_lesion, full = lesion[rows] > 0.5, has_seg[rows].view(-1, 1, 1, 1)
    known = F.one_hot(seg.clamp(0, 2), 3).permute(0, 3, 1, 2).bool()
    partial = torch.stack([is_lesion if c == LESION else ~is_lesion for c in range(3)], 1)
    allowed = torch.where(full, known, partial)
    nll = torch.logsumexp(logits, 1) - torch.logsumexp(logits.masked_fill(~allowed, -1e9), 1)
    loss = nll.mean()
    if dice_weight:
        prob = torch.softmax(logits, 1)[:, LESION].flatten(1)
        target = torch.where(full.view(-1, 1, 1), seg == LESION, is_lesion).float().flatten(1)
        dice = (2 * (prob * target).sum(1) + 1) / (prob.sum(1) + target.sum(1) + 1)
        loss = loss + dice_weight * (1 - dice).mean()
    return loss


def anatomy_loss(logits: torch.Tensor, anatomy: torch.Tensor,
                 has_anatomy: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the anatomy logits over the samples with an anatomy map."""
    if not bool(has_anatomy.any()):
        return _nothing(logits)
    return F.cross_entropy(logits[has_anatomy].float(), anatomy[has_anatomy])


def depth_loss(log_depth: torch.Tensor, depth: torch.Tensor, has_depth: torch.Tensor,
               kind: Literal["l1", "silog"] = "l1", silog_lambda: float = 0.5) -> torch.Tensor:
    """Loss of the (N, 1, H, W) log-depth output against depth in metres (0 = unknown).

    ``l1``: mean |depth - truth| in metres over the known pixels. ``silog`` (Eigen et al.,
    NeurIPS 2014): per image, with g = log depth - log truth over its known pixels,
    mean(g^2) - lambda * mean(g)^2 (lambda 1: blind to a global scale; 0: log-L2), averaged over
    the images with known depth."""
    log_depth = log_depth[:, 0] if log_depth.dim() == 4 else log_depth
    valid = (depth > 0) & has_depth.view(-1, 1, 1)
    if not bool(valid.any()):
        return _nothing(log_depth)
    if kind == "l1":
        return (depth_from_log(log_depth)[valid] - depth[valid]).abs().mean()
    mask = valid.float()
    g = (log_depth.float().clamp(*LOG_DEPTH_RANGE) - torch.log(depth.clamp(min=1e-6))) * mask
    n = mask.flatten(1).sum(1)
    images = n > 0
    mean_sq = g.pow(2).flatten(1).sum(1)[images] / n[images]
    mean = g.flatten(1).sum(1)[images] / n[images]
    return (mean_sq - silog_lambda * mean.pow(2)).mean()
