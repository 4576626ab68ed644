"""Training as a KubeRay RayJob: a valid manifest placed by the platform config, submitted and
awaited via the Kubernetes API."""

from pathlib import Path

import kubernetes_validate
import pytest
from conftest import tiny_overrides
from fake_k8s import FakeKubeRay
from mlflow.tracking import MlflowClient

from dermml.config import ConfigError
from dermml.orchestration import tracking
from dermml.orchestration.platform import PlatformConfig, load_platform
from dermml.orchestration.rayjob import rayjob_manifest
from dermml.training.run import resolve_config, train

DEFAULT_PLATFORM = Path(__file__).resolve().parents[2] / "configs" / "platform" / "default.yaml"


def rayjob_platform(**ray_job) -> PlatformConfig:
    """The shipped cloud platform with training as a RayJob (and ``ray_job`` changes)."""
    platform = load_platform(DEFAULT_PLATFORM)
    job = platform.ray_job.model_copy(update={"enabled": True, **ray_job})
    return platform.model_copy(update={"ray_job": job})


def validate_strictly(manifest: dict) -> None:
    """The CRD schema with unknown fields forbidden (as the chart's RayCluster is checked), and
    every pod template as a Kubernetes 1.33 Pod in strict mode."""
    from test_chart import KUBE_VERSION, crd_validator

    errors = list(crd_validator(manifest["apiVersion"], manifest["kind"]).iter_errors(manifest))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    spec = manifest["spec"]
    templates = [spec["submitterPodTemplate"]]
    if "rayClusterSpec" in spec:
        cluster = spec["rayClusterSpec"]
        templates += [cluster["headGroupSpec"]["template"],
                      *(g["template"] for g in cluster["workerGroupSpecs"])]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
        for container in template["spec"]["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert {"/tmp", "/dev/shm"} <= mounts


def gpu_cfg(*extra: str):
    sets = ["ray.use_gpu=true", "ray.num_workers=2", "ray.storage_path=s3://dermml/ray", *extra]
    return resolve_config("segmentation", None, sets)


def test_rayjob_manifest_is_placed_by_the_platform_config_and_matches_the_kuberay_crd():
    platform = rayjob_platform()
    manifest = rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123", platform)
    validate_strictly(manifest)
    spec = manifest["spec"]
    assert spec["entrypoint"] == "dermml train segmentation --resume 0123456789abcdef0123"
    assert manifest["metadata"]["namespace"] == platform.ray_job.namespace == "dermml"
    assert spec["backoffLimit"] == platform.ray_job.backoff_limit
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 2  # the task's need
    pod = worker["template"]["spec"]
    gpu_pool = platform.pools["gpu"]  # ray_job.worker_pool: its selector, taint and pod size
    assert pod["containers"][0]["resources"]["limits"] == {
        "cpu": gpu_pool.cpu_request, "memory": gpu_pool.memory_request, "nvidia.com/gpu": "1"}
    assert pod["containers"][0]["resources"]["requests"] == pod["containers"][0]["resources"][
        "limits"]
    assert pod["nodeSelector"] == gpu_pool.node_selector == {"dermml.io/pool": "gpu"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists",
                                   "effect": "NoSchedule"}]
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in head["template"]["spec"]
    for template in (head["template"], worker["template"], spec["submitterPodTemplate"]):
        container = template["spec"]["containers"][0]
        assert container["image"] == platform.images["gpu"]
        assert template["spec"]["serviceAccountName"] == "dermml-ray"
        sec = container["securityContext"]
        assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"]["drop"] == ["ALL"]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        secret_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]
                      if "valueFrom" in e}
        assert secret_env["AWS_SECRET_ACCESS_KEY"] == {"name": "dermml-s3",
                                                       "key": "AWS_SECRET_ACCESS_KEY"}
        assert {ref["name"] for ref in secret_env.values()} == {"dermml-s3", "dermml-mlflow"}


def test_a_custom_platform_places_the_rayjob_elsewhere(tmp_path):
    custom = tmp_path / "platform.yaml"
    custom.write_text(
        "images: {gpu: registry.example/dermml-gpu:9}\n"
        "pools:\n  a100:\n    node_selector: {pool: a100}\n    cpu_request: '7'\n"
        "    memory_request: 60Gi\n    accelerator_type: nvidia.com/gpu\n"
        "    accelerator_limit: 1\n    node: {cpu: 8, memory: 64Gi, gpus: 1}\n"
        "ray_job: {enabled: true, namespace: ml, worker_pool: a100, service_account: trainer}\n")
    manifest = rayjob_manifest("segmentation", gpu_cfg("ray.cpus_per_worker=6"), "abc",
                               load_platform(custom))
    validate_strictly(manifest)
    assert manifest["metadata"]["namespace"] == "ml"
    worker = manifest["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["nodeSelector"] == {"pool": "a100"} and "tolerations" not in worker
    assert worker["serviceAccountName"] == "trainer"
    container = worker["containers"][0]
    assert container["image"] == "registry.example/dermml-gpu:9"
    assert container["resources"]["limits"]["cpu"] == "7"
    assert not any("valueFrom" in e for e in container["env"])  # this platform lists none


def test_a_worker_asking_more_cpus_than_its_pod_has_is_a_config_error_before_any_job():
    with pytest.raises(ConfigError) as error:
        rayjob_manifest("segmentation", gpu_cfg("ray.cpus_per_worker=4"), "abc",
                        rayjob_platform())
    message = str(error.value)
    for part in ("ray.cpus_per_worker=4", "RayJob pod of pool 'gpu'", "3 CPUs",
                 "pools.gpu.cpu_request", "g5.xlarge", "to 3 or less", "default.yaml"):
        assert part in message, (part, message)


def test_rayjob_can_target_an_existing_raycluster():
    platform = rayjob_platform(cluster_selector={"ray.io/cluster": "dermml-ray"})
    manifest = rayjob_manifest("segmentation", gpu_cfg(), "abc", platform)
    validate_strictly(manifest)
    assert manifest["spec"]["clusterSelector"] == {"ray.io/cluster": "dermml-ray"}
    assert "rayClusterSpec" not in manifest["spec"]


@pytest.mark.integration
def test_rayjob_without_s3_checkpoints_is_refused_before_any_run(demo_data):
    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 1) + [
        "ray.enabled=true"])
    with pytest.raises(ConfigError, match="ray.storage_path"):
        train("segmentation", cfg, progress=False, platform=rayjob_platform())
    assert MlflowClient(tracking.tracking_uri()).get_experiment_by_name(
        "dermml/segmentation") is None


def test_train_submits_a_rayjob_that_trains_inside_the_same_run(demo_data, tmp_path,
                                                               monkeypatch, capsys):
    with FakeKubeRay(tmp_path) as kuberay:
        monkeypatch.setenv("KUBECONFIG", str(kuberay.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        # The job itself trains in-process here (no Ray cluster in the fake), 3 epochs.
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 3))
        outcome = train("segmentation", cfg, progress=False,
                        platform=rayjob_platform(poll_seconds=0.5))
        (job,) = kuberay.jobs.values()
        (attempt,) = kuberay.attempts(job["metadata"]["name"])

    assert job["metadata"]["labels"]["dermml.io/mlflow-run"] == outcome.run_id
    # The job's epoch lines are in the stage's own output, and the job is gone once it
    # succeeded (ray_job.delete_on_success).
    out = capsys.readouterr().out
    assert [line for line in out.splitlines()
            if line.startswith(f"[{attempt.pod}] epoch 3/3")], out[-3000:]
    assert kuberay.deleted == [job["metadata"]["name"]]
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(outcome.run_id)
    # Placement is the platform's: the run logs no ray.kubernetes.* (nor any platform) param.
    assert not [k for k in run.data.params if k.startswith("ray.kubernetes")]
    assert "ray.num_workers" in run.data.params
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(outcome.run_id, "val_dice")) == 3
    assert outcome.model_uri == run.data.tags["dermml.model_uri"]


@pytest.mark.integration
def test_failed_rayjob_fails_the_run(demo_data, tmp_path, monkeypatch):
    from dermml.orchestration.rayjob import RayJobFailed

    with FakeKubeRay(tmp_path) as kuberay:
        monkeypatch.setenv("KUBECONFIG", str(kuberay.kubeconfig(tmp_path / "kubeconfig")))
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 1) + [
            "data.image_size=30"])  # not divisible by 2**depth: the job's training fails
        with pytest.raises(RayJobFailed, match="FAILED"):
            train("segmentation", cfg, progress=False,
                  platform=rayjob_platform(poll_seconds=0.5, backoff_limit=0))
        assert kuberay.deleted == list(kuberay.jobs)  # a failed stage leaves no RayJob
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment_by_name(
        "dermml/segmentation")
    runs = MlflowClient(tracking.tracking_uri()).search_runs([experiment.experiment_id])
    assert runs[0].info.status == "FAILED"


def test_rayjob_pods_fall_under_the_charts_network_policies():
    """Default deny + the Ray policy of the chart select the RayJob's pods: they may talk to
    each other, MLflow, S3 and DNS, and nothing else."""
    from test_chart import NAMESPACE, RELEASE, render

    manifest = rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123",
                               rayjob_platform())
    spec = manifest["spec"]
    templates = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])]
    policies = {p["metadata"]["name"]: p for p in render() if p["kind"] == "NetworkPolicy"}
    assert manifest["metadata"]["namespace"] == NAMESPACE
    for name in (f"{RELEASE}-default-deny", f"{RELEASE}-allow-dns", f"{RELEASE}-ray"):
        selector = policies[name]["spec"]["podSelector"]["matchLabels"]
        for template in templates:
            assert selector.items() <= template["metadata"]["labels"].items(), name


def test_ray_kubernetes_keys_in_a_task_config_point_to_the_platform_config(tmp_path):
    with pytest.raises(ConfigError) as error:
        resolve_config("segmentation", None, ["ray.kubernetes.enabled=true"])
    assert "ray_job.enabled" in str(error.value) and "platform config" in str(error.value)
    preset = tmp_path / "old.yaml"
    preset.write_text("ray:\n  num_workers: 2\n  kubernetes: {enabled: true, worker_cpu: '7'}\n")
    with pytest.raises(ConfigError) as error:
        resolve_config("segmentation", str(preset), [])
    message = str(error.value)
    assert str(preset) in message and "ray.kubernetes.worker_cpu -> pools." in message
    # A run logged before the move still resumes: its stored ray.kubernetes is left out.
    from dermml.config import load_config
    from dermml.tasks.segmentation import SegmentationConfig

    old = {"task": "segmentation", "ray": {"num_workers": 3, "kubernetes": {"enabled": True}}}
    assert load_config(SegmentationConfig, base=old).ray.num_workers == 3
