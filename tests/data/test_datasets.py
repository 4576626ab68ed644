"""Torch datasets over the procedural demo data: classification, attribute label maps, lesions."""

import numpy as np
import pytest
import torch

from dermml.data.augment import AugmentConfig, build_augment
from dermml.data.datasets import (
    AttributeDataset,
    ClassificationDataset,
    SegmentationDataset,
    class_pixel_counts,
)
from dermml.data.images import load_mask
from dermml.data.manifest import ATTRIBUTES, DIAGNOSES, read_manifest

SIZE = 32


@pytest.fixture(scope="module")
def manifest(demo_data):
    return read_manifest(demo_data)


@pytest.fixture(scope="module")
def train_rows(manifest):
    return manifest.split("train")


# ---------------------------------------------------------------------- classification


def test_classification_items_are_float_images_and_int64_class_indices(manifest, train_rows):
    ds = ClassificationDataset(manifest, train_rows, SIZE, list(DIAGNOSES))
    assert len(ds) == len(train_rows)
    image, label = ds[0]
    assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert label.dtype == torch.int64 and label.shape == ()
    expected = [DIAGNOSES.index(lbl) for lbl in train_rows["label"]]
    assert ds.labels == expected
    assert [int(ds[i][1]) for i in range(5)] == expected[:5]


def test_classification_load_gives_the_resized_uint8_image(manifest, train_rows):
    ds = ClassificationDataset(manifest, train_rows, 24, list(DIAGNOSES))
    image, label = ds.load(3)
    assert image.shape == (24, 24, 3) and image.dtype == np.uint8
    assert label == ds.labels[3]


def test_class_order_follows_class_names(manifest, train_rows):
    order = ["seborrheic_keratosis", "melanoma", "nevus"]
    ds = ClassificationDataset(manifest, train_rows, SIZE, order)
    assert ds.labels == [order.index(lbl) for lbl in train_rows["label"]]


def test_labels_outside_the_classes_name_the_sample_and_label(manifest, train_rows):
    sample = train_rows.loc[train_rows["label"] == "seborrheic_keratosis", "sample_id"].iloc[0]
    with pytest.raises(ValueError, match="seborrheic_keratosis") as err:
        ClassificationDataset(manifest, train_rows, SIZE, ["nevus", "melanoma"])
    assert sample in str(err.value)


def test_missing_labels_are_rejected(manifest, train_rows):
    rows = train_rows.copy()
    rows.loc[2, "label"] = None
    with pytest.raises(ValueError, match=rows.loc[2, "sample_id"]):
        ClassificationDataset(manifest, rows, SIZE, list(DIAGNOSES))


def test_augmented_classification_keeps_shapes_and_labels(manifest, train_rows):
    augment = build_augment(AugmentConfig(rotate_degrees=20, hair=1.0), seed=0)
    ds = ClassificationDataset(manifest, train_rows, SIZE, list(DIAGNOSES), augment)
    plain = ClassificationDataset(manifest, train_rows, SIZE, list(DIAGNOSES))
    image, label = ds[1]
    assert image.shape == (3, SIZE, SIZE) and int(label) == plain.labels[1]
    assert not torch.equal(image, plain[1][0])


# -------------------------------------------------------------------------- attributes


def test_attribute_items_are_int64_label_maps_with_indices_0_to_k(manifest, train_rows):
    ds = AttributeDataset(manifest, train_rows, SIZE)
    image, labels = ds[0]
    assert image.shape == (3, SIZE, SIZE)
    assert labels.shape == (SIZE, SIZE) and labels.dtype == torch.int64
    seen = set()
    for i in range(len(ds)):
        seen |= set(np.unique(ds.load(i)[1]).tolist())
    assert seen <= set(range(len(ATTRIBUTES) + 1))
    assert len(seen) >= 4  # background and several attributes across the set


def test_overlapping_attributes_keep_the_later_one(manifest, train_rows):
    ds = AttributeDataset(manifest, train_rows, SIZE)
    overlaps = 0
    for i in range(len(ds)):
        _, labels = ds.load(i)
        masks = [load_mask(uri) for uri in ds.attribute_uris[i]]  # demo masks are SIZE px
        for k, mask in enumerate(masks, start=1):
            later = np.any(masks[k:], axis=0) if k < len(masks) else np.zeros_like(mask)
            assert (mask[labels == k]).all()
            np.testing.assert_array_equal(labels[mask & ~later], k)
            overlaps += int((mask & later).sum())
    assert overlaps > 0  # the rule was exercised


def test_attribute_order_sets_the_class_indices(manifest, train_rows):
    ds = AttributeDataset(manifest, train_rows, SIZE, attributes=("globules",))
    for i in range(5):
        _, labels = ds.load(i)
        np.testing.assert_array_equal(labels == 1, load_mask(ds.attribute_uris[i][0]))


def test_a_missing_attribute_mask_counts_as_empty(manifest, train_rows):
    rows = train_rows.copy()
    rows["attribute_mask_uris"] = [{k: v for k, v in d.items() if k != "pigment_network"}
                                   for d in rows["attribute_mask_uris"]]
    ds = AttributeDataset(manifest, rows, SIZE)
    assert all(1 not in np.unique(ds.load(i)[1]) for i in range(len(ds)))


def test_rows_without_attribute_masks_name_the_sample(manifest, train_rows):
    rows = train_rows.copy()
    rows["attribute_mask_uris"] = [None] + list(rows["attribute_mask_uris"][1:])
    with pytest.raises(ValueError, match=rows.loc[0, "sample_id"]):
        AttributeDataset(manifest, rows, SIZE)


def test_augmented_label_maps_stay_integer_labels(manifest, train_rows):
    augment = build_augment(AugmentConfig(rotate_degrees=30, elastic=1.0, hair=1.0), seed=0)
    ds = AttributeDataset(manifest, train_rows, SIZE, augment=augment)
    for i in range(5):
        raw = ds.load(i)[1]
        _, labels = ds[i]
        assert labels.dtype == torch.int64
        assert set(labels.unique().tolist()) <= set(np.unique(raw).tolist())


def test_class_pixel_counts_cover_every_pixel(manifest, train_rows):
    ds = AttributeDataset(manifest, train_rows, SIZE)
    counts = class_pixel_counts(ds)
    assert counts.shape == (len(ATTRIBUTES) + 1,)
    assert counts.sum() == len(ds) * SIZE * SIZE
    assert counts[0] == counts.max()  # background dominates, hence the class weights
    capped = class_pixel_counts(ds, max_samples=4)
    assert capped.sum() == 4 * SIZE * SIZE


# ------------------------------------------------------------------------ segmentation


def test_segmentation_dataset_accepts_the_shared_augment(manifest, train_rows):
    augment = build_augment(AugmentConfig(rotate_degrees=30, hair=1.0), seed=0)
    ds = SegmentationDataset(manifest, train_rows, SIZE, augment)
    image, mask = ds[0]
    assert image.shape == (3, SIZE, SIZE)
    assert mask.shape == (1, SIZE, SIZE) and mask.dtype == torch.float32
    assert set(mask.unique().tolist()) <= {0.0, 1.0}


def test_dataset_files_follow_subsets_and_concatenations(demo_data):
    from torch.utils.data import ConcatDataset, Subset

    from dermml.data.datasets import SegmentationDataset, dataset_files

    manifest = read_manifest(demo_data)
    rows = manifest.split("train").iloc[:4]
    ds = SegmentationDataset(manifest, rows, image_size=16)
    nested = ConcatDataset([Subset(ds, [1, 3]), Subset(ConcatDataset([ds]), [0])])
    assert dataset_files(nested) == [*ds.files(1), *ds.files(3), *ds.files(0)]
