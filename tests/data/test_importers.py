"""Importers: each public layout becomes manifest rows that point into the untouched source."""

from __future__ import annotations

import hashlib
import json
import warnings
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermml.data.importers import (
    IMPORTERS,
    DatasetImportError,
    import_classification,
    import_coco,
    import_dataset,
    import_isic2018,
    import_ph2,
    import_segmentation,
    parse_ph2_labels,
)
from dermml.data.manifest import manifest_info, read_manifest


def _image(path: Path, size: tuple[int, int] = (16, 16), value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "L" if "mask" in path.name or "segmentation" in path.name or "lesion" in path.name \
        else "RGB"
    if mode == "L":
        Image.new(mode, size, value).save(path)
    else:  # every photo different, as real ones are: identical images are near-duplicates
        rng = np.random.default_rng(zlib.crc32(str(path).encode()))
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _tree_state(root: Path) -> dict[str, str]:
    """Every file and folder below ``root`` with its content hash (folders hash to '')."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file()
            else "" for p in sorted(root.rglob("*"))}


def _by_id(df):
    return df.set_index("sample_id")


PH2_TXT = """\
||   Name   || Histological Diagnosis || Clinical Diagnosis || Asymmetry | Pigment Network \
| Dots/Globules | Streaks | Regression Areas | Blue-Whitish Veil ||   Colors   ||
||  IMD002  ||                        ||          1         ||     0     |        T        \
|       A       |    A    |         A        |         A         ||     3      ||
||  IMD003  ||                        ||          0         ||     0     |        T        \
|       A       |    A    |         A        |         A         ||     4      ||
||  IMD058  ||    Melanoma in situ    ||          2         ||     2     |        AT       \
|       P       |    P    |         P        |         P         ||   3  4  5  ||
||  IMD999  ||                        ||                    ||     0     |        T        \
|       A       |    A    |         A        |         A         ||     4      ||

Legend:
|| Clinical Diagnosis: 0 - Common Nevus; 1 - Atypical Nevus; 2 - Melanoma ||
|| Colors: 1 - White; 2 - Red; 3 - Light-Brown; 4 - Dark-Brown; 5 - Blue-Gray; 6 - Black ||
"""


def _ph2_source(root: Path, ids=("IMD002", "IMD003", "IMD058"), txt: str | None = PH2_TXT):
    images = root / "PH2 Dataset images"
    for n, sample_id in enumerate(ids):
        case = images / sample_id
        _image(case / f"{sample_id}_Dermoscopic_Image" / f"{sample_id}.bmp", (16 + n, 16))
        _image(case / f"{sample_id}_lesion" / f"{sample_id}_lesion.bmp")
    if txt is not None:
        (root / "PH2_dataset.txt").write_text(txt)
    return root


def _isic_source(root: Path, phases=("Training",), n: int = 4, attributes: bool = True):
    ids = iter(range(100))
    for phase in phases:
        for _ in range(n):
            sample_id = f"ISIC_{next(ids):07d}"
            _image(root / f"ISIC2018_Task1-2_{phase}_Input" / f"{sample_id}.jpg")
            _image(root / f"ISIC2018_Task1_{phase}_GroundTruth" / f"{sample_id}_segmentation.png")
            if attributes and phase == "Training":
                for name in ("globules", "streaks"):
                    _image(root / f"ISIC2018_Task2_{phase}_GroundTruth_v3"
                           / f"{sample_id}_attribute_{name}.png")
    (root / f"ISIC2018_Task1-2_{phases[0]}_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    return root


# --- segmentation ------------------------------------------------------------------------------


def test_segmentation_pairs_images_with_every_accepted_mask_name(tmp_path):
    src = tmp_path / "seg"
    for stem, ext, mask in [("a", "png", "a.png"), ("b", "jpg", "b_mask.png"),
                            ("c", "bmp", "c_segmentation.png"), ("d", "tif", "d_lesion.png")]:
        _image(src / "images" / f"{stem}.{ext}")
        _image(src / "masks" / mask)
    df = _by_id(import_segmentation(str(src)))
    assert sorted(df.index) == ["a", "b", "c", "d"]
    assert df.loc["b", "mask_uri"] == str(src / "masks" / "b_mask.png")
    assert df.loc["d", "mask_uri"] == str(src / "masks" / "d_lesion.png")
    assert (df["width"] == 16).all() and (df["source"] == "segmentation").all()
    assert df.loc["a", "sha256"] == hashlib.sha256((src / "images/a.png").read_bytes()).hexdigest()
    assert df["split"].isna().all()


def test_missing_mask_is_a_row_with_null_mask(tmp_path):
    src = tmp_path / "seg"
    _image(src / "images" / "with.png")
    _image(src / "masks" / "with.png")
    _image(src / "images" / "without.png")
    df = _by_id(import_segmentation(str(src)))
    assert pd.isna(df.loc["without", "mask_uri"])
    assert df.loc["with", "mask_uri"] == str(src / "masks" / "with.png")


def test_segmentation_split_folders_become_splits_with_unique_ids(tmp_path):
    src = tmp_path / "seg"
    for split in ("train", "holdout"):
        _image(src / split / "images" / "same.png")
        _image(src / split / "masks" / "same_mask.png")
    df = _by_id(import_segmentation(str(src)))
    assert df.loc["train/images/same.png", "split"] == "train"
    assert df.loc["holdout/images/same.png", "mask_uri"] == str(src / "holdout/masks/same_mask.png")


def test_undecodable_image_is_still_a_row_without_size(tmp_path):
    src = tmp_path / "seg"
    _image(src / "images" / "good.png")
    (src / "images" / "broken.png").write_bytes(b"not a png at all")
    df = _by_id(import_segmentation(str(src)))
    assert pd.isna(df.loc["broken", "width"])
    assert df.loc["broken", "sha256"] == hashlib.sha256(b"not a png at all").hexdigest()
    assert df.loc["good", "height"] == 16


# --- classification ----------------------------------------------------------------------------


def test_classification_split_folders_keep_their_names(tmp_path):
    src = tmp_path / "cls"
    for split, label, name in [("wl_train", "melanoma", "m1"), ("sl_train", "nevus", "n1"),
                               ("sl_test", "nevus", "n2"), ("external_test", "melanoma", "m2")]:
        _image(src / split / label / f"{name}.jpg")
    df = _by_id(import_classification(str(src)))
    assert df.loc["m1", ["split", "label"]].tolist() == ["wl_train", "melanoma"]
    assert df.loc["m2", ["split", "label"]].tolist() == ["external_test", "melanoma"]
    assert df.loc["n2", "image_uri"] == str(src / "sl_test" / "nevus" / "n2.jpg")


def test_classification_flat_class_folders_get_assigned_splits(tmp_path):
    src = tmp_path / "cls"
    for label in ("melanoma", "nevus"):
        for i in range(6):
            _image(src / label / f"{label}_{i}.jpg")
    uri, _ = import_dataset("classification", str(src), str(tmp_path / "out"), seed=1)
    df = read_manifest(uri).df
    assert sorted(df["label"].unique()) == ["melanoma", "nevus"]
    for label in ("melanoma", "nevus"):
        assert set(df.loc[df["label"] == label, "split"]) == {"train", "val", "test"}


# --- ISIC 2018 ---------------------------------------------------------------------------------


def test_isic2018_training_only_is_assigned_train_val_test_and_attributes_are_found(tmp_path):
    src = _isic_source(tmp_path / "isic", n=6)
    uri, _ = import_dataset("isic2018", str(src), str(tmp_path / "out"))
    df = _by_id(read_manifest(uri).df)
    assert len(df) == 6 and set(df["split"]) == {"train", "val", "test"}
    row = df.loc["ISIC_0000000"]
    assert row["lesion_id"] == "ISIC_0000000" and pd.isna(row["label"])
    assert row["mask_uri"].endswith("ISIC2018_Task1_Training_GroundTruth/"
                                    "ISIC_0000000_segmentation.png")
    assert sorted(row["attribute_mask_uris"]) == ["globules", "streaks"]
    assert row["attribute_mask_uris"]["streaks"] == str(
        src / "ISIC2018_Task2_Training_GroundTruth_v3" / "ISIC_0000000_attribute_streaks.png")


def test_isic2018_official_validation_and_test_folders_become_splits(tmp_path):
    src = _isic_source(tmp_path / "isic", phases=("Training", "Validation", "Test"), n=2)
    df = _by_id(import_isic2018(str(src)))
    assert df["split"].value_counts().to_dict() == {"train": 2, "val": 2, "test": 2}
    assert df.loc["ISIC_0000002", "mask_uri"].endswith(
        "ISIC2018_Task1_Validation_GroundTruth/ISIC_0000002_segmentation.png")
    assert df.loc["ISIC_0000002", "attribute_mask_uris"] is None


# --- PH2 ---------------------------------------------------------------------------------------


def test_ph2_labels_parse_from_the_clinical_diagnosis_column():
    labels = parse_ph2_labels(PH2_TXT)
    assert labels == {"IMD002": "atypical_nevus", "IMD003": "common_nevus",
                      "IMD058": "melanoma", "IMD999": None}


def test_ph2_clinical_diagnosis_column_is_found_by_its_header():
    text = "|| Name || Clinical Diagnosis || Histological Diagnosis ||\n|| IMD010 || 2 ||  ||\n"
    assert parse_ph2_labels(text) == {"IMD010": "melanoma"}


PH2_TABLE = [["Name", "Clinical Diagnosis", "Asymmetry"], ["IMD002", "1", "0"],
             ["IMD003", "0", "0"], ["IMD058", "2", "2"]]
PH2_LABELS = {"IMD002": "atypical_nevus", "IMD003": "common_nevus", "IMD058": "melanoma"}


@pytest.mark.parametrize("sep", ["\t", ",", ";"])
def test_ph2_labels_parse_from_delimited_copies_of_the_table(tmp_path, sep):
    """Several public copies carry PH2_dataset.txt tab-separated (with CRLF and a BOM): their
    labels used to vanish silently."""
    text = "\ufeff" + "\r\n".join(sep.join(row) for row in PH2_TABLE) + "\r\n"
    assert parse_ph2_labels(text) == PH2_LABELS
    src = _ph2_source(tmp_path / "PH2Dataset", txt=text)
    assert _by_id(import_ph2(str(src)))["label"].to_dict() == PH2_LABELS


def test_ph2_labels_read_from_the_excel_workbook(tmp_path):
    """PH2_dataset.xlsx: a legend block above, a 'Clinical Diagnosis' banner row, then a header
    with one column per diagnosis marked X."""
    src = _ph2_source(tmp_path / "PH2Dataset", txt=None)
    rows = [[None] * 6, [None, None, None, None, None, "Legends"],
            [None, None, "Clinical Diagnosis", None, None, None],
            ["Image Name", "Histological Diagnosis", "Common Nevus", "Atypical Nevus",
             "Melanoma", "Asymmetry\n(0/1/2)"],
            ["IMD002", None, None, "X", None, "0"], ["IMD003", None, "X", None, None, "0"],
            ["IMD058", "Melanoma", None, None, "X", "2"]]
    pd.DataFrame(rows).to_excel(src / "PH2_dataset.xlsx", header=False, index=False)
    assert _by_id(import_ph2(str(src)))["label"].to_dict() == PH2_LABELS


def test_ph2_label_file_without_diagnoses_is_an_error_not_silence(tmp_path):
    src = _ph2_source(tmp_path / "PH2Dataset", txt="Name\tAsymmetry\nIMD002\t0\nIMD003\t1\n")
    with pytest.raises(DatasetImportError, match=r"PH2_dataset.txt holds no clinical diagnosis"):
        import_ph2(str(src))


def test_ph2_import_from_dataset_root_and_from_images_folder(tmp_path):
    root = _ph2_source(tmp_path / "PH2Dataset")
    for src in (root, root / "PH2 Dataset images"):
        df = _by_id(import_ph2(str(src)))
        assert df["label"].to_dict() == {"IMD002": "atypical_nevus", "IMD003": "common_nevus",
                                         "IMD058": "melanoma"}
        assert df.loc["IMD058", "lesion_id"] == "IMD058"
        assert df.loc["IMD003", "mask_uri"] == str(
            root / "PH2 Dataset images/IMD003/IMD003_lesion/IMD003_lesion.bmp")
        assert df.loc["IMD003", "width"] == 17


def test_ph2_without_label_file_warns_and_leaves_labels_empty(tmp_path):
    src = _ph2_source(tmp_path / "PH2Dataset", txt=None)
    with pytest.warns(UserWarning, match="no label table .*PH2_dataset.txt.* found"):
        df = import_ph2(str(src))
    assert df["label"].isna().all() and len(df) == 3


# --- COCO --------------------------------------------------------------------------------------


def test_coco_rows_carry_boxes_category_names_and_json_sizes(tmp_path):
    src = tmp_path / "coco"
    _image(src / "images" / "a.jpg")
    _image(src / "images" / "b.jpg")
    annotations = {
        "images": [{"id": 1, "file_name": "images/a.jpg", "width": 640, "height": 480},
                   {"id": 2, "file_name": "images/b.jpg", "width": 32, "height": 24}],
        "annotations": [
            {"id": 10, "image_id": 1, "category_id": 7, "bbox": [1, 2, 3, 4]},
            {"id": 11, "image_id": 1, "category_id": 8, "bbox": [5.5, 6, 7, 8]},
        ],
        "categories": [{"id": 7, "name": "lesion"}, {"id": 8, "name": "ruler"}],
    }
    ann_path = src / "instances.json"
    ann_path.write_text(json.dumps(annotations))
    df = _by_id(import_coco(str(src), annotations=str(ann_path), split="train"))
    assert df.loc["images/a", "boxes"] == [[1.0, 2.0, 3.0, 4.0], [5.5, 6.0, 7.0, 8.0]]
    assert df.loc["images/a", "box_labels"] == ["lesion", "ruler"]
    assert df.loc["images/b", "boxes"] == [] and pd.isna(df.loc["images/b", "label"])
    assert df.loc["images/a", ["width", "height"]].tolist() == [640, 480]
    assert df.loc["images/b", "image_uri"] == str(src / "images" / "b.jpg")
    assert set(df["split"]) == {"train"}


def test_coco_finds_the_json_in_the_source_when_not_given(tmp_path):
    src = tmp_path / "coco"
    _image(src / "img" / "x.png")
    (src / "annotations").mkdir()
    (src / "annotations" / "train.json").write_text(json.dumps(
        {"images": [{"id": 1, "file_name": "x.png"}], "annotations": [], "categories": []}))
    df = import_coco(str(src))
    assert df["image_uri"].tolist() == [str(src / "img" / "x.png")]  # found by unique basename
    assert df["width"].tolist() == [16]  # the JSON had no size: read from the header


# --- failures, safety and the import stage -----------------------------------------------------


@pytest.mark.parametrize("fmt, make, message", [
    ("ph2", lambda p: _image(p / "IMD002" / "photo.jpg"), "ph2: no IMDxxx folders under"),
    ("segmentation", lambda p: _image(p / "pics" / "a.png"), "no images in an 'images' folder"),
    ("isic2018", lambda p: _image(p / "x" / "ISIC_1.jpg"),
     "isic2018: no images of a known ISIC layout .*ISIC2018_Task1-2_Training_Input"),
    ("classification", lambda p: (p / "README").write_text("hi"), "no images in class folders"),
])
def test_unreadable_layout_raises_naming_the_folder(tmp_path, fmt, make, message):
    src = tmp_path / "data"
    src.mkdir()
    make(src)
    with pytest.raises(DatasetImportError, match=message) as err:
        IMPORTERS[fmt](str(src))
    assert str(src) in str(err.value) and "expected" in str(err.value)


def test_missing_source_folder_raises_naming_it(tmp_path):
    with pytest.raises(DatasetImportError, match="nowhere is missing or holds no files"):
        import_segmentation(str(tmp_path / "nowhere"))


def test_unknown_format_lists_the_known_formats(tmp_path):
    with pytest.raises(DatasetImportError, match="unknown dataset format 'isic2099'") as err:
        import_dataset("isic2099", str(tmp_path), str(tmp_path / "out"))
    for name in ("segmentation", "classification", "isic2018", "ph2", "coco"):
        assert name in str(err.value)


def test_unknown_importer_option_is_rejected(tmp_path):
    with pytest.raises(DatasetImportError, match=r"ph2: unknown option\(s\) \['annotations'\]"):
        import_dataset("ph2", str(tmp_path), str(tmp_path / "out"), annotations="x.json")


def test_import_references_images_without_copying_and_leaves_source_byte_identical(tmp_path):
    src = _ph2_source(tmp_path / "PH2Dataset")
    before = _tree_state(src)
    out = tmp_path / "out"
    uri, version = import_dataset("ph2", str(src), str(out), seed=0)
    assert _tree_state(src) == before
    assert [p.name for p in out.iterdir()] == ["manifest.parquet"]
    manifest = read_manifest(uri)
    assert manifest.version == version and uri == str(out / "manifest.parquet")
    for column in ("image_uri", "mask_uri"):
        assert all(u.startswith(str(src) + "/") and Path(u).is_file() for u in manifest.df[column])


def test_import_refuses_to_overwrite_an_existing_manifest(tmp_path):
    src = _isic_source(tmp_path / "isic")
    out = tmp_path / "datasets" / "isic.parquet"
    import_dataset("isic2018", str(src), str(out))
    written = out.read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        import_dataset("isic2018", str(src), str(out), seed=5)
    assert out.read_bytes() == written


def test_import_refuses_to_write_inside_the_source(tmp_path):
    src = _isic_source(tmp_path / "isic")
    before = _tree_state(src)
    with pytest.raises(DatasetImportError, match="inside the source"):
        import_dataset("isic2018", str(src), str(src / "manifest"))
    assert _tree_state(src) == before


def test_group_option_keeps_each_lesion_in_one_split(tmp_path):
    src = tmp_path / "seg"
    for i in range(8):
        _image(src / "images" / f"img{i}.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lesion_id is empty: splitting falls back to rows, warned
        with pytest.raises(UserWarning, match="'lesion_id' is empty"):
            import_dataset("segmentation", str(src), str(tmp_path / "out"), group="lesion_id")


def test_metadata_csv_gives_lesion_ids_that_keep_each_lesion_in_one_split(tmp_path):
    """HAM10000-style metadata (image_id -> lesion_id): several images of one lesion must never
    straddle train and test, which a row-level split would do."""
    from typer.testing import CliRunner

    from dermml.cli import app

    src = tmp_path / "seg"
    for i in range(30):
        _image(src / "images" / f"img{i:02d}.png")
    meta = tmp_path / "metadata.csv"
    meta.write_text("image_id,lesion_id,dx\n" + "".join(
        f"img{i:02d},HAM_{i // 3:04d},nv\n" for i in range(30)))
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["data", "import", "segmentation", str(src), "--out",
                                      str(out), "--group", "lesion_id", "--metadata", str(meta)])
    assert result.exit_code == 0, result.output
    df = read_manifest(str(out)).df
    assert df["lesion_id"].nunique() == 10
    assert (df.groupby("lesion_id")["split"].nunique() == 1).all()
    assert df["split"].nunique() > 1
    # A row-level split of the same rows does put some lesion into two splits.
    rows = import_dataset("segmentation", str(src), str(tmp_path / "rows"), metadata=str(meta),
                          group="none")
    by_row = read_manifest(rows[0]).df
    assert (by_row.groupby("lesion_id")["split"].nunique() > 1).any()

    bad = tmp_path / "bad.csv"
    bad.write_text("filename,lesion\nimg00,L1\n")
    with pytest.raises(DatasetImportError, match=r"bad.csv: no column to match samples"):
        import_dataset("segmentation", str(src), str(tmp_path / "o2"), metadata=str(bad))
    assert not (tmp_path / "o2").exists()


def test_manifest_info_summarises_version_counts_and_missing_masks(tmp_path):
    src = _ph2_source(tmp_path / "PH2Dataset", ids=("IMD002", "IMD003", "IMD058", "IMD101"))
    (src / "PH2 Dataset images/IMD101/IMD101_lesion/IMD101_lesion.bmp").unlink()
    with pytest.warns(UserWarning, match=r"no clinical diagnosis for 1 images, e.g. \['IMD101'\]"):
        uri, version = import_dataset("ph2", str(src), str(tmp_path / "out"))
    info = manifest_info(uri)
    assert version in info and "samples:  4" in info and "no mask:  1 of 4" in info
    assert "melanoma" in info and "total" in info and "ph2 (4)" in info


def test_default_import_keeps_near_duplicate_photographs_in_one_split(tmp_path):
    """ISIC holds several photographs of one lesion; a random row split put such pairs in two
    splits and the import then failed its own leakage check. Resized/recompressed copies must
    land in their original's split (auto grouping), and validation must then find no leak."""
    from dermml.data.demo import generate_demo
    from dermml.validation.run import validate

    demo = read_manifest(generate_demo(str(tmp_path / "demo"), n=24, size=64, seed=0))
    src = tmp_path / "seg"
    (src / "images").mkdir(parents=True)
    for i, uri in enumerate(demo.df["image_uri"]):
        photo = Image.open(demo.resolve(uri)).convert("RGB")
        photo.save(src / "images" / f"img{i:02d}.png")
        if i % 3 == 0:  # two resized, recompressed copies of every third photograph
            for k, side in enumerate((80, 56)):
                photo.resize((side, side), Image.Resampling.BICUBIC).save(
                    src / "images" / f"img{i:02d}_copy{k}.jpg", quality=85)
    uri, _ = import_dataset("segmentation", str(src), str(tmp_path / "auto"), seed=3)
    df = read_manifest(uri).df.set_index("sample_id")
    for i in range(0, 24, 3):
        assert df.loc[f"img{i:02d}_copy0", "split"] == df.loc[f"img{i:02d}", "split"]
        assert df.loc[f"img{i:02d}_copy1", "split"] == df.loc[f"img{i:02d}", "split"]
    assert df["split"].nunique() == 3
    report = validate(uri, "segmentation", track=False, progress=False, processes=1,
                      overrides=["mask_present.enabled=false", "mask_decodable.enabled=false",
                                 "lesion_fraction.enabled=false"], warn_only=True).report
    assert not [p for p in report.problems if p.check == "no_near_duplicates_across_splits"]

    # Row by row (--group none), some copy is separated from its original: the check exists.
    uri, _ = import_dataset("segmentation", str(src), str(tmp_path / "rows"), seed=3,
                            group="none")
    rows = read_manifest(uri).df.set_index("sample_id")
    assert any(rows.loc[f"img{i:02d}_copy{k}", "split"] != rows.loc[f"img{i:02d}", "split"]
               for i in range(0, 24, 3) for k in (0, 1))


def test_unknown_group_is_refused_before_reading_the_source(tmp_path):
    with pytest.raises(ValueError, match="group must be 'auto'"):
        import_dataset("segmentation", str(tmp_path / "nowhere"), str(tmp_path / "o"),
                       group="patient")


# --- ISIC 2016 / 2017 / 2018 task 3 / 2019 and HAM10000, as their archives unpack -------------


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_isic2016_pairs_part1_masks_and_part3_benign_malignant_labels(tmp_path):
    root = tmp_path / "isic2016"
    for phase, ids in (("Training", ("ISIC_0000000", "ISIC_0000001")), ("Test", ("ISIC_0000003",))):
        for sample_id in ids:
            _image(root / f"ISBI2016_ISIC_Part1_{phase}_Data" / f"{sample_id}.jpg")
            _image(root / f"ISBI2016_ISIC_Part3_{phase}_Data" / f"{sample_id}.jpg")  # same photo
            _image(root / f"ISBI2016_ISIC_Part1_{phase}_GroundTruth"
                   / f"{sample_id}_Segmentation.png")
    _write(root / "ISBI2016_ISIC_Part3_Training_GroundTruth.csv",
           "ISIC_0000000,benign\nISIC_0000001,malignant\n")
    _write(root / "ISBI2016_ISIC_Part3_Test_GroundTruth.csv", "ISIC_0000003,1.0\n")
    df = _by_id(import_dataset_rows("isic2016", root))
    assert sorted(df.index) == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000003"]
    assert df["label"].to_dict() == {"ISIC_0000000": "benign", "ISIC_0000001": "malignant",
                                     "ISIC_0000003": "malignant"}
    assert df["split"].to_dict() == {"ISIC_0000000": "train", "ISIC_0000001": "train",
                                     "ISIC_0000003": "test"}
    assert df["mask_uri"].str.endswith("_Segmentation.png").all()
    assert (df["source"] == "isic2016").all()


def test_isic2017_reads_three_phases_masks_and_the_melanoma_keratosis_table(tmp_path):
    root = tmp_path / "isic2017"
    for folder, phase, sample_id in (("ISIC-2017_Training_Data", "Training", "ISIC_0000000"),
                                     ("ISIC-2017_Validation_Data", "Validation", "ISIC_0001769"),
                                     ("ISIC-2017_Test_v2_Data", "Test_v2", "ISIC_0012086")):
        _image(root / folder / f"{sample_id}.jpg")
        _image(root / folder / f"{sample_id}_superpixels.png")  # not an image of the dataset
        _image(root / f"ISIC-2017_{phase}_Part1_GroundTruth" / f"{sample_id}_segmentation.png")
    _write(root / "ISIC-2017_Training_Part3_GroundTruth.csv",
           "image_id,melanoma,seborrheic_keratosis\nISIC_0000000,0.0,1.0\n")
    _write(root / "ISIC-2017_Validation_Part3_GroundTruth.csv",
           "image_id,melanoma,seborrheic_keratosis\nISIC_0001769,0.0,0.0\n")
    _write(root / "ISIC-2017_Test_v2_Part3_GroundTruth.csv",
           "image_id,melanoma,seborrheic_keratosis\nISIC_0012086,1.0,0.0\n")
    df = _by_id(import_dataset_rows("isic2017", root))
    assert df[["split", "label"]].to_dict("index") == {
        "ISIC_0000000": {"split": "train", "label": "seborrheic_keratosis"},
        "ISIC_0001769": {"split": "val", "label": "nevus"},
        "ISIC_0012086": {"split": "test", "label": "melanoma"}}
    assert df["mask_uri"].notna().all()


def test_isic2018_task3_one_hot_labels_and_lesion_groupings(tmp_path):
    root = tmp_path / "isic2018"
    for sample_id in ("ISIC_0024306", "ISIC_0024307", "ISIC_0024308"):
        _image(root / "ISIC2018_Task3_Training_Input" / f"{sample_id}.jpg")
    _write(root / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv",
           "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\nISIC_0024306,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
           "ISIC_0024307,1.0,0.0,0.0,0.0,0.0,0.0,0.0\nISIC_0024308,0.0,0.0,0.0,1.0,0.0,0.0,0.0\n")
    _write(root / "ISIC2018_Task3_Training_LesionGroupings.csv",
           "image,lesion_id,diagnosis_confirm_type\nISIC_0024306,HAM_0000118,histopathology\n"
           "ISIC_0024307,HAM_0000118,histopathology\nISIC_0024308,HAM_0002730,follow_up\n")
    df = _by_id(import_dataset_rows("isic2018", root))
    assert df["label"].to_dict() == {"ISIC_0024306": "nevus", "ISIC_0024307": "melanoma",
                                     "ISIC_0024308": "actinic_keratosis"}
    assert df["lesion_id"].to_dict() == {"ISIC_0024306": "HAM_0000118",
                                         "ISIC_0024307": "HAM_0000118",
                                         "ISIC_0024308": "HAM_0002730"}
    assert df["split"].isna().all()  # training only: splits are assigned at import
    uri, _ = import_dataset("isic2018", str(root), str(tmp_path / "out"))
    split = read_manifest(uri).df.set_index("sample_id")["split"]
    assert split["ISIC_0024306"] == split["ISIC_0024307"]  # one lesion, one split (auto)


def test_isic2019_unk_is_unlabelled_and_metadata_gives_lesion_ids(tmp_path):
    root = tmp_path / "isic2019"
    for name in ("ISIC_0000000", "ISIC_0000001_downsampled", "ISIC_0000002"):
        _image(root / "ISIC_2019_Training_Input" / f"{name}.jpg")
    _write(root / "ISIC_2019_Training_GroundTruth.csv",
           "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK\n"
           "ISIC_0000000,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0\n"
           "ISIC_0000001,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0\n"
           "ISIC_0000002,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0\n")
    _write(root / "ISIC_2019_Training_Metadata.csv",
           "image,age_approx,anatom_site_general,lesion_id,sex\n"
           "ISIC_0000000,55.0,anterior torso,BCN_0000001,female\n"
           "ISIC_0000001,30.0,,,male\n")
    with pytest.warns(UserWarning, match="isic2019: 1 of 3 images have no diagnosis"):
        df = _by_id(import_dataset_rows("isic2019", root))
    assert df.loc["ISIC_0000000", "label"] == "squamous_cell_carcinoma"
    assert df.loc["ISIC_0000001", "label"] == "nevus"
    assert pd.isna(df.loc["ISIC_0000002", "label"])
    assert df.loc["ISIC_0000000", "lesion_id"] == "BCN_0000001"
    assert df.loc["ISIC_0000001", "image_uri"].endswith("ISIC_0000001_downsampled.jpg")


def test_ham10000_reads_both_image_parts_metadata_and_masks(tmp_path):
    root = tmp_path / "HAM10000"
    _image(root / "HAM10000_images_part_1" / "ISIC_0024306.jpg")
    _image(root / "HAM10000_images_part_2" / "ISIC_0032258.jpg")
    _image(root / "HAM10000_segmentations_lesion_tschandl" / "ISIC_0024306_segmentation.png")
    _write(root / "HAM10000_metadata.csv",
           "lesion_id,image_id,dx,dx_type,age,sex,localization\n"
           "HAM_0000118,ISIC_0024306,nv,follow_up,45.0,male,trunk\n"
           "HAM_0002730,ISIC_0032258,mel,histo,70.0,female,back\n")
    df = _by_id(import_dataset_rows("ham10000", root))
    assert df["label"].to_dict() == {"ISIC_0024306": "nevus", "ISIC_0032258": "melanoma"}
    assert df["lesion_id"].to_dict() == {"ISIC_0024306": "HAM_0000118",
                                         "ISIC_0032258": "HAM_0002730"}
    assert df.loc["ISIC_0024306", "mask_uri"].endswith("ISIC_0024306_segmentation.png")
    assert pd.isna(df.loc["ISIC_0032258", "mask_uri"])
    assert (df["source"] == "ham10000").all()


def test_isic_finds_every_release_side_by_side(tmp_path):
    _isic_source(tmp_path / "all" / "2018")
    root = tmp_path / "all"
    _image(root / "HAM10000_images_part_1" / "ISIC_0024306.jpg")
    _write(root / "HAM10000_metadata.csv", "lesion_id,image_id,dx\nHAM_1,ISIC_0024306,bkl\n")
    df = import_dataset_rows("isic", root)
    assert set(df["source"]) == {"isic2018", "ham10000"}
    assert df.set_index("sample_id").loc["ISIC_0024306", "label"] == "benign_keratosis"


def import_dataset_rows(fmt: str, root: Path) -> pd.DataFrame:
    from dermml.data.importers import get_importer

    return get_importer(fmt)(str(root))
