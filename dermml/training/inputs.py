"""The inputs of one training run, made once, and the one place its data loaders are assembled.

``training_inputs`` runs in the driver (``training.run.train``): it makes the config's file
URIs absolute, reads the manifest once, fails early on an empty split, fills the task's
data-dependent settings (``Task.prepare``), and builds the training set (with the synthetic mix,
if configured) and the validation set once. The same ``TrainingInputs`` then feeds the file
check, the in-process loop or Ray Train's workers, and the model preview.

Ray workers receive the datasets themselves (``for_workers``), not a recipe to rebuild them: a
dataset holds file URIs, labels and its augmentation pipeline, never pixels, so it pickles in a
few hundred bytes per sample, and workers neither read the manifest again nor resolve paths
from a working directory of their own (Ray runs them in its session folder: every local URI in
the inputs is absolute). The worker copy leaves out the manifest table, which loaders never
read.

``build_loaders`` assembles the loaders for one (data-parallel) rank: the training sampler
(shuffle, class oversampling, the mixed real/synthetic batch sampler, or a
``DistributedSampler`` with several workers), batch size, loader workers, pinned memory and
the task's ``collate_fn``.
``sampler_epochs`` tells the epoch-aware samplers the epoch.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from dermml import storage
from dermml.data.manifest import Manifest, ManifestError, read_manifest
from dermml.data.sampling import MixedBatchSampler, mixed_dataset, oversampling_sampler
from dermml.tasks import get_task
from dermml.tasks.base import Task, TaskConfig, read_task_manifest


@dataclass
class TrainingInputs:
    """What one training run reads: made once in the driver, handed to every consumer."""

    task: str
    """Task name (``get_task``)."""
    cfg: TaskConfig
    """The resolved config: absolute URIs, and prepared (class names, class weights)."""
    train_set: Dataset
    """The training set: the manifest's training split(s), plus the synthetic mix."""
    val_set: Dataset
    """The validation set (never mixed, never augmented)."""
    manifest: Manifest | None = None
    """The manifest both sets come from; None in the copy sent to Ray workers."""
    batch_sampler: MixedBatchSampler | None = None
    """Mixed batches (``mix.real_batch_ratio``) over ``train_set``, not yet sharded."""

    def for_workers(self) -> TrainingInputs:
        """The copy Ray ships to each worker: everything but the manifest table."""
        return dataclasses.replace(self, manifest=None)

    def files(self) -> list[str]:
        """Every file the training and validation sets read."""
        from dermml.data.datasets import dataset_files

        return [f for ds in (self.train_set, self.val_set) for f in dataset_files(ds)]

    def check_files(self) -> None:
        """Fail before any worker starts when a file the training or validation set reads is
        missing (a missing mask found mid-epoch in a Ray worker would be retried, then
        reported as a worker traceback)."""
        files = self.files()
        missing = storage.missing_files(files)
        if missing:
            uri = self.manifest.uri if self.manifest is not None else self.cfg.data.manifest
            shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise ManifestError(
                f"{uri}: {len(missing)} of the {len(set(files))} files the training and "
                f"validation splits read do not exist: {shown}; run `dermml validate "
                f"{uri} --write-clean CLEAN` and train on CLEAN")


def absolute_uri(uri: str) -> str:
    """A local path made absolute against this process's working directory; ``s3://`` and
    other remote URIs (and the empty string) unchanged."""
    if not uri or storage.is_remote(uri):
        return uri
    return os.path.normpath(storage.resolve(uri, os.getcwd()))


def with_absolute_uris(cfg: TaskConfig) -> TaskConfig:
    """``cfg`` with its local file settings absolute: the manifests, the reference order and a
    pretrained weights file (other processes, Ray workers among them, run elsewhere)."""
    data = cfg.data.model_copy(update={"manifest": absolute_uri(cfg.data.manifest),
                                       "reference_order": absolute_uri(cfg.data.reference_order)})
    mix = cfg.mix.model_copy(update={
        "synthetic_manifest": absolute_uri(cfg.mix.synthetic_manifest)})
    update: dict[str, Any] = {"data": data, "mix": mix}
    model = getattr(cfg, "model", None)
    pretrained = getattr(model, "pretrained", "")
    if pretrained and os.path.exists(pretrained):  # a local file (not ``imagenet``)
        update["model"] = model.model_copy(update={"pretrained": absolute_uri(pretrained)})
    return cfg.model_copy(update=update)


def training_inputs(task: Task | str, cfg: TaskConfig, *, prepare: bool = False
                    ) -> TrainingInputs:
    """Read the manifest of ``cfg`` once and build its training and validation sets once.

    ``prepare``: fill the task's data-dependent settings from the manifest first (a new run;
    a resumed run keeps the config it was logged with).
    """
    task = get_task(task) if isinstance(task, str) else task
    if not cfg.data.manifest:
        raise ValueError("no training data: set data.manifest (e.g. --set data.manifest=DIR)")
    cfg = with_absolute_uris(cfg)
    manifest = read_task_manifest(cfg)
    for split in (cfg.data.train_split, cfg.data.val_split):
        manifest.split(*split.split(","))  # fails early, naming the empty split
    if prepare:
        cfg = task.prepare(cfg, manifest)  # class names/weights: logged and stored with model
    train_set, val_set = task.datasets(cfg, manifest)
    batch_sampler = None
    if cfg.mix.synthetic_manifest:
        train_set, batch_sampler = _mix(task, cfg, train_set)
    return TrainingInputs(task.name, cfg, train_set, val_set, manifest, batch_sampler)


def _mix(task: Task, cfg: TaskConfig, real: Dataset
         ) -> tuple[Dataset, MixedBatchSampler | None]:
    """The real training set mixed with the synthetic manifest's split (DermSynth3D)."""
    synthetic_manifest = read_manifest(cfg.mix.synthetic_manifest)
    synthetic = task.dataset(cfg, synthetic_manifest,
                             synthetic_manifest.split(cfg.mix.synthetic_split), True)
    if hasattr(getattr(synthetic, "augment", None), "use_stream"):
        synthetic.augment.use_stream(1)  # not the real set's transforms, in lockstep
    mixed, batch_sampler, _ = mixed_dataset(real, synthetic, cfg.mix, cfg.data.batch_size)
    return mixed, batch_sampler


def build_loaders(inputs: TrainingInputs, device: torch.device | None = None,
                  world_size: int = 1, rank: int = 0) -> tuple[DataLoader, DataLoader]:
    """The training and validation loaders of data-parallel rank ``rank`` of ``world_size``.

    Training: the mixed batch sampler (every ``world_size``-th batch per rank), class
    oversampling (an independent weighted stream per rank with 1/N of the draws: statistically
    one sharded stream), or shuffling (a ``DistributedSampler`` over several ranks, as Ray's
    ``prepare_data_loader`` would add). Validation: the whole set on every rank, in order, so
    all ranks agree on the gate metric.
    """
    cfg = inputs.cfg
    data, seed = cfg.data, cfg.train.seed
    pin = device is not None and device.type == "cuda"
    # Persistent workers keep their own dataset copy: progressive resizing needs fresh ones.
    persistent = data.loader_workers > 0 and not data.progressive_resize.sizes
    common: dict[str, Any] = {"num_workers": data.loader_workers, "pin_memory": pin,
                              "persistent_workers": persistent}
    collate = get_task(inputs.task).collate_fn(cfg)
    if collate is not None:  # e.g. detection: lists of images and box targets
        common["collate_fn"] = collate
    train_set = inputs.train_set
    if inputs.batch_sampler is not None:  # the sampler composes the batches itself
        batch_sampler = copy.copy(inputs.batch_sampler)  # sharding changes it: not the shared
        batch_sampler.shard(world_size, rank)
        train_loader = DataLoader(train_set, batch_sampler=batch_sampler, **common)
    else:
        # The generator also seeds the loader workers (and shuffles with one rank).
        batched = {"batch_size": data.batch_size, "drop_last": len(train_set) > data.batch_size,
                   "generator": torch.Generator().manual_seed(seed), **common}
        if data.oversample:
            train_loader = DataLoader(train_set, sampler=_oversampler(inputs, world_size, rank),
                                      **batched)
        elif world_size > 1:
            # Ray's default (seed 0); sampler_epochs gives it the epoch.
            sampler = DistributedSampler(train_set, num_replicas=world_size, rank=rank,
                                         shuffle=True)
            train_loader = DataLoader(train_set, sampler=sampler, **batched)
        else:
            train_loader = DataLoader(train_set, shuffle=True, **batched)
    val_loader = DataLoader(inputs.val_set, batch_size=data.batch_size, shuffle=False, **common)
    return train_loader, val_loader


def _oversampler(inputs: TrainingInputs, world_size: int, rank: int):
    labels = getattr(inputs.train_set, "labels", None)
    if labels is None:
        raise ValueError(f"data.oversample needs class labels; task {inputs.task!r} has none")
    seed = inputs.cfg.train.seed
    if world_size == 1:
        return oversampling_sampler(labels, seed=seed)
    return oversampling_sampler(labels, num_samples=max(1, len(labels) // world_size),
                                seed=seed * 1000 + rank)


def sampler_epochs(loader, then=None):
    """An ``on_epoch_start`` hook that tells epoch-aware samplers the epoch (then calls
    ``then``): a DistributedSampler (several workers) would otherwise repeat epoch 0's order
    every epoch, and a resumed run would restart the mixed batch sampler's stream at epoch 0."""
    samplers = []
    for sampler in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                    getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        if hasattr(sampler, "set_epoch") and all(sampler is not s for s in samplers):
            samplers.append(sampler)

    def on_epoch_start(epoch: int) -> None:
        for sampler in samplers:
            sampler.set_epoch(epoch)
        if then:
            then(epoch)

    return on_epoch_start
