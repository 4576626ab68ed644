"""KubeRay adapter: training as a ``RayJob`` created through the Kubernetes API.

The train component opens the MLflow run and logs the config, then submits a RayJob whose
entrypoint is ``dermml train TASK --resume RUN_ID``: the job reads the config back from that run
and trains in it. Checkpoints live under ``ray.storage_path`` (S3 on a cluster) named after the
run, so a worker lost on a spot node (Ray ``FailureConfig``) or a resubmitted job
(``backoffLimit``) resumes from the last checkpoint.

Where the job runs comes from the platform config (``platform.PlatformConfig``: ``ray_job``, the
worker pool, images, secrets); what it trains and what each worker needs, from the task config.

``run_rayjob`` is the stage's side of the job's life: create it, stream its submitter pods' logs
(the Ray driver's output) into the stage's log, follow KubeRay's retries (``Retrying``, up to
``backoffLimit``) to the end (Complete, Failed, ValidationFailed), and delete it when it fails,
when the stage is cancelled (SIGTERM: a KFP run cancelled; Ctrl-C) and, with
``ray_job.delete_on_success``, when it succeeds.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

from dermml.config import ConfigError
from dermml.orchestration.platform import (
    PlatformConfig,
    Pool,
    RayJobConfig,
    check_training_fits,
)
from dermml.tasks.base import TaskConfig

FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "DERMML_S3_ENDPOINT", "AWS_ENDPOINT_URL",
                 "AWS_DEFAULT_REGION", "DERMML_HOME", "DERMML_GIT_COMMIT")
RESTRICTED_CONTAINER = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
                        "runAsNonRoot": True, "capabilities": {"drop": ["ALL"]},
                        "seccompProfile": {"type": "RuntimeDefault"}}


HOME = "/home/dermml"
"""The images' home directory (the chart's ``homeDir``)."""


class RayJobFailed(RuntimeError):
    """The RayJob ended without success (Failed, ValidationFailed, a STOPPED job, or our wait
    ran out); the message carries KubeRay's reason and message."""


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


# ----------------------------------------------------------------------------- lifecycle
# KubeRay v1.7.0 (ray-operator/apis/ray/v1/rayjob_types.go, controllers/ray/rayjob_controller.go):
# jobDeploymentStatus is the RayJob's own lifecycle, jobStatus the Ray job's. A failed attempt
# with retries left (status.failed < spec.backoffLimit + 1) is written as jobStatus FAILED with
# jobDeploymentStatus Retrying; KubeRay then deletes the attempt's RayCluster and submitter Job
# and starts over (New -> Initializing -> Running). Only these are final:
COMPLETE = "Complete"
"""The Ray job ended: SUCCEEDED, or STOPPED (a failure for the stage)."""
FINAL_FAILURES = ("Failed", "ValidationFailed")
"""Failed: the last attempt failed (AppFailed), or a deadline or status check ran out, which
KubeRay never retries. ValidationFailed: the spec is invalid; nothing happens until it changes."""
API_OUTAGE_SECONDS = 300.0
"""How long the wait rides out a Kubernetes API it cannot reach before giving up (the job runs
on regardless; a stage that gives up deletes it)."""
SUBMITTER_POD_SELECTOR = "batch.kubernetes.io/job-name={}"
"""Pods of the submitter Job (K8sJobMode), which KubeRay names after the RayJob. Its container
runs ``ray job submit`` and then follows the job's logs: its log is the job's driver log."""


class RayJobCancelled(KeyboardInterrupt):
    """The stage was cancelled (SIGTERM: a KFP run cancelled or its pod deleted; or Ctrl-C)
    while its RayJob ran; the RayJob has been deleted."""


def _api_client(api_client=None):
    from dermml.orchestration.k8s import api_client as k8s_api_client

    return k8s_api_client(api_client)


def _custom_objects(api_client=None):
    from kubernetes import client

    return client.CustomObjectsApi(_api_client(api_client))


def _say(name: str, namespace: str, message: str) -> None:
    print(f"[rayjob {namespace}/{name}] {message}", flush=True)


def submit_rayjob(manifest: dict[str, Any], api_client=None) -> str:
    api = _custom_objects(api_client)
    meta = manifest["metadata"]
    api.create_namespaced_custom_object("ray.io", "v1", meta["namespace"], "rayjobs", manifest)
    _say(meta["name"], meta["namespace"], "created")
    return meta["name"]


def delete_rayjob(name: str, namespace: str, api_client=None) -> bool:
    """Delete the RayJob; KubeRay stops its Ray job and its RayCluster and submitter Job go with
    it. False when it was already gone."""
    from kubernetes.client.exceptions import ApiException

    try:
        _custom_objects(api_client).delete_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs", name, propagation_policy="Background",
            _request_timeout=60)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    _say(name, namespace, "deleted")
    return True


class SubmitterLogs:
    """Streams the logs of a RayJob's submitter pods (one per attempt, or per submitter retry)
    into this process's stdout, each line prefixed with its pod's name. ``poll`` starts a
    stream for every pod that has started since the last call; ``close`` waits for the open
    streams to end (a pod's stream ends when its container does)."""

    def __init__(self, name: str, namespace: str, api_client=None):
        from kubernetes import client

        self.name, self.namespace = name, namespace
        self.core = client.CoreV1Api(_api_client(api_client))
        self.started: set[str] = set()
        self.threads: list[threading.Thread] = []
        self.lock = threading.Lock()
        self.warned = False

    def poll(self) -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            pods = self.core.list_namespaced_pod(
                self.namespace, label_selector=SUBMITTER_POD_SELECTOR.format(self.name),
                _request_timeout=60).items
        except Exception as error:  # e.g. RBAC without pods/list: no logs, still the job
            if not self.warned:
                self.warned = True
                reason = (f"{error.status} {error.reason}" if isinstance(error, ApiException)
                          else str(error))
                _say(self.name, self.namespace, f"cannot list its submitter pods to stream "
                     f"their logs ({reason})")
            return
        for pod in sorted(pods, key=lambda p: p.metadata.creation_timestamp or 0):
            uid, phase = pod.metadata.uid, (pod.status.phase if pod.status else None)
            if uid in self.started or phase not in ("Running", "Succeeded", "Failed"):
                continue
            try:
                response = self.core.read_namespaced_pod_log(
                    pod.metadata.name, self.namespace, follow=True, _preload_content=False)
            except Exception:
                continue  # not readable yet (container creating): the next poll tries again
            self.started.add(uid)
            thread = threading.Thread(target=self._copy, args=(pod.metadata.name, response),
                                      name=f"logs-{pod.metadata.name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def _copy(self, pod: str, response) -> None:
        prefix, pending = f"[{pod}] ", b""
        try:
            while True:
                data = response.read1(65536)  # what has arrived, line by line as it comes
                if not data:
                    break
                *lines, pending = (pending + data).split(b"\n")
                self._write(prefix, lines)
        except Exception as error:  # a dropped stream costs log lines, never the stage
            self._write(prefix, [f"(log stream ended: {error})".encode()])
        finally:
            if pending:
                self._write(prefix, [pending])
            response.release_conn()

    def _write(self, prefix: str, lines: list[bytes]) -> None:
        if not lines:
            return
        text = "".join(f"{prefix}{line.decode(errors='replace').rstrip()}\n" for line in lines)
        with self.lock:
            sys.stdout.write(text)
            sys.stdout.flush()

    def close(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))


def _describe(status: dict[str, Any]) -> str:
    parts = [status.get("jobDeploymentStatus") or "New"]
    if status.get("jobStatus"):
        parts.append(f"job {status['jobStatus']}")
    if status.get("reason"):
        parts.append(status["reason"])
    text = ", ".join(parts)
    return f"{text}: {status['message']}" if status.get("message") else text


def _get_rayjob(api, name: str, namespace: str, poll_seconds: float) -> dict[str, Any]:
    """The RayJob, riding out an unreachable or overloaded API server for
    ``API_OUTAGE_SECONDS``; a RayJob deleted by someone else ends the wait."""
    from kubernetes.client.exceptions import ApiException

    outage_since = None
    while True:
        try:
            return api.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", name,
                                                    _request_timeout=60)
        except ApiException as error:
            if error.status == 404:
                raise RayJobFailed(f"RayJob {namespace}/{name} was deleted while the stage "
                                   "waited for it") from None
            if error.status not in (0, 429) and error.status < 500:
                raise
            problem = f"{error.status} {error.reason}"
        except Exception as error:  # connection refused, reset, timed out
            problem = str(error)
        outage_since = outage_since or time.monotonic()
        if time.monotonic() - outage_since > API_OUTAGE_SECONDS:
            raise RayJobFailed(f"RayJob {namespace}/{name}: the Kubernetes API did not answer "
                               f"for {API_OUTAGE_SECONDS:.0f}s ({problem})")
        _say(name, namespace, f"Kubernetes API: {problem}; trying again")
        time.sleep(poll_seconds)


def wait_rayjob(name: str, namespace: str, poll_seconds: float = 15.0,
                timeout: float = 86400.0, api_client=None, logs: bool = True) -> dict[str, Any]:
    """Poll the RayJob until KubeRay ends it; returns its status when the Ray job SUCCEEDED,
    raises ``RayJobFailed`` otherwise (or after ``timeout`` seconds).

    A failed attempt that KubeRay retries (``jobDeploymentStatus: Retrying``, up to
    ``spec.backoffLimit`` times) is followed, not failed on: only Complete, Failed and
    ValidationFailed end the wait. With ``logs``, the submitter pods' logs (the Ray job's
    driver output) are streamed into this process's stdout meanwhile."""
    api = _custom_objects(api_client)
    streams = SubmitterLogs(name, namespace, api_client) if logs else None
    deadline = time.monotonic() + timeout
    seen, failed_attempts = "", 0
    try:
        while True:
            obj = _get_rayjob(api, name, namespace, poll_seconds)
            status = obj.get("status") or {}
            if streams is not None:
                streams.poll()
            state, job_status = status.get("jobDeploymentStatus"), status.get("jobStatus")
            attempts = (obj.get("spec") or {}).get("backoffLimit", 0) + 1
            if int(status.get("failed") or 0) > failed_attempts:
                failed_attempts = int(status["failed"])
                if state != "Failed":
                    _say(name, namespace, f"attempt {failed_attempts} of {attempts} failed "
                         f"({status.get('reason') or job_status or 'FAILED'}); KubeRay "
                         "retries it")
            if _describe(status) != seen:
                seen = _describe(status)
                _say(name, namespace, seen)
            if state == COMPLETE and job_status == "SUCCEEDED":
                return status
            if state == COMPLETE or state in FINAL_FAILURES:
                reason = f", {status['reason']}" if status.get("reason") else ""
                message = f": {status['message']}" if status.get("message") else ""
                raise RayJobFailed(
                    f"RayJob {namespace}/{name} ended {state} (job {job_status or 'not run'}"
                    f"{reason}; {int(status.get('failed') or 0)} failed attempt(s), at most "
                    f"{attempts}){message}")
            if time.monotonic() >= deadline:
                raise RayJobFailed(f"RayJob {namespace}/{name} did not finish in "
                                   f"{timeout:.0f}s (last: {seen})")
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        streams = None  # cancelled: the job is deleted next, and its streams end with it
        raise
    finally:
        if streams is not None:
            streams.poll()  # an attempt that started and ended between two polls
            streams.close()  # the tail of the last attempt's log


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises ``RayJobCancelled`` in the main thread (the default would end
    the process without cleanup). KFP cancels a run by terminating its step pods, and Kubernetes
    stops a container with SIGTERM. A second signal while cleaning up is ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def cancel(signum, frame):
        nonlocal fired
        if fired:
            return
        fired = True
        raise RayJobCancelled(f"received {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, cancel)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def wait_timeout(job: RayJobConfig) -> float:
    """How long the stage waits at most: KubeRay's deadline counts per attempt."""
    return (job.backoff_limit + 1) * job.active_deadline_seconds + 600.0


def run_rayjob(manifest: dict[str, Any], job: RayJobConfig,
               api_client=None) -> dict[str, Any]:
    """Create the RayJob, stream its logs, wait for its end through KubeRay's retries, and
    delete it when it fails, when this stage is cancelled (SIGTERM or Ctrl-C while waiting) or,
    with ``job.delete_on_success`` (``ray_job`` of the platform config), when it succeeds."""
    from kubernetes.client.exceptions import ApiException

    name, namespace = manifest["metadata"]["name"], manifest["metadata"]["namespace"]
    api_client = _api_client(api_client)
    with _sigterm_raises():
        try:
            submit_rayjob(manifest, api_client)
        except ApiException:
            raise  # not created (e.g. it exists, or no RBAC): nothing of ours to delete
        except BaseException:
            _delete_quietly(name, namespace, api_client)  # cancelled while creating it
            raise
        try:
            status = wait_rayjob(name, namespace, job.poll_seconds, wait_timeout(job),
                                 api_client)
        except KeyboardInterrupt:
            _say(name, namespace, "stage cancelled: deleting the RayJob")
            _delete_quietly(name, namespace, api_client)
            raise
        except BaseException:
            _delete_quietly(name, namespace, api_client)
            raise
        if job.delete_on_success:
            delete_rayjob(name, namespace, api_client)
    return status


def _delete_quietly(name: str, namespace: str, api_client) -> None:
    """Delete the RayJob of a failed or cancelled stage; a failure to delete is reported, the
    stage's own error is what it raises."""
    try:
        delete_rayjob(name, namespace, api_client)
    except Exception as error:
        _say(name, namespace, f"could not delete it ({error}); delete it with kubectl -n "
             f"{namespace} delete rayjob {name}")


def tune_as_rayjob(task: str, cfg: TaskConfig, concurrent: int, run_id: str,
                   platform: PlatformConfig, api_client=None) -> dict[str, Any]:
    """Run the search of parent run ``run_id`` as a RayJob whose ``concurrent x
    ray.num_workers`` worker pods hold ``concurrent`` trials at once (``run_rayjob``)."""
    manifest = rayjob_manifest(task, cfg, run_id, platform, tune_entrypoint(task, run_id),
                               concurrent * cfg.ray.num_workers)
    return run_rayjob(manifest, platform.ray_job, api_client)


def train_as_rayjob(task: str, cfg: TaskConfig, run_id: str, platform: PlatformConfig,
                    api_client=None) -> dict[str, Any]:
    """Run the training RayJob for ``run_id`` (placed by ``platform``; ``run_rayjob``)."""
    return run_rayjob(rayjob_manifest(task, cfg, run_id, platform), platform.ray_job,
                      api_client)
