"""StyleGAN dataset ZIPs: export from a manifest in dataset_tool.py's layout, import back."""

import io
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermml.data.demo import generate_demo
from dermml.data.images import encode_png, load_image
from dermml.data.importers import DatasetImportError, import_dataset, import_stylegan_zip
from dermml.data.manifest import DIAGNOSES, ManifestError, read_manifest, write_manifest
from dermml.data.stylegan_zip import (
    DATASET_JSON,
    StyleGANExportError,
    archive_name,
    center_crop_resize,
    export_stylegan_zip,
)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """12 demo samples at 32 px, every split populated."""
    out = tmp_path_factory.mktemp("demo")
    return generate_demo(str(out), n=12, size=32, seed=0)


def _manifest(path, images, labels=None):
    """A manifest of the given (name, HxWx3 array) images."""
    rows = []
    for i, (name, image) in enumerate(images):
        (path / name).write_bytes(encode_png(image))
        rows.append({"sample_id": f"s{i}", "image_uri": name, "split": "train",
                     "label": None if labels is None else labels[i]})
    uri = str(path / "manifest.parquet")
    write_manifest(pd.DataFrame(rows), uri)
    return uri


def _pixels(seed, height, width):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_archive_names_follow_dataset_tool():
    assert archive_name(0) == "00000/img00000000.png"
    assert archive_name(1234) == "00001/img00001234.png"
    assert archive_name(49_999) == "00049/img00049999.png"


def test_zip_has_the_reference_layout(demo, tmp_path):
    out = tmp_path / "ds.zip"
    result = export_stylegan_zip(demo, str(out), split=None)
    manifest = read_manifest(demo)
    assert result["images"] == 12 and result["resolution"] == 32
    assert result["classes"] == sorted(DIAGNOSES) and result["version"] == manifest.version
    with zipfile.ZipFile(out) as zf:
        infos = zf.infolist()
        assert all(info.compress_type == zipfile.ZIP_STORED for info in infos)
        names = [info.filename for info in infos]
        assert names == [archive_name(i) for i in range(12)] + [DATASET_JSON]
        meta = json.loads(zf.read(DATASET_JSON))
        with Image.open(io.BytesIO(zf.read(names[0]))) as png:
            assert png.format == "PNG" and png.mode == "RGB" and png.size == (32, 32)
    # What StyleGAN2-ADA's ImageFolderDataset reads: labels as [[name, class index], ...].
    labels = dict(meta["labels"])
    assert sorted(labels) == names[:-1]
    assert all(isinstance(v, int) and 0 <= v < 3 for v in labels.values())
    extra = meta["dermml"]
    assert extra["classes"] == sorted(DIAGNOSES) and extra["manifest"] == manifest.uri
    assert extra["version"] == manifest.version and extra["split"] is None
    by_id = manifest.df.set_index("sample_id")["label"]
    for name, index in labels.items():
        assert extra["classes"][index] == by_id[extra["samples"][name]["sample_id"]]


def test_export_is_reproducible_and_never_overwrites(demo, tmp_path):
    a = export_stylegan_zip(demo, str(tmp_path / "a.zip"))
    b = export_stylegan_zip(demo, str(tmp_path / "b.zip"))
    assert a["sha256"] == b["sha256"]
    assert a["images"] == int((read_manifest(demo).df["split"] == "train").sum())
    with pytest.raises(FileExistsError, match="a.zip already exists"):
        export_stylegan_zip(demo, str(tmp_path / "a.zip"))


def test_round_trip_keeps_labels_pixels_and_ids(demo, tmp_path):
    export_stylegan_zip(demo, str(tmp_path / "ds.zip"), split=None)
    uri, _ = import_dataset("stylegan", str(tmp_path / "ds.zip"), str(tmp_path / "imported"))
    back = read_manifest(uri)
    original = read_manifest(demo)
    assert len(back.df) == 12 and set(back.df["source"]) == {"stylegan"}
    merged = back.df.merge(original.df, on="sample_id", suffixes=("", "_orig"))
    assert len(merged) == 12
    assert (merged["label"] == merged["label_orig"]).all()
    assert (merged["patient_id"] == merged["patient_id_orig"]).all()
    for _, row in merged.iterrows():
        assert row["image_uri"].startswith(str(tmp_path / "imported" / "stylegan"))
        np.testing.assert_array_equal(load_image(back.resolve(row["image_uri"])),
                                      load_image(original.resolve(row["image_uri_orig"])))
    assert back.df["split"].notna().all()  # the import stage assigned splits


def test_resolution_center_crops_and_resizes(tmp_path):
    wide = _pixels(0, 40, 60)
    uri = _manifest(tmp_path, [("a.png", wide), ("b.png", _pixels(1, 64, 64))], ["x", "y"])
    export_stylegan_zip(uri, str(tmp_path / "ds.zip"), resolution=16)
    rows = import_stylegan_zip(str(tmp_path / "ds.zip"), derived_root=str(tmp_path / "out"))
    assert rows["width"].tolist() == [16, 16] and rows["height"].tolist() == [16, 16]
    assert rows["label"].tolist() == ["x", "y"]
    np.testing.assert_array_equal(load_image(rows["image_uri"][0]),
                                  center_crop_resize(wide, 16))
    assert center_crop_resize(wide, 40).shape == (40, 40, 3)  # the crop alone


def test_classes_order_the_indices_and_select_rows(demo, tmp_path):
    result = export_stylegan_zip(demo, str(tmp_path / "mel.zip"), split=None,
                                 classes=["melanoma", "nevus"])
    with zipfile.ZipFile(tmp_path / "mel.zip") as zf:
        meta = json.loads(zf.read(DATASET_JSON))
    labels = read_manifest(demo).df["label"]
    assert result["images"] == int(labels.isin(["melanoma", "nevus"]).sum())
    assert result["left_out"] == int((labels == "seborrheic_keratosis").sum())
    assert meta["dermml"]["classes"] == ["melanoma", "nevus"]
    rows = import_stylegan_zip(str(tmp_path / "mel.zip"), derived_root=str(tmp_path / "out"))
    assert set(rows["label"]) == {"melanoma", "nevus"}


def test_unconditional_export_and_foreign_archives(tmp_path):
    uri = _manifest(tmp_path, [("a.png", _pixels(0, 8, 8)), ("b.png", _pixels(1, 8, 8))])
    export_stylegan_zip(uri, str(tmp_path / "u.zip"), label_column="")
    with zipfile.ZipFile(tmp_path / "u.zip") as zf:
        assert json.loads(zf.read(DATASET_JSON))["labels"] is None
    rows = import_stylegan_zip(str(tmp_path / "u.zip"), derived_root=str(tmp_path / "o1"))
    assert rows["label"].isna().all() and rows["sample_id"].tolist() == ["s0", "s1"]
    # An archive written elsewhere: no dermml key, so labels are the indices (one-hot too).
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        for i in range(3):
            zf.writestr(archive_name(i), encode_png(_pixels(i, 8, 8)))
        zf.writestr(DATASET_JSON, json.dumps({"labels": [
            [archive_name(0), 4], [archive_name(1), [0, 1, 0]], [archive_name(2), 0]]}))
    rows = import_stylegan_zip(str(foreign), derived_root=str(tmp_path / "o2"))
    assert rows["label"].tolist() == ["4", "1", "0"]
    assert rows["sample_id"].tolist() == ["img00000000", "img00000001", "img00000002"]


def _one_line(err):
    assert "\n" not in str(err.value)
    return str(err.value)


def test_bad_exports_fail_with_one_line_errors(demo, tmp_path):
    mixed = _manifest(tmp_path, [("a.png", _pixels(0, 32, 32)), ("b.png", _pixels(1, 64, 64))],
                      ["x", "y"])
    with pytest.raises(StyleGANExportError) as err:
        export_stylegan_zip(mixed, str(tmp_path / "m.zip"))
    message = _one_line(err)
    assert "a.png is 32x32" in message and "b.png is 64x64" in message
    assert "resolution" in message
    assert not (tmp_path / "m.zip").exists() and not list(tmp_path.glob("stylegan-*"))

    odd = tmp_path / "odd"
    odd.mkdir()
    uri = _manifest(odd, [("c.png", _pixels(0, 24, 24))], ["x"])
    with pytest.raises(StyleGANExportError, match="c.png is 24x24.*power-of-two"):
        export_stylegan_zip(uri, str(tmp_path / "o.zip"))

    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    uri = _manifest(unlabeled, [("a.png", _pixels(0, 8, 8)), ("b.png", _pixels(1, 8, 8))],
                    ["x", None])
    with pytest.raises(StyleGANExportError) as err:
        export_stylegan_zip(uri, str(tmp_path / "u.zip"))
    assert "1 of 2 rows have no label" in _one_line(err) and "s1" in str(err.value)

    for kwargs, match in [
        ({"resolution": 48}, "resolution 48: StyleGAN needs a power of two"),
        ({"label_column": "diagnosis"}, "no column 'diagnosis'"),
        ({"classes": ["melanoma", "mole"]}, r"names \['mole'\], not labels"),
        ({"split": "holdout"}, "split holdout has no samples"),
    ]:
        with pytest.raises((StyleGANExportError, ManifestError), match=match) as err:
            export_stylegan_zip(demo, str(tmp_path / "x.zip"), **kwargs)
        _one_line(err)
    with pytest.raises(StyleGANExportError, match="must be a .zip"):
        export_stylegan_zip(demo, str(tmp_path / "x.tar"))


def test_bad_archives_fail_with_one_line_errors(tmp_path):
    derived = str(tmp_path / "out")
    not_zip = tmp_path / "x.zip"
    not_zip.write_text("hello")
    no_images = tmp_path / "empty.zip"
    with zipfile.ZipFile(no_images, "w") as zf:
        zf.writestr(DATASET_JSON, json.dumps({"labels": None}))
    bad_json = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad_json, "w") as zf:
        zf.writestr(archive_name(0), encode_png(_pixels(0, 8, 8)))
        zf.writestr(DATASET_JSON, "{labels: oops")
    outside = tmp_path / "outside.zip"
    with zipfile.ZipFile(outside, "w") as zf:
        zf.writestr(archive_name(0), encode_png(_pixels(0, 8, 8)))
        zf.writestr(DATASET_JSON, json.dumps({"labels": [[archive_name(0), 5]],
                                              "dermml": {"classes": ["a", "b"]}}))
    slip = tmp_path / "slip.zip"
    with zipfile.ZipFile(slip, "w") as zf:
        zf.writestr("../evil.png", encode_png(_pixels(0, 8, 8)))
    for src, match in [
        (tmp_path / "nowhere.zip", "nowhere.zip is missing or not a file"),
        (not_zip, "is not a ZIP archive"),
        (no_images, "holds no images"),
        (bad_json, "dataset.json is not valid JSON"),
        (outside, "label of 00000/img00000000.png is 5, outside the 2 classes"),
        (slip, "unsafe member path '../evil.png'"),
    ]:
        with pytest.raises(DatasetImportError, match=match) as err:
            import_stylegan_zip(str(src), derived_root=derived)
        _one_line(err)
    assert not (tmp_path / "evil.png").exists()
    with pytest.raises(DatasetImportError, match="derived_root"):
        import_stylegan_zip(str(no_images))
