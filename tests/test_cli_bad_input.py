"""Bad input: a clear error naming the file and problem, a non-zero exit, user data untouched."""

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dermml.cli import app
from dermml.data.datasets import SegmentationDataset
from dermml.data.images import ImageReadError
from dermml.data.manifest import read_manifest

runner = CliRunner()


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


@pytest.fixture()
def bad_layout(tmp_path) -> Path:
    """images/ + masks/ with one good sample and one of each problem."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    # Distinct images: identical ones in two splits would be (rightly) reported as leakage.
    def img():
        return rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)

    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    for name in ("good1", "good2", "good3", "good4", "good5", "good6"):
        write_png(src / "images" / f"{name}.png", img())
        write_png(src / "masks" / f"{name}.png", mask)
    write_png(src / "images" / "nomask.png", img())  # mask missing
    (src / "images").joinpath("broken.png").write_bytes(b"this is not a png")
    write_png(src / "masks" / "broken.png", mask)
    write_png(src / "images" / "offsize.png", img())
    write_png(src / "masks" / "offsize.png", np.zeros((16, 15), np.uint8))  # 1 px off
    write_png(src / "images" / "soft.png", img())
    soft = mask.copy()
    soft[4, 4:12] = 128
    write_png(src / "masks" / "soft.png", soft)  # a mask with one grey edge row: binarised
    write_png(src / "images" / "photo.png", img())
    write_png(src / "masks" / "photo.png", img())  # a photograph where the mask should be
    return src


def test_validate_names_each_bad_file_and_reason(bad_layout, tmp_path):
    before = tree_digest(bad_layout)
    manifest = str(tmp_path / "m.parquet")
    result = runner.invoke(app, ["data", "import", "segmentation", str(bad_layout), "--out",
                                 manifest])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["validate", manifest, "--report", str(tmp_path / "report"),
                                 "--no-track"])
    assert result.exit_code == 1
    out = result.output
    assert "nomask" in out and "no mask_uri" in out
    assert "broken.png" in out and "not a decodable image" in out
    assert "offsize.png" in out and "15x16" in out and "16x16" in out
    assert "photo.png" in out and "not a lesion mask" in out
    assert "1 masks are not stored as 0/255 (1 with grey levels" in out  # soft.png, once
    assert "good1" not in out
    assert tree_digest(bad_layout) == before  # user data never modified


def test_write_clean_drops_quarantined_rows(bad_layout, tmp_path):
    manifest, clean = str(tmp_path / "m.parquet"), str(tmp_path / "clean.parquet")
    runner.invoke(app, ["data", "import", "segmentation", str(bad_layout), "--out", manifest])
    result = runner.invoke(app, ["validate", manifest, "--warn-only", "--write-clean", clean,
                                 "--no-track"])
    assert result.exit_code == 0, result.output
    from dermml.data.manifest import read_manifest

    ids = set(read_manifest(clean).df["sample_id"])
    assert ids == {f"good{i}" for i in range(1, 7)} | {"soft"}


def test_unknown_import_format_lists_known_formats(tmp_path):
    result = runner.invoke(app, ["data", "import", "dicomz", str(tmp_path), "--out",
                                 str(tmp_path / "m.parquet")])
    assert result.exit_code == 2
    assert "dicomz" in result.output and "isic2018" in result.output
    assert not (tmp_path / "m.parquet").exists()


def test_unreadable_layout_fails_without_writing_a_manifest(tmp_path):
    (tmp_path / "empty").mkdir()
    out = tmp_path / "m.parquet"
    result = runner.invoke(app, ["data", "import", "ph2", str(tmp_path / "empty"), "--out",
                                 str(out)])
    assert result.exit_code == 2 and "ph2" in result.output
    assert not out.exists()


def test_bad_set_key_is_rejected_before_any_work(demo_data):
    result = runner.invoke(app, ["train", "segmentation", "--set", f"data.manifest={demo_data}",
                                 "--set", "train.epoks=3"])
    assert result.exit_code == 2
    assert "train.epoks" in result.output and "did you mean 'train.epochs'" in result.output
    assert "data.manifest" not in result.output  # only the keys of the section in question
    top = runner.invoke(app, ["train", "segmentation", "--set", "modl.arch=unet"])
    assert top.exit_code == 2 and "did you mean 'model.arch'" in top.output
    assert "valid top-level keys: " in top.output


def test_empty_split_is_named(demo_data, dermml_home):
    result = runner.invoke(app, ["train", "segmentation", "--set", f"data.manifest={demo_data}",
                                 "--set", "data.val_split=holdout", "--set", "ray.enabled=false"])
    assert result.exit_code == 2
    assert "holdout" in result.output and "no samples" in result.output
    assert not (dermml_home / "checkpoints").exists()


def test_missing_manifest_is_named(tmp_path):
    result = runner.invoke(app, ["data", "info", str(tmp_path / "nope.parquet")])
    assert result.exit_code == 2 and "nope.parquet" in result.output


def test_demo_refuses_to_overwrite_existing_dataset(demo_data):
    out = str(Path(demo_data).parent)
    before = tree_digest(Path(out))
    result = runner.invoke(app, ["data", "demo", "--out", out, "--n", "10"])
    assert result.exit_code == 2
    assert tree_digest(Path(out)) == before


def test_missing_mask_stops_ray_training_before_any_worker_starts(demo_data, dermml_home,
                                                                  tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(demo_data).parent, data)
    manifest = read_manifest(str(data))
    row = manifest.split("train").iloc[0]
    gone = Path(manifest.resolve(row["mask_uri"]))
    gone.unlink()
    before = tree_digest(data)
    # Ray is on (the default): the check runs in the driver, before a Ray worker could be
    # retried on it and end in a worker traceback.
    result = runner.invoke(app, ["train", "segmentation", "--set", f"data.manifest={data}"])
    assert result.exit_code == 2, result.output
    assert str(gone) in result.output and "do not exist" in result.output
    assert "dermml validate" in result.output
    assert not (dermml_home / "ray_results").exists()
    assert tree_digest(data) == before


def test_mask_of_another_size_is_an_error_not_resized(demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(demo_data).parent, data)
    manifest = read_manifest(str(data))
    rows = manifest.split("train").iloc[:2]
    mask_path = Path(manifest.resolve(rows.iloc[1]["mask_uri"]))
    with Image.open(mask_path) as img:
        img.resize((img.width - 1, img.height)).save(mask_path)
    dataset = SegmentationDataset(manifest, rows, image_size=16)
    assert dataset[0][1].shape == (1, 16, 16)
    with pytest.raises(ImageReadError, match=rf"{mask_path}: mask is \d+x\d+ but its image"):
        dataset[1]


def test_ray_worker_input_errors_are_reraised_as_they_were_raised():
    from ray.train import WorkerGroupError

    from dermml.orchestration.ray_train import _input_error

    cause = ImageReadError("/data/m.png: mask is 3x4 but its image /data/i.png is 4x4")
    wrapped = RuntimeError("worker died")
    wrapped.__cause__ = cause
    assert _input_error(WorkerGroupError("failed", {0: RuntimeError("oom"), 1: wrapped})) is cause
    assert _input_error(WorkerGroupError("failed", {0: RuntimeError("oom")})) is None


def test_dermml_debug_shows_the_traceback_of_a_one_line_error(demo_data, monkeypatch):
    args = ["train", "segmentation", "--set", f"data.manifest={demo_data}",
            "--set", "data.val_split=holdout", "--set", "ray.enabled=false"]
    assert runner.invoke(app, args).exit_code == 2
    monkeypatch.setenv("DERMML_DEBUG", "1")
    result = runner.invoke(app, args)
    assert result.exit_code != 2 and "holdout" in str(result.exception)
