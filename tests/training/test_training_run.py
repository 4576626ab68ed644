"""What a training run records in MLflow and prints on the console (in-process, ray off)."""

import re

import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.data.manifest import read_manifest
from dermml.orchestration import tracking
from dermml.orchestration.training_hooks import LOSS_CURVE_ARTIFACT
from dermml.training.run import resolve_config, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def loss_curve_bytes(client: MlflowClient, run_id: str, tmp_path) -> bytes:
    path = client.download_artifacts(run_id, LOSS_CURVE_ARTIFACT, str(tmp_path))
    with open(path, "rb") as f:
        return f.read()


def test_run_logs_its_dataset_input_loss_curve_and_only_params_that_apply(demo_data, capsys,
                                                                         tmp_path):
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 3))
    outcome = train("segmentation", cfg, progress=True)
    err = capsys.readouterr().err

    # One readable line per epoch: epoch, train loss, gate metric, time.
    lines = re.findall(r"^epoch (\d)/3  train_loss \d+\.\d{4}  val_dice \d\.\d{4}  \d+\.\d s$",
                       err, re.MULTILINE)
    assert lines == ["1", "2", "3"], err
    assert "epoch 1/3:" not in err  # no progress bar ("epoch 1/3: 50%|...") off a terminal

    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(outcome.run_id)
    params = run.data.params
    assert not [k for k in params if k.startswith("ray.kubernetes.")]
    assert params["ray.enabled"] == "False" and params["train.epochs"] == "3"

    manifest = read_manifest(demo_data)
    (given,) = run.inputs.dataset_inputs
    tags = {t.key: t.value for t in given.tags}
    assert tags["mlflow.data.context"] == "training"
    assert tags["dermml.dataset_version"] == manifest.version
    assert given.dataset.digest == manifest.version[:36]
    assert given.dataset.name == "data"  # the dataset's folder: .../data/manifest.parquet
    assert manifest.uri in given.dataset.source

    assert loss_curve_bytes(client, outcome.run_id, tmp_path).startswith(PNG_MAGIC)


def test_a_run_killed_mid_training_already_has_its_loss_curve(demo_data, monkeypatch,
                                                              tmp_path):
    from dermml.training import checkpoint

    save = checkpoint.FolderCheckpointer.save

    def die_in_epoch_two(self, state, metrics):
        if state["epoch"] == 1:
            raise RuntimeError("node lost")
        save(self, state, metrics)

    monkeypatch.setattr(checkpoint.FolderCheckpointer, "save", die_in_epoch_two)
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 3))
    with pytest.raises(RuntimeError, match="node lost"):
        train("segmentation", cfg, progress=False)

    client = MlflowClient(tracking.tracking_uri())
    experiment = client.get_experiment_by_name(tracking.experiment_name("segmentation"))
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [0]
    assert loss_curve_bytes(client, run.info.run_id, tmp_path).startswith(PNG_MAGIC)
