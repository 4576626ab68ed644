"""Evaluation on test sets whose images differ in size (PH2, original-size ISIC), and figures
that cannot be drawn: the metrics, the table and the gate never depend on a picture."""

import re

import numpy as np
import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient
from PIL import Image
from typer.testing import CliRunner

from dermml.cli import app
from dermml.data.images import encode_png, load_image, load_mask
from dermml.data.manifest import read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.training.run import resolve_config, train

# (height, width), all above the 128 px display size so the overlays keep them: PH2-like
# aspect ratios, odd sides and squares one pixel apart (the reported 576 vs. 575 crash).
SIZES = [(129, 172), (131, 131), (130, 130), (141, 95), (135, 201)]


@pytest.fixture(scope="module")
def segmentation_model(demo_data, tmp_path_factory):
    home = tmp_path_factory.mktemp("eval-figures-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 2))
        outcome = train("segmentation", cfg, progress=False)
    return home, outcome.model_uri


def mixed_size_manifest(demo_data: str, out) -> str:
    """The demo data with every test image (and its mask) resized to one of SIZES."""
    manifest = read_manifest(demo_data)
    df = manifest.df.copy()
    for col in ("image_uri", "mask_uri"):
        df[col] = [manifest.resolve(u) for u in df[col]]
    df["attribute_mask_uris"] = None
    out.mkdir()
    for i, idx in enumerate(np.flatnonzero(df["split"] == "test")):
        h, w = SIZES[i % len(SIZES)]
        image = Image.fromarray(load_image(df.at[idx, "image_uri"])).resize((w, h),
                                                                            Image.BILINEAR)
        mask = Image.fromarray(load_mask(df.at[idx, "mask_uri"])).resize((w, h), Image.NEAREST)
        df.at[idx, "image_uri"] = str(out / f"{df.at[idx, 'sample_id']}.png")
        df.at[idx, "mask_uri"] = str(out / f"{df.at[idx, 'sample_id']}_mask.png")
        image.save(df.at[idx, "image_uri"])
        (out / f"{df.at[idx, 'sample_id']}_mask.png").write_bytes(encode_png(np.asarray(mask)))
    uri = str(out / "mixed.parquet")
    write_manifest(df, uri)
    return uri


def test_evaluate_and_promote_on_test_images_of_different_sizes(segmentation_model, demo_data,
                                                                tmp_path, monkeypatch):
    home, model_uri = segmentation_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    uri = mixed_size_manifest(demo_data, tmp_path / "mixed")
    test = read_manifest(uri).split("test")
    assert len({load_image(u).shape for u in test["image_uri"][:8]}) > 1

    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", model_uri, "--data", uri, "--resamples", "20"])
    assert result.exit_code == 0, result.output
    assert re.search(r"test\s+dice\s+\d", result.output), result.output
    run_id = re.search(r"MLflow run: (\w+)", result.output).group(1)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "test_dice" in run.data.metrics
    assert not [k for k in run.data.tags if k.startswith("dermml.figure_error")]
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "evaluation")}
    assert {"test_worst_overlays.png", "metrics.csv", "metrics.md"} <= names
    overlays = np.asarray(Image.open(client.download_artifacts(
        run_id, "evaluation/test_worst_overlays.png", str(tmp_path))))
    # Cells as wide as the widest of the 8 worst tiles, shown at their own aspect ratio.
    assert (overlays.shape[1] - 2) // 4 - 2 in {w for _, w in SIZES}

    registered = runner.invoke(app, ["registry", "register", model_uri])
    assert registered.exit_code == 0, registered.output
    version = registered.output.split("version ")[1].split()[0]
    promoted = runner.invoke(app, ["registry", "promote", version, "--data", uri])
    assert promoted.exit_code == 0, promoted.output
    assert '"promoted": true' in promoted.output


def test_a_figure_that_cannot_be_drawn_never_fails_the_evaluation(segmentation_model,
                                                                  demo_data, monkeypatch,
                                                                  caplog):
    from dermml.tasks import get_task

    home, model_uri = segmentation_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    task_cls = type(get_task("segmentation"))

    def broken(self, *args):
        raise RuntimeError("cannot draw this")

    monkeypatch.setattr(task_cls, "figures", broken)
    result = CliRunner().invoke(app, ["evaluate", model_uri, "--data", demo_data,
                                      "--splits", "val,test", "--resamples", "20"])
    assert result.exit_code == 0, result.output
    assert re.search(r"val\s+dice\s+\d", result.output)
    assert re.search(r"test\s+dice\s+\d", result.output)
    assert "could not draw or log evaluation/test figures (RuntimeError: cannot draw this)" \
        in caplog.text
    run_id = re.search(r"MLflow run: (\w+)", result.output).group(1)
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"val_dice", "test_dice", "test_dice_ci_low"} <= set(run.data.metrics)
    assert run.data.tags["dermml.figure_error.evaluation/test_figures"] == \
        "RuntimeError: cannot draw this"
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "evaluation")}
    assert {"metrics.csv", "metrics.md", "test_per_sample.csv"} <= names

    # One figure that cannot be logged costs that figure only, not the others.
    ok = np.zeros((8, 8, 3), np.uint8)
    monkeypatch.setattr(task_cls, "figures",
                        lambda self, *args: {"broken.png": object(), "ok.png": ok})
    result = CliRunner().invoke(app, ["evaluate", model_uri, "--data", demo_data,
                                      "--resamples", "0"])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"MLflow run: (\w+)", result.output).group(1)
    tags = client.get_run(run_id).data.tags
    assert "dermml.figure_error.evaluation/test_broken.png" in tags
    names = {a.path.split("/")[-1] for a in client.list_artifacts(run_id, "evaluation")}
    assert "test_ok.png" in names and "test_broken.png" not in names


def test_evaluate_pools_splits_joined_with_plus_into_one_test_set(segmentation_model, demo_data,
                                                                    monkeypatch):
    """An external dataset (PH2 for an ISIC model) is scored whole: --splits train+val+test."""
    home, model_uri = segmentation_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = CliRunner().invoke(app, ["evaluate", model_uri, "--data", demo_data,
                                      "--splits", "train+val+test,test", "--resamples", "0"])
    assert result.exit_code == 0, result.output
    run_id = re.search(r"MLflow run: (\w+)", result.output).group(1)
    metrics = MlflowClient(tracking.tracking_uri()).get_run(run_id).data.metrics
    assert metrics["train.val.test_dice"] != metrics["test_dice"]  # scored on more images
    table = result.output.split("MLflow run")[0]
    assert "train+val+test" in table and re.search(r"\btest\s+dice", table)
