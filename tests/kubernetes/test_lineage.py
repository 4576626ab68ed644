"""``dermml lineage NAME@ALIAS`` against a real MLflow server: the runs a training pipeline
writes (parent run, validate / train / evaluate stage runs), registered and promoted through the
gate, and the InferenceService that serves the alias (a fake Kubernetes API), or "no cluster"."""

from __future__ import annotations

import itertools
import json

import pytest
from fake_kserve import FakeKServe
from typer.testing import CliRunner

from dermml.cli import app
from dermml.orchestration import kserve, tracking
from dermml.orchestration.lineage import lineage, parse_ref, render

NAME = "dermml-segmentation"
SCORES = itertools.count(50)
"""The MLflow server lives for the session: each test's models beat the earlier ones."""


def pipeline_run(manifest: str, dataset: str, score: float) -> tuple[str, str, str]:
    """What a training pipeline leaves in MLflow (the stage functions' tags, without the
    training): a parent run with validate, train and evaluate stage runs, the model registered
    from the train run, its evaluation recorded for the gate. Returns (parent, train, version)."""
    import mlflow

    from dermml.evaluation.run import EvaluationResult
    from dermml.registry.gate import record_evaluation, register

    parent = tracking.start_pipeline_run("segmentation", "training")
    with tracking.stage_run("segmentation", "validate", parent):
        tracking.log_dataset(manifest, dataset)
        tracking.set_tags({"dermml.validation": "passed", "dermml.validation_suite":
                           "segmentation"})
        tracking.log_text('{"passed": true}', "validation/report.json")
    with tracking.stage_run("segmentation", "train", parent) as run:
        train = run.info.run_id
        tracking.log_dataset(manifest, dataset)
        tracking.log_metrics({"best_val_gate": score})
        mlflow.log_text("flavors: {}\n", "model/MLmodel")
    version = register(f"runs:/{train}/model", "segmentation")
    with tracking.stage_run("segmentation", "evaluate", parent) as run:
        tracking.log_dataset(manifest, dataset)
        evaluation = run.info.run_id
    record_evaluation(EvaluationResult(evaluation, "segmentation", dataset,
                                       {"test": {"dice": score, "jaccard": score - 0.1}},
                                       model_uri=f"models:/{NAME}/{version}"))
    tracking.finish_pipeline_run(parent)
    return parent, train, version


@pytest.fixture
def promoted_twice(tracking_server, demo_data):
    """Two pipeline runs; the second's model beat the first's and is the champion."""
    from dermml.data.manifest import read_manifest
    from dermml.registry.gate import promote

    dataset = read_manifest(demo_data).version
    runs = [pipeline_run(demo_data, dataset, next(SCORES) / 100) for _ in range(2)]
    for _parent, _train, version in runs:
        assert promote("segmentation", version, demo_data).promoted
    return dataset, runs


def test_lineage_goes_from_the_data_to_the_registry_without_a_cluster(promoted_twice,
                                                                      monkeypatch, tmp_path):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-kubeconfig"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    dataset, runs = promoted_twice
    (_, _, v1), (parent, train, v2) = runs

    info = lineage(f"{NAME}@champion")

    assert info["version"] == v2
    assert info["dataset"]["version"] == dataset
    assert info["validation"]["parent_run_id"] == parent and info["validation"]["same_pipeline"]
    assert info["validation"]["result"] == "passed"
    assert info["validation"]["report"].endswith("/validation/report.json")
    assert info["training_run"]["run_id"] == train
    best = info["training_run"]["metrics"]["best_val_gate"]
    assert info["pipeline_run"]["run_id"] == parent
    assert info["pipeline_run"]["pipeline"] == "training"
    (evaluation,) = info["evaluations"]
    assert evaluation["parent_run_id"] == parent
    assert evaluation["scores"]["dice"] == pytest.approx(best)
    registry = info["registry"]
    assert registry["aliases"] == ["challenger", "champion"]
    assert registry["gate"]["promoted"] and registry["previous_champion"] == v1
    # The server proxies artifacts: KServe reads them from the artifact store behind it.
    assert registry["storage_location"].startswith("mlflow-artifacts:")
    assert registry["storage_uri"] == "s3://dermml-mlflow/artifacts/" + registry[
        "storage_location"].removeprefix("mlflow-artifacts:/")
    moves = [(e["action"], e["version"], e["previous"]) for e in info["alias_history"]]
    assert moves[-1] == ("promote", v2, v1) and moves[-2][:2] == ("promote", v1)
    assert info["serving"]["cluster"] == "no cluster"

    text = render(info)
    order = ["dataset", "-> validation", "-> training", "-> evaluation", "-> registry",
             "-> aliases", "-> serving"]
    positions = [text.index(label) for label in order]
    assert positions == sorted(positions), text
    assert "no cluster" in text and dataset in text and train[:12] in text


def test_lineage_names_the_inference_service_revision_that_serves_the_alias(
        promoted_twice, monkeypatch, tmp_path):
    from dermml.orchestration.platform import ServingConfig

    _dataset, runs = promoted_twice
    version = runs[1][2]
    uri = kserve.storage_uri(NAME, version, ServingConfig())
    assert uri.startswith("s3://dermml-mlflow/artifacts/")
    with FakeKServe() as cluster:
        monkeypatch.setenv("KUBECONFIG", str(cluster.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        cluster.create(kserve.inference_service(kserve.ServedModel(
            "dermml-serving-segmentation", "dermml", f"models:/{NAME}@champion", uri, version,
            "dermml-mlserver")))

        result = CliRunner().invoke(app, ["lineage", f"{NAME}@champion", "--json"])
        assert result.exit_code == 0, result.output
        info = json.loads(result.output)
        (row,) = info["serving"]["inference_services"]
        assert row["inference_service"] == "dermml/dermml-serving-segmentation"
        assert row["serves_this_version"] and row["storage_uri"] == uri
        assert row["latest_ready_revision"] == "dermml-serving-segmentation-predictor-00001"

        text = CliRunner().invoke(app, ["lineage", f"models:/{NAME}@champion"]).output
        assert "-> serving" in text and "predictor-00001" in text and "100%" in text


def test_a_lineage_reference_names_a_model_and_an_alias():
    assert parse_ref("dermml-segmentation@champion") == ("dermml-segmentation", "champion")
    assert parse_ref("models:/m@a") == ("m", "a")
    with pytest.raises(ValueError, match="NAME@ALIAS|e.g."):
        parse_ref("dermml-segmentation")
