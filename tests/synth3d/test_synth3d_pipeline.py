"""The synthesis pipeline and the training pipeline's synthetic_views parameter."""

from pathlib import Path

import pytest
import yaml

from dermml.orchestration.kfp_local import compile_pipeline
from pipelines import get_pipeline


def _docs(path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def _executor(spec: dict, task: str) -> str:
    component = spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return spec["components"][component]["executorLabel"]


def test_synthesis_pipeline_validates_lesions_synthesises_on_the_gpu_pool_and_validates(
        tmp_path):
    spec, platform = _docs(compile_pipeline(get_pipeline("synthesis"), str(tmp_path / "s.yaml")))
    tasks = spec["root"]["dag"]["tasks"]
    assert {"validate-data", "synthesize-views", "validate-data-2"} <= set(tasks)
    assert set(tasks["synthesize-views"]["dependentTasks"]) == {"validate-data",
                                                                "start-pipeline-run"}
    assert "synthesize-views" in tasks["validate-data-2"]["dependentTasks"]
    suite = tasks["validate-data-2"]["inputs"]["parameters"]["suite"]
    assert suite["runtimeValue"]["constant"] == "synth3d"
    executor = _executor(spec, "synthesize-views")
    container = spec["deploymentSpec"]["executors"][executor]["container"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]
    assert k8s["nodeSelector"]["labels"] == {"dermml.io/pool": "gpu"}
    validate = _executor(spec, "validate-data-2")
    assert "accelerator" not in spec["deploymentSpec"]["executors"][validate]["container"].get(
        "resources", {})


def test_training_pipeline_mixes_synthetic_views_in_through_the_train_component(tmp_path):
    spec, _ = _docs(compile_pipeline(get_pipeline("training"), str(tmp_path / "t.yaml")))
    assert "synthetic_views" in spec["root"]["inputDefinitions"]["parameters"]
    train_inputs = spec["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]
    assert train_inputs["synthetic_manifest"]["componentInputParameter"] == "synthetic_views"


def test_train_component_sets_the_mix_manifest(monkeypatch, tmp_path):
    """The component hands the synthetic set to resolve_config (which puts it under mix:)."""
    import dermml.training.run as training_run
    from components.train import train_model

    seen = {}

    def fake_resolve(task, config, sets, synthetic_manifest=""):
        seen["sets"], seen["synthetic"] = sets, synthetic_manifest
        raise RuntimeError("stop")

    monkeypatch.setattr(training_run, "resolve_config", fake_resolve)
    with pytest.raises(RuntimeError, match="stop"):
        train_model.python_func(task="segmentation", config="", overrides=[],
                                manifest_uri="m.parquet", parent_run_id="",
                                synthetic_manifest="s3://b/synth/manifest.parquet")
    assert seen["synthetic"] == "s3://b/synth/manifest.parquet"
    assert "data.manifest=m.parquet" in seen["sets"]


@pytest.mark.integration
def test_synthesis_pipeline_runs_locally_end_to_end(tmp_path):
    from dermml.data.demo import generate_demo
    from dermml.data.manifest import read_manifest
    from dermml.orchestration.kfp_local import run_local

    lesions = generate_demo(str(tmp_path / "lesions"), n=12, size=64, seed=0)
    outputs = run_local(get_pipeline("synthesis"), {
        "lesions_uri": lesions, "out_uri": str(tmp_path / "synth"), "bodies": "procedural:1",
        "views": 2, "size": 48, "blend": "paste", "validation_warn_only": True,
        "overrides": ["paste.lesions_per_body=2", "bodies.texture_size=128",
                      "bodies.edge=0.07", "paste.view_size=96"]})
    manifest = read_manifest(str(tmp_path / "synth"))
    assert len(manifest.df) == 2 and outputs


def test_synthetic_views_reach_the_mix_settings_of_every_task(tmp_path):
    """The train component hands the synthesis output to resolve_config, which must put it
    where the task reads it (a wrong key, data.mix..., failed the pipeline's train step)."""
    from dermml.training.run import resolve_config

    for task in ("segmentation", "classification", "attributes", "segdiff"):
        cfg = resolve_config(task, None, ["data.manifest=m.parquet"],
                             synthetic_manifest="s3://bucket/synthetic/manifest.parquet")
        assert cfg.mix.synthetic_manifest == "s3://bucket/synthetic/manifest.parquet", task
