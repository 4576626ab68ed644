"""Loading pretrained weights from a local file (weights are never downloaded).

Accepts torch checkpoints (``.pt``/``.pth``, a state dict or ``{"state_dict"|"model": ...}``) and
``.safetensors``. Common prefixes are stripped and keys whose shapes differ (a classifier head
for another number of classes) are skipped; a file matching too little of the model is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

PREFIXES = ("module.", "model.", "encoder.", "backbone.", "net.")


class PretrainedWeightsError(ValueError):
    """The weights file is missing or does not fit the model."""


def _numpy_scalar_globals() -> list:
    """What unpickling a numpy float scalar needs (training scripts save losses such as
    ``np.mean(losses)`` beside the weights), under numpy 1's and numpy 2's module names.
    Numbers only: none of these can run code."""
    scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, np.dtypes.Float64DType, np.dtypes.Float32DType]


def read_checkpoint(path: str) -> Any:
    """The object saved in a weights file (a state dict, or a dict holding one), loaded as
    tensors, numbers, strings and containers only."""
    file = Path(path)
    if not file.is_file():
        raise PretrainedWeightsError(f"pretrained weights {path}: file not found (weights are "
                                     "never downloaded; pass a local .pth/.safetensors file)")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    try:  # weights_only: a weights file must not be able to run code when it is loaded
        with torch.serialization.safe_globals(_numpy_scalar_globals()):
            return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PretrainedWeightsError(
            f"pretrained weights {path}: cannot be loaded as tensors only ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0]}); re-save it with torch.save(model.state_dict(), PATH) "
            "or as .safetensors") from None


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    state = read_checkpoint(path)
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"pretrained weights {path}: no state dict inside")
    return state


def _strip(key: str, wanted: set[str]) -> str:
    while key not in wanted:
        for prefix in PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        else:
            return key
    return key


def load_pretrained(module: nn.Module, path: str, min_fraction: float = 0.5) -> dict[str, int]:
    """Copy matching tensors from ``path`` into ``module``; returns loaded/skipped counts."""
    target = module.state_dict()
    wanted = set(target)
    matched, skipped = {}, 0
    for key, value in read_state_dict(path).items():
        name = _strip(key, wanted)
        if name in target and target[name].shape == value.shape:
            matched[name] = value
        else:
            skipped += 1
    if len(matched) < min_fraction * len(target):
        raise PretrainedWeightsError(
            f"pretrained weights {path}: only {len(matched)} of {len(target)} tensors of "
            f"{type(module).__name__} match; is this the right file for this backbone?")
    module.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "skipped": skipped, "missing": len(target) - len(matched)}
