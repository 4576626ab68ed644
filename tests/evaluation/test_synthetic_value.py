"""The synthetic-value measurement: every arm trained and scored on the same real test split,
compared with real-only by paired bootstrap, per skin-tone group, with sources a task cannot
use reported as skipped; one table and plot in the parent run."""

import pandas as pd
import pytest
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.data.manifest import read_manifest, write_manifest
from dermml.evaluation.synthetic_value import (
    combine_manifests,
    measure_synthetic_value,
    plan_arms,
    stacked,
    synthetic_share,
)
from dermml.orchestration import tracking


def copy_of_train(demo_data: str, out, name: str, drop_labels: bool = False) -> str:
    """A stand-in synthetic source: the demo training images under new ids."""
    manifest = read_manifest(demo_data)
    rows = manifest.split("train").head(20).copy()
    rows["image_uri"] = [manifest.resolve(u) for u in rows["image_uri"]]
    rows["mask_uri"] = [manifest.resolve(u) for u in rows["mask_uri"]]
    rows["sample_id"] = [f"{name}-{s}" for s in rows["sample_id"]]
    if drop_labels:
        rows["label"] = None
    uri = str(out / f"{name}.parquet")
    write_manifest(rows, uri)
    return uri


def test_arms_shares_and_stacking():
    arms = plan_arms(["gan"], [0.5, 1.0], [0, 1])
    assert [a.name for a in arms] == ["real", "real", "gan@0.5", "gan@0.5", "gan@1", "gan@1"]
    assert synthetic_share(100, 400, 0.5) == 0.125 and synthetic_share(100, 40, 1.0) == 1.0
    with pytest.raises(ValueError, match="positive"):
        plan_arms(["gan"], [0.0], [0])
    records = {0: pd.DataFrame({"sample_id": ["a", "b"]}), 1: pd.DataFrame({"sample_id": ["a",
                                                                                          "b"]})}
    assert stacked(records)["sample_id"].tolist() == ["a#0", "b#0", "a#1", "b#1"]


def test_combined_manifest_keeps_both_sources(demo_data, tmp_path):
    a = copy_of_train(demo_data, tmp_path, "a")
    b = copy_of_train(demo_data, tmp_path, "b")
    combined = read_manifest(combine_manifests({"a": a, "b": b}, str(tmp_path / "ab")))
    assert len(combined.df) == 40 and set(combined.df["source"]) == {"a", "b"}


def test_real_and_synthetic_arms_are_compared_on_one_test_split(demo_data, tmp_path):
    source = copy_of_train(demo_data, tmp_path, "synth3d")
    unlabelled = copy_of_train(demo_data, tmp_path, "views", drop_labels=True)
    overrides = [o for o in tiny_overrides(demo_data, 2) if not o.startswith("data.manifest")]
    with tracking.stage_run("segmentation", "synthetic-value") as parent:
        value = measure_synthetic_value(
            "segmentation", demo_data, {"synth3d": source}, [0.5], [0],
            overrides=overrides, parent_run_id=parent.info.run_id, n_resamples=30,
            min_group_size=3)
    table = value.table
    overall = table[(table["group"] == "all") & (table["metric"] == "dice")].set_index("arm")
    assert set(overall.index) == {"real", "synth3d@0.5"}
    assert overall.loc["synth3d@0.5", "delta_ci_low"] <= overall.loc["synth3d@0.5", "delta"] \
        <= overall.loc["synth3d@0.5", "delta_ci_high"]
    assert (table["group"] != "all").any()  # per skin-tone group rows (or too-few notes)
    client = MlflowClient(tracking.tracking_uri())
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "synthetic_value")}
    assert {"synthetic_value/table.csv", "synthetic_value/plot.png"} <= artifacts
    assert len(value.runs["real"]) == 1 and len(value.runs["synth3d@0.5"]) == 1

    with tracking.stage_run("classification", "synthetic-value") as parent:
        skipped = measure_synthetic_value(
            "classification", demo_data, {"views": unlabelled}, [1.0], [0],
            overrides=["model.backbone=resnet10t", "data.image_size=32", "train.epochs=1",
                       "ray.enabled=false"], parent_run_id=parent.info.run_id,
            n_resamples=0)
    notes = skipped.table.set_index("arm")["note"].dropna()
    assert "views" in notes.index and notes["views"].startswith("skipped:")
