"""The tuning pipeline and the search's RayJob as the cluster gets them: every stage, the
search on the GPU pool, trial concurrency that fits, one worker pod per concurrent trial worker."""

import pytest
from test_kubernetes_pipeline import executor_of, k8s_config, load_docs
from test_rayjob import rayjob_platform, validate_strictly

from dermml.config import ConfigError
from dermml.orchestration.kfp_local import compile_pipeline
from dermml.orchestration.platform import platform_from_json
from dermml.orchestration.rayjob import rayjob_manifest, tune_entrypoint
from dermml.training.run import resolve_config
from pipelines import get_pipeline

TUNING = get_pipeline("tuning")


def test_the_tuning_pipeline_compiles_with_every_stage_and_the_search_on_the_gpu_pool(tmp_path):
    pipeline, platform = load_docs(compile_pipeline(TUNING, str(tmp_path / "tuning.yaml")))
    tasks = pipeline["root"]["dag"]["tasks"]
    assert {"start-pipeline-run", "prepare-data", "validate-data", "tune-model",
            "register-model", "evaluate-model", "promote-model",
            "finish-pipeline-run"} <= set(tasks)
    # The best trial's model is what gets registered, then scored and gated.
    assert tasks["register-model"]["inputs"]["parameters"]["model_uri"][
        "taskOutputParameter"] == {"outputParameterKey": "model_uri",
                                   "producerTask": "tune-model"}
    tune_exec = executor_of(pipeline, "tune-model")
    container = pipeline["deploymentSpec"]["executors"][tune_exec]["container"]
    assert container["image"].startswith("ghcr.io/dermml/dermml-gpu")
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert k8s_config(platform, tune_exec)["nodeSelector"]["labels"] == {
        "dermml.io/pool": "gpu"}
    shipped = platform_from_json(tasks["tune-model"]["inputs"]["parameters"]["platform"][
        "runtimeValue"]["constant"])
    assert shipped.stages["tune"] == "gpu"
    defaults = pipeline["root"]["inputDefinitions"]["parameters"]
    assert defaults["space"]["defaultValue"] == "configs/tune/segmentation.yaml"


def test_concurrent_trials_that_do_not_fit_the_tune_pod_are_refused_at_compile(tmp_path):
    """Two trials of 3 CPUs each in the tune step's pod: 6 CPUs on a g5.xlarge (4 vCPUs)."""
    params = {"overrides": ["ray.cpus_per_worker=3"], "concurrent": 2}
    with pytest.raises(ConfigError) as error:
        compile_pipeline(TUNING, str(tmp_path / "t.yaml"), params=params)
    assert "concurrent=2 trials" in str(error.value) and "= 6 CPUs" in str(error.value)
    compile_pipeline(TUNING, str(tmp_path / "t.yaml"), params={**params, "concurrent": 1})


def test_a_search_runs_as_a_rayjob_with_one_worker_pod_per_concurrent_trial_worker():
    cfg = resolve_config("segmentation", None, ["ray.use_gpu=true", "ray.num_workers=1",
                                                "ray.cpus_per_worker=3",
                                                "ray.storage_path=s3://dermml/ray"])
    platform = rayjob_platform()
    manifest = rayjob_manifest("segmentation", cfg, "0123456789abcdef", platform,
                               tune_entrypoint("segmentation", "0123456789abcdef"), 4)
    validate_strictly(manifest)
    spec = manifest["spec"]
    assert spec["entrypoint"] == "dermml tune segmentation --run 0123456789abcdef"
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    pod = group["template"]["spec"]
    assert pod["nodeSelector"] == platform.pools["gpu"].node_selector
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
