"""Evaluation per skin-tone group (ITA groups and the manifest's Fitzpatrick column), with
counts, bootstrap CIs and "too few", and the gate's per-group floors."""

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from dermml.evaluation.skin_tone import TOO_FEW, group_table, stratify
from dermml.metrics.skin_tone import ITA_GROUPS
from dermml.orchestration import tracking


def test_stratify_reports_every_group_with_counts_cis_or_too_few():
    rng = np.random.default_rng(0)
    groups = ["light"] * 30 + ["dark"] * 4 + ["tan"] * 12
    per_sample = pd.DataFrame({"score": rng.random(len(groups)), "ita_group": groups,
                               "fitzpatrick": ["2"] * 30 + ["6"] * 16})

    def aggregate(df):
        return {"mean_score": float(df["score"].mean())}

    scores = stratify(per_sample, aggregate, {"ita": "ita_group", "fitzpatrick": "fitzpatrick"},
                      min_group_size=10, n_resamples=50)
    by = {(g.stratifier, g.group): g for g in scores}
    # All six ITA groups, in order, absent ones with n = 0; the column's groups as found.
    assert [g.group for g in scores if g.stratifier == "ita"] == list(ITA_GROUPS)
    assert [g.group for g in scores if g.stratifier == "fitzpatrick"] == ["2", "6"]
    assert by["ita", "light"].n == 30 and by["ita", "light"].reported
    assert by["ita", "light"].metrics["mean_score"] == pytest.approx(
        per_sample["score"][:30].mean())
    low, high = by["ita", "light"].intervals["mean_score"]
    assert low < by["ita", "light"].metrics["mean_score"] < high
    assert by["ita", "dark"].n == 4 and not by["ita", "dark"].reported
    assert by["ita", "dark"].metrics == {} and by["ita", "brown"].n == 0

    table = group_table("test", scores, ["mean_score"])
    assert len(table) == 8
    few = table[table["status"] == TOO_FEW]
    assert set(few["group"]) == {"very_light", "intermediate", "brown", "dark"}
    assert few["value"].isna().all() and few["ci_low"].isna().all()
    reported = table[table["status"] == "reported"]
    assert reported[["value", "ci_low", "ci_high"]].notna().all().all()


@pytest.fixture(scope="module")
def segmentation_model(demo_data, tmp_path_factory):
    from dermml.training.run import resolve_config, train

    home = tmp_path_factory.mktemp("skin-tone-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 2))
        outcome = train("segmentation", cfg, progress=False)
    return home, outcome.model_uri


def test_evaluation_reports_every_metric_per_skin_tone_group(segmentation_model, demo_data,
                                                             monkeypatch, tmp_path):
    from dermml.evaluation.run import evaluate

    home, model_uri = segmentation_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    result = evaluate(model_uri, demo_data, ["train"], n_resamples=20, min_group_size=10)
    groups = result.groups["train"]
    ita = [g for g in groups if g.stratifier == "ita"]
    fitz = [g for g in groups if g.stratifier == "fitzpatrick"]  # the demo's known skin type
    assert [g.group for g in ita] == list(ITA_GROUPS)
    assert sum(g.n for g in ita) == sum(g.n for g in fitz) == 62
    assert {g.group for g in fitz} == {"1", "2", "3", "4", "5", "6"}
    assert any(g.reported for g in ita) and any(not g.reported for g in ita)
    metrics = set(result.metrics["train"])
    for g in groups:
        if g.reported:
            assert g.n >= 10 and set(g.metrics) == metrics
            low, high = g.intervals["dice"]
            assert low <= g.metrics["dice"] <= high
        else:
            assert g.n < 10 and not g.metrics

    table = result.group_table()
    assert set(table["status"]) == {"reported", TOO_FEW}
    assert (table.groupby(["stratifier", "group"])["n"].nunique() == 1).all()

    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(result.run_id)
    light = next(g for g in ita if g.reported)
    logged = run.data.metrics
    assert logged[f"train_dice.ita_{light.group}"] == pytest.approx(light.metrics["dice"])
    assert f"train_dice_ci_low.ita_{light.group}" in logged
    few = next(g for g in ita if not g.reported)
    assert logged[f"train_n.ita_{few.group}"] == few.n
    assert f"train_dice.ita_{few.group}" not in logged
    assert "train_dice.fitzpatrick_2" in logged
    names = {a.path.split("/")[-1] for a in client.list_artifacts(result.run_id, "evaluation")}
    assert {"train_by_skin_tone.csv", "train_by_skin_tone.md",
            "train_dice_by_skin_tone.png"} <= names
    assert not [k for k in run.data.tags if k.startswith("dermml.figure_error")]
    md = Path(client.download_artifacts(result.run_id, "evaluation/train_by_skin_tone.md",
                                        str(tmp_path))).read_text()
    assert TOO_FEW in md and "very_light" in md
    per_sample = pd.read_csv(client.download_artifacts(
        result.run_id, "evaluation/train_per_sample.csv", str(tmp_path)))
    assert {"ita", "ita_group", "fitzpatrick"} <= set(per_sample.columns)
    assert per_sample["ita"].notna().all()


def test_the_gate_refuses_a_model_with_a_group_below_the_floor(segmentation_model, demo_data,
                                                               monkeypatch):
    from dermml.cli import app
    from dermml.evaluation.run import evaluate
    from dermml.registry.gate import model_name, promote, record_evaluation, register

    home, model_uri = segmentation_model
    monkeypatch.setenv("DERMML_HOME", str(home))
    name = model_name("segmentation")
    version = register(model_uri, "segmentation")
    # The demo test split has 15 images: groups of 5 are reported here.
    result = evaluate(f"models:/{name}/{version}", demo_data, ["test"], n_resamples=20,
                      min_group_size=5)
    assert record_evaluation(result)
    reported = [g for g in result.groups["test"] if g.reported]
    assert reported
    worst = min(reported, key=lambda g: g.metrics["dice"])

    floor = worst.metrics["dice"] + 1e-3
    refused = promote("segmentation", version, demo_data, min_per_group={"dice": floor})
    assert not refused.promoted
    assert f"skin-tone group {worst.stratifier}:{worst.group} (n={worst.n})" in refused.reason
    assert "below the floor" in refused.reason
    failed = [c for c in refused.group_floors if not c["passed"]]
    assert {(c["stratifier"], c["group"]) for c in failed} >= {(worst.stratifier, worst.group)}
    client = MlflowClient(tracking.configure())
    record = json.loads(client.get_model_version(name, version).tags["dermml.gate"])
    assert record["promoted"] is False and record["reason"] == refused.reason
    assert record["group_floors"] == refused.group_floors

    # The CLI flag: refused (exit 3) naming the group; a floor every group reaches promotes.
    runner = CliRunner()
    out = runner.invoke(app, ["registry", "promote", version, "--data", demo_data,
                              "--min-per-group", f"dice={floor}"])
    assert out.exit_code == 3, out.output
    assert re.search(r"refused: test dice of skin-tone group \w+:\w+ \(n=\d+\)", out.output)
    bad = runner.invoke(app, ["registry", "promote", version, "--data", demo_data,
                              "--min-per-group", "dice=high"])
    assert bad.exit_code != 0 and "must be a number" in bad.output
    passed = promote("segmentation", version, demo_data,
                     min_per_group={"dice": worst.metrics["dice"] - 1e-3})
    assert passed.promoted and all(c["passed"] for c in passed.group_floors)
    assert len(passed.group_floors) == len(reported)


def test_the_pipelines_promote_step_takes_the_per_group_floors(monkeypatch, tmp_path):
    """`gate_min_per_group` of the training and tuning pipelines reaches the gate."""
    import yaml

    import dermml.registry.gate as gate
    from components.registry import promote_model
    from dermml.orchestration.kfp_local import compile_pipeline
    from pipelines import get_pipeline

    seen = {}

    def fake_promote(task, version, manifest_uri, split, metric, min_delta, parent_run_id,
                     min_per_group=None):
        seen["floors"] = min_per_group
        raise RuntimeError("stop")

    monkeypatch.setattr(gate, "promote", fake_promote)
    with pytest.raises(RuntimeError, match="stop"):
        promote_model.python_func(task="segmentation", version="1", manifest_uri="m.parquet",
                                  split="test", min_delta=0.0, parent_run_id="",
                                  min_per_group=["dice=0.7"])
    assert seen["floors"] == {"dice": 0.7}
    compiled = compile_pipeline(get_pipeline("training"), str(tmp_path / "t.yaml"))
    spec = yaml.safe_load(Path(compiled).read_text().split("\n---\n")[0])
    assert "gate_min_per_group" in spec["root"]["inputDefinitions"]["parameters"]
