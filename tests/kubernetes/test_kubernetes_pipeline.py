"""Pipelines on Kubernetes: placement in the compiled YAML, submit and schedule via kfp.Client."""

from pathlib import Path

import pytest
import yaml
from fake_kfp import FakeKFP

from dermml.config import ConfigError
from dermml.orchestration.kfp_client import Target, schedule, submit
from dermml.orchestration.kfp_local import compile_pipeline
from dermml.orchestration.platform import load_platform, platform_from_json
from pipelines import get_pipeline

TRAINING = get_pipeline("training")
ROOT = Path(__file__).resolve().parents[2]


def k8s_config(spec: dict, executor: str) -> dict:
    return spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"][executor]


def executor_of(pipeline_spec: dict, task: str) -> str:
    component = pipeline_spec["root"]["dag"]["tasks"][task]["componentRef"]["name"]
    return pipeline_spec["components"][component]["executorLabel"]


def load_docs(path) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    return docs[0], (docs[1] if len(docs) > 1 else {})


def test_compiled_yaml_places_gpu_stages_on_the_gpu_pool(tmp_path):
    pipeline, platform = load_docs(compile_pipeline(TRAINING, str(tmp_path / "t.yaml")))
    train_exec = executor_of(pipeline, "train-model")
    container = pipeline["deploymentSpec"]["executors"][train_exec]["container"]
    assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert container["resources"]["accelerator"]["resourceCount"] == "1"
    assert container["resources"]["memoryRequest"] > 1 and container["resources"]["cpuRequest"]
    assert container["image"].startswith("ghcr.io/dermml/dermml-gpu")
    train_k8s = k8s_config(platform, train_exec)
    assert train_k8s["nodeSelector"]["labels"] == {"dermml.io/pool": "gpu"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
        train_k8s["tolerations"]
    secrets = {s["secretName"] for s in train_k8s["secretAsEnv"]}
    assert secrets == {"dermml-s3", "dermml-mlflow"}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLFLOW_TRACKING_URI"].startswith("http://dermml-mlflow")

    # Scoring stages run the model over the test split: GPU image on the GPU pool too.
    for scoring in ("evaluate-model", "promote-model"):
        exec_name = executor_of(pipeline, scoring)
        scorer = pipeline["deploymentSpec"]["executors"][exec_name]["container"]
        assert scorer["image"].startswith("ghcr.io/dermml/dermml-gpu"), scoring
        assert scorer["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu", scoring
        assert k8s_config(platform, exec_name)["nodeSelector"]["labels"] == {
            "dermml.io/pool": "gpu"}, scoring

    validate_exec = executor_of(pipeline, "validate-data")
    validate = pipeline["deploymentSpec"]["executors"][validate_exec]["container"]
    assert "accelerator" not in validate.get("resources", {})
    assert k8s_config(platform, validate_exec)["nodeSelector"]["labels"] == {
        "dermml.io/pool": "cpu"}
    assert "tolerations" not in k8s_config(platform, validate_exec)


def test_no_credentials_in_compiled_pipeline(tmp_path, monkeypatch):
    """Credentials in the compiling shell never reach the YAML; pods get them from Secrets."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-fake-value")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-fake")
    path = compile_pipeline(TRAINING, str(tmp_path / "t.yaml"))
    text = Path(path).read_text()
    assert "s3cr3t-fake-value" not in text and "hunter2-fake" not in text
    pipeline, _ = load_docs(path)
    for executor in pipeline["deploymentSpec"]["executors"].values():
        plain_env = {e["name"] for e in executor["container"].get("env", [])}
        assert not plain_env & {"AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID",
                                "MLFLOW_TRACKING_PASSWORD"}


def test_platform_config_from_file_changes_placement(tmp_path):
    custom = tmp_path / "platform.yaml"
    custom.write_text("pools:\n  cpu: {node_selector: {pool: small}}\n"
                      "  a100: {node_selector: {pool: a100}, accelerator_type: nvidia.com/gpu,"
                      " accelerator_limit: 2}\nstages: {train: a100}\ndata_pvc: dermml-data\n")
    pipeline, platform = load_docs(compile_pipeline(TRAINING, str(tmp_path / "t.yaml"),
                                                    str(custom)))
    train_exec = executor_of(pipeline, "train-model")
    resources = pipeline["deploymentSpec"]["executors"][train_exec]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert k8s_config(platform, train_exec)["pvcMount"][0]["mountPath"] == "/data"


def test_unknown_pool_is_a_clear_error(tmp_path):
    custom = tmp_path / "platform.yaml"
    custom.write_text("stages: {train: tpu}\n")
    with pytest.raises(KeyError, match="tpu"):
        compile_pipeline(TRAINING, str(tmp_path / "t.yaml"), str(custom))


def test_shipped_platform_config_loads():
    platform = load_platform()
    assert platform.pool_for("train").accelerator_type == "nvidia.com/gpu"
    assert platform.pool_for("validate").accelerator_limit == 0
    assert platform.pool_for("train").node.instance_type == "g5.xlarge"
    assert platform.ray_job.worker_pool == platform.stages["train"] == "gpu"
    assert not platform.ray_job.enabled  # training runs in the train stage's pod by default


def test_images_come_from_the_platform_config(tmp_path, monkeypatch):
    custom = tmp_path / "platform.yaml"
    custom.write_text("images: {cpu: mirror.example/dermml:7, gpu: mirror.example/gpu:7}\n"
                      "pools: {cpu: {}, gpu: {accelerator_type: nvidia.com/gpu, "
                      "accelerator_limit: 1}}\nstages: {train: gpu}\n")
    pipeline, _ = load_docs(compile_pipeline(TRAINING, str(tmp_path / "t.yaml"), str(custom)))
    images = {name: executor["container"]["image"]
              for name, executor in pipeline["deploymentSpec"]["executors"].items()}
    assert images[executor_of(pipeline, "train-model")] == "mirror.example/gpu:7"
    assert images[executor_of(pipeline, "validate-data")] == "mirror.example/dermml:7"
    assert set(images.values()) == {"mirror.example/dermml:7", "mirror.example/gpu:7"}
    # $DERMML_IMAGE(_GPU) still override the file's images (CI builds).
    monkeypatch.setenv("DERMML_IMAGE_GPU", "ci.example/gpu:sha")
    assert load_platform(custom).images == {"cpu": "mirror.example/dermml:7",
                                            "gpu": "ci.example/gpu:sha"}
    custom.write_text("images: {cpu: mirror.example/dermml:7}\n")
    monkeypatch.delenv("DERMML_IMAGE_GPU")
    with pytest.raises(ConfigError, match="needs the 'gpu' image.*images.gpu"):
        compile_pipeline(TRAINING, str(tmp_path / "t.yaml"), str(custom))


def test_the_train_step_carries_the_platform_it_submits_rayjobs_with(tmp_path):
    pipeline, _ = load_docs(compile_pipeline(TRAINING, str(tmp_path / "t.yaml")))
    train = pipeline["root"]["dag"]["tasks"]["train-model"]["inputs"]["parameters"]
    platform = platform_from_json(train["platform"]["runtimeValue"]["constant"])
    assert platform.ray_job == load_platform().ray_job
    assert platform.pools["gpu"] == load_platform().pools["gpu"]


def test_a_preset_needing_more_cpus_than_the_pool_nodes_is_refused_at_compile(tmp_path):
    """A preset asking for 8 CPUs per worker on a g5.xlarge pool (4 vCPUs): without the check
    the train step's Ray would wait forever for CPUs no node has."""
    out = tmp_path / "t.yaml"
    params = {"task": "segdiff", "config": "configs/segdiff/ph2.yaml",
              "overrides": ["ray.cpus_per_worker=8"]}
    with pytest.raises(ConfigError) as error:
        compile_pipeline(TRAINING, str(out), params=params)
    message = str(error.value)
    for part in ("configs/segdiff/ph2.yaml", "ray.cpus_per_worker=8", "pool 'gpu'",
                 "4 vCPUs, 16Gi, 1 GPU (g5.xlarge)", "Ray has 4 CPUs",
                 "Lower ray.cpus_per_worker to 4 or less", "pools.gpu.node"):
        assert part in message, (part, message)
    assert not out.exists()
    # What the error says to do works, and the parameters become the pipeline's defaults.
    fixed = {**params, "overrides": ["ray.cpus_per_worker=4"]}
    pipeline, _ = load_docs(compile_pipeline(TRAINING, str(out), params=fixed))
    defaults = pipeline["root"]["inputDefinitions"]["parameters"]
    assert defaults["task"]["defaultValue"] == "segdiff"
    assert defaults["overrides"]["defaultValue"] == ["ray.cpus_per_worker=4"]


@pytest.mark.parametrize("task, preset", [
    ("segdiff", "configs/segdiff/isic2018.yaml"), ("segdiff", "configs/segdiff/ph2.yaml"),
    ("segdiff", "configs/segdiff/ham10000.yaml"),
    ("segmentation", "configs/segmentation/isic2018.yaml"),
    ("attributes", "configs/attributes/isic2018.yaml"),
    ("classification", "configs/classification/isic2019.yaml")])
def test_every_shipped_gpu_preset_fits_the_default_platform(tmp_path, task, preset):
    compile_pipeline(TRAINING, str(tmp_path / "t.yaml"), params={"task": task, "config": preset})


def test_gpu_training_on_a_platform_without_gpus_is_refused_at_submit():
    target = Target(host="http://127.0.0.1:9",  # nothing listens: no call may be made
                    platform=str(ROOT / "configs" / "platform" / "local.yaml"))
    with pytest.raises(ConfigError, match=r"ray.use_gpu=true.*pool 'cpu'.*accelerator_limit"):
        submit(TRAINING, target, {"overrides": ["ray.use_gpu=true"]})
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        schedule(TRAINING, Target(host="http://127.0.0.1:9"),
                 {"overrides": ["ray.cpus_per_worker=5"]}, cron="0 2 * * 1")


def test_a_pool_whose_pods_exceed_its_nodes_is_a_config_error(tmp_path):
    custom = tmp_path / "platform.yaml"
    custom.write_text("pools:\n  gpu:\n    cpu_request: '6'\n"
                      "    node: {cpu: 4, memory: 16Gi, gpus: 1, instance_type: g5.xlarge}\n")
    with pytest.raises(ConfigError, match=r"pools.gpu: cpu_request 6 is more than one node"
                                          r".*g5.xlarge"):
        load_platform(custom)


def test_submit_uploads_and_runs_with_namespace_sa_and_s3_root():
    with FakeKFP() as kfp_api:
        target = Target(host=kfp_api.url, experiment="derm-exp", namespace="dermml",
                        service_account="dermml-pipeline-runner",
                        pipeline_root="s3://dermml-pipelines/root")
        out = submit(TRAINING, target, {"demo_n": 500, "overrides": ["train.epochs=50"]})
        again = submit(TRAINING, target, {"demo_n": 500})

    assert len(kfp_api.pipelines) == 1  # second submit adds a version, not a pipeline
    assert len(kfp_api.versions) == 2
    assert out["pipeline_id"] == again["pipeline_id"]
    spec = kfp_api.versions[0]["spec"]
    assert spec["pipelineInfo"]["name"] == "dermml-training"
    run = kfp_api.runs[0]
    assert run["experiment_id"] == out["experiment_id"]
    assert kfp_api.experiments[out["experiment_id"]]["display_name"] == "derm-exp"
    assert run["service_account"] == "dermml-pipeline-runner"
    assert run["runtime_config"]["pipeline_root"] == "s3://dermml-pipelines/root"
    assert run["runtime_config"]["parameters"]["demo_n"] == 500
    assert run["pipeline_version_reference"]["pipeline_version_id"] == out["version_id"]
    assert out["url"].endswith(out["run_id"])


def test_schedule_creates_a_cron_recurring_run():
    with FakeKFP() as kfp_api:
        target = Target(host=kfp_api.url)
        out = schedule(TRAINING, target, {"demo_n": 100}, cron="0 2 * * 1")
    job = kfp_api.recurring_runs[0]
    assert out["cron"] == "0 0 2 * * 1"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * 1"
    assert job["max_concurrency"] in (1, "1")
    assert job["service_account"] == "pipeline-runner"


def test_bad_cron_and_unknown_params_are_rejected_before_any_call():
    target = Target(host="http://127.0.0.1:9")  # nothing listens: no call may be made
    with pytest.raises(ValueError, match="cron"):
        schedule(TRAINING, target, {}, cron="every monday")
    with pytest.raises(ConfigError, match="epochz"):
        submit(TRAINING, target, {"epochz": 3})


def test_local_platform_runs_every_stage_on_the_cpu_node_without_gpus(tmp_path):
    """kind has no GPU: a step asking for one would stay Pending forever."""
    path = compile_pipeline(TRAINING, str(tmp_path / "t.yaml"),
                            str(ROOT / "configs" / "platform" / "local.yaml"))
    pipeline, platform = load_docs(path)
    executors = pipeline["deploymentSpec"]["executors"]
    assert executors
    for name, executor in executors.items():
        container = executor["container"]
        assert "accelerator" not in container.get("resources", {}), name
        k8s = k8s_config(platform, name)
        assert k8s["nodeSelector"]["labels"] == {"dermml.io/pool": "cpu"}, name
        assert "tolerations" not in k8s, name
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["DERMML_S3_ENDPOINT"].startswith("http://minio.dermml"), name


def test_default_service_account_is_the_one_the_chart_binds_in_the_default_namespace():
    """Steps of a submitted run must be allowed to create RayJobs in the dermml namespace."""
    values = yaml.safe_load((ROOT / "charts" / "dermml" / "values.yaml").read_text())
    target = Target(host="http://kfp")
    assert {"name": target.service_account, "namespace": target.namespace} in \
        values["pipelineRunner"]["extraServiceAccounts"]


def test_validation_suite_overrides_and_warn_only_are_pipeline_parameters(tmp_path):
    """Official datasets may need a looser suite: the pipeline takes it without a code change."""
    pipeline, _ = load_docs(compile_pipeline(TRAINING, str(tmp_path / "t.yaml")))
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["validation_overrides"]["parameterType"] == "LIST"
    assert params["validation_warn_only"]["defaultValue"] is False
    assert params["validation_suite"]["defaultValue"] == ""
    task = pipeline["root"]["dag"]["tasks"]["validate-data"]["inputs"]["parameters"]
    assert task["overrides"]["componentInputParameter"] == "validation_overrides"
    assert task["warn_only"]["componentInputParameter"] == "validation_warn_only"
    assert task["custom_suite"]["componentInputParameter"] == "validation_suite"
