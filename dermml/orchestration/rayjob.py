"""KubeRay adapter: training as a ``RayJob`` created through the Kubernetes API.

The train component opens the MLflow run and logs the config, then submits a RayJob whose
entrypoint is ``dermml train TASK --resume RUN_ID``: the job reads the config back from that run
and trains in it. Checkpoints live under ``ray.storage_path`` (S3 on a cluster) named after the
run, so a worker lost on a spot node (Ray ``FailureConfig``) or a resubmitted job
(``backoffLimit``) resumes from the last checkpoint.

Where the job runs comes from the platform config (``platform.PlatformConfig``: ``ray_job``, the
worker pool, images, secrets); what it trains and what each worker needs, from the task config.
"""

from __future__ import annotations

import os
import re
import shlex
import time
from typing import Any

from dermml.config import ConfigError
from dermml.orchestration.platform import PlatformConfig, Pool, check_training_fits
from dermml.tasks.base import TaskConfig

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "DERMML_S3_ENDPOINT", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "DERMML_HOME", "DERMML_GIT_COMMIT")
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


HOME = "/home/dermml"
"""The images' home directory (the chart's ``homeDir``)."""


class RayJobFailed(RuntimeError):
    """The RayJob ended in FAILED (or its deadline passed); the message carries KubeRay's."""


def job_name(task: str, run_id: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"dermml-{task}-{run_id[:12]}".lower())


def entrypoint(task: str, run_id: str) -> str:
    """The job's command: train in the run (no --platform: the job trains where it is)."""
    return shlex.join(["dermml", "train", task, "--resume", run_id])


def tune_entrypoint(task: str, run_id: str) -> list[str]:
    """A search's job command: run the search recorded in its parent run (``dermml tune``)."""
    return ["dermml", "tune", task, "--run", run_id]


def _env() -> list[dict[str, str]]:
    return [{"name": k, "value": os.environ[k]} for k in FORWARDED_ENV if k in os.environ]


def _secret_env(platform: PlatformConfig) -> list[dict[str, Any]]:
    return [{"name": env, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}}
            for secret in platform.secrets for key, env in secret.keys.items()]


def _container(name: str, platform: PlatformConfig, cpu: str, memory: str, gpus: int = 0,
               gpu_resource: str = "nvidia.com/gpu") -> dict[str, Any]:
    resources: dict[str, Any] = {"cpu": cpu, "memory": memory}
    if gpus:
        resources[gpu_resource] = str(gpus)
    job = platform.ray_job
    return {"name": name, "image": platform.image(job.image, "ray_job.image"),
            "env": [{"name": "HOME", "value": HOME}, *_env(), *_secret_env(platform)],
            "resources": {"requests": dict(resources), "limits": dict(resources)},
            # Read-only root FS as in the chart: Ray writes its session files under /tmp, its
            # auth token under $HOME and its object store in /dev/shm, all emptyDirs.
            "securityContext": RESTRICTED_CONTAINER,
            "volumeMounts": [{"name": "ray-tmp", "mountPath": "/tmp"},
                             {"name": "home", "mountPath": HOME},
                             {"name": "dshm", "mountPath": "/dev/shm"}]}


def pod_labels(platform: PlatformConfig) -> dict[str, str]:
    """Labels of every RayJob pod: the chart's Ray pod selector (release
    ``ray_job.helm_release``), so the chart's default-deny and Ray NetworkPolicies cover these
    pods too (Ray traffic among them, MLflow, S3 and DNS, nothing else)."""
    return {"app.kubernetes.io/name": "dermml",
            "app.kubernetes.io/instance": platform.ray_job.helm_release,
            "app.kubernetes.io/part-of": "dermml", "app.kubernetes.io/component": "ray"}


def _pod(container: dict, platform: PlatformConfig, pool: Pool | None) -> dict[str, Any]:
    """A pod template; placed on ``pool`` (node selector, tolerations) when given."""
    job = platform.ray_job
    spec: dict[str, Any] = {
        "serviceAccountName": job.service_account, "containers": [container],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 10001,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "volumes": [{"name": "ray-tmp", "emptyDir": {"sizeLimit": "20Gi"}},
                    {"name": "home", "emptyDir": {"sizeLimit": "1Gi"}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory",
                                                  "sizeLimit": job.shm_size}}]}
    if pool is not None:
        if pool.node_selector:
            spec["nodeSelector"] = dict(pool.node_selector)
        if pool.tolerations:
            spec["tolerations"] = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    return {"metadata": {"labels": pod_labels(platform)}, "spec": spec}


def check_config(cfg: TaskConfig) -> None:
    """Refuse a RayJob whose checkpoints would die with its pods."""
    if cfg.ray.enabled and not cfg.ray.storage_path.startswith("s3://"):
        raise ConfigError(
            f"ray.storage_path: {cfg.ray.storage_path or '(empty: a local folder)'} is lost with "
            "the RayJob's pods, so a lost worker or a resubmitted job could not resume; set "
            "ray.storage_path=s3://BUCKET/ray")


def rayjob_manifest(task: str, cfg: TaskConfig, run_id: str, platform: PlatformConfig,
                    command: list[str] | None = None,
                    workers: int | None = None) -> dict[str, Any]:
    """The RayJob for training ``task`` in MLflow run ``run_id``, placed by ``platform``.

    ``command`` replaces the entrypoint and ``workers`` the number of worker pods (one per Ray
    Train worker: ``ray.num_workers``); a search runs ``concurrent`` trials' workers at once."""
    check_config(cfg)
    check_training_fits(platform.model_copy(update={"ray_job": platform.ray_job.model_copy(
        update={"enabled": True})}), cfg.ray)
    job = platform.ray_job
    spec: dict[str, Any] = {
        "entrypoint": shlex.join(command) if command else entrypoint(task, run_id),
        "submissionMode": "K8sJobMode",
        "backoffLimit": job.backoff_limit,
        "activeDeadlineSeconds": job.active_deadline_seconds,
        "submitterPodTemplate": _pod(_container("submitter", platform, "500m", "1G"),
                                     platform, None),
    }
    if job.cluster_selector:
        spec["clusterSelector"] = dict(job.cluster_selector)
    else:
        spec["shutdownAfterJobFinishes"] = True
        spec["ttlSecondsAfterFinished"] = 600
        pool = platform.pool_named(job.worker_pool, "ray_job.worker_pool")
        gpus = pool.accelerator_limit if cfg.ray.use_gpu else 0
        workers = workers or cfg.ray.num_workers
        worker = _container("ray-worker", platform, pool.cpu_request, pool.memory_request, gpus,
                            pool.accelerator_type or "nvidia.com/gpu")
        spec["rayClusterSpec"] = {
            "headGroupSpec": {
                "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                "template": _pod(_container("ray-head", platform, job.head_cpu,
                                            job.head_memory), platform, None)},
            "workerGroupSpecs": [{
                "groupName": "gpu-workers" if gpus else "cpu-workers",
                "replicas": workers, "minReplicas": workers, "maxReplicas": workers,
                "rayStartParams": {},
                # CPU-only workers keep the pool's pod size but may run on any node.
                "template": _pod(worker, platform, pool if gpus else None)}],
        }
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": job_name(task, run_id), "namespace": job.namespace,
                         "labels": {"app.kubernetes.io/part-of": "dermml",
                                    "dermml.io/task": task, "dermml.io/mlflow-run": run_id}},
            "spec": spec}


def _custom_objects(api_client=None):
    from kubernetes import client, config

    if api_client is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            # The library reads $KUBECONFIG once at import; read it now.
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.CustomObjectsApi(api_client)


def submit_rayjob(manifest: dict[str, Any], api_client=None) -> str:
    api = _custom_objects(api_client)
    meta = manifest["metadata"]
    api.create_namespaced_custom_object("ray.io", "v1", meta["namespace"], "rayjobs", manifest)
    return meta["name"]


def wait_rayjob(name: str, namespace: str, poll_seconds: float = 15.0,
                timeout: float = 86400.0, api_client=None) -> dict[str, Any]:
    """Poll the RayJob until it succeeds (returns its status) or fails (raises)."""
    api = _custom_objects(api_client)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        obj = api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name)
        status = obj.get("status") or {}
        if status.get("jobStatus") == "SUCCEEDED":
            return status
        if status.get("jobStatus") in ("FAILED", "STOPPED") or \
                status.get("jobDeploymentStatus") == "Failed":
            raise RayJobFailed(f"RayJob {namespace}/{name} {status.get('jobStatus')}: "
                               f"{status.get('reason', '')} {status.get('message', '')}".strip())
        time.sleep(poll_seconds)
    raise RayJobFailed(f"RayJob {namespace}/{name} did not finish in {timeout:.0f}s")


def tune_as_rayjob(task: str, cfg: TaskConfig, concurrent: int, run_id: str,
                   platform: PlatformConfig, api_client=None) -> dict[str, Any]:
    """Submit the search of parent run ``run_id`` as a RayJob whose ``concurrent x
    ray.num_workers`` worker pods hold ``concurrent`` trials at once, and wait for it."""
    manifest = rayjob_manifest(task, cfg, run_id, platform, tune_entrypoint(task, run_id),
                               concurrent * cfg.ray.num_workers)
    name = submit_rayjob(manifest, api_client)
    job = platform.ray_job
    return wait_rayjob(name, job.namespace, job.poll_seconds, job.active_deadline_seconds,
                       api_client)


def train_as_rayjob(task: str, cfg: TaskConfig, run_id: str, platform: PlatformConfig,
                    api_client=None) -> dict[str, Any]:
    """Submit the training RayJob for ``run_id`` (placed by ``platform``) and wait for it."""
    manifest = rayjob_manifest(task, cfg, run_id, platform)
    name = submit_rayjob(manifest, api_client)
    job = platform.ray_job
    return wait_rayjob(name, job.namespace, job.poll_seconds, job.active_deadline_seconds,
                       api_client)
