"""Class oversampling, real + synthetic batch mixing, MixUp and the progressive-resize schedule."""

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from dermml.config import ConfigError, Section, load_config
from dermml.data.sampling import (
    MixConfig,
    MixedBatchSampler,
    ProgressiveResizeConfig,
    class_balanced_weights,
    mixed_dataset,
    mixup,
    oversampling_sampler,
    size_for_epoch,
    subset_indices,
)

# ------------------------------------------------------------------------- oversampling


def test_class_balanced_weights_give_every_class_the_same_total_weight():
    labels = ["nevus"] * 8 + ["melanoma"] * 2 + ["seborrheic_keratosis"]
    weights = class_balanced_weights(labels)
    totals = {c: weights[np.array(labels) == c].sum() for c in set(labels)}
    assert all(t == pytest.approx(1.0) for t in totals.values())
    assert weights[0] == pytest.approx(1 / 8)


def test_oversampling_draws_rare_classes_about_as_often_as_frequent_ones():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    drawn = np.array([labels[i] for i in oversampling_sampler(labels, num_samples=6000, seed=0)])
    shares = np.bincount(drawn, minlength=3) / drawn.size
    # 6000 draws: the standard error of a 1/3 share is about 0.006.
    np.testing.assert_allclose(shares, 1 / 3, atol=0.03)


def test_oversampling_is_seeded_and_each_epoch_draws_anew():
    labels = [0] * 50 + [1] * 5
    first, again = oversampling_sampler(labels, seed=3), oversampling_sampler(labels, seed=3)
    epoch0, epoch0_again = list(first), list(again)
    assert epoch0 == epoch0_again
    assert len(epoch0) == len(labels)
    assert list(first) != epoch0


# ------------------------------------------------------------------------------ mixing


def test_mixed_batches_hold_the_exact_real_and_synthetic_counts():
    n_real, n_synth = 20, 100
    sampler = MixedBatchSampler(range(n_real), range(n_real, n_real + n_synth), batch_size=8,
                                real_batch_ratio=0.25, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 10  # 20 real / 2 per batch
    for batch in batches:
        assert len(batch) == 8
        assert sum(i < n_real for i in batch) == 2
        assert all(n_real <= i < n_real + n_synth for i in batch if i >= n_real)
    real_seen = [i for b in batches for i in b if i < n_real]
    assert sorted(real_seen) == list(range(n_real))  # every real sample once per epoch
    synth_seen = [i for b in batches for i in b if i >= n_real]
    assert len(set(synth_seen)) == len(synth_seen)  # no repeats before the pool runs out


def test_last_mixed_batch_is_topped_up_to_full_size():
    sampler = MixedBatchSampler(range(5), range(5, 9), batch_size=4, real_batch_ratio=0.5)
    batches = list(sampler)
    assert len(batches) == 3  # ceil(5 real / 2 per batch)
    assert all(len(b) == 4 and sum(i < 5 for i in b) == 2 for b in batches)


def test_mixed_batches_depend_only_on_seed_and_epoch():
    def batches(seed, epoch):
        sampler = MixedBatchSampler(range(16), range(16, 64), 8, 0.5, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 2) == batches(0, 2)
    assert batches(0, 2) != batches(0, 3)
    assert batches(0, 2) != batches(1, 2)


def test_mixed_batches_change_across_passes_without_set_epoch():
    sampler = MixedBatchSampler(range(16), range(16, 64), 8, 0.5, seed=0)
    first, second = list(sampler), list(sampler)
    assert first != second
    sampler.set_epoch(0)
    assert list(sampler) == first


def test_mixed_batches_split_across_data_parallel_ranks():
    def rank_batches(rank):
        return list(MixedBatchSampler(range(10), range(10, 40), 4, 0.5, seed=0,
                                      num_replicas=2, rank=rank))

    whole = list(MixedBatchSampler(range(10), range(10, 40), 4, 0.5, seed=0, num_batches=6))
    rank0, rank1 = rank_batches(0), rank_batches(1)
    assert len(rank0) == len(rank1) == 3  # ceil(5 batches / 2), equal so DDP never hangs
    assert rank0 == whole[0::2] and rank1 == whole[1::2]


def test_mixed_batch_sampler_rejects_impossible_mixes():
    with pytest.raises(ValueError, match="no real sample"):
        MixedBatchSampler(range(4), range(4, 8), batch_size=4, real_batch_ratio=0.1)
    with pytest.raises(ValueError, match="synthetic set is empty"):
        MixedBatchSampler(range(4), [], batch_size=4, real_batch_ratio=0.5)


def test_subset_indices_keep_the_requested_fraction_reproducibly():
    kept = subset_indices(200, 0.3, seed=1)
    assert kept.size == 60 and len(set(kept)) == 60 and kept.max() < 200
    np.testing.assert_array_equal(kept, subset_indices(200, 0.3, seed=1))
    assert not np.array_equal(kept, subset_indices(200, 0.3, seed=2))
    np.testing.assert_array_equal(subset_indices(7, 1.0, seed=0), np.arange(7))
    assert subset_indices(7, 0.0, seed=0).size == 0
    assert subset_indices(7, 0.01, seed=0).size == 1


def _dataset(n, offset, labels=None):
    ds = TensorDataset(torch.arange(offset, offset + n))
    if labels is not None:
        ds.labels = labels
    return ds


def test_mixed_dataset_applies_real_ratio_and_synthetic_fraction():
    real, synthetic = _dataset(40, 0), _dataset(100, 1000)
    cfg = MixConfig(synthetic_manifest="synth", real_ratio=0.5, synthetic_fraction=0.2,
                    real_batch_ratio=0.5, seed=0)
    mixed, sampler, kept = mixed_dataset(real, synthetic, cfg, batch_size=8)
    assert len(kept["real"]) == 20 and len(kept["synthetic"]) == 20
    assert len(mixed) == 40
    values = [int(mixed[i][0]) for i in range(len(mixed))]
    assert values[:20] == kept["real"].tolist()
    assert values[20:] == (1000 + kept["synthetic"]).tolist()
    for batch in sampler:  # batch indices address the concatenation: first 20 are real
        assert sum(i < 20 for i in batch) == 4
        assert all(int(mixed[i][0]) >= 1000 for i in batch if i >= 20)


def test_mixed_dataset_without_batch_ratio_shuffles_freely_and_keeps_labels():
    real, synthetic = _dataset(6, 0, labels=[0, 0, 0, 0, 1, 1]), _dataset(4, 100, [1, 1, 2, 2])
    mixed, sampler, _ = mixed_dataset(real, synthetic, MixConfig(synthetic_manifest="s"), 4)
    assert sampler is None
    assert mixed.labels == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]  # ready for oversampling


# ------------------------------------------------------------------------------ MixUp


def test_mixup_soft_targets_sum_to_one_and_weigh_partners_by_lam():
    n = 8
    # Image i is constant i and has its own class, so every mix can be read back.
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 4, 4)
    targets = torch.arange(n)
    mixed, soft = mixup(images, targets, num_classes=n, alpha=0.4,
                        generator=torch.Generator().manual_seed(0))
    assert soft.shape == (n, n)
    torch.testing.assert_close(soft.sum(1), torch.ones(n))
    lams = set()
    for i in range(n):
        nonzero = soft[i].nonzero().flatten().tolist()
        if nonzero == [i]:
            continue  # paired with itself
        partner = next(j for j in nonzero if j != i)
        lam = float(soft[i, i])
        assert float(soft[i, partner]) == pytest.approx(1 - lam)
        assert float(mixed[i, 0, 0, 0]) == pytest.approx(lam * i + (1 - lam) * partner, abs=1e-5)
        lams.add(round(lam, 6))
    assert len(lams) == 1  # one lam per batch


def test_mixup_is_reproducible_with_a_seeded_generator():
    images, targets = torch.rand(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    a = mixup(images, targets, 3, 1.0, torch.Generator().manual_seed(5))
    b = mixup(images, targets, 3, 1.0, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b)


def test_mixup_with_alpha_zero_returns_images_and_one_hot_targets():
    images, targets = torch.rand(4, 3, 4, 4), torch.tensor([2, 0, 1, 2])
    mixed, soft = mixup(images, targets, num_classes=3, alpha=0.0)
    assert torch.equal(mixed, images)
    torch.testing.assert_close(soft, torch.nn.functional.one_hot(targets, 3).float())


# ----------------------------------------------------------------- progressive resizing


def test_progressive_resize_follows_the_schedule():
    cfg = ProgressiveResizeConfig(sizes=[64, 96, 128], epochs=[0, 5, 10])
    assert [size_for_epoch(cfg, e, 256) for e in (0, 4, 5, 9, 10, 30)] == \
        [64, 64, 96, 96, 128, 128]


def test_progressive_resize_uses_the_default_before_the_first_size_and_when_empty():
    assert size_for_epoch(ProgressiveResizeConfig(), 7, default=64) == 64
    late = ProgressiveResizeConfig(sizes=[128], epochs=[3])
    assert [size_for_epoch(late, e, 64) for e in (0, 2, 3)] == [64, 64, 128]


@pytest.mark.parametrize("sizes, epochs, message", [
    ([64, 96], [0], "one start epoch per size"),
    ([64, 96], [5, 5], "must increase"),
    ([64, 96], [5, 0], "must increase"),
    ([0, 96], [0, 5], "positive"),
    ([64], [-1], ">= 0"),
])
def test_progressive_resize_rejects_bad_schedules_with_the_reason(sizes, epochs, message):
    with pytest.raises(ValueError, match=message):
        ProgressiveResizeConfig(sizes=sizes, epochs=epochs)


def test_progressive_resize_schedule_errors_surface_as_config_errors():
    class Cfg(Section):
        progressive_resize: ProgressiveResizeConfig = ProgressiveResizeConfig()

    ok = load_config(Cfg, overrides=["progressive_resize.sizes=[64,96]",
                                     "progressive_resize.epochs=[0,5]"])
    assert size_for_epoch(ok.progressive_resize, 5, 32) == 96
    with pytest.raises(ConfigError, match="must increase"):
        load_config(Cfg, overrides=["progressive_resize.sizes=[64,96]",
                                    "progressive_resize.epochs=[5,0]"])


def test_data_parallel_ranks_get_disjoint_equal_parts_of_every_sampler():
    """training/inputs.py shards the training set per rank: mixed batches, oversampling and
    plain shuffling (a DistributedSampler) alike."""
    from dermml.tasks.base import TaskConfig
    from dermml.training.inputs import TrainingInputs, build_loaders

    data = TensorDataset(torch.arange(40))

    def drawn(inputs: TrainingInputs, rank: int) -> list[list[int]]:
        train, _ = build_loaders(inputs, world_size=2, rank=rank)
        return [batch[0].tolist() for batch in train]

    cfg = TaskConfig.model_validate({"data": {"batch_size": 4}})
    mixed = TrainingInputs("segmentation", cfg, data, data, batch_sampler=MixedBatchSampler(
        range(10), range(10, 40), 4, 0.5, seed=0))
    whole = list(MixedBatchSampler(range(10), range(10, 40), 4, 0.5, seed=0, num_batches=6))
    rank0, rank1 = drawn(mixed, 0), drawn(mixed, 1)
    assert len(rank0) == len(rank1) == 3  # half an epoch each, not a whole one
    assert rank0 == whole[0::2] and rank1 == whole[1::2]
    assert mixed.batch_sampler.num_replicas == 1  # the inputs' own sampler stays whole

    labelled = TensorDataset(torch.arange(40))
    labelled.labels = [0] * 30 + [1] * 10
    oversampled = TrainingInputs("classification", TaskConfig.model_validate(
        {"data": {"batch_size": 5, "oversample": True}}), labelled, labelled)
    a, b = (sum(drawn(oversampled, rank), []) for rank in (0, 1))
    assert len(a) == len(b) == 20 and a != b  # 1/2 of the draws each, different streams

    shuffled = TrainingInputs("segmentation", cfg, data, data)
    a, b = (sum(drawn(shuffled, rank), []) for rank in (0, 1))
    assert len(a) == len(b) == 20 and sorted(a + b) == list(range(40))
