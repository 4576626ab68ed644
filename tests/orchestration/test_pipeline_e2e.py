"""The whole job against real servers: KFP local pipeline -> MLflow server -> model server."""

import base64
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port, tiny_overrides
from mlflow.tracking import MlflowClient
from PIL import Image

from dermml.data.images import load_image, load_mask
from dermml.data.manifest import read_manifest
from dermml.metrics.segmentation import segmentation_scores
from dermml.orchestration import tracking
from dermml.orchestration.kfp_local import PipelineFailed, compile_pipeline, run_local
from dermml.serving.server import predict_http, serve_model, stop_server
from pipelines import get_pipeline

TRAINING = get_pipeline("training")

pytestmark = pytest.mark.integration


def pipeline_params(manifest: str, epochs: int = 8) -> dict:
    overrides = [o for o in tiny_overrides(manifest, epochs, ray=True)
                 if not o.startswith("data.manifest")]
    return {"manifest_uri": manifest, "overrides": overrides}


def runs_of(client: MlflowClient, parent_run_id: str) -> dict[str, list]:
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_run_id}'")
    by_stage: dict[str, list] = {}
    for run in children:
        by_stage.setdefault(run.data.tags["dermml.stage"], []).append(run)
    return by_stage


def test_pipeline_trains_registers_promotes_and_serves(tracking_server, demo_data, tmp_path):
    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    outputs = run_local(TRAINING, pipeline_params(demo_data))
    # The server is the session's: other tests may have registered (and deleted) segmentation
    # versions first, so the number is whatever the registry gave; it is the champion now.
    assert outputs["promoted"] is True
    champion = client.get_model_version_by_alias("dermml-segmentation", "champion")
    assert champion.version == outputs["model_version"]
    assert champion.run_id == outputs["train_run_id"]

    parent = client.get_run(outputs["parent_run_id"])
    assert parent.info.status == "FINISHED"
    stages = runs_of(client, outputs["parent_run_id"])
    assert {"validate", "train", "evaluate"} <= set(stages)
    train_run = stages["train"][0]
    assert train_run.info.run_id == outputs["train_run_id"]
    tags, params = train_run.data.tags, train_run.data.params
    assert tags["dermml.dataset_version"] == read_manifest(demo_data).version
    assert len(tags["dermml.git_commit"]) >= 7 and params["seed"] == "0"
    assert params["train.epochs"] == "8"
    history = client.get_metric_history(train_run.info.run_id, "val_dice")
    assert len(history) == 8  # one point per epoch, logged live by the Ray worker
    assert history[-1].value > history[0].value
    assert any(k.startswith("system/") for k in train_run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(train_run.info.run_id)}
    assert {"config.yaml", "previews"} <= artifacts
    # The logged model has a signature (image in, mask out, serving params) and an example.
    import mlflow

    # models:/m-... resolves through the global tracking URI, which earlier tests in the same
    # process may have pointed at their own store: point it at this pipeline's server.
    # (set_tracking_uri also exports MLFLOW_TRACKING_URI: restoring an earlier test's URI
    # would send this test's later registry lookups there; the fixture's value stays.)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(tracking_server)
    try:
        info = mlflow.models.get_model_info(train_run.data.tags["dermml.model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
        os.environ["MLFLOW_TRACKING_URI"] = tracking_server  # the fixture restores it after
    assert [c.name for c in info.signature.inputs.inputs] == ["image"]
    assert "mask" in [c.name for c in info.signature.outputs.inputs]
    assert "threshold" in [p.name for p in info.signature.params.params]
    assert info.saved_input_example_info is not None
    evaluation = stages["evaluate"][0].data.metrics
    assert evaluation["test_dice"] > 0.6

    # Serve the champion and ask for one real prediction over HTTP.
    manifest = read_manifest(demo_data)
    sample = manifest.split("test").iloc[0]
    image = load_image(manifest.resolve(sample["image_uri"]))
    truth = load_mask(manifest.resolve(sample["mask_uri"]))
    server, url = serve_model("models:/dermml-segmentation@champion",
                              log_file=str(tmp_path / "serve.log"))
    try:
        response = predict_http(url, [image])
        mask = np.asarray(Image.open(io.BytesIO(base64.b64decode(response.loc[0, "mask"]))))
        assert mask.shape == truth.shape
        assert segmentation_scores(mask > 127, truth)["dice"] > 0.5
        strict = predict_http(url, [image], params={"threshold": 0.99})
        assert strict.loc[0, "lesion_fraction"] <= response.loc[0, "lesion_fraction"]

        garbage = requests.post(f"{url}/invocations", timeout=30, json={
            "dataframe_split": {"columns": ["image"], "data": [["not base64 at all!"]]}})
        assert garbage.status_code == 400 and "base64" in garbage.text
        not_image = requests.post(f"{url}/invocations", timeout=30, json={
            "dataframe_split": {"columns": ["image"],
                                "data": [[base64.b64encode(b"hello").decode()]]}})
        assert not_image.status_code == 400 and "decodable" in not_image.text
        wrong_column = requests.post(f"{url}/invocations", timeout=30, json={
            "dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
        assert wrong_column.status_code == 400
    finally:
        stop_server(server)


def test_bad_data_stops_the_pipeline_before_training(tracking_server, demo_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(Path(demo_data).parent, data)
    victim = sorted((data / "images").glob("*.png"))[3]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated PNG
    before = victim.read_bytes()
    manifest = str(data / "manifest.parquet")

    with pytest.raises(PipelineFailed, match="failed at stage 'validate-data'"):
        run_local(TRAINING, pipeline_params(manifest, epochs=1))

    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    experiment = client.get_experiment_by_name("dermml/segmentation")
    parents = client.search_runs([experiment.experiment_id], "tags.`dermml.stage` = 'pipeline'",
                                 order_by=["attributes.start_time DESC"], max_results=1)
    assert parents[0].info.status == "FAILED"
    stages = runs_of(client, parents[0].info.run_id)
    assert "train" not in stages
    validation = stages["validate"][0]
    assert validation.data.tags["dermml.validation"] == "failed"
    report = client.download_artifacts(validation.info.run_id, "validation/report.json",
                                       str(tmp_path))
    assert victim.stem in Path(report).read_text()
    logged = {a.path for a in client.list_artifacts(validation.info.run_id, "validation")}
    assert {"validation/quarantine.csv", "validation/data_docs"} <= logged
    assert victim.read_bytes() == before  # source data untouched


def test_compiled_pipeline_yaml_holds_every_stage(tmp_path):
    out = compile_pipeline(TRAINING, str(tmp_path / "training.yaml"))
    text = Path(out).read_text()
    for component in ("prepare-data", "validate-data", "train-model", "register-model",
                      "evaluate-model", "promote-model", "start-pipeline-run",
                      "finish-pipeline-run"):
        assert f"comp-{component}" in text
    assert "ghcr.io/dermml/dermml-gpu" in text and "ghcr.io/dermml/dermml:" in text


@pytest.mark.slow  # the same pipeline as the segmentation test, another task: `make test-slow`
def test_pipeline_task_parameter_trains_and_registers_a_classifier(demo_data):
    """The same pipeline, another task: no special case anywhere but the parameter."""
    overrides = ["data.image_size=32", "data.batch_size=8", "model.backbone=resnet10t",
                 "train.epochs=3", "train.lr=0.003", "ray.enabled=false"]
    outputs = run_local(TRAINING, {"task": "classification", "manifest_uri": demo_data,
                                     "overrides": overrides})
    assert outputs["model_version"] == "1" and outputs["promoted"] is True
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    champion = client.get_model_version_by_alias("dermml-classification", "champion")
    assert champion.run_id == outputs["train_run_id"]
    stages = runs_of(client, outputs["parent_run_id"])
    assert "test_balanced_accuracy" in stages["evaluate"][0].data.metrics


@pytest.mark.integration
@pytest.mark.slow  # the same pipeline as the segmentation test, another task: `make test-slow`
def test_pipeline_task_parameter_trains_evaluates_and_registers_segdiff(demo_data):
    """The diffusion task through the same pipeline: its suite, the shared evaluation (HD95
    included) with the model's default sampler, registry and gate."""
    demo = str(Path(__file__).resolve().parents[2] / "configs" / "segdiff" / "demo.yaml")
    outputs = run_local(TRAINING, {"task": "segdiff", "manifest_uri": demo_data,
                                     "config": demo,
                                     "overrides": ["train.epochs=2", "ray.enabled=false",
                                                   "serving.steps=4", "serving.ensemble=1"]})
    assert outputs["model_version"] == "1" and outputs["promoted"] is True
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    champion = client.get_model_version_by_alias("dermml-segdiff", "champion")
    assert champion.run_id == outputs["train_run_id"]
    stages = runs_of(client, outputs["parent_run_id"])
    assert {"validate", "train", "evaluate"} <= set(stages)
    metrics = stages["evaluate"][0].data.metrics
    assert {"test_dice", "test_iou", "test_precision", "test_hd95"} <= set(metrics)


def test_a_stage_failing_outside_its_own_run_still_fails_the_pipeline_run():
    """A bad override, the registry: failures before a stage's MLflow run exists (or outside
    it) must not leave the pipeline's parent run RUNNING forever."""
    from dermml.orchestration.tracking import failing_parent, start_pipeline_run

    parent = start_pipeline_run("segmentation", "training")
    with pytest.raises(ValueError, match="bad override"), failing_parent(parent):
        raise ValueError("bad override")
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    assert client.get_run(parent).info.status == "FAILED"


STAGES = ["start-pipeline-run", "prepare-data", "validate-data", "train-model",
          "register-model", "evaluate-model", "promote-model", "finish-pipeline-run"]


def dermml_command(*args: str, timeout: float = 540) -> subprocess.CompletedProcess:
    """``dermml ARGS`` in a subprocess, its stdout and stderr together as a person sees them."""
    return subprocess.run([sys.executable, "-m", "dermml.cli", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout, env=dict(os.environ, COLUMNS="80"))


@pytest.mark.integration
def test_make_demo_job_runs_end_to_end_on_embedded_defaults(dermml_home):
    """`make demo` runs `dermml demo`: pipeline, serve the champion, one HTTP prediction; the
    console reads as a line per step, stage and epoch, ending with the Dice and the UI command;
    every stage's full output is in its log file (and in MLflow)."""
    done = dermml_command("demo", "--n", "40", "--size", "32", "--epochs", "3", "--port",
                          str(free_port()))
    out = done.stdout
    assert done.returncode == 0, out
    lines = out.splitlines()
    assert len(lines) <= 20, out  # 8 stages + 3 epochs + 6: no executor input, no Ray noise
    for stage in STAGES:
        assert re.search(rf"^  {stage} +ok +\d+\.\d s$", out, re.MULTILINE), out
    epochs = re.findall(r"^    epoch (\d)/3  train_loss \d+\.\d{4}  val_dice \d\.\d{4}  ", out,
                        re.MULTILINE)
    assert epochs == ["1", "2", "3"], out
    for noise in ("executor_input", "Checkpoint successfully created", "Downloading artifacts",
                  "RayTrainWorker", "INFO"):
        assert noise not in out
    dice = re.fullmatch(r"\[3/3\] POST .*: Dice vs ground truth = (\d\.\d{3})", lines[-2])
    assert dice and 0.0 <= float(dice.group(1)) <= 1.0, lines[-2]
    # The UI command it prints last points at the store that holds the champion it served.
    store = re.fullmatch(r"MLflow UI on these runs: mlflow ui --backend-store-uri (sqlite:\S+) "
                         r".*", lines[-1]).group(1)
    client = MlflowClient(store, registry_uri=store)
    version = client.get_model_version_by_alias("dermml-segmentation", "champion")
    assert str(version.version) == "1"

    logs = Path(re.search(r"stage logs in (\S+)", out).group(1))
    assert logs.parent == dermml_home / "logs"
    assert {f"{stage}.log" for stage in STAGES} | {"pipeline.log", "serve.log"} <= {
        p.name for p in logs.iterdir()}
    train_log = (logs / "train-model.log").read_text()
    assert "executor_input" in train_log and "Checkpoint successfully created" in train_log
    logged = {a.path for a in client.list_artifacts(version.run_id, "logs")}
    assert logged == {"logs/train-model.log"}


@pytest.mark.integration
def test_a_failing_stage_prints_the_path_of_its_log_which_holds_the_traceback(tmp_path):
    done = dermml_command("pipeline", "run", "training", "--local", "--param",
                          f"manifest_uri={tmp_path / 'missing'}")
    out = done.stdout
    assert done.returncode == 1, out
    assert re.search(r"^  start-pipeline-run +ok ", out, re.MULTILINE), out
    assert re.search(r"^  prepare-data +FAILED ", out, re.MULTILINE), out
    assert "manifest not found" in out and "train-model" not in out
    log = Path(re.search(r"full log: (\S+)", out).group(1))
    assert log.name == "prepare-data.log" and str(log) in out.splitlines()[-1]  # the error too
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "ManifestError" in text
    assert len(out.splitlines()) <= 8, out
