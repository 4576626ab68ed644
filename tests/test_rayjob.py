"""Training as a KubeRay RayJob: a valid manifest, submitted and awaited via the Kubernetes API."""


import kubernetes_validate
import pytest
from conftest import tiny_overrides
from fake_k8s import FakeKubeRay
from mlflow.tracking import MlflowClient

from dermml.orchestration import tracking
from dermml.orchestration.rayjob import rayjob_manifest
from dermml.training.run import resolve_config, train


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


def gpu_cfg(**extra):
    sets = ["ray.use_gpu=true", "ray.num_workers=2", "ray.kubernetes.enabled=true",
            "ray.storage_path=s3://dermml/ray"]
    sets += [f"{k}={v}" for k, v in extra.items()]
    return resolve_config("segmentation", None, sets)


def test_rayjob_manifest_matches_the_kuberay_crd_and_asks_for_gpus():
    manifest = rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123")
    validate_strictly(manifest)
    spec = manifest["spec"]
    assert spec["entrypoint"].startswith("dermml train segmentation --resume 0123456789abcdef")
    worker = spec["rayClusterSpec"]["workerGroupSpecs"][0]
    assert worker["replicas"] == 2
    pod = worker["template"]["spec"]
    assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"dermml.io/pool": "gpu"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    head = spec["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert "nodeSelector" not in head["template"]["spec"]
    for template in (head["template"], worker["template"], spec["submitterPodTemplate"]):
        sec = template["spec"]["containers"][0]["securityContext"]
        assert sec["allowPrivilegeEscalation"] is False and sec["capabilities"]["drop"] == ["ALL"]
        assert template["spec"]["securityContext"]["runAsNonRoot"] is True
        env_from = template["spec"]["containers"][0]["envFrom"]
        assert {e["secretRef"]["name"] for e in env_from} == {"dermml-s3", "dermml-mlflow"}


def test_rayjob_can_target_an_existing_raycluster():
    cfg = gpu_cfg(**{"ray.kubernetes.cluster_selector": "{ray.io/cluster: dermml-ray}"})
    manifest = rayjob_manifest("segmentation", cfg, "abc")
    validate_strictly(manifest)
    assert manifest["spec"]["clusterSelector"] == {"ray.io/cluster": "dermml-ray"}
    assert "rayClusterSpec" not in manifest["spec"]


@pytest.mark.integration
def test_rayjob_without_s3_checkpoints_is_refused_before_any_run(demo_data):
    from dermml.config import ConfigError

    cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 1) + [
        "ray.enabled=true", "ray.kubernetes.enabled=true"])
    with pytest.raises(ConfigError, match="ray.storage_path"):
        train("segmentation", cfg, progress=False)
    assert MlflowClient(tracking.tracking_uri()).get_experiment_by_name(
        "dermml/segmentation") is None


def test_train_submits_a_rayjob_that_trains_inside_the_same_run(demo_data, tmp_path,
                                                               monkeypatch):
    with FakeKubeRay(tmp_path) as kuberay:
        monkeypatch.setenv("KUBECONFIG", str(kuberay.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        # The job itself trains in-process here (no Ray cluster in the fake), 3 epochs.
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 3) + [
            "ray.kubernetes.enabled=true", "ray.kubernetes.poll_seconds=0.5"])
        outcome = train("segmentation", cfg, progress=False)
        (job,) = kuberay.jobs.values()

    assert job["metadata"]["labels"]["dermml.io/mlflow-run"] == outcome.run_id
    client = MlflowClient(tracking.tracking_uri())
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(outcome.run_id, "val_dice")) == 3
    assert outcome.model_uri == run.data.tags["dermml.model_uri"]


@pytest.mark.integration
def test_failed_rayjob_fails_the_run(demo_data, tmp_path, monkeypatch):
    from dermml.orchestration.rayjob import RayJobFailed

    with FakeKubeRay(tmp_path) as kuberay:
        monkeypatch.setenv("KUBECONFIG", str(kuberay.kubeconfig(tmp_path / "kubeconfig")))
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 1) + [
            "ray.kubernetes.enabled=true", "ray.kubernetes.poll_seconds=0.5",
            "data.image_size=30"])  # not divisible by 2**depth: the job's training fails
        with pytest.raises(RayJobFailed, match="FAILED"):
            train("segmentation", cfg, progress=False)
    experiment = MlflowClient(tracking.tracking_uri()).get_experiment_by_name(
        "dermml/segmentation")
    runs = MlflowClient(tracking.tracking_uri()).search_runs([experiment.experiment_id])
    assert runs[0].info.status == "FAILED"


def test_rayjob_pods_fall_under_the_charts_network_policies():
    """Default deny + the Ray policy of the chart select the RayJob's pods: they may talk to
    each other, MLflow, S3 and DNS, and nothing else."""
    from test_chart import NAMESPACE, RELEASE, render

    manifest = rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123")
    spec = manifest["spec"]
    templates = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"],
                 *(g["template"] for g in spec["rayClusterSpec"]["workerGroupSpecs"])]
    policies = {p["metadata"]["name"]: p for p in render() if p["kind"] == "NetworkPolicy"}
    assert manifest["metadata"]["namespace"] == NAMESPACE
    for name in (f"{RELEASE}-default-deny", f"{RELEASE}-allow-dns", f"{RELEASE}-ray"):
        selector = policies[name]["spec"]["podSelector"]["matchLabels"]
        for template in templates:
            assert selector.items() <= template["metadata"]["labels"].items(), name
