"""Real public data, as users bring it: import + validate with the default suites, and a short
training run that learns. The data live outside the repository (see tests/fixtures/real/README.md):
``$DERMML_REAL_DATA`` or ``../shared/data/real`` beside the checkout; without them these tests
skip and say why.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dermml.cli import app
from dermml.data.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]
REAL = Path(os.environ.get("DERMML_REAL_DATA") or REPO.parent / "shared" / "data" / "real")
DATASETS = {"isic2018": "isic2018", "ph2": "ph2"}

runner = CliRunner()
pytestmark = pytest.mark.integration


def real_dataset(name: str) -> Path:
    folder = REAL / name
    if not folder.is_dir():
        pytest.skip(f"no real {name} data at {folder} (set DERMML_REAL_DATA; "
                    "tests/fixtures/real/README.md says what goes there)")
    return folder


@pytest.mark.parametrize("fmt", sorted(DATASETS))
def test_real_dataset_imports_and_passes_the_default_suite(fmt, tmp_path):
    src = real_dataset(DATASETS[fmt])
    out = tmp_path / f"{fmt}.parquet"
    result = runner.invoke(app, ["data", "import", fmt, str(src), "--out", str(out)])
    assert result.exit_code == 0, result.output
    df = read_manifest(str(out)).df
    assert len(df) >= 8 and df["mask_uri"].notna().all()
    assert set(df["split"]) == {"train", "val", "test"}
    if fmt == "ph2":  # the labels must come through, whatever form the table has
        assert df["label"].notna().all()
    result = runner.invoke(app, ["validate", str(out), "--report", str(tmp_path / "report"),
                                 "--no-track"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output


def test_a_short_training_run_on_real_isic_images_learns(tmp_path):
    """A few epochs of the small U-Net on real ISIC 2018 pairs: the loss falls and the validation
    Dice beats an all-lesion prediction."""
    from mlflow.tracking import MlflowClient

    from dermml.orchestration.tracking import tracking_uri

    src = real_dataset("isic2018")
    manifest = tmp_path / "isic.parquet"
    assert runner.invoke(app, ["data", "import", "isic2018", str(src), "--out",
                               str(manifest)]).exit_code == 0
    result = runner.invoke(app, [
        "train", "segmentation", "--config", str(REPO / "configs/segmentation/demo.yaml"),
        "--set", f"data.manifest={manifest}", "--set", "ray.enabled=false",
        "--set", "train.epochs=12", "--set", "data.image_size=64",
        "--set", "data.batch_size=8"])
    assert result.exit_code == 0, result.output
    client = MlflowClient(tracking_uri())
    experiment = client.get_experiment_by_name("dermml/segmentation")
    run = client.search_runs([experiment.experiment_id], order_by=["start_time DESC"])[0]
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "train_loss")]
    assert losses[-1] < 0.8 * losses[0]
    dice = run.data.metrics["val_dice"]
    df = read_manifest(str(manifest)).df
    assert dice > 0.5, f"val Dice {dice:.3f} on {len(df)} real pairs"
