"""Losses by name, and a config-driven weighted sum of them (``loss: [{name: bce}, ...]``)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
from pydantic import field_validator

from dermml.config import Section
from dermml.losses.classification import cross_entropy, focal_loss
from dermml.losses.segmentation import (
    bce_loss,
    dice_loss,
    focal_tversky_loss,
    generalized_dice_loss,
    tversky_loss,
)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": cross_entropy,
    "weighted_ce": cross_entropy,
    "label_smoothing": partial(cross_entropy, label_smoothing=0.1),
    "focal": focal_loss,
    "bce": bce_loss,
    "dice": dice_loss,
    "generalized_dice": generalized_dice_loss,
    "tversky": tversky_loss,
    "focal_tversky": focal_tversky_loss,
}

# Terms that take the dataset's class weights, and the keyword they take them as.
CLASS_WEIGHT_PARAM = {"weighted_ce": "weight", "focal": "alpha"}
# Terms that cannot do without class weights.
NEEDS_CLASS_WEIGHTS = ("weighted_ce",)


def loss_function(name: str) -> Callable[..., torch.Tensor]:
    """The loss registered as ``name``; ValueError listing the known names otherwise."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known losses: {', '.join(LOSSES)}")
    return LOSSES[name]


class LossTerm(Section):
    """One term of the training loss: ``weight * LOSSES[name](logits, target, **params)``."""

    name: str
    """Registered loss name: ce, weighted_ce, label_smoothing, focal, bce, dice,
    generalized_dice, tversky, focal_tversky."""
    weight: float = 1.0
    """Multiplier of this term in the sum."""
    params: dict[str, Any] = {}
    """Keyword arguments of the loss, e.g. {gamma: 2.0} for focal or {alpha: 0.3, beta: 0.7}
    for tversky; lists become tensors (class weights)."""

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        loss_function(name)
        return name


def _term_kwargs(term: LossTerm, class_weights: torch.Tensor | None) -> dict[str, Any]:
    """The term's keyword arguments: its params (lists as tensors), plus the class weights for
    the terms that take them unless params set them explicitly."""
    kwargs = {k: torch.tensor(v, dtype=torch.float32) if isinstance(v, list) else v
              for k, v in term.params.items()}
    key = CLASS_WEIGHT_PARAM.get(term.name)
    if key is not None and key not in kwargs and class_weights is not None:
        kwargs[key] = class_weights
    if term.name in NEEDS_CLASS_WEIGHTS and kwargs.get(key) is None:
        raise ValueError(f"loss term {term.name!r} needs class weights: pass class_weights "
                         f"(e.g. inverse_frequency_weights of the training labels) or set "
                         f"params.{key}")
    fn = loss_function(term.name)
    try:
        inspect.signature(fn).bind(None, None, **kwargs)
    except TypeError as exc:
        valid = [p for p in inspect.signature(fn).parameters if p not in ("logits", "target")]
        raise ValueError(f"loss term {term.name!r}: bad params {sorted(term.params)} ({exc}); "
                         f"valid params: {', '.join(valid)}") from None
    return kwargs


class WeightedLoss:
    """Sum of weighted loss terms; ``components`` gives each weighted term for logging."""

    def __init__(self, terms: list[tuple[str, float, LossFn]]):
        self.terms = terms

    def components(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        parts: dict[str, torch.Tensor] = {}
        for name, weight, fn in self.terms:
            key = name if name not in parts else f"{name}_{len(parts)}"
            parts[key] = weight * fn(logits, target)
        return parts

    def __call__(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return sum(self.components(logits, target).values())


def build_loss(terms: Sequence[LossTerm],
               class_weights: torch.Tensor | None = None) -> WeightedLoss:
    """``sum(term.weight * loss(logits, target))``; ``class_weights`` go to weighted_ce (as
    ``weight``) and focal (as ``alpha``). Bad names or params fail here, not at the first step."""
    if not terms:
        raise ValueError(f"no loss terms configured; give at least one of: {', '.join(LOSSES)}")
    built = []
    for term in terms:
        fn = loss_function(term.name)
        built.append((term.name, term.weight, partial(fn, **_term_kwargs(term, class_weights))))
    return WeightedLoss(built)


def inverse_frequency_weights(counts: Sequence[int] | np.ndarray,
                              normalize: bool = True) -> torch.Tensor:
    """Class weights proportional to 1 / count, scaled so the classes present average 1.

    A class with zero count gets weight 0 (nothing to weight, and no inf).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 1 or (counts < 0).any():
        raise ValueError(f"class counts must be a 1-D list of non-negative numbers, got {counts}")
    present = counts > 0
    if not present.any():
        raise ValueError("all class counts are zero: no labels to weight")
    weights = np.zeros_like(counts)
    weights[present] = 1.0 / counts[present]
    if normalize:
        weights /= weights[present].mean()
    return torch.tensor(weights, dtype=torch.float32)
