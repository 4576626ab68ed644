"""Per-sample facts: what they measure, that they stream with bounded memory, and the KFP
validation component's outputs."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path
from types import SimpleNamespace

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermml.data.manifest import read_manifest, write_manifest
from dermml.data.phash import perceptual_hash
from dermml.validation import pool
from dermml.validation.facts import FACT_COLUMNS, sample_facts
from dermml.validation.pool import facts_frame


def write_noise_dataset(root: Path, n: int, size: int, seed: int = 0) -> str:
    """n random-noise RGB images (incompressible, so decoded size >> file size) with masks."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    mask = np.zeros((size, size), np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = 255
    Image.fromarray(mask).save(root / "masks" / "m.png")
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
            root / "images" / f"{i}.png")
        rows.append({"sample_id": f"s{i}", "image_uri": f"images/{i}.png",
                     "mask_uri": "masks/m.png", "split": "train"})
    return write_manifest(pd.DataFrame(rows), str(root / "manifest.parquet")) and str(root)


def test_perceptual_hash_equals_imagehash_phash(demo_data):
    manifest = read_manifest(demo_data)
    for uri in manifest.df["image_uri"][:40]:
        image = Image.open(manifest.resolve(uri))
        image.load()
        assert perceptual_hash(image) == str(imagehash.phash(image, hash_size=16))
        rotated = image.rotate(90)
        assert perceptual_hash(rotated) == str(imagehash.phash(rotated, hash_size=16))


def test_facts_measure_image_mask_and_exif(tmp_path):
    image = np.zeros((20, 30, 3), np.uint8)
    image[..., 0] = 200
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: upright it is 20 wide, 30 high
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", exif=exif.tobytes())
    (tmp_path / "img.jpg").write_bytes(buf.getvalue())
    mask = np.zeros((30, 20), np.uint8)
    mask[0:5, 0:5] = 255  # touches the border
    mask[20:25, 10:15] = 255  # a second region
    Image.fromarray(mask).save(tmp_path / "mask.png")
    facts = sample_facts({"sample_id": "a", "image_uri": str(tmp_path / "img.jpg"),
                          "mask_uri": str(tmp_path / "mask.png")})
    assert facts.image_ok and facts.format == "JPEG" and facts.channels == 3
    assert facts.exif_orientation == 6 and (facts.width, facts.height) == (20, 30)
    assert facts.file_size == len(buf.getvalue()) and len(facts.sha256) == 64
    assert len(facts.phash) == 64 and facts.mean_r > 150 and facts.mean_g < 20
    assert facts.mask_ok and facts.mask_binary and (facts.mask_width, facts.mask_height) == (20, 30)
    assert facts.lesion_fraction == pytest.approx(50 / 600)
    assert facts.mask_components == 2 and facts.mask_touches_border is True


def test_facts_stream_with_a_bounded_number_of_rows_in_flight(demo_data):
    manifest = read_manifest(demo_data)
    one = {"sample_id": "x", "image_uri": manifest.resolve(manifest.df["image_uri"][0]),
           "mask_uri": None}
    pulled = 0

    def rows():
        nonlocal pulled
        for _ in range(100_000):
            pulled += 1
            yield one

    stream = pool.stream_fact_tuples(rows(), total=100_000, processes=2)
    first = next(stream)
    assert first[0] == "x" and first[FACT_INDEX["image_ok"]] is True
    assert pulled <= (4 * 2 + 2) * pool._BATCH  # a window of batches, not the whole input
    stream.close()


FACT_INDEX = {name: i for i, name in enumerate(FACT_COLUMNS)}


def test_facts_memory_does_not_grow_with_image_count_or_size(tmp_path):
    small = write_noise_dataset(tmp_path / "small", n=130, size=128)
    large = write_noise_dataset(tmp_path / "large", n=390, size=128, seed=1)

    def peak(root: str) -> int:
        manifest = read_manifest(root)
        tracemalloc.start()
        facts_frame(manifest, processes=1)
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    peak_small, peak_large = peak(small), peak(large)
    decoded = 390 * 128 * 128 * 3  # what keeping the images would cost: 19 MB
    assert peak_large < decoded / 4  # one batch of work in flight, no pixels kept
    assert peak_large - peak_small < 260 * 4096  # a few KB per extra row


def test_validation_of_an_s3_manifest_in_worker_processes(s3_endpoint, demo_data, monkeypatch,
                                                          tmp_path):
    from dermml import storage
    from dermml.validation.run import validate

    monkeypatch.setattr(pool, "_BATCH", 8)  # 90 rows: enough batches for the process pool
    root = Path(demo_data).parent
    for sub in ("images", "masks"):  # what the segmentation suite reads
        storage.upload_dir(str(root / sub), f"s3://dermml/validation-demo/{sub}")
    storage.write_bytes("s3://dermml/validation-demo/manifest.parquet",
                        Path(demo_data).read_bytes())
    outcome = validate("s3://dermml/validation-demo", report_dir="s3://dermml/reports/demo",
                       track=False, progress=False, processes=2)
    assert outcome.report.passed and outcome.report.n_samples == 90
    assert storage.exists("s3://dermml/reports/demo/validation.json")
    assert storage.exists("s3://dermml/reports/demo/data_docs/index.html")


def test_kfp_component_outputs_report_and_clean_manifest(demo_data, tmp_path):
    from components.validate import validate_data

    report = SimpleNamespace(path=str(tmp_path / "report"), metadata={})
    clean = SimpleNamespace(path=str(tmp_path / "clean_manifest"), metadata={})
    uri = validate_data.python_func(manifest_uri=demo_data, suite="segmentation",
                                    required_splits="train,val,test", parent_run_id="",
                                    report=report, clean_manifest=clean)
    assert uri == demo_data
    assert (tmp_path / "report" / "data_docs" / "index.html").exists()
    assert report.metadata["n_problems"] == 0 and clean.metadata["n_samples"] == 90
    clean_df = read_manifest(clean.path).df
    assert len(clean_df) == 90 and all(Path(u).is_absolute() for u in clean_df["image_uri"])


def test_mask_facts_count_regions_not_specks_and_accept_rgb_black_and_white(tmp_path):
    image = Image.new("RGB", (100, 100), (180, 120, 90))
    image.save(tmp_path / "img.png")
    lesion = np.zeros((100, 100), np.uint8)
    lesion[20:60, 20:60] = 255  # the lesion
    lesion[80:90, 80:90] = 255  # a second real region (1% of the image)
    for y, x in ((5, 5), (5, 95), (95, 5), (70, 10)):
        lesion[y, x] = 255  # annotation specks: single pixels
    Image.fromarray(np.stack([lesion] * 3, axis=-1)).save(tmp_path / "mask.png")
    facts = sample_facts({"sample_id": "s", "image_uri": str(tmp_path / "img.png"),
                          "mask_uri": str(tmp_path / "mask.png")})
    assert facts.mask_encoding == "binary" and facts.mask_binary and facts.mask_mode == "RGB"
    assert facts.mask_components == 2
    assert facts.lesion_fraction == pytest.approx((1600 + 100 + 4) / 10000)


def test_kfp_component_takes_suite_overrides_and_hands_on_the_clean_manifest_when_warn_only(
        demo_data, tmp_path):
    from components.validate import validate_data

    def outputs(name: str):
        report = SimpleNamespace(path=str(tmp_path / name / "report"), metadata={})
        clean = SimpleNamespace(path=str(tmp_path / name / "clean"), metadata={}, uri="")
        return report, clean

    strict = ["lesion_fraction.min=0.2"]  # a threshold most demo masks fail
    report, clean = outputs("failing")
    with pytest.raises(Exception, match="validation failed|FAILED"):
        validate_data.python_func(manifest_uri=demo_data, suite="segmentation",
                                  required_splits="", parent_run_id="", report=report,
                                  clean_manifest=clean, overrides=strict)
    report, clean = outputs("warn")
    uri = validate_data.python_func(manifest_uri=demo_data, suite="segmentation",
                                    required_splits="", parent_run_id="", report=report,
                                    clean_manifest=clean, overrides=strict, warn_only=True)
    assert uri == clean.path and report.metadata["n_quarantined"] > 0
    kept = read_manifest(uri).df
    assert 0 < len(kept) == 90 - report.metadata["n_quarantined"]
