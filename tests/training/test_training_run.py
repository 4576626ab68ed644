"""What a training run records in MLflow and prints on the console; what it reads, and how often."""

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


def _count_calls(monkeypatch, owner, name: str) -> list:
    calls = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_a_run_reads_its_manifest_and_builds_its_datasets_once(demo_data, monkeypatch):
    """The driver's file check, the loop and the model preview share one TrainingInputs."""
    from dermml.tasks import base

    datasets = _count_calls(monkeypatch, base.Task, "datasets")
    manifests = _count_calls(monkeypatch, base, "read_manifest")
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 1))
    train("segmentation", cfg, progress=False)
    assert len(datasets) == 1 and len(manifests) == 1


@pytest.mark.integration
def test_cli_training_with_ray_on_a_relative_manifest_prints_epochs_and_logs_the_rest(
        demo_data, monkeypatch, tmp_path, dermml_home):
    """Ray runs its workers in its session folder: the driver hands them absolute URIs (and
    the datasets, built once there), so `--set data.manifest=data/demo` works with Ray on. The
    console gets the epoch lines and the log's path; Ray's own lines go to the log (and the
    log to the run)."""
    import json
    import shutil
    from pathlib import Path

    from typer.testing import CliRunner

    from dermml.cli import app
    from dermml.tasks import base

    shutil.copytree(Path(demo_data).parent, tmp_path / "data" / "demo")
    monkeypatch.chdir(tmp_path)
    datasets = _count_calls(monkeypatch, base.Task, "datasets")
    sets = [arg for o in tiny_overrides("data/demo", 2, ray=True) for arg in ("--set", o)]
    result = CliRunner().invoke(app, ["train", "segmentation", *sets])
    assert result.exit_code == 0, result.output
    assert len(datasets) == 1  # in the driver; the workers got the datasets themselves

    lines = result.stderr.splitlines()
    assert [line.split("  ")[0] for line in lines[:2]] == ["epoch 1/2", "epoch 2/2"], lines
    done = re.fullmatch(r"train done in \d+\.\d s; full log: (\S+/train\.log)", lines[2])
    assert done and len(lines) == 3, lines
    assert Path(done.group(1)).parent.parent == dermml_home / "logs"
    log = Path(done.group(1)).read_text()
    assert "Checkpoint successfully created" in log and "epoch 2/2  train_loss" in log

    outcome = json.loads(result.stdout[:result.stdout.rindex("}") + 1])
    client = MlflowClient(tracking.tracking_uri())
    params = client.get_run(outcome["run_id"]).data.params
    assert params["data.manifest"] == str(tmp_path / "data" / "demo")
    assert "logs/train.log" in {a.path for a in client.list_artifacts(outcome["run_id"], "logs")}
