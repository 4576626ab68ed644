"""The synthetic-value pipeline compiles for the cluster and, with KFP local on demo data,
trains real / real+3D / real+GAN / real+both arms and logs one table and plot."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.orchestration.kfp_local import compile_pipeline, run_local
from pipelines import get_pipeline

PIPELINE = get_pipeline("synthetic-value")
GAN = ["gan.with_masks=true", "data.image_size=16", "data.batch_size=8", "model.z_dim=16",
       "model.w_dim=16", "model.mapping_layers=2", "model.channel_base=256",
       "model.channel_max=16", "gan.kimg=0.1", "gan.tick_kimg=0.1", "metrics.every_ticks=0",
       "ray.enabled=false"]
SYNTH3D = ["paste.lesions_per_body=2", "bodies.texture_size=128", "bodies.edge=0.07",
           "paste.view_size=96"]


def test_synthetic_value_compiles_with_its_heavy_steps_on_the_gpu_pool(tmp_path):
    spec = yaml.safe_load(Path(compile_pipeline(PIPELINE, str(tmp_path / "p.yaml")))
                          .read_text().split("\n---\n")[0])
    names = set(spec["root"]["dag"]["tasks"])
    assert {"synthesize-views", "train-model", "generate-images",
            "measure-synthetic-value"} <= names
    gpu = [n for n, e in spec["deploymentSpec"]["executors"].items()
           if e["container"].get("resources", {}).get("accelerator")]
    assert any("measure-synthetic-value" in g for g in gpu), gpu


@pytest.mark.integration
@pytest.mark.slow  # a few minutes: 3D synthesis, a GAN and four trainings through KFP local
def test_synthetic_value_pipeline_on_demo_data(tracking_server, demo_data, tmp_path):
    overrides = [o for o in tiny_overrides(demo_data, 2) if not o.startswith("data.manifest")]
    outputs = run_local(PIPELINE, {
        "task": "segmentation", "manifest_uri": demo_data, "overrides": overrides,
        "synthetic_root": str(tmp_path / "synthetic"), "bodies": "procedural:1", "views": 6,
        "view_size": 48, "synth3d_overrides": SYNTH3D, "gan_overrides": GAN,
        "synthetic_per_class": "nevus=6,melanoma=6,seborrheic_keratosis=6",
        "fractions": "0.25", "seeds": "0", "bootstrap_resamples": 30})
    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    table = pd.read_csv(client.download_artifacts(outputs["parent_run_id"],
                                                  "synthetic_value/table.csv"))
    overall = table[(table["group"] == "all") & (table["metric"] == "dice")]
    assert set(overall["arm"]) == {"real", "synth3d@0.25", "gan@0.25", "both@0.25"}
    assert overall["ci_low"].notna().all()
    assert client.get_run(outputs["parent_run_id"]).info.status == "FINISHED"
