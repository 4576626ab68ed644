"""Registration and the promotion gate: the champion changes only for a better model."""

import json

import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.orchestration import tracking
from dermml.registry.gate import history, model_name, promote, register, rollback
from dermml.training.run import resolve_config, train


def trained(demo_data, epochs: int, lr: float = 0.003) -> str:
    cfg = resolve_config("segmentation", None,
                         tiny_overrides(demo_data, epochs) + [f"train.lr={lr}"])
    return train("segmentation", cfg, progress=False).model_uri


@pytest.fixture(scope="module")
def models(demo_data, tmp_path_factory):
    """A weak and a strong model, trained once into a module-wide MLflow store."""
    home = tmp_path_factory.mktemp("registry-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        weak = trained(demo_data, 1, lr=1e-5)
        strong = trained(demo_data, 10)
    return home, weak, strong


def test_gate_promotes_better_refuses_worse_and_rolls_back(models, demo_data, monkeypatch):
    home, weak, strong = models
    monkeypatch.setenv("DERMML_HOME", str(home))
    name = model_name("segmentation")

    v1 = register(weak, "segmentation")
    first = promote("segmentation", v1, demo_data)
    assert first.promoted and "first model" in first.reason

    v2 = register(strong, "segmentation")
    better = promote("segmentation", v2, demo_data)
    assert better.promoted and better.challenger_score > better.champion_score

    v3 = register(weak, "segmentation")
    worse = promote("segmentation", v3, demo_data)
    assert not worse.promoted and "does not beat" in worse.reason

    client = MlflowClient(tracking.configure())
    assert str(client.get_model_version_by_alias(name, "champion").version) == v2
    assert str(client.get_model_version_by_alias(name, "challenger").version) == v3
    audit = client.get_model_version(name, v2).tags
    assert audit["dermml.previous_champion"] == v1 and audit["dermml.promoted_by"]
    refused = json.loads(client.get_model_version(name, v3).tags["dermml.gate"])
    assert refused["promoted"] is False and refused["champion_version"] == v2

    assert rollback("segmentation", "test") == v1
    assert str(client.get_model_version_by_alias(name, "champion").version) == v1
    # The audit trail shows each version's real aliases (`dermml registry history`).
    from typer.testing import CliRunner

    from dermml.cli import app

    result = CliRunner().invoke(app, ["registry", "history", "--task", "segmentation"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output)
    assert shown == history("segmentation")
    assert [(h["version"], h["aliases"]) for h in shown] == [
        (v3, ["challenger"]), (v2, []), (v1, ["champion"])]


def test_gate_compares_on_the_same_test_set(models, demo_data, monkeypatch):
    """Scores are stored per dataset version and split, never mixed across test sets."""
    home, weak, _ = models
    monkeypatch.setenv("DERMML_HOME", str(home))
    from dermml.data.manifest import read_manifest
    from dermml.registry.gate import stored_score

    version = register(weak, "segmentation")
    promote("segmentation", version, demo_data, split="val")
    ds = read_manifest(demo_data).version
    name = model_name("segmentation")
    assert stored_score(name, version, ds, "val", "dice") is not None
    assert stored_score(name, version, ds, "test", "dice") is None


def test_an_unreachable_registry_is_an_error_not_a_missing_champion():
    """Only "no such alias/model" means there is no champion; anything else must not promote."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

    from dermml.registry.gate import _champion_version

    class Registry:
        def __init__(self, error):
            self.error = error

        def get_model_version_by_alias(self, name, alias):
            raise self.error

    missing = MlflowException("alias champion not found", error_code=INVALID_PARAMETER_VALUE)
    assert _champion_version(Registry(missing), "dermml-segmentation") is None
    down = MlflowException("API request failed: connection refused", error_code=INTERNAL_ERROR)
    with pytest.raises(MlflowException, match="connection refused"):
        _champion_version(Registry(down), "dermml-segmentation")
    with pytest.raises(ConnectionError):
        _champion_version(Registry(ConnectionError("refused")), "dermml-segmentation")


def test_loaded_models_run_where_dermml_device_says(monkeypatch):
    import torch

    from dermml.serving.pyfunc import serving_device

    monkeypatch.delenv("DERMML_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert serving_device().type == expected
    monkeypatch.setenv("DERMML_DEVICE", "cpu")
    assert serving_device() == torch.device("cpu")
    monkeypatch.setenv("DERMML_DEVICE", "tpu-please")
    with pytest.raises(ValueError, match="DERMML_DEVICE='tpu-please'"):
        serving_device()


def test_evaluation_is_stored_for_the_gate_only_when_the_caller_records_it(models, demo_data,
                                                                         monkeypatch):
    """``evaluate`` returns its result; ``record_evaluation`` stores it on the version (and
    never a result under non-default serving params)."""
    from dataclasses import replace

    from dermml.data.manifest import read_manifest
    from dermml.evaluation.run import evaluate
    from dermml.registry.gate import record_evaluation, stored_score

    home, weak, _ = models
    monkeypatch.setenv("DERMML_HOME", str(home))
    name, version = model_name("segmentation"), register(weak, "segmentation")
    ds = read_manifest(demo_data).version
    result = evaluate(f"models:/{name}/{version}", demo_data, ["val"], n_resamples=0)
    assert stored_score(name, version, ds, "val", "dice") is None
    assert not record_evaluation(replace(result, params={"threshold": 0.3}))
    assert stored_score(name, version, ds, "val", "dice") is None
    assert record_evaluation(result)
    assert stored_score(name, version, ds, "val", "dice") == pytest.approx(
        result.metrics["val"]["dice"])
    assert not record_evaluation(replace(result, model_uri=weak))  # runs:/ URI: no version
