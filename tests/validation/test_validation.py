"""Validation: each kind of bad input is reported with its sample and reason, the pipeline stops,
and the dataset is left byte-identical."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter
from typer.testing import CliRunner

from dermml.cli import app
from dermml.data.manifest import read_manifest, write_manifest
from dermml.validation.run import ValidationFailed, validate

runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo64(tmp_path_factory) -> Path:
    """90 procedural samples at 64 px (train/val/test), shared read-only by this module (60
    leave a class with 2 test samples under the shared splitter: the classification suite
    asks for 3)."""
    from dermml.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo64") / "data"
    generate_demo(str(root), n=90, size=64, seed=1)
    return root


@pytest.fixture()
def dataset(demo64, tmp_path) -> Path:
    """A private copy of the demo data that a test may damage."""
    root = tmp_path / "data"
    shutil.copytree(demo64, root)
    return root


def rows_of(root: Path) -> pd.DataFrame:
    return read_manifest(str(root)).df


def save_manifest(root: Path, df: pd.DataFrame) -> str:
    uri = str(root / "manifest.parquet")
    Path(uri).unlink()
    write_manifest(df, uri)
    return uri


def jpeg_bytes(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def findings(report) -> dict[str, list[tuple[str, str, str]]]:
    out: dict[str, list] = {}
    for p in report.problems:
        out.setdefault(p.sample_id, []).append((p.check, p.file, p.reason))
    return out


def has(found: dict, sample_id: str, check: str, *texts: str) -> bool:
    return any(c == check and all(t in f"{file} {reason}" for t in texts)
               for c, file, reason in found.get(sample_id, []))


# --------------------------------------------------------------------------- planting


def plant_bad_inputs(root: Path) -> dict[str, str]:
    """Damage a copy of the demo data in every way the issue lists; returns role -> sample id."""
    df = rows_of(root)
    by_split = {s: df[df["split"] == s]["sample_id"].tolist() for s in ("train", "val", "test")}
    train, test = by_split["train"], by_split["test"]
    roles = dict(zip(["empty", "truncated_jpeg", "not_image", "photo_mask", "soft_mask",
                      "mask_off_by_one", "missing_mask_file", "no_mask", "unknown_label",
                      "empty_mask"], train[:10], strict=True))
    roles.update(patient_leak=test[0], leak_source=train[10], near_source=train[11])
    row = {sid: i for i, sid in enumerate(df["sample_id"])}

    def image(sid: str) -> Path:
        return root / df.at[row[sid], "image_uri"]

    def mask(sid: str) -> Path:
        return root / df.at[row[sid], "mask_uri"]

    image(roles["empty"]).write_bytes(b"")
    full = jpeg_bytes(Image.open(image(roles["truncated_jpeg"])))
    image(roles["truncated_jpeg"]).with_suffix(".jpg").write_bytes(full[: len(full) // 2])
    df.at[row[roles["truncated_jpeg"]], "image_uri"] = f"images/{roles['truncated_jpeg']}.jpg"
    image(roles["not_image"]).write_bytes(b"GIF89a? no: just some text with an image name")
    # The photograph saved as its own mask: no mask at all.
    Image.open(image(roles["photo_mask"])).convert("RGB").save(mask(roles["photo_mask"]))
    # An RGB mask holding exactly black and white (as PH2's IMD mask): a good mask.
    roles["rgb_binary_mask"] = train[13]
    binary = np.asarray(Image.open(mask(roles["rgb_binary_mask"])))
    Image.fromarray(np.stack([binary] * 3, axis=-1)).save(mask(roles["rgb_binary_mask"]))
    # Soft (blurred) edges: still a mask, binarised like the rest, reported once as a warning.
    soft = Image.open(mask(roles["soft_mask"])).filter(ImageFilter.GaussianBlur(2))
    soft.save(mask(roles["soft_mask"]))
    off = Image.open(mask(roles["mask_off_by_one"]))
    off.resize((off.width - 1, off.height), Image.Resampling.NEAREST).save(
        mask(roles["mask_off_by_one"]))
    mask(roles["missing_mask_file"]).unlink()
    df.at[row[roles["no_mask"]], "mask_uri"] = None
    df.at[row[roles["unknown_label"]], "label"] = "unknown_disease"
    Image.new("L", Image.open(mask(roles["empty_mask"])).size, 0).save(mask(roles["empty_mask"]))

    # The same image in test under another name, and a resized + recompressed copy.
    source = df.loc[row[roles["leak_source"]]]
    near = df.loc[row[roles["near_source"]]]
    shutil.copyfile(image(roles["leak_source"]), root / "images" / "renamed_copy.png")
    big = Image.open(image(roles["near_source"])).resize((80, 80), Image.Resampling.BICUBIC)
    (root / "images" / "near_copy.jpg").write_bytes(jpeg_bytes(big, quality=85))
    Image.open(mask(roles["near_source"])).resize((80, 80), Image.Resampling.NEAREST).save(
        root / "masks" / "near_copy.png")
    extra = pd.DataFrame([
        {**source.to_dict(), "sample_id": "renamed_copy", "image_uri": "images/renamed_copy.png",
         "split": "test", "patient_id": "p_new1", "lesion_id": "l_new1", "width": None,
         "height": None},
        {**near.to_dict(), "sample_id": "near_copy", "image_uri": "images/near_copy.jpg",
         "mask_uri": "masks/near_copy.png", "split": "test", "patient_id": "p_new2",
         "lesion_id": "l_new2", "width": None, "height": None}])
    roles.update(exact_copy="renamed_copy", near_copy="near_copy")
    # A patient with samples in train and in test.
    df.at[row[roles["patient_leak"]], "patient_id"] = df.at[row[train[12]], "patient_id"]
    roles["patient_home"] = train[12]
    save_manifest(root, pd.concat([df, extra], ignore_index=True))
    return roles


def test_each_planted_bad_input_is_reported_with_its_sample_and_reason(dataset, tmp_path):
    roles = plant_bad_inputs(dataset)
    before = tree_digest(dataset)
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), "segmentation", report_dir=str(tmp_path / "report"), track=False,
                 progress=False)
    report = failed.value.report
    found = findings(report)
    assert has(found, roles["empty"], "image_decodable", "empty (0 bytes)")
    assert has(found, roles["truncated_jpeg"], "image_decodable", ".jpg", "truncated")
    assert has(found, roles["not_image"], "image_decodable", "not a decodable image")
    assert has(found, roles["photo_mask"], "mask_binary", "not a lesion mask", "colour image")
    assert roles["rgb_binary_mask"] not in found and roles["soft_mask"] not in found
    encodings = [w for w in report.warnings if w.check == "mask_binary.encoding"]
    assert len(encodings) == 1 and encodings[0].sample_id == ""
    assert "1 masks are not stored as 0/255 (1 with grey levels" in encodings[0].reason
    assert has(found, roles["mask_off_by_one"], "mask_size_matches_image", "mask is 63x64",
               "is 64x64")
    assert has(found, roles["missing_mask_file"], "mask_decodable", "masks/", "not found")
    assert has(found, roles["no_mask"], "mask_present", "no mask_uri")
    assert has(found, roles["unknown_label"], "labels_allowed", "'unknown_disease'")
    assert has(found, roles["empty_mask"], "lesion_fraction", "mask is empty")
    assert has(found, "renamed_copy", "no_exact_duplicates_across_splits",
               roles["leak_source"], "'train'")
    assert has(found, "near_copy", "no_near_duplicates_across_splits", roles["near_source"],
               "perceptual-hash distance")
    assert has(found, roles["patient_leak"], "no_group_across_splits", "patient_id",
               roles["patient_home"], "'test'")
    # The originals of the leaks stay; nothing else is quarantined.
    planted = {v for k, v in roles.items() if k not in ("leak_source", "near_source",
                                                        "patient_home", "soft_mask",
                                                        "rgb_binary_mask")}
    assert set(report.quarantine) == planted
    assert tree_digest(dataset) == before  # the dataset is only read

    # The report folder holds the JSON summary, Data Docs, quarantine and facts tables.
    folder = tmp_path / "report"
    summary = json.loads((folder / "validation.json").read_text())
    assert summary["passed"] is False and set(summary["quarantine"]) == planted
    mask_binary = next(e for e in summary["expectations"] if e["name"] == "mask_binary")
    assert mask_binary["success"] is False and mask_binary["severity"] == "error"
    assert {f["sample_id"] for f in mask_binary["failing"]} == {roles["photo_mask"]}
    assert mask_binary["expectation_type"] == "ExpectColumnValuesToNotBeInSet"
    index = (folder / "data_docs" / "index.html").read_text()
    assert "segmentation.samples" in index
    # Data Docs name failing rows by sample_id (not only by table row number).
    page = next((folder / "data_docs" / "validations").rglob("dermml-samples.html")).read_text()
    assert "sample_id" in page and roles["photo_mask"] in page
    quarantine = pd.read_csv(folder / "quarantine.csv")
    assert set(quarantine["sample_id"]) == planted
    photo = quarantine.set_index("sample_id").loc[roles["photo_mask"]]
    assert "mask_binary" in photo["checks"] and photo["mask_uri"].endswith(".png")
    facts = pd.read_csv(folder / "facts.csv")
    assert {"phash", "sha256", "lesion_fraction", "mask_components", "exif_orientation",
            "channels", "file_size", "mask_touches_border", "near_leak"} <= set(facts.columns)


def test_cli_exits_non_zero_names_files_and_write_clean_yields_a_passing_manifest(dataset,
                                                                                  tmp_path):
    roles = plant_bad_inputs(dataset)
    before = tree_digest(dataset)
    result = runner.invoke(app, ["validate", str(dataset), "--no-track"])
    assert result.exit_code == 1
    assert roles["not_image"] in result.output and "not a decodable image" in result.output
    clean = tmp_path / "clean.parquet"
    result = runner.invoke(app, ["validate", str(dataset), "--warn-only", "--no-track",
                                 "--write-clean", str(clean)])
    assert result.exit_code == 0, result.output
    assert "FAILED" in result.output  # warn-only still says what is wrong
    kept = set(read_manifest(str(clean)).df["sample_id"])
    assert roles["photo_mask"] not in kept and roles["leak_source"] in kept
    assert roles["soft_mask"] in kept  # soft edges: binarised, kept
    assert runner.invoke(app, ["validate", str(clean), "--no-track"]).exit_code == 0
    assert tree_digest(dataset) == before


def test_a_failed_validation_marks_its_mlflow_run_and_logs_every_report_file(dataset):
    from mlflow.tracking import MlflowClient

    from dermml.orchestration.tracking import tracking_uri

    plant_bad_inputs(dataset)
    with pytest.raises(ValidationFailed):
        validate(str(dataset), "segmentation", progress=False)
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("dermml/segmentation")
    run = client.search_runs([experiment.experiment_id])[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["dermml.validation"] == "failed"
    assert run.data.metrics["n_quarantined"] == 12  # soft edges are no longer quarantined
    files = {a.path for a in client.list_artifacts(run.info.run_id, "validation")}
    assert {"validation/report.json", "validation/facts.csv", "validation/quarantine.csv",
            "validation/data_docs"} <= files


def test_clean_demo_data_passes_every_shipped_suite_it_fits(demo64):
    for suite in ("segmentation", "classification", "attributes"):
        outcome = validate(str(demo64), suite, track=False, progress=False)
        assert outcome.report.passed, (suite, outcome.report.summary())
        assert len(outcome.report.expectations) > 15


def test_duplicate_sample_ids_are_reported(dataset):
    df = rows_of(dataset)
    df.loc[1, "sample_id"] = df.loc[0, "sample_id"]
    Path(dataset / "manifest.parquet").unlink()
    # write_manifest refuses duplicates; other tools may not.
    pq.write_table(pa.Table.from_pandas(df.drop(columns=["attribute_mask_uris"])),
                   dataset / "manifest.parquet")
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), track=False, progress=False)
    checks = {(p.sample_id, p.check) for p in failed.value.report.problems}
    assert (df.loc[0, "sample_id"], "unique_sample_ids") in checks


# --------------------------------------------------------------------------- suites


def test_threshold_override_changes_the_outcome(demo64):
    assert validate(str(demo64), track=False, progress=False).report.passed
    with pytest.raises(ValidationFailed) as failed:
        validate(str(demo64), track=False, progress=False,
                 overrides=["lesion_fraction.min=0.5"])
    problems = failed.value.report.problems
    assert problems and all(p.check == "lesion_fraction" for p in problems)
    assert "outside [50.000%, 99.990%]" in problems[0].reason


def test_unknown_override_key_names_the_rules_parameters(demo64):
    result = runner.invoke(app, ["validate", str(demo64), "--no-track", "--set",
                                 "lesion_fraction.minimum=0.1"])
    assert result.exit_code == 2
    assert "lesion_fraction.minimum" in result.output and "min, max" in result.output
    result = runner.invoke(app, ["validate", str(demo64), "--no-track", "--suite", "segmentatio"])
    assert result.exit_code == 2 and "classification" in result.output


def test_a_custom_suite_file_is_used_and_can_turn_rules_off(dataset, tmp_path):
    roles = plant_bad_inputs(dataset)
    suite = tmp_path / "mine.yaml"
    suite.write_text("name: mine\ntask: segmentation\nimage_decodable:\nmask_binary: "
                     "{severity: warning}\n")
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), str(suite), track=False, progress=False)
    report = failed.value.report
    assert {p.check for p in report.problems} == {"image_decodable"}
    # The photo mask is a (per-sample) warning now; soft edges are one dataset-level line.
    assert {p.sample_id for p in report.warnings} == {roles["photo_mask"], ""}
    assert [e["name"] for e in report.expectations] == ["image_decodable", "mask_binary",
                                                        "mask_binary.encoding"]


def test_required_split_and_class_counts_fail_without_quarantining_samples(dataset):
    df = rows_of(dataset)
    df = df[~((df["split"] == "val") & (df["label"] == "melanoma"))]
    save_manifest(dataset, df)
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), track=False, progress=False, required_splits=("train", "holdout"))
    report = failed.value.report
    reasons = [p.reason for p in report.problems]
    assert "split 'holdout' has no samples" in reasons
    assert "split 'val' has 0 samples of class 'melanoma' (minimum 1)" in reasons
    assert report.quarantine == []


def test_class_imbalance_is_a_warning_only(dataset):
    df = rows_of(dataset)
    melanoma = df[(df["split"] == "train") & (df["label"] == "melanoma")].index
    save_manifest(dataset, df.drop(index=melanoma[2:]))  # 2 melanomas left in train
    outcome = validate(str(dataset), track=False, progress=False,
                       overrides=["class_balance.max_ratio=2"])
    assert outcome.report.passed
    warning = next(w for w in outcome.report.warnings if w.check == "class_balance")
    assert "'train': class 'melanoma'" in warning.reason and warning.sample_id == ""


def test_detection_boxes_outside_or_without_area_are_reported(dataset):
    df = rows_of(dataset)
    df["boxes"] = [[[10.0, 10.0, 20.0, 20.0]] for _ in range(len(df))]
    df.at[0, "boxes"] = [[10.0, 10.0, 20.0, 20.0], [50.0, 50.0, 30.0, 10.0]]  # x+w = 80 > 64
    df.at[1, "boxes"] = [[5.0, 5.0, 0.0, 8.0]]
    save_manifest(dataset, df)
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), "detection", track=False, progress=False)
    found = findings(failed.value.report)
    assert has(found, df.at[0, "sample_id"], "boxes_inside_image", "1 of 2 boxes",
               "outside the image")
    assert has(found, df.at[1, "sample_id"], "boxes_positive_area", "no area")
    assert set(failed.value.report.quarantine) == {df.at[0, "sample_id"], df.at[1, "sample_id"]}


def test_attribute_masks_are_checked_for_presence_size_and_values(dataset):
    df = rows_of(dataset)
    first, second = df.at[0, "sample_id"], df.at[1, "sample_id"]
    streaks = dataset / df.at[0, "attribute_mask_uris"]["streaks"]
    Image.new("L", (64, 63), 0).save(streaks)
    uris = dict(df.at[1, "attribute_mask_uris"])
    del uris["globules"]
    df.at[1, "attribute_mask_uris"] = uris
    save_manifest(dataset, df)
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), "attributes", track=False, progress=False)
    found = findings(failed.value.report)
    assert has(found, first, "attribute_masks", "streaks", "64x63")
    assert has(found, second, "attribute_masks", "no globules file")


# --------------------------------------------------------------------------- drift


def test_drift_passes_an_identical_batch_and_flags_a_shifted_one(demo64, dataset, tmp_path):
    same = validate(str(demo64), track=False, progress=False, drift_against=str(demo64),
                    report_dir=str(tmp_path / "same"))
    assert same.report.passed and same.report.drift["passed"]
    assert all(f["value"] == 0 for f in same.report.drift["features"])
    assert (tmp_path / "same" / "drift.png").stat().st_size > 1000

    for path in (dataset / "images").glob("*.png"):  # a darker camera
        pixels = np.asarray(Image.open(path)).astype(np.float32) * 0.6
        Image.fromarray(pixels.astype(np.uint8)).save(path)
    df = rows_of(dataset)
    save_manifest(dataset, df[df["label"] != "nevus"])  # and no nevi in this batch
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), track=False, progress=False, drift_against=str(demo64),
                 report_dir=str(tmp_path / "shifted"))
    drift = failed.value.report.drift
    assert not drift["passed"]
    assert {"mean_r", "mean_g", "mean_b", "label"} <= set(drift["drifted"])
    assert {"width", "height"}.isdisjoint(drift["drifted"])
    checks = {p.check for p in failed.value.report.problems}
    assert checks == {"drift.features", "drift.labels"}
    assert (tmp_path / "shifted" / "drift.png").exists()


def test_an_independent_batch_of_the_same_source_does_not_drift(demo64, tmp_path):
    from dermml.data.demo import generate_demo

    other = generate_demo(str(tmp_path / "other"), n=60, size=64, seed=2)
    outcome = validate(other, track=False, progress=False, drift_against=str(demo64))
    assert outcome.report.drift["passed"], outcome.report.drift


def test_synth3d_companion_files_must_exist_and_match_the_image(dataset):
    df = rows_of(dataset)
    df["anatomy_uri"], df["depth_uri"] = df["mask_uri"], df["mask_uri"]
    Image.new("L", (64, 65)).save(dataset / "masks" / "depth_off.png")
    df.at[0, "depth_uri"] = "masks/depth_off.png"
    df.at[1, "anatomy_uri"] = None
    save_manifest(dataset, df)
    with pytest.raises(ValidationFailed) as failed:
        validate(str(dataset), "synth3d", track=False, progress=False)
    found = findings(failed.value.report)
    assert has(found, df.at[0, "sample_id"], "companion_files", "depth_uri", "64x65")
    assert has(found, df.at[1, "sample_id"], "companion_files", "no anatomy_uri file")
    assert set(failed.value.report.quarantine) == {df.at[0, "sample_id"], df.at[1, "sample_id"]}


def test_a_suite_can_extend_another_and_every_task_has_a_suite(demo64, tmp_path):
    from dermml.tasks import task_names
    from dermml.validation.suite import load_suite, shipped_suites

    assert set(task_names()) <= set(shipped_suites())  # the pipeline validates with suite=task
    suite = tmp_path / "strict.yaml"
    suite.write_text("extends: segmentation\nlesion_fraction: {min: 0.5}\n")
    config = load_suite(str(suite))
    assert config.name == "strict" and config.experiment_task == "segmentation"
    assert config.lesion_fraction.min == 0.5 and config.mask_binary.enabled
    with pytest.raises(ValidationFailed):
        validate(str(demo64), str(suite), track=False, progress=False)
    assert validate(str(demo64), "segdiff", track=False, progress=False).report.passed


def test_demo_boxes_are_coco_style_and_pass_the_detection_suite(demo64):
    outcome = validate(str(demo64), "detection", track=False, progress=False)
    assert outcome.report.passed, outcome.report.summary()
    boxes = {e["name"]: e for e in outcome.report.expectations}
    assert boxes["boxes_inside_image"]["success"] and boxes["boxes_positive_area"]["success"]


def test_a_file_twice_in_one_split_is_a_warning_naming_both_samples(dataset):
    df = rows_of(dataset)
    train = df.index[df["split"] == "train"]
    first, copy = df.loc[train[0]], df.loc[train[1]]
    shutil.copyfile(dataset / first["image_uri"], dataset / "images" / "copy_of_first.png")
    df.at[train[1], "image_uri"] = "images/copy_of_first.png"
    save_manifest(dataset, df)
    outcome = validate(str(dataset), track=False, progress=False)
    assert outcome.report.passed  # a warning in the shipped suites
    warning = next(w for w in outcome.report.warnings
                   if w.check == "no_exact_duplicates_within_split")
    assert warning.sample_id == copy["sample_id"] and first["sample_id"] in warning.reason
    assert "copy_of_first.png" in warning.file
    with pytest.raises(ValidationFailed):
        validate(str(dataset), track=False, progress=False,
                 overrides=["no_exact_duplicates_within_split.severity=error"])


def test_data_docs_templates_are_compiled_once_not_on_every_report(demo64, tmp_path,
                                                                    monkeypatch):
    import jinja2

    validate(str(demo64), report_dir=str(tmp_path / "first"), track=False, progress=False)
    compiled = []
    original = jinja2.Environment.compile

    def counting(self, source, name=None, *args, **kwargs):
        compiled.append(name)
        return original(self, source, name, *args, **kwargs)

    monkeypatch.setattr(jinja2.Environment, "compile", counting)
    validate(str(demo64), report_dir=str(tmp_path / "second"), track=False, progress=False)
    pages = list((tmp_path / "second" / "data_docs").rglob("*.html"))
    assert len(pages) >= 5 and all(p.stat().st_size > 10_000 for p in pages)
    # GE renders each page with a new jinja Environment; the bytecode cache spares the
    # ~50 file templates (only inline string templates, if any, are still compiled).
    assert not [n for n in compiled if n and n.endswith(".j2")], compiled


def test_validation_under_an_info_root_logger_prints_no_great_expectations_chatter(demo64):
    """KFP's executor logs at INFO: GE's import-time INFO lines must not flood pipeline logs."""
    import subprocess
    import sys

    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from dermml.validation.run import validate\n"
            f"validate({str(demo64)!r}, track=False, progress=False, processes=1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    chatter = [line for line in done.stderr.splitlines() if "great_expectations" in line]
    assert not chatter and len(done.stderr.splitlines()) < 20, done.stderr[-2000:]


def test_a_column_missing_from_the_manifest_file_fails_required_columns(demo_data, tmp_path):
    """Reading fills the schema's columns a file lacks with nulls; the check looks at the file:
    a hand-made detection manifest without ``boxes`` fails, naming the column."""
    manifest = read_manifest(demo_data)
    df = manifest.df[["sample_id", "image_uri", "mask_uri", "label", "split"]].copy()
    for column in ("image_uri", "mask_uri"):
        df[column] = [manifest.resolve(u) for u in df[column]]
    path = tmp_path / "foreign.parquet"
    df.to_parquet(path)  # written by another tool, not write_manifest
    outcome = validate(str(path), "detection", track=False, warn_only=True, progress=False)
    failed = [e["name"] for e in outcome.report.expectations if not e["success"]]
    assert failed == ["required_columns.boxes"]
    assert any("no column 'boxes'" in p.reason for p in outcome.report.problems)
    assert validate(str(path), "segmentation", track=False, progress=False).report.passed


def test_validation_shows_a_progress_bar_per_sample_on_a_terminal(demo_data, capsys,
                                                                   monkeypatch):
    import sys

    validate(demo_data, "segmentation", track=False, warn_only=True, progress=True)
    assert "validating" not in capsys.readouterr().err  # a log file gets no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    validate(demo_data, "segmentation", track=False, warn_only=True, progress=True)
    err = capsys.readouterr().err
    n = len(read_manifest(demo_data).df)
    assert "validating" in err and f"{n}/{n}" in err
    validate(demo_data, "segmentation", track=False, warn_only=True, progress=False)
    assert "validating" not in capsys.readouterr().err
