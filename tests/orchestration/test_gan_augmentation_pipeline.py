"""The gan-augmentation pipeline: compiled for the cluster (GAN, generation and the classifiers
on the GPU pool), and run with KFP local on demo data against a real MLflow server: both
classifier arms are scored on the same real test split and compared in one table and plot."""

from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from dermml.orchestration.kfp_local import compile_pipeline, run_local
from pipelines import get_pipeline

PIPELINE = get_pipeline("gan-augmentation")
GAN = ["data.image_size=16", "data.batch_size=8", "model.z_dim=16", "model.w_dim=16",
       "model.mapping_layers=2", "model.channel_base=256", "model.channel_max=16",
       "gan.kimg=0.25", "gan.tick_kimg=0.25", "metrics.num_real=32", "metrics.num_fake=32",
       "metrics.kid_subsets=5", "metrics.kid_subset_size=16", "metrics.every_ticks=1",
       "ray.enabled=false"]
CLASSIFIER = ["model.backbone=resnet10t", "data.image_size=32", "data.batch_size=16",
              "train.epochs=1", "ray.enabled=false"]


def test_gan_augmentation_compiles_with_its_training_stages_on_the_gpu_pool(tmp_path):
    out = compile_pipeline(PIPELINE, str(tmp_path / "p.yaml"))
    docs = list(yaml.safe_load_all(Path(out).read_text()))
    executors = docs[-1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"] \
        if len(docs) > 1 else {}
    tasks = docs[0]["root"]["dag"]["tasks"]
    names = set(tasks)
    assert {"train-model", "generate-images", "compare-models", "register-model"} <= names
    assert sum(1 for n in names if n.startswith("train-model")) == 3
    assert sum(1 for n in names if n.startswith("evaluate-model")) == 2
    gpu = [name for name, spec in docs[0]["deploymentSpec"]["executors"].items()
           if spec["container"].get("resources", {}).get("accelerator")]
    assert any("generate-images" in g for g in gpu) and len(gpu) >= 5, gpu
    assert executors  # node selectors and tolerations of the pools


@pytest.mark.integration
@pytest.mark.slow  # ~70 s: a GAN and two classifiers through KFP local
def test_gan_augmentation_compares_real_and_real_plus_gan_on_one_test_set(tracking_server,
                                                                           demo_data):
    outputs = run_local(PIPELINE, {"manifest_uri": demo_data, "gan_overrides": GAN,
                                   "classifier_overrides": CLASSIFIER,
                                   "synthetic_per_class": "nevus=8,melanoma=8,"
                                                          "seborrheic_keratosis=8",
                                   "bootstrap_resamples": 50})
    client = MlflowClient(tracking_server, registry_uri=tracking_server)
    parent = client.get_run(outputs["parent_run_id"])
    assert parent.info.status == "FINISHED"
    table = pd.read_csv(client.download_artifacts(parent.info.run_id, "comparison/table.csv"))
    assert set(table["arm"]) == {"real", "real_gan"}
    balanced = table[table["metric"] == "balanced_accuracy"].set_index("arm")
    assert balanced.loc["real_gan", "delta"] == pytest.approx(
        balanced.loc["real_gan", "value"] - balanced.loc["real", "value"])
    assert balanced["ci_low"].notna().all() and balanced.loc["real_gan", "delta_ci_low"] <= \
        balanced.loc["real_gan", "delta"] <= balanced.loc["real_gan", "delta_ci_high"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "comparison")}
    assert {"comparison/table.csv", "comparison/table.md", "comparison/plot.png"} <= artifacts
    generated = pd.read_parquet(outputs["synthetic_manifest"])
    assert len(generated) == 24 and set(generated["label"]) == {
        "nevus", "melanoma", "seborrheic_keratosis"}
