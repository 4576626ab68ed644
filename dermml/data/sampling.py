"""What the training loader draws: class oversampling, real + synthetic mixes, MixUp, and the
progressive-resizing schedule."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch.utils.data import ConcatDataset, Dataset, Sampler, Subset, WeightedRandomSampler

from dermml.config import Section

# ------------------------------------------------------------------------- class oversampling


def class_balanced_weights(labels: Sequence[str | int]) -> np.ndarray:
    """Per-sample weights of 1 / (size of the sample's class): every class weighs the same."""
    if len(labels) == 0:
        raise ValueError("class_balanced_weights: no labels given")
    _, inverse, counts = np.unique(np.asarray(labels), return_inverse=True, return_counts=True)
    return 1.0 / counts[inverse.ravel()].astype(np.float64)


def oversampling_sampler(labels: Sequence[str | int], num_samples: int | None = None,
                         seed: int = 0) -> WeightedRandomSampler:
    """Draws (with replacement) rare classes as often as frequent ones; ``num_samples`` per
    epoch defaults to the dataset size. Seeded, and each epoch continues the stream."""
    weights = torch.as_tensor(class_balanced_weights(labels))
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(weights, num_samples or len(labels), replacement=True,
                                 generator=generator)


# ------------------------------------------------------------------- real + synthetic mixing


class MixConfig(Section):
    """A second (e.g. synthetic) manifest mixed into training, as in DermSynth3D."""

    synthetic_manifest: str = ""
    """Manifest of the extra data (URI); empty trains on the real data only."""
    synthetic_split: str = "train"
    """Split of the synthetic manifest to mix in."""
    real_ratio: float = Field(1.0, gt=0, le=1)
    """Fraction of the real training set used (a random subset, fixed by seed)."""
    synthetic_fraction: float = Field(1.0, ge=0, le=1)
    """Fraction of the synthetic set used (a random subset, fixed by seed)."""
    real_batch_ratio: float | None = Field(None, gt=0, le=1)
    """Fraction of real samples in every batch (0.5: half real, half synthetic); None shuffles
    the concatenated data freely."""
    seed: int = 0
    """Seed of the subsets and of the batch composition."""


def subset_indices(n: int, fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of a random ``round(n * fraction)`` of ``range(n)`` (all when 1)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must lie in [0, 1] (got {fraction})")
    if fraction == 1:
        return np.arange(n)
    k = round(n * fraction)
    if fraction > 0 and n > 0:
        k = max(k, 1)  # a small positive fraction of a small set still keeps one sample
    return np.sort(np.random.default_rng(seed).choice(n, size=k, replace=False))


class MixedBatchSampler(Sampler[list[int]]):
    """Batches with a fixed number of real samples, the rest synthetic.

    Indices refer to a ``ConcatDataset([real, synthetic])``: pass synthetic indices already
    offset by ``len(real)``. An epoch ends when the real samples are used up (the last batch
    tops up with reshuffled real samples); synthetic samples cycle, reshuffled on each pass.
    Batches depend only on (seed, epoch). Each pass uses the current epoch and then moves on
    to the next, so a loop that never calls ``set_epoch`` still gets fresh batches;
    ``set_epoch(e)`` pins the next pass to epoch ``e`` (resume). With ``num_replicas > 1``
    each data-parallel rank gets every ``num_replicas``-th batch, the same number on each.
    """

    def __init__(self, real_indices: Sequence[int], synthetic_indices: Sequence[int],
                 batch_size: int, real_batch_ratio: float, seed: int = 0,
                 num_batches: int | None = None, num_replicas: int = 1, rank: int = 0):
        self.real = np.asarray(real_indices, dtype=np.int64)
        self.synthetic = np.asarray(synthetic_indices, dtype=np.int64)
        self.real_per_batch = round(batch_size * real_batch_ratio)
        self.synthetic_per_batch = batch_size - self.real_per_batch
        _check_mix(self.real.size, self.synthetic.size, batch_size, real_batch_ratio,
                   self.real_per_batch)
        self.total_batches = num_batches or math.ceil(self.real.size / self.real_per_batch)
        self.seed, self.epoch = seed, 0
        self.shard(num_replicas, rank)

    def shard(self, num_replicas: int, rank: int) -> None:
        """Give this sampler's rank every ``num_replicas``-th batch of the epoch."""
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.batches_per_replica = math.ceil(self.total_batches / num_replicas)
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.batches_per_replica

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1
        n = self.batches_per_replica * self.num_replicas
        real = _shuffled_stream(rng, self.real, n * self.real_per_batch)
        synthetic = _shuffled_stream(rng, self.synthetic, n * self.synthetic_per_batch)
        real = real.reshape(n, self.real_per_batch)
        synthetic = synthetic.reshape(n, self.synthetic_per_batch)
        for b in range(self.rank, n, self.num_replicas):
            yield real[b].tolist() + synthetic[b].tolist()


def _check_mix(n_real: int, n_synthetic: int, batch_size: int, ratio: float,
               real_per_batch: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")
    if not 0 < ratio <= 1:
        raise ValueError(f"real_batch_ratio must lie in (0, 1] (got {ratio})")
    if real_per_batch < 1:
        raise ValueError(f"real_batch_ratio {ratio} leaves no real sample in batches of "
                         f"{batch_size}; raise the ratio or the batch size")
    if n_real == 0:
        raise ValueError("mixed batches need real samples, but the real set is empty")
    if n_synthetic == 0 and real_per_batch < batch_size:
        raise ValueError(f"real_batch_ratio {ratio} asks for synthetic samples, but the "
                         "synthetic set is empty (check synthetic_split / synthetic_fraction)")


def _shuffled_stream(rng: np.random.Generator, pool: np.ndarray, count: int) -> np.ndarray:
    """``count`` items from back-to-back shuffles of ``pool`` (each item once per pass)."""
    if count == 0:
        return np.empty(0, np.int64)
    passes = math.ceil(count / pool.size)
    return np.concatenate([rng.permutation(pool) for _ in range(passes)])[:count]


def mixed_dataset(real_ds: Dataset, synth_ds: Dataset, cfg: MixConfig, batch_size: int,
                  num_replicas: int = 1, rank: int = 0
                  ) -> tuple[ConcatDataset, MixedBatchSampler | None, dict[str, np.ndarray]]:
    """``ConcatDataset([real subset, synthetic subset])``, the batch sampler that keeps
    ``cfg.real_batch_ratio`` (None when unset: shuffle freely), and the indices kept of each
    source (``{"real": ..., "synthetic": ...}``, into the original datasets).

    The result carries ``.labels`` when both sources do, so oversampling works on mixes too.
    ``num_replicas``/``rank`` shard the batches for data-parallel training.
    """
    kept = {"real": subset_indices(len(real_ds), cfg.real_ratio, cfg.seed),
            # Another seed, so the two subsets are not drawn from the same random stream.
            "synthetic": subset_indices(len(synth_ds), cfg.synthetic_fraction, cfg.seed + 1)}
    real, synthetic = Subset(real_ds, kept["real"].tolist()), Subset(synth_ds,
                                                                     kept["synthetic"].tolist())
    mixed = ConcatDataset([real, synthetic])
    labels = [getattr(real_ds, "labels", None), getattr(synth_ds, "labels", None)]
    if labels[0] is not None and labels[1] is not None:
        mixed.labels = [labels[0][i] for i in kept["real"]] + \
                       [labels[1][i] for i in kept["synthetic"]]
    sampler = None
    if cfg.real_batch_ratio is not None:
        n_real = len(real)
        sampler = MixedBatchSampler(range(n_real), range(n_real, n_real + len(synthetic)),
                                    batch_size, cfg.real_batch_ratio, seed=cfg.seed,
                                    num_replicas=num_replicas, rank=rank)
    return mixed, sampler, kept


# ---------------------------------------------------------------------------------- MixUp


def mixup(images: torch.Tensor, targets: torch.Tensor, num_classes: int, alpha: float,
          generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp (Zhang et al. 2018): one lam ~ Beta(alpha, alpha) per batch mixes each sample
    with a random partner; returns the mixed images and soft targets (N, num_classes).

    ``generator`` is a CPU generator; alpha <= 0 returns the images with one-hot targets.
    """
    dtype = images.dtype if images.is_floating_point() else torch.float32
    one_hot = F.one_hot(targets.long(), num_classes).to(dtype)
    if alpha <= 0:
        return images, one_hot
    mixed, _, _, lam, perm = mixup_pairs(images, targets, alpha, generator)
    soft = one_hot * lam + one_hot[perm.to(one_hot.device)] * (1 - lam)
    return mixed, soft


def mixup_pairs(images: torch.Tensor, targets: torch.Tensor, alpha: float,
                generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """MixUp as (mixed images, targets, partner targets, lam, permutation): the loss is
    ``lam * loss(logits, targets) + (1 - lam) * loss(logits, partner targets)``, so any
    configured loss (class weights, focal, label smoothing) applies unchanged."""
    # torch's Beta sampler takes no generator; draw lam from a numpy stream seeded by it.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    perm = torch.randperm(images.shape[0], generator=generator).to(images.device)
    mixed = images * lam + images[perm] * (1 - lam)
    return mixed, targets, targets[perm.to(targets.device)], lam, perm


# ------------------------------------------------------------------- progressive resizing


class ProgressiveResizeConfig(Section):
    """Train at growing image sizes (fastai-style progressive resizing)."""

    sizes: list[int] = []
    """Training image sizes, e.g. [64, 96, 128]; empty keeps data.image_size throughout."""
    epochs: list[int] = []
    """Epoch at which each size starts, e.g. [0, 5, 10]; before the first, data.image_size."""

    @model_validator(mode="after")
    def _valid_schedule(self) -> ProgressiveResizeConfig:
        check_schedule(self)
        return self


def check_schedule(cfg: ProgressiveResizeConfig) -> None:
    """Raise a ValueError that says what is wrong with a resize schedule."""
    if len(cfg.sizes) != len(cfg.epochs):
        raise ValueError(f"progressive_resize: {len(cfg.sizes)} sizes {cfg.sizes} but "
                         f"{len(cfg.epochs)} start epochs {cfg.epochs}; give one start epoch "
                         "per size, e.g. sizes [64, 96, 128] with epochs [0, 5, 10]")
    if any(s < 1 for s in cfg.sizes):
        raise ValueError(f"progressive_resize: sizes must be positive (got {cfg.sizes})")
    if any(e < 0 for e in cfg.epochs):
        raise ValueError(f"progressive_resize: epochs must be >= 0 (got {cfg.epochs})")
    if any(b <= a for a, b in zip(cfg.epochs, cfg.epochs[1:], strict=False)):
        raise ValueError(f"progressive_resize: start epochs must increase (got {cfg.epochs})")


def size_for_epoch(cfg: ProgressiveResizeConfig, epoch: int, default: int) -> int:
    """The training image size at ``epoch``: the last size whose start epoch has passed."""
    check_schedule(cfg)
    size = default
    for start, s in zip(cfg.epochs, cfg.sizes, strict=True):
        if epoch >= start:
            size = s
    return size
