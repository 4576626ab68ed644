"""Sample quality of generative models: FID, KID and k-NN precision/recall on feature arrays,
and the feature extractors that embed images for them.

The metric functions take two ``(N, D)`` arrays of features (real, generated) and nothing else;
they follow the StyleGAN2-ADA reference (``metrics/frechet_inception_distance.py``,
``kernel_inception_distance.py``, ``precision_recall.py``) formula for formula.

A value is only comparable with another computed in the same features. Every extractor has a
``name`` and a ``digest`` (sha256 of its weights and preprocessing), to be logged beside the
values so numbers from different extractors are never put side by side:

- ``inception``: Inception-v3 pool3 (2048-d) from the TensorFlow 2015-12-05 graph, through
  torch-fidelity, from a local weights file (``metrics.inception_weights``; nothing is
  downloaded). FID and KID in these features are comparable to published values when the
  images and counts are too (e.g. 50k generated against the full training set). Published
  precision/recall (Kynkäänniemi et al., StyleGAN2-ADA ``pr50k3``) use VGG16 features instead,
  so P/R here are not comparable to those.
- ``random``: a small convolutional network with fixed random weights (seed 0), needing no
  weights file. Every process builds the same network (the digest shows it; features agree up
  to float rounding across machines), so it follows one model's training, but its values are
  NOT comparable to any published FID.
- ``model``: any torch module the caller loaded (e.g. a DermML classifier from the registry),
  with a function giving its features (by default timm's penultimate layer).
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal

import numpy as np
import scipy.linalg
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from dermml.config import Section

ExtractorKind = Literal["random", "inception", "model"]
EXTRACTOR_KINDS: tuple[str, ...] = ("random", "inception", "model")

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
"""torch-fidelity's Inception-v3 weights file (pytorch-fid publishes the same weights as
``pt_inception-2015-12-05-6726825d.pth``)."""
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 f"{INCEPTION_FILE}")
INCEPTION_SHA256_PREFIX = "6726825d"
"""The published file's sha256 starts with this (the suffix of its name)."""

RANDOM_NAME = "random-conv-v1"
RANDOM_SEED = 0
RANDOM_INPUT_SIZE = 128
RANDOM_WIDTHS = (32, 64, 128, 256, 512)

DEFAULT_PR_BATCH = 1024
"""Rows (and columns) of one block of k-NN distances: 1024 x 1024 float32 = 4 MiB a block."""


class FeatureExtractorError(ValueError):
    """A feature extractor cannot be built: the message names the setting and what to do."""


# ----------------------------------------------------------------------------- the metrics


def _check_features(real: np.ndarray, fake: np.ndarray, min_rows: int = 2
                    ) -> tuple[np.ndarray, np.ndarray]:
    real = np.asarray(real, dtype=np.float64)
    fake = np.asarray(fake, dtype=np.float64)
    for name, x in (("real", real), ("fake", fake)):
        if x.ndim != 2:
            raise ValueError(f"{name} features must be (N, D), got shape {x.shape}")
        if x.shape[0] < min_rows:
            raise ValueError(f"{name} features: {x.shape[0]} rows; at least {min_rows} needed")
        if not np.isfinite(x).all():
            raise ValueError(f"{name} features hold NaN or infinite values")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dims but fake ones "
                         f"{fake.shape[1]}: they come from different extractors")
    return real, fake


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of ``(N, D)`` features in float64; the covariance is the unbiased
    one (N - 1), as TTUR's, clean-fid's and torch-fidelity's (StyleGAN2-ADA divides by N: a
    relative difference of 1/N in the covariance terms)."""
    x = np.asarray(features, dtype=np.float64)
    return x.mean(axis=0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2))``.

    The square root is scipy's; its imaginary parts (numerical noise of a singular product)
    are dropped, and a product whose root is not finite is retried with ``eps`` added to both
    diagonals, as TTUR and clean-fid do."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1 = np.atleast_2d(sigma1).astype(np.float64)
    sigma2 = np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or \
            sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched statistics: means {mu1.shape} and {mu2.shape}, "
                         f"covariances {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = np.real(covmean)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet (Inception) Distance between the Gaussians fitted to two feature sets."""
    real, fake = _check_features(real, fake)
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def kid_from_features(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100,
                      max_subset_size: int = 1000, seed: int = 0) -> float:
    """Kernel Inception Distance: the unbiased MMD^2 with the cubic polynomial kernel
    ``k(x, y) = (x.y / D + 1)^3``, averaged over ``num_subsets`` random subsets of
    ``m = min(len(real), len(fake), max_subset_size)`` rows of each set (drawn without
    replacement), as StyleGAN2-ADA computes it. Subsets come from ``seed``. Can be negative
    (it is unbiased): two samples of one distribution average 0."""
    if num_subsets < 1:
        raise ValueError(f"num_subsets must be at least 1, got {num_subsets}")
    if max_subset_size < 2:
        raise ValueError(f"max_subset_size must be at least 2, got {max_subset_size}")
    real, fake = _check_features(real, fake)
    n = real.shape[1]
    m = min(real.shape[0], fake.shape[0], max_subset_size)
    rng = np.random.default_rng(seed)
    t = 0.0
    for _ in range(num_subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def _distance_blocks(rows: torch.Tensor, cols: torch.Tensor, batch: int):
    """(column offset, distances of ``rows`` to a block of ``batch`` columns), block by block."""
    for start in range(0, cols.shape[0], batch):
        yield start, torch.cdist(rows, cols[start:start + batch])


def knn_radii(manifold: torch.Tensor, k: int, batch_size: int = DEFAULT_PR_BATCH
              ) -> torch.Tensor:
    """Distance of every point of ``manifold`` to its k-th nearest neighbour in it (the point
    itself, at distance 0, is not counted: the (k+1)-th smallest distance, as the reference's
    ``kthvalue(k + 1)``). Computed in blocks of ``batch_size`` x ``batch_size`` distances."""
    if not 1 <= k < manifold.shape[0]:
        raise ValueError(f"k={k} needs 1 <= k < the number of points ({manifold.shape[0]})")
    radii = []
    for rows in manifold.split(batch_size):
        best = torch.full((rows.shape[0], 0), math.inf, device=rows.device)
        for _, dist in _distance_blocks(rows, manifold, batch_size):
            both = torch.cat([best, dist], dim=1)
            best = both.topk(min(k + 1, both.shape[1]), dim=1, largest=False).values
        radii.append(best[:, k])
    return torch.cat(radii)


def _coverage(probes: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor,
              batch_size: int) -> float:
    """Share of ``probes`` inside at least one ball (manifold point, its radius)."""
    inside = []
    for rows in probes.split(batch_size):
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for start, dist in _distance_blocks(rows, manifold, batch_size):
            hit |= (dist <= radii[start:start + dist.shape[1]]).any(dim=1)
        inside.append(hit)
    return float(torch.cat(inside).float().mean())


def precision_recall_from_features(real: np.ndarray, fake: np.ndarray, k: int = 3,
                                   batch_size: int = DEFAULT_PR_BATCH,
                                   device: str | torch.device = "cpu") -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) as StyleGAN2-ADA's
    ``precision_recall.py``: the real manifold is the union of balls around each real feature
    reaching its k-th nearest real neighbour; precision is the share of fake features inside
    it, recall the share of real features inside the fake manifold built the same way.

    Distances are computed in float32 blocks of ``batch_size`` x ``batch_size`` (the reference
    uses float16 on GPUs), so 50k x 50k features need a few MiB at a time, on ``device``."""
    real, fake = _check_features(real, fake, min_rows=k + 1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    r = torch.as_tensor(real, dtype=torch.float32, device=device)
    f = torch.as_tensor(fake, dtype=torch.float32, device=device)
    with torch.inference_mode():
        precision = _coverage(f, r, knn_radii(r, k, batch_size), batch_size)
        recall = _coverage(r, f, knn_radii(f, k, batch_size), batch_size)
    return precision, recall


def gan_metrics(real: np.ndarray, fake: np.ndarray, *, kid_subsets: int = 100,
                kid_subset_size: int = 1000, pr_k: int = 3, seed: int = 0,
                device: str | torch.device = "cpu") -> dict[str, float]:
    """``fid``, ``kid``, ``precision`` and ``recall`` of two feature sets."""
    precision, recall = precision_recall_from_features(real, fake, k=pr_k, device=device)
    return {"fid": fid_from_features(real, fake),
            "kid": kid_from_features(real, fake, kid_subsets, kid_subset_size, seed),
            "precision": precision, "recall": recall}


# ---------------------------------------------------------------------- feature extractors


class FeatureExtractor:
    """Images -> features: uint8 ``(N, 3, H, W)`` tensors in, float32 ``(N, dims)`` out.

    ``name`` and ``digest`` identify the network and its preprocessing: log them with every
    value, and compare values only between equal digests. The module is put in eval mode.
    """

    def __init__(self, name: str, digest: str, dims: int, module: nn.Module,
                 features: Callable[[torch.Tensor], torch.Tensor]):
        self.name, self.digest, self.dims = name, digest, int(dims)
        self.module = module.eval()
        self._features = features

    def __repr__(self) -> str:
        return f"FeatureExtractor({self.name!r}, dims={self.dims}, digest={self.digest[:12]})"

    @property
    def device(self) -> torch.device:
        tensor = next(iter(self.module.parameters()), None)
        if tensor is None:
            tensor = next(iter(self.module.buffers()), None)
        return tensor.device if tensor is not None else torch.device("cpu")

    def to(self, device: str | torch.device) -> FeatureExtractor:
        self.module.to(device)
        return self

    def info(self) -> dict[str, str | int]:
        """What to log beside the values (MLflow params or tags)."""
        return {"feature_extractor": self.name, "feature_extractor_digest": self.digest,
                "feature_dims": self.dims}

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or \
                images.ndim != 4 or images.shape[1] != 3:
            got = (f"{images.dtype} tensor of shape {tuple(images.shape)}"
                   if isinstance(images, torch.Tensor) else type(images).__name__)
            raise ValueError(f"{self.name}: expected uint8 images of shape (N, 3, H, W), "
                             f"got a {got}")
        with torch.inference_mode():
            out = self._features(images.to(self.device))
        out = out.float().reshape(out.shape[0], -1)
        if out.shape != (images.shape[0], self.dims):
            raise ValueError(f"{self.name}: features of shape {tuple(out.shape)} for "
                             f"{images.shape[0]} images; expected ({images.shape[0]}, "
                             f"{self.dims})")
        return out


def state_digest(module: nn.Module, spec: str = "") -> str:
    """sha256 of ``spec`` and every tensor of ``module``'s state dict (names, shapes, bytes)."""
    h = hashlib.sha256(spec.encode())
    for key, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# --- random


class RandomConvNet(nn.Module):
    """Conv 3x3 + ReLU blocks (average-pooled by 2 between them), then a global mean: 512-d.
    Input: uint8 images, resized (bilinear, antialiased) to ``input_size`` and scaled to
    [-1, 1]."""

    def __init__(self, widths: tuple[int, ...] = RANDOM_WIDTHS,
                 input_size: int = RANDOM_INPUT_SIZE):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            if i:
                layers.append(nn.AvgPool2d(2))
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
        self.body = nn.Sequential(*layers)
        self.input_size = input_size
        self.dims = channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if tuple(x.shape[-2:]) != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.body(x / 127.5 - 1.0).mean(dim=(2, 3))


def random_extractor(seed: int = RANDOM_SEED) -> FeatureExtractor:
    """The offline default: ``RandomConvNet`` with He-normal weights drawn on the CPU from
    ``seed`` (zero biases), so every process and machine builds the same network; the digest
    (of the weights and input size) shows it did. NOT comparable to published FID."""
    net = RandomConvNet()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator)
                                    * math.sqrt(2.0 / fan_in))
                module.bias.zero_()
    net.requires_grad_(False)
    name = f"{RANDOM_NAME}-seed{seed}-{RANDOM_INPUT_SIZE}px-{net.dims}d"
    return FeatureExtractor(name, state_digest(net, name), net.dims, net, net)


# --- inception


def _inception_missing(what: str) -> FeatureExtractorError:
    return FeatureExtractorError(
        f"metrics.inception_weights: {what}; download {INCEPTION_FILE} (torch-fidelity's "
        f"Inception-v3, TensorFlow 2015-12-05 weights) from {INCEPTION_URL} and set "
        "metrics.inception_weights to its path, or use metrics.extractor=random (offline, not "
        "comparable to published FID)")


def inception_extractor(weights: str | Path) -> FeatureExtractor:
    """Inception-v3 pool3 features (2048-d) through torch-fidelity's
    ``FeatureExtractorInceptionV3`` (input resized to 299 as TensorFlow 1.x did) from the
    local weights file ``weights``. A file other than the published one builds, with a
    warning: its values are not comparable to published FID."""
    if not str(weights).strip():
        raise _inception_missing("empty, but metrics.extractor=inception needs the weights file")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise _inception_missing(f"{path} not found")
    try:  # tensors only: the file is checked here before torch-fidelity unpickles it
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign or corrupt files
        raise FeatureExtractorError(
            f"metrics.inception_weights: {path} is not a torch state dict of tensors "
            f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
            f"expected {INCEPTION_FILE}") from None
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    try:
        net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(path))
    except RuntimeError as exc:  # load_state_dict: missing or mis-shaped keys
        raise FeatureExtractorError(
            f"metrics.inception_weights: {path} does not fit torch-fidelity's Inception-v3 "
            f"({str(exc).splitlines()[0]}); expected {INCEPTION_FILE}") from None
    digest = file_digest(path)
    if digest.startswith(INCEPTION_SHA256_PREFIX):
        name = "inception-v3-tf-2015-12-05"
    else:
        name = f"inception-v3-custom-{digest[:8]}"
        warnings.warn(f"metrics.inception_weights: {path} is not {INCEPTION_FILE} (sha256 "
                      f"{digest[:8]}...): FID/KID in its features are not comparable to "
                      "published values", stacklevel=2)
    return FeatureExtractor(name, digest, 2048, net, lambda x: net(x)[0])


# --- a caller's model


def timm_penultimate(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Pre-logit features of a timm model (``forward_head(..., pre_logits=True)``), else the
    module's output."""
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return model.forward_head(model.forward_features(images), pre_logits=True)
    return model(images)


def model_extractor(model: nn.Module,
                    features_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
                    *, name: str = "", digest: str = "", input_size: int = 224,
                    dims: int | None = None) -> FeatureExtractor:
    """Features of a caller's module (a DermML classifier loaded from the registry elsewhere:
    the metrics import no tracking library). Images are resized (bilinear, antialiased) to
    ``input_size`` and scaled to [0, 1], as DermML's datasets feed its models; then
    ``features_fn(model, x)`` gives the features (default ``timm_penultimate``).

    ``name`` defaults to the module's class, ``digest`` to the sha256 of its state dict;
    give a registry URI as ``name`` so the logged values say which model they came from.
    ``dims`` is found by running one blank image when not given."""
    fn = features_fn or timm_penultimate

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.float().div(255.0)
        if tuple(x.shape[-2:]) != (input_size, input_size):
            x = F.interpolate(x, size=(input_size, input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        out = fn(model, x)
        return out.reshape(out.shape[0], -1)

    model.eval()
    name = name or f"model-{type(model).__name__}"
    spec = f"{name}:{input_size}:{getattr(fn, '__qualname__', repr(fn))}"
    digest = digest or state_digest(model, spec)
    if dims is None:
        device = next(iter(model.parameters()), torch.empty(0)).device
        with torch.inference_mode():
            probe = features(torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8,
                                         device=device))
        dims = probe.shape[1]
    return FeatureExtractor(name, digest, dims, model, features)


def build_extractor(kind: str, weights: str = "", model: nn.Module | None = None
                    ) -> FeatureExtractor:
    """The extractor ``kind`` (``metrics.extractor``): ``random``; ``inception`` from the
    local file ``weights`` (``metrics.inception_weights``); ``model`` wrapping ``model``, a
    module the caller loaded (from ``metrics.extractor_model``), or a ready FeatureExtractor."""
    if kind == "random":
        return random_extractor()
    if kind == "inception":
        return inception_extractor(weights)
    if kind == "model":
        if isinstance(model, FeatureExtractor):
            return model
        if not isinstance(model, nn.Module):
            raise FeatureExtractorError(
                "metrics.extractor=model: no model given; load metrics.extractor_model (a "
                "registry model URI) with the registry and pass the module as "
                "build_extractor('model', model=...)")
        return model_extractor(model)
    raise FeatureExtractorError(f"metrics.extractor {kind!r}: unknown; choose one of "
                                f"{', '.join(EXTRACTOR_KINDS)}")


def _as_nchw(item: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A uint8 batch (B, 3, H, W) from a CHW/NCHW tensor or an HWC/NHWC numpy array."""
    if isinstance(item, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(item))
        t = (t.unsqueeze(0) if t.ndim == 3 else t)
        if t.ndim == 4:
            t = t.permute(0, 3, 1, 2)
    elif isinstance(item, torch.Tensor):
        t = item.unsqueeze(0) if item.ndim == 3 else item
    else:
        raise ValueError(f"expected image tensors or arrays, got {type(item).__name__}")
    if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] != 3:
        raise ValueError(f"expected uint8 RGB images (tensors (3, H, W) or (N, 3, H, W); "
                         f"arrays (H, W, 3) or (N, H, W, 3)), got {t.dtype} of shape "
                         f"{tuple(item.shape)}")
    return t


def extract_features(extractor: FeatureExtractor,
                     images: Iterable[torch.Tensor | np.ndarray], batch_size: int = 64,
                     device: str | torch.device | None = None) -> np.ndarray:
    """float32 ``(N, dims)`` features of every image ``images`` yields, run ``batch_size`` at
    a time on ``device`` (default: where the extractor is; it is moved there). Items are
    single images or batches: tensors channels-first (``(3, H, W)``, ``(B, 3, H, W)``), numpy
    arrays channels-last as ``load_image`` returns them; images of different sizes go in
    different batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if device is not None:
        extractor.to(device)
    out: list[np.ndarray] = []
    pending: list[torch.Tensor] = []

    def run(batch: torch.Tensor) -> None:
        out.append(extractor(batch).cpu().numpy().astype(np.float32, copy=False))

    def flush(full_only: bool) -> None:
        if not pending:
            return
        batch = torch.cat(pending) if len(pending) > 1 else pending[0]
        pending.clear()
        stop = len(batch) - len(batch) % batch_size if full_only else len(batch)
        for start in range(0, stop, batch_size):
            run(batch[start:start + batch_size])
        if stop < len(batch):
            pending.append(batch[stop:])

    count = 0
    for item in images:
        t = _as_nchw(item)
        if pending and t.shape[1:] != pending[0].shape[1:]:
            flush(full_only=False)
            count = 0
        pending.append(t)
        count += len(t)
        if count >= batch_size:
            flush(full_only=True)
            count = sum(len(p) for p in pending)
    flush(full_only=False)
    if not out:
        raise ValueError(f"{extractor.name}: no images to extract features from")
    return np.concatenate(out)


# ---------------------------------------------------------------------------------- config


class GanMetricsConfig(Section):
    """Sample-quality metrics of a generative model (FID, KID, precision/recall) computed in
    the features of ``extractor``; values are comparable only between equal extractor digests
    (logged with them)."""

    extractor: ExtractorKind = "random"
    """Feature network: random (offline, fixed seed; NOT comparable to published FID),
    inception (Inception-v3 pool3 from inception_weights; comparable to published FID/KID) or
    model (a DermML classifier's penultimate features, from extractor_model)."""
    inception_weights: str = ""
    """Local path of torch-fidelity's Inception-v3 weights,
    weights-inception-2015-12-05-6726825d.pth (nothing is downloaded at run time)."""
    extractor_model: str = ""
    """extractor=model: the registry model URI (e.g. models:/derm-classifier/3) the caller
    loads and passes in."""
    num_real: int = Field(10_000, ge=0)
    """Real images whose features are compared (0 = all of the split; StyleGAN2-ADA's
    fid50k_full uses all)."""
    num_fake: int = Field(10_000, ge=2)
    """Generated images (50000 for values comparable to published fid50k/kid50k)."""
    kid_subsets: int = Field(100, ge=1)
    """KID: number of random subsets averaged (StyleGAN2-ADA: 100)."""
    kid_subset_size: int = Field(1000, ge=2)
    """KID: rows of each set per subset, at most (StyleGAN2-ADA: 1000)."""
    pr_k: int = Field(3, ge=1)
    """Precision/recall: the k of the k-nearest-neighbour manifolds (StyleGAN2-ADA: 3)."""
    every_ticks: int = Field(50, ge=0)
    """Compute the metrics every N training ticks (0 = not during training)."""
    batch_size: int = Field(64, ge=1)
    """Images per batch of feature extraction."""
    seed: int = 0
    """Seed of the real-image subsample and of the KID subsets."""

    @model_validator(mode="after")
    def _extractor_source(self) -> GanMetricsConfig:
        if self.extractor == "inception" and not self.inception_weights.strip():
            raise ValueError(f"extractor=inception needs inception_weights, the local path of "
                             f"{INCEPTION_FILE} (download it from {INCEPTION_URL}), or use "
                             "extractor=random")
        if self.extractor == "model" and not self.extractor_model.strip():
            raise ValueError("extractor=model needs extractor_model, a registry model URI "
                             "(e.g. models:/derm-classifier/3)")
        return self
