"""Behaviour of the procedural demo data generator (dermml.data.demo)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from dermml.data import images
from dermml.data.demo import generate_demo
from dermml.data.manifest import ATTRIBUTES, DIAGNOSES, read_manifest

SIZE = 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    uri = generate_demo(str(out), n=60, size=SIZE, seed=5)
    return read_manifest(uri)


def load(manifest, uri: str) -> np.ndarray:
    return np.asarray(Image.open(manifest.resolve(uri)))


def load_mask(manifest, uri: str) -> np.ndarray:
    image = Image.open(manifest.resolve(uri))
    assert image.mode == "L"
    return np.asarray(image)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_returns_manifest_uri_with_relative_uris(dataset):
    assert dataset.uri.endswith("manifest.parquet")
    first = dataset.df.iloc[0]
    assert first.sample_id == "demo_00001"
    assert first.image_uri == "images/demo_00001.png"
    assert first.mask_uri == "masks/demo_00001.png"
    assert first.attribute_mask_uris == {a: f"attributes/{a}/demo_00001.png" for a in ATTRIBUTES}
    assert set(dataset.df["source"]) == {"demo"}
    assert dataset.df["lesion_id"].is_unique


def test_same_seed_gives_identical_files_and_version(tmp_path):
    a = read_manifest(generate_demo(str(tmp_path / "a"), n=6, size=32, seed=1))
    b = read_manifest(generate_demo(str(tmp_path / "b"), n=6, size=32, seed=1))
    assert a.version == b.version
    assert files_under(tmp_path / "a") == files_under(tmp_path / "b")


def test_different_seed_gives_different_data(tmp_path):
    a = read_manifest(generate_demo(str(tmp_path / "a"), n=6, size=32, seed=1))
    b = read_manifest(generate_demo(str(tmp_path / "b"), n=6, size=32, seed=2))
    assert a.version != b.version
    assert set(a.df["sha256"]).isdisjoint(b.df["sha256"])


def test_sample_depends_only_on_seed_and_index(tmp_path):
    short = read_manifest(generate_demo(str(tmp_path / "short"), n=4, size=32, seed=3))
    long = read_manifest(generate_demo(str(tmp_path / "long"), n=9, size=32, seed=3))
    assert list(short.df["sha256"]) == list(long.df["sha256"][:4])
    assert list(short.df["patient_id"]) == list(long.df["patient_id"][:4])


def test_images_are_rgb_of_requested_size(dataset):
    for row in dataset.df.itertuples():
        image = Image.open(dataset.resolve(row.image_uri))
        assert image.mode == "RGB"
        assert image.size == (SIZE, SIZE) == (row.width, row.height)


def test_sha256_matches_image_bytes(dataset):
    for row in dataset.df.head(5).itertuples():
        data = Path(dataset.resolve(row.image_uri)).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256


def test_lesion_masks_are_binary_nonempty_and_not_whole_image(dataset):
    for row in dataset.df.itertuples():
        mask = load_mask(dataset, row.mask_uri)
        assert set(np.unique(mask)) == {0, 255}
        assert 0.005 < (mask > 0).mean() < 0.8


def test_attribute_masks_are_binary_and_inside_dilated_lesion(dataset):
    seen = set()
    for row in dataset.df.itertuples():
        lesion = ndimage.binary_dilation(load_mask(dataset, row.mask_uri) > 0,
                                         structure=np.ones((3, 3)), iterations=SIZE // 8)
        for name, uri in row.attribute_mask_uris.items():
            mask = load_mask(dataset, uri)
            assert set(np.unique(mask)) <= {0, 255}
            assert not (mask[~lesion] > 0).any(), (row.sample_id, name)
            if mask.any():
                seen.add(name)
    assert seen == set(ATTRIBUTES)


def test_lesion_is_darker_than_surrounding_skin(dataset):
    for row in dataset.df.itertuples():
        lesion = load_mask(dataset, row.mask_uri) > 0
        ring = ndimage.binary_dilation(lesion, iterations=4) & ~ndimage.binary_dilation(lesion)
        luminance = load(dataset, row.image_uri).astype(float).mean(axis=2)
        core = ndimage.binary_erosion(lesion, iterations=1)
        assert np.median(luminance[core]) < 0.85 * np.median(luminance[ring]), row.sample_id


def border_irregularity(mask: np.ndarray) -> float:
    perimeter = (mask & ~ndimage.binary_erosion(mask)).sum()
    return perimeter**2 / mask.sum()


def test_melanoma_is_larger_and_more_irregular_than_nevus(dataset):
    stats = {label: [] for label in DIAGNOSES}
    for row in dataset.df.itertuples():
        mask = load_mask(dataset, row.mask_uri) > 0
        stats[row.label].append((mask.sum(), border_irregularity(mask)))
    melanoma, nevus = np.array(stats["melanoma"]), np.array(stats["nevus"])
    assert melanoma[:, 0].mean() > 1.5 * nevus[:, 0].mean()
    assert melanoma[:, 1].mean() > nevus[:, 1].mean()


def test_milia_like_cysts_mark_seborrheic_keratosis(dataset):
    def cyst_rate(label: str) -> float:
        rows = dataset.df[dataset.df["label"] == label]
        return np.mean([load_mask(dataset, uris["milia_like_cyst"]).any()
                        for uris in rows["attribute_mask_uris"]])

    assert cyst_rate("seborrheic_keratosis") > cyst_rate("nevus") + 0.3


def test_patients_never_span_splits(dataset):
    splits_per_patient = dataset.df.groupby("patient_id")["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert (dataset.df.groupby("patient_id").size() > 1).any()


def test_lesions_of_a_patient_share_a_fitzpatrick_type(dataset):
    assert dataset.df["fitzpatrick"].between(1, 6).all()
    assert (dataset.df.groupby("patient_id")["fitzpatrick"].nunique() == 1).all()
    assert dataset.df["fitzpatrick"].nunique() >= 4


def test_every_split_has_every_class(dataset):
    counts = dataset.counts()
    for split in ("train", "val", "test"):
        for label in DIAGNOSES:
            assert counts.loc[split, label] >= 1, (split, label)


def test_split_fractions_are_respected(tmp_path):
    manifest = read_manifest(
        generate_demo(str(tmp_path), n=30, size=32, seed=0, split_fractions=(0.5, 0.5, 0.0)))
    sizes = manifest.df["split"].value_counts()
    assert "test" not in sizes
    assert abs(sizes["train"] - 15) <= 3


def test_writes_preview_grid(dataset):
    preview = Image.open(Path(dataset.base_dir) / "preview.png")
    assert preview.mode == "RGB"
    assert preview.size == (4 * 128, 4 * 128)


def test_refuses_to_overwrite_existing_dataset(tmp_path):
    generate_demo(str(tmp_path), n=2, size=32)
    before = (tmp_path / "manifest.parquet").read_bytes()
    with pytest.raises(FileExistsError, match="--out"):
        generate_demo(str(tmp_path), n=2, size=32, seed=9)
    assert (tmp_path / "manifest.parquet").read_bytes() == before


def test_progress_bar_is_shown_when_asked_and_on_a_terminal_only(tmp_path, capsys,
                                                                  monkeypatch):
    generate_demo(str(tmp_path / "quiet"), n=2, size=32)
    assert "demo data" not in capsys.readouterr().err
    generate_demo(str(tmp_path / "log"), n=2, size=32, progress=True)  # stderr is no terminal
    assert "demo data" not in capsys.readouterr().err
    import sys

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    generate_demo(str(tmp_path / "loud"), n=2, size=32, progress=True)
    assert "demo data" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs", [{"n": 0}, {"size": 8}, {"seed": -1},
                                    {"split_fractions": (0.5, 0.2, 0.2)}])
def test_rejects_bad_arguments_before_writing(tmp_path, kwargs):
    with pytest.raises(ValueError):
        generate_demo(str(tmp_path / "out"), **{"n": 3, "size": 32, **kwargs})
    assert not (tmp_path / "out").exists()


def test_preview_png_is_a_valid_image_in_memory():
    from dermml.data.demo import preview_png, render_sample

    sample = render_sample(np.random.default_rng([0, 0]), 32, "nevus", 3)
    image = Image.open(io.BytesIO(preview_png([sample])))
    assert image.size == (128, 128)


def test_images_masks_and_attributes_are_well_formed(demo_data):
    manifest = read_manifest(demo_data)
    assert set(manifest.df["label"]) == set(DIAGNOSES)
    for _, row in manifest.df.head(20).iterrows():
        image = images.load_image(manifest.resolve(row["image_uri"]))
        mask = images.load_mask(manifest.resolve(row["mask_uri"]))
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
                attribute = images.load_mask(manifest.resolve(uri))
                assert not (attribute & ~near_lesion).any(), (row["sample_id"], name)
