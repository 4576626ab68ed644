"""Ray Tune searches (`dermml tune`): trials are real training runs tracked as MLflow child runs
of one parent; ASHA stops trailing trials; a killed search resumes; the best model becomes the
challenger and the gate decides; bad space files never start Ray."""

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import BIN, tiny_overrides
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dermml.cli import app

pytestmark = pytest.mark.integration

# lr 0.03 learns the demo lesions within two epochs (val_dice ~0 after the first, ~0.3 after
# the second); lr 1e-5 leaves the network where it started (every pixel "lesion": ~0.2). Seed 11
# samples lr 0.03, 0.03, 1e-5, 0.03; two trials run at a time, so the third starts only when one
# of the first two has ended, after at least two epochs (ASHA, grace 1 and factor 2, cannot stop
# either at epoch 1: their first scores tie). At epoch 2 the 1e-5 trial trails every 0.03 trial
# ASHA has recorded, so it is stopped, whatever the timing (training is seeded: same scores).
SEED = "11"
SPACE = "train.lr: choice([0.03, 0.00001])\nloss.0.weight: uniform(0.5, 2)\n"


def tune_args(demo_data: str, space: Path, *extra: str, epochs: int = 3) -> list[str]:
    sets = [f"--set={o}" for o in tiny_overrides(demo_data, epochs, ray=True)]
    return ["tune", "segmentation", "--space", str(space), *sets, "--search", "random",
            "--scheduler", "asha", *extra]


def children(client: MlflowClient, parent_run_id: str) -> list:
    parent = client.get_run(parent_run_id)
    return client.search_runs([parent.info.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent_run_id}'")


@pytest.fixture(scope="module")
def searched(demo_data, tmp_path_factory):
    """One seeded 4-trial search on the demo data, two trials at a time (~1 min)."""
    import ray

    home = tmp_path_factory.mktemp("tune-home")
    space = home / "space.yaml"
    space.write_text(SPACE)
    saved = os.environ.get("DERMML_HOME")
    os.environ["DERMML_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        result = CliRunner().invoke(app, tune_args(demo_data, space, "--trials", "4",
                                                   "--concurrent", "2", "--seed", SEED))
        assert result.exit_code == 0, result.output
        out = result.output  # Tune's tables, then the command's JSON
        start = out.rindex('{\n  "run_id"')
        outcome = json.loads(out[start:out.index("\n}", start) + 2])
        yield {"home": home, "outcome": outcome, "uri": f"sqlite:///{home / 'mlflow.db'}"}
    finally:
        ray.shutdown()
        if saved is None:
            os.environ.pop("DERMML_HOME", None)
        else:
            os.environ["DERMML_HOME"] = saved


def test_a_search_is_one_parent_run_with_a_child_run_per_trial(searched, tmp_path):
    client = MlflowClient(searched["uri"])
    parent = client.get_run(searched["outcome"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["dermml.stage"] == "tune"
    experiment = parent.info.experiment_id
    assert len(client.search_runs([experiment], "tags.`dermml.stage` = 'tune'")) == 1
    trials = children(client, parent.info.run_id)
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    table = client.download_artifacts(parent.info.run_id, "tune/trials.csv", str(tmp_path))
    import pandas as pd

    rows = pd.read_csv(table).set_index("run_id")
    assert len(rows) == 4
    for trial in trials:
        row = rows.loc[trial.info.run_id]
        params = trial.data.params
        # The sampled values are the trial's params and the config it trained with.
        assert float(params["tune.train.lr"]) == row["train.lr"]
        assert float(params["train.lr"]) == row["train.lr"]
        assert float(params["tune.loss.0.weight"]) == pytest.approx(row["loss.0.weight"])
        assert f"'weight': {params['tune.loss.0.weight']}" in params["loss"]
        epochs = int(trial.data.metrics["epochs_run"])
        # Rank 0's curve, one point per epoch (a stopped trial's worker may log one more epoch
        # before its Train run is aborted).
        steps = sorted(m.step for m in client.get_metric_history(trial.info.run_id, "val_dice"))
        assert steps[:epochs] == list(range(epochs))
        assert trial.data.metrics["best_val_gate"] == pytest.approx(row["best_val_dice"])
        assert trial.data.tags["dermml.tune.stop_reason"] == row["stop_reason"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "tune")}
    assert {"tune/trials.csv", "tune/parallel_coordinates.png", "tune/best_config.yaml",
            "tune/space.yaml"} <= artifacts
    best = client.download_artifacts(parent.info.run_id, "tune/best_config.yaml", str(tmp_path))
    best_cfg = yaml.safe_load(Path(best).read_text())
    assert best_cfg["train"]["lr"] == searched["outcome"]["best_values"]["train.lr"] == 0.03
    assert parent.data.metrics["best_val_dice"] == max(rows["best_val_dice"])


def test_asha_stops_the_trials_that_trail_after_their_first_epoch(searched):
    rows = searched["outcome"]
    client = MlflowClient(searched["uri"])
    trials = sorted(children(client, rows["run_id"]), key=lambda t: t.data.tags[
        "dermml.tune.trial_id"])
    lrs = [float(t.data.params["train.lr"]) for t in trials]
    assert lrs == [0.03, 0.03, 0.00001, 0.03]  # the seeded order the test is built on
    for trial, lr in zip(trials, lrs, strict=True):
        reason = trial.data.tags["dermml.tune.stop_reason"]
        epochs = trial.data.metrics["epochs_run"]
        if lr == 0.00001:
            assert reason == "stopped by asha after epoch 2/3" and epochs == 2
        else:  # a good trial runs on (ASHA may still stop the weaker one at epoch 2)
            assert reason in ("completed", "stopped by asha after epoch 2/3") and epochs >= 2
    assert client.get_run(rows["run_id"]).data.metrics["trials_stopped_early"] >= 1


def test_the_best_trial_is_registered_as_challenger_and_the_gate_decides(searched, demo_data,
                                                                         monkeypatch):
    monkeypatch.setenv("DERMML_HOME", str(searched["home"]))
    from dermml.registry.gate import CHALLENGER, promote

    outcome = searched["outcome"]
    client = MlflowClient(searched["uri"], registry_uri=searched["uri"])
    version = client.get_model_version_by_alias("dermml-segmentation", CHALLENGER)
    assert str(version.version) == outcome["version"]
    assert version.run_id == outcome["best_run_id"]
    decision = promote("segmentation", outcome["version"], demo_data, "test")
    assert decision.promoted and decision.reason == "first model: no champion to beat"
    assert decision.metric == "dice" and 0 < decision.challenger_score <= 1


@pytest.mark.slow  # ~2 min: `make test-slow` (CI runs it)
def test_a_killed_search_resumes_with_exactly_one_run_per_trial(demo_data, tmp_path,
                                                                monkeypatch):
    """The driver dies at the 3rd epoch result (both trials mid-way); the same command with
    --resume finishes both trials in their first runs, from their checkpoints."""
    import ray

    space = tmp_path / "space.yaml"
    space.write_text("train.lr: loguniform(0.003, 0.03)\n")
    args = tune_args(demo_data, space, "--trials", "2", "--concurrent", "2", "--no-register",
                     "--scheduler", "none", epochs=4)
    env = dict(os.environ, DERMML_FAULT_KILL_SEARCH_AT_RESULT="3", PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))
    killed = subprocess.Popen([str(BIN / "dermml"), *args], env=env, start_new_session=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = killed.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):  # the Ray processes it started
            os.killpg(killed.pid, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, output[-3000:]
    uri = f"sqlite:///{tmp_path / 'dermml-home' / 'mlflow.db'}"
    client = MlflowClient(uri)
    (parent,) = client.search_runs([client.get_experiment_by_name(
        "dermml/segmentation").experiment_id], "tags.`dermml.stage` = 'tune'")
    assert parent.info.status == "RUNNING"
    before = children(client, parent.info.run_id)
    assert len(before) == 2 and all(t.info.status == "RUNNING" for t in before)

    again = CliRunner().invoke(app, args)  # without --resume: refused, naming the flag
    assert again.exit_code == 2 and "--resume" in again.output
    try:
        result = CliRunner().invoke(app, [*args, "--resume"])
    finally:
        ray.shutdown()
    assert result.exit_code == 0, result.output
    runs = client.search_runs([parent.info.experiment_id], "tags.`dermml.stage` = 'tune'")
    assert [r.info.run_id for r in runs] == [parent.info.run_id]
    assert runs[0].info.status == "FINISHED"
    trials = children(client, parent.info.run_id)
    assert len(trials) == 2 and all(t.info.status == "FINISHED" for t in trials)
    assert {t.info.run_id for t in trials} == {t.info.run_id for t in before}
    for trial in trials:
        assert trial.data.metrics["epochs_run"] == 4
        assert trial.data.tags["dermml.tune.stop_reason"] == "completed"
        steps = {m.step for m in client.get_metric_history(trial.info.run_id, "val_dice")}
        assert steps == {0, 1, 2, 3}
