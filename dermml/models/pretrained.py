"""Pretrained weights for backbones and encoders: ``model.pretrained`` is one of

- ``""``: train from scratch;
- ``imagenet``: the backbone's published ImageNet weights, through the Hugging Face hub cache
  (``HF_HOME``, default ``~/.cache/huggingface``): downloaded once when the machine has network,
  read from the cache only under ``HF_HUB_OFFLINE=1``. timm backbones (and smp ``tu-<name>``
  encoders) take timm's default weights (``resnet18`` -> ``timm/resnet18.a1_in1k``; a name with
  a tag, ``resnet50.tv_in1k``, those weights); smp's own encoders (``resnet34``,
  ``efficientnet-b0``) take smp's ``imagenet`` weights (``smp-hub/<encoder>.imagenet``) at the
  revision segmentation-models-pytorch pins;
- a local file: torch checkpoints (``.pt``/``.pth``, a state dict or
  ``{"state_dict"|"model": ...}``) or ``.safetensors``, read as tensors only.

Every backbone goes through ``load_backbone_weights``. Common prefixes are stripped and keys whose
shapes differ (a classifier head for another number of classes) are skipped; weights matching
too little of the model are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

PREFIXES = ("module.", "model.", "encoder.", "backbone.", "net.")
IMAGENET = "imagenet"
Library = Literal["timm", "smp"]


class PretrainedWeightsError(ValueError):
    """The weights are missing or do not fit the model."""


@dataclass(frozen=True)
class HubWeights:
    """Where a backbone's published weights live on the Hugging Face hub."""

    repo_id: str
    filenames: tuple[str, ...]
    """Candidates, preferred first (timm repos: safetensors, else the pickled original)."""
    revision: str | None = None
    """A commit hash (smp pins them) or None for the repo's ``main``."""

    def __str__(self) -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{at}/{self.filenames[0]}"

    def download_command(self) -> str:
        revision = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo_id} {self.filenames[0]}{revision}"


def hub_weights(backbone: str, library: Library = "timm") -> HubWeights:
    """The hub repo and file of ``backbone``'s ImageNet weights, resolved as timm (its default
    pretrained tag) or segmentation-models-pytorch (its ``imagenet`` weights) would."""
    if library == "smp" and backbone.startswith("tu-"):
        library, backbone = "timm", backbone[3:]
    if library == "smp":
        from segmentation_models_pytorch.encoders import encoders

        if backbone not in encoders:
            raise PretrainedWeightsError(f"model.encoder {backbone!r}: not an smp encoder")
        settings = encoders[backbone].get("pretrained_settings", {})
        if IMAGENET not in settings:
            raise PretrainedWeightsError(
                f"model.pretrained=imagenet: smp encoder {backbone!r} has no ImageNet weights "
                f"(it has: {', '.join(settings) or 'none'}); use a tu-<timm name> encoder or a "
                "local weights file")
        return HubWeights(settings[IMAGENET]["repo_id"], ("model.safetensors",),
                          settings[IMAGENET].get("revision"))
    if backbone.startswith("hf-hub:"):
        repo, _, revision = backbone[len("hf-hub:"):].partition("@")
        return HubWeights(repo, ("model.safetensors", "pytorch_model.bin"), revision or None)
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(backbone)
    if cfg is None or not cfg.hf_hub_id:
        raise PretrainedWeightsError(
            f"model.pretrained=imagenet: timm publishes no hub weights for {backbone!r} (see "
            "timm.list_pretrained()); pick a backbone that has them or pass a local weights file")
    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else ("model.safetensors",
                                                                 "pytorch_model.bin")
    return HubWeights(repo, files, revision or None)


def hub_cache_dir() -> str:
    """The hub cache huggingface_hub uses, from the environment as it is now."""
    env = os.environ
    home = env.get("HF_HOME") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE") or \
        os.path.join(home, "hub")
    return os.path.expandvars(os.path.expanduser(cache))


def hub_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE


def fetch_hub_weights(weights: HubWeights) -> str:
    """Local path of ``weights``: from the hub cache, downloading into it when online."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    reason = ""
    for filename in weights.filenames:
        try:
            return hf_hub_download(weights.repo_id, filename, revision=weights.revision,
                                   cache_dir=cache, local_files_only=offline)
        except LocalEntryNotFoundError as exc:  # not cached, and offline or unreachable
            reason = reason or _first_line(exc.__cause__ or exc)
        except EntryNotFoundError:  # online: the repo has no such file; try the next one
            continue
        except (HfHubHTTPError, OfflineModeIsEnabled, OSError) as exc:
            reason = reason or _first_line(exc)
            break
    where = f"the Hugging Face cache {cache}"
    home = os.environ.get("HF_HOME")
    where += f" (HF_HOME={home})" if home else " (HF_HOME unset)"
    why = "HF_HUB_OFFLINE=1 forbids downloading it" if offline else \
        f"it could not be downloaded ({reason or 'not found on the hub'})"
    raise PretrainedWeightsError(
        f"model.pretrained=imagenet: {weights} is not in {where} and {why}; run once with "
        f"network (or `{weights.download_command()}` with this HF_HOME) to cache it, or set "
        "model.pretrained to a local .pth/.safetensors file")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


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
        raise PretrainedWeightsError(
            f"pretrained weights {path}: file not found; pass a local .pth/.safetensors file, or "
            "model.pretrained=imagenet for the backbone's ImageNet weights from the Hugging Face "
            "hub cache")
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


def load_pretrained(module: nn.Module, path: str, min_fraction: float = 0.5,
                    source: str = "") -> dict[str, int]:
    """Copy matching tensors from the file ``path`` into ``module``; returns loaded/skipped
    counts. ``source`` names the weights in messages (default: the path)."""
    source = source or f"pretrained weights {path}"
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
            f"{source}: only {len(matched)} of {len(target)} tensors of "
            f"{type(module).__name__} match; is this the right file for this backbone?")
    module.load_state_dict(matched, strict=False)
    return {"loaded": len(matched), "skipped": skipped, "missing": len(target) - len(matched)}


def load_backbone_weights(module: nn.Module, pretrained: str, backbone: str,
                          library: Library = "timm") -> dict[str, int]:
    """Load ``model.pretrained`` into ``module``, the network of ``backbone`` (a timm model
    name, or with ``library="smp"`` an smp encoder name: ``resnet34``, ``tu-inception_v3``).

    ``pretrained``: empty (nothing to load), ``imagenet`` (hub weights, see the module doc) or
    a local weights file. Returns loaded/skipped/missing tensor counts (empty when nothing).
    """
    if not pretrained:
        return {}
    if pretrained.strip().lower() != IMAGENET:
        return load_pretrained(module, pretrained)
    weights = hub_weights(backbone, library)
    return load_pretrained(module, fetch_hub_weights(weights),
                           source=f"ImageNet weights {weights} for {backbone!r}")
