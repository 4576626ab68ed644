"""Procedural demo data: deterministic, well-formed, class-dependent, patient-safe splits."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from dermml.data.demo import generate_demo
from dermml.data.images import load_image, load_mask
from dermml.data.manifest import ATTRIBUTES, DIAGNOSES, read_manifest


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = read_manifest(generate_demo(str(tmp_path / "a"), n=12, size=32, seed=3))
    b = read_manifest(generate_demo(str(tmp_path / "b"), n=12, size=32, seed=3))
    c = read_manifest(generate_demo(str(tmp_path / "c"), n=12, size=32, seed=4))
    assert a.version == b.version and tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert a.version != c.version


def test_images_masks_and_attributes_are_well_formed(demo_data):
    manifest = read_manifest(demo_data)
    assert set(manifest.df["label"]) == set(DIAGNOSES)
    for _, row in manifest.df.head(20).iterrows():
        image = load_image(manifest.resolve(row["image_uri"]))
        mask = load_mask(manifest.resolve(row["mask_uri"]))
        assert image.shape == (32, 32, 3) and mask.shape == (32, 32)
        assert 0 < mask.mean() < 0.9  # a lesion, not the whole image
        rows, cols = np.nonzero(mask)  # the box is COCO-style [x, y, w, h] around the lesion
        assert [list(b) for b in row["boxes"]] == [[cols.min(), rows.min(), np.ptp(cols) + 1,
                                                    np.ptp(rows) + 1]]
        for name in ATTRIBUTES:
            uri = row["attribute_mask_uris"].get(name)
            if uri:
                # Streaks radiate outward from the border; the others lie inside the lesion.
                margin = 8 if name == "streaks" else 2
                near_lesion = ndimage.binary_dilation(mask, iterations=margin)
                attribute = load_mask(manifest.resolve(uri))
                assert not (attribute & ~near_lesion).any(), (row["sample_id"], name)


def test_melanomas_are_larger_and_more_irregular_than_nevi(tmp_path):
    manifest = read_manifest(generate_demo(str(tmp_path / "d"), n=90, size=64, seed=0))
    area, irregularity = {}, {}
    for _, row in manifest.df.iterrows():
        mask = load_mask(manifest.resolve(row["mask_uri"]))
        perimeter = (mask & ~ndimage.binary_erosion(mask)).sum()
        area.setdefault(row["label"], []).append(mask.sum())
        irregularity.setdefault(row["label"], []).append(perimeter**2 / max(1, mask.sum()))
    assert np.mean(area["melanoma"]) > np.mean(area["nevus"])
    assert np.mean(irregularity["melanoma"]) > np.mean(irregularity["nevus"])


def test_patients_never_span_splits_and_every_split_has_every_class(demo_data):
    df = read_manifest(demo_data).df
    assert (df.groupby("patient_id")["split"].nunique() == 1).all()
    for split in ("train", "val", "test"):
        assert set(df[df["split"] == split]["label"]) == set(DIAGNOSES)


def test_refuses_to_overwrite_an_existing_dataset(demo_data):
    with pytest.raises(FileExistsError):
        generate_demo(str(Path(demo_data).parent), n=5, size=32)
