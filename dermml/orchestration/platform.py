"""The platform config: where and how things run on Kubernetes, owned here and nowhere else.

A platform config (``configs/platform/*.yaml``) names the container images, the node pools (node
selector, tolerations, pod size, accelerators, and the size of one node), which pool each
pipeline stage runs on, the Secrets and plain env every pod gets, and how training runs as a
KubeRay RayJob. A task config says only what to train and what its Ray workers need
(``ray.num_workers``, ``ray.use_gpu``, ``ray.cpus_per_worker``);
``check_training_fits`` refuses a task whose workers no node of the platform could take.

``k8s.place`` applies this config to pipeline steps, ``rayjob.rayjob_manifest`` to RayJobs;
its ``serving`` section says whether and how KServe follows the registry's champion
(``kserve.py``: namespace, canary share, how a canary is judged).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from decimal import Decimal, InvalidOperation
from typing import Any, Literal

from pydantic import Field, PrivateAttr, model_validator

from dermml.config import ConfigError, Section, load_config, shipped_config

IMAGE_MARKER = "<platform image: {}>"
"""What a component declares as its base image: the image *flavour* it needs (``cpu``: slim;
``gpu``: CUDA torch and pytorch3d). ``k8s.place`` replaces it by the platform's image of that
flavour; unreplaced it is no valid image reference, so it can never be pulled."""

_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "k": 10**3,
            "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def parse_quantity(value: str | float | int, what: str = "quantity") -> Decimal:
    """A Kubernetes quantity (``500m``, ``3``, ``12Gi``, ``1G``) as a number (cores, bytes)."""
    text = str(value).strip()
    number, factor = text, Decimal(1)
    for suffix, scale in (*_BINARY.items(), *_DECIMAL.items()):
        if text.endswith(suffix) and suffix != text:
            number, factor = text[: -len(suffix)], Decimal(scale)
            break
    try:
        return Decimal(number) * factor
    except InvalidOperation:
        raise ConfigError(f"{what}: {value!r} is not a Kubernetes quantity (e.g. 500m, 3, "
                          "12Gi)") from None


def image_flavour(name: str) -> str:
    """The base image a component declares: ``IMAGE_MARKER`` for flavour ``name``."""
    return IMAGE_MARKER.format(name)


def flavour_of(image: str | None) -> str | None:
    """The flavour behind an ``image_flavour`` marker, or None for a real image reference."""
    prefix, suffix = IMAGE_MARKER.split("{}")
    if image and image.startswith(prefix) and image.endswith(suffix):
        return image[len(prefix): len(image) - len(suffix)]
    return None


RAYJOB_STAGES = frozenset({"train", "tune"})
"""Stages whose step, with ``ray_job.enabled``, submits a KubeRay RayJob and waits for it
instead of running Ray in its own pod."""

STEP_LABELS = {"app.kubernetes.io/part-of": "dermml",
               "app.kubernetes.io/component": "pipeline-runner"}
"""Default labels of pipeline step pods: what the chart's NetworkPolicies admit from the
namespaces where KFP runs DermML's steps (``networkPolicy.pipelinePodLabels``)."""


class Toleration(Section):
    """A Kubernetes toleration."""

    key: str
    """Taint key, e.g. nvidia.com/gpu."""
    operator: str = "Exists"
    """Exists or Equal."""
    value: str | None = None
    """Taint value (operator Equal only)."""
    effect: str | None = "NoSchedule"
    """NoSchedule, PreferNoSchedule or NoExecute."""


class NodeSize(Section):
    """What one node of a pool has: its instance type's vCPUs, memory and accelerators."""

    cpu: float
    """vCPUs of one node (g5.xlarge: 4). Ray in a pod without a CPU limit sees all of them."""
    memory: str
    """Memory of one node (g5.xlarge: 16Gi); the kubelet keeps ~1Gi of it."""
    gpus: int = 0
    """Accelerators of one node."""
    instance_type: str = ""
    """The cloud instance type (g5.xlarge), named in messages."""

    def describe(self) -> str:
        gpus = f", {self.gpus} GPU{'s' if self.gpus != 1 else ''}" if self.gpus else ""
        kind = f" ({self.instance_type})" if self.instance_type else ""
        return f"{self.cpu:g} vCPUs, {self.memory}{gpus}{kind}"


class Pool(Section):
    """A node pool and the size of the pods placed on it."""

    node_selector: dict[str, str] = {}
    """Node labels the pod must match."""
    tolerations: list[Toleration] = []
    """Taints the pod tolerates (GPU pools are tainted)."""
    cpu_request: str = "1"
    """CPU request of a pod (a RayJob worker pod gets it as request and limit)."""
    memory_request: str = "2Gi"
    """Memory request of a pod (a RayJob worker pod gets it as request and limit)."""
    cpu_limit: str | None = None
    """CPU limit of a pipeline step (unset: none)."""
    memory_limit: str | None = "8Gi"
    """Memory limit of a pipeline step."""
    accelerator_type: str | None = None
    """Accelerator resource, e.g. nvidia.com/gpu."""
    accelerator_limit: int = 0
    """Accelerators per pod."""
    node: NodeSize | None = None
    """Size of one node of the pool; unset (unknown, e.g. kind): task needs are checked against
    the pod size only. Pod requests and limits must fit it."""

    def describe_node(self) -> str:
        return self.node.describe() if self.node else "of unknown size (no node set)"

    @model_validator(mode="after")
    def _pods_fit_the_node(self) -> Pool:
        node = self.node
        if node is None:
            return self
        for key, value, room in (
                ("cpu_request", self.cpu_request, Decimal(str(node.cpu))),
                ("cpu_limit", self.cpu_limit, Decimal(str(node.cpu))),
                ("memory_request", self.memory_request, parse_quantity(node.memory, "memory")),
                ("memory_limit", self.memory_limit, parse_quantity(node.memory, "memory")),
                ("accelerator_limit", self.accelerator_limit, Decimal(node.gpus))):
            if value is not None and parse_quantity(value, key) > room:
                raise ValueError(f"{key} {value} is more than one node of the pool has "
                                 f"({node.describe()}): no node could take the pod; lower "
                                 f"{key}, or set node to the pool's real node size")
        return self


class SecretEnv(Section):
    """An existing Secret whose keys become env vars of every pod."""

    name: str
    """Secret name."""
    keys: dict[str, str]
    """Secret key -> env var name."""


class RayJobConfig(Section):
    """Training as a KubeRay RayJob, submitted by the train stage (or ``dermml train
    --platform FILE``): the job trains inside the stage's MLflow run."""

    enabled: bool = False
    """Submit training as a RayJob; false trains in the train stage's own pod (local Ray, or
    the cluster at the task's ``ray.address``)."""
    namespace: str = "dermml"
    """Namespace of the RayJob."""
    helm_release: str = "dermml"
    """Release of charts/dermml in that namespace: its NetworkPolicies select the RayJob's pods
    by this release's labels."""
    cluster_selector: dict[str, str] = {}
    """Labels of an existing RayCluster to run on (e.g. ray.io/cluster: dermml-ray); empty
    creates a RayCluster for the job and deletes it afterwards."""
    image: str = "gpu"
    """Image flavour of the head and worker pods (a key of ``images``)."""
    service_account: str = "dermml-ray"
    """Service account of the Ray pods."""
    worker_pool: str = "gpu"
    """Pool of the worker pods: node selector, tolerations, accelerators, and its cpu_request and
    memory_request as each worker's request and limit. Workers of CPU-only training
    (ray.use_gpu=false) keep that size but get no GPU, node selector or tolerations."""
    head_cpu: str = "2"
    """Head pod CPU (the head runs no training: num-cpus 0; no node selector)."""
    head_memory: str = "8Gi"
    """Head pod memory."""
    shm_size: str = "2Gi"
    """Size of /dev/shm (Ray's object store and DataLoader workers; counts as memory)."""
    backoff_limit: int = 2
    """Resubmissions of a failed job; each resumes from the run's last checkpoint. The stage
    follows KubeRay's retries (``jobDeploymentStatus: Retrying``) to the job's end."""
    active_deadline_seconds: int = 86400
    """Give up on one attempt after this long (KubeRay's deadline counts per attempt)."""
    poll_seconds: float = 15.0
    """How often the train stage checks the job (and looks for new submitter pods to stream
    the logs of)."""
    delete_on_success: bool = True
    """Delete the RayJob (its RayCluster and submitter Job with it) when it succeeds; its log
    is already in the stage's log. A failed or cancelled stage always deletes it."""
    step_pool: str = "cpu"
    """Pool of the pipeline step that submits the RayJob and waits for it (train and tune with
    ray_job enabled): it only polls and streams logs, so a CPU pool (its node selector and
    tolerations), with the small size below and no accelerator."""
    step_image: str = "cpu"
    """Image flavour of that step (a key of ``images``): no CUDA is needed to submit a job."""
    step_cpu_request: str = "250m"
    """CPU request of that step."""
    step_memory_request: str = "1Gi"
    """Memory request of that step (it reads the manifest and opens the MLflow run)."""
    step_memory_limit: str = "4Gi"
    """Memory limit of that step."""


class CanaryAnalysis(Section):
    """How the rollout step judges a canary (``dermml.orchestration.kserve.rollout``): the
    canary revision must become ready, then its error rate and p95 latency, read from
    Prometheus over the analysis window, must stay under the limits."""

    prometheus_url: str = "http://prometheus-operated.monitoring.svc:9090"
    """Prometheus HTTP API the step queries (``/api/v1/query``); it must scrape Knative's
    queue-proxy metrics of the serving namespace."""
    analysis_seconds: float = 600.0
    """How long the canary takes its share of traffic before it is judged (the query window
    grows with it, up to this long)."""
    poll_seconds: float = 30.0
    """How often the step reads the InferenceService and the metrics meanwhile; a canary past
    the error limit with enough requests is rolled back at once."""
    ready_timeout_seconds: float = 900.0
    """How long a new revision may take to become ready (download and load the model) before
    it counts as failed."""
    min_requests: int = 20
    """Requests the canary must have served for its error rate and latency to count."""
    max_error_rate: float = 0.01
    """Highest share of 5xx answers of the canary."""
    max_p95_latency_ms: float = 2000.0
    """Highest 95th percentile of the canary's request latency, in milliseconds."""
    when_no_traffic: Literal["rollback", "promote"] = "rollback"
    """What a canary that served fewer than ``min_requests`` gets: no evidence is no
    promotion (rollback), or trust the offline gate (promote)."""
    requests_query: str = ('sum(increase(revision_app_request_count{{namespace_name='
                           '"{namespace}",revision_name="{revision}"}}[{window}]))')
    """PromQL of the canary's requests in the window (Knative queue-proxy metric);
    ``{namespace}``, ``{revision}`` and ``{window}`` are filled in (Python ``str.format``: the
    query's own braces are doubled)."""
    errors_query: str = ('sum(increase(revision_app_request_count{{namespace_name='
                         '"{namespace}",revision_name="{revision}",'
                         'response_code_class="5xx"}}[{window}]))')
    """PromQL of the canary's 5xx answers in the window."""
    p95_query: str = ('histogram_quantile(0.95, sum by (le) (rate('
                      'revision_app_request_latencies_bucket{{namespace_name="{namespace}",'
                      'revision_name="{revision}"}}[{window}])))')
    """PromQL of the canary's 95th percentile latency in milliseconds."""


class ServingConfig(Section):
    """Serving on KServe that follows the registry: after a promotion (and a rollback) the
    InferenceServices that serve ``models:/<model>@champion`` (found by their
    ``dermml.io/registered-model`` label, set by charts/dermml with ``serving.mode: kserve``)
    get the champion's artifacts as ``storageUri``, first as a canary."""

    kserve: bool = False
    """Update the InferenceServices when the champion changes (the pipelines then end with a
    rollout step; ``dermml registry promote/rollback`` patch them too)."""
    namespace: str = "dermml"
    """Namespace of the InferenceServices (the chart's release namespace)."""
    canary_traffic_percent: int = Field(10, ge=0, le=100)
    """Share of traffic the new champion gets while it is judged; 0 or 100 (or an
    InferenceService in Standard mode, which cannot split traffic) rolls it out at once."""
    artifacts_destination: str = "s3://dermml-mlflow/artifacts"
    """Where the MLflow server keeps proxied artifacts (the chart's
    ``mlflow.artifactsDestination``): a model version stored at ``mlflow-artifacts:/PATH``
    is served from ``<artifacts_destination>/PATH``."""
    analysis: CanaryAnalysis = CanaryAnalysis()
    """How a canary is judged."""


class PlatformConfig(Section):
    """Where and how pipeline steps and training run on Kubernetes."""

    images: dict[str, str] = {"cpu": "ghcr.io/dermml/dermml:0.1.0",
                              "gpu": "ghcr.io/dermml/dermml-gpu:0.1.0"}
    """Image of each flavour a component or the RayJob asks for (cpu: slim; gpu: CUDA torch and
    pytorch3d). ``$DERMML_IMAGE`` / ``$DERMML_IMAGE_GPU``, when set, replace cpu / gpu."""
    pools: dict[str, Pool] = {"cpu": Pool()}
    """Named node pools."""
    stages: dict[str, str] = {}
    """Stage name -> pool name; unlisted stages use ``default_pool``."""
    default_pool: str = "cpu"
    """Pool of stages not listed in ``stages``."""
    secrets: list[SecretEnv] = []
    """Secrets exposed as env to pipeline steps and Ray pods (S3, MLflow credentials)."""
    env: dict[str, str] = {}
    """Plain env vars of pipeline steps (MLFLOW_TRACKING_URI, DERMML_S3_ENDPOINT, DERMML_HOME)."""
    step_labels: dict[str, str] = dict(STEP_LABELS)
    """Labels of every pipeline step's pod (kfp-kubernetes ``add_pod_label``). The chart's
    NetworkPolicies admit pods of its client namespaces (e.g. kubeflow) to MLflow and the Ray
    head only when they carry all of these (``networkPolicy.pipelinePodLabels`` of
    charts/dermml, the same by default): change both together."""
    data_pvc: str | None = None
    """PersistentVolumeClaim mounted at ``data_mount_path`` (alternative to S3)."""
    data_mount_path: str = "/data"
    """Where ``data_pvc`` is mounted."""
    ray_job: RayJobConfig = RayJobConfig()
    """Training as a KubeRay RayJob."""
    serving: ServingConfig = ServingConfig()
    """KServe serving that follows the registry's champion (canary rollout, rollback)."""

    _source: str = PrivateAttr("the platform config")

    @property
    def source(self) -> str:
        """Where this config came from (its file), for messages."""
        return self._source

    def pool_named(self, name: str, what: str) -> Pool:
        if name not in self.pools:
            raise KeyError(f"{what} names pool {name!r}, which is not defined; pools: "
                           f"{', '.join(self.pools)}")
        return self.pools[name]

    def pool_for(self, stage: str) -> Pool:
        return self.pool_named(self.stages.get(stage, self.default_pool), f"stage {stage!r}")

    def submits_rayjob(self, stage: str) -> bool:
        """Whether the pipeline step of ``stage`` only submits a RayJob and waits for it."""
        return self.ray_job.enabled and stage in RAYJOB_STAGES

    def step_pool(self, stage: str) -> Pool:
        """Node placement and pod size of the pipeline step of ``stage``: the stage's pool, or,
        for a step that submits a RayJob, ``ray_job.step_pool`` with the job's step size and no
        accelerator (the RayJob's workers hold the GPUs)."""
        if not self.submits_rayjob(stage):
            return self.pool_for(stage)
        job = self.ray_job
        pool = self.pool_named(job.step_pool, "ray_job.step_pool")
        return Pool.model_validate({
            **pool.model_dump(exclude_none=True), "cpu_request": job.step_cpu_request,
            "memory_request": job.step_memory_request, "cpu_limit": None,
            "memory_limit": job.step_memory_limit, "accelerator_type": None,
            "accelerator_limit": 0})

    def step_flavour(self, stage: str, flavour: str) -> str:
        """The image flavour of the pipeline step of ``stage`` whose component asks for
        ``flavour``: ``ray_job.step_image`` for a step that submits a RayJob."""
        return self.ray_job.step_image if self.submits_rayjob(stage) else flavour

    def image(self, flavour: str, what: str) -> str:
        """The image of ``flavour``; an unknown flavour is an error naming ``what`` asked."""
        if flavour not in self.images:
            raise ConfigError(f"{self.source}: {what} needs the {flavour!r} image, but images "
                              f"has only {', '.join(self.images) or 'none'}; add images."
                              f"{flavour}: REGISTRY/IMAGE:TAG")
        return self.images[flavour]


LOCAL = PlatformConfig()
"""The platform of local runs (``kfp.local``): no pools, env or secrets applied, no RayJob, no
fit checks; steps run in this venv."""

_active: PlatformConfig | None = None


def load_platform(path: str | os.PathLike | None = None) -> PlatformConfig:
    """The platform config at ``path``, ``$DERMML_PLATFORM``, or the shipped default."""
    path = path or os.environ.get("DERMML_PLATFORM") or shipped_config("platform",
                                                                       "default.yaml")
    platform = load_config(PlatformConfig, path)
    images = {flavour: os.environ[var] for flavour, var in (("cpu", "DERMML_IMAGE"),
                                                             ("gpu", "DERMML_IMAGE_GPU"))
              if os.environ.get(var)}
    if images:
        platform = platform.model_copy(update={"images": {**platform.images, **images}})
    platform._source = str(path)
    return platform


def active_platform() -> PlatformConfig:
    """The platform pipelines are being built under (default: the shipped one)."""
    return _active if _active is not None else load_platform()


@contextlib.contextmanager
def using_platform(platform: PlatformConfig) -> Iterator[PlatformConfig]:
    """Build pipelines with ``platform`` in force."""
    global _active
    previous, _active = _active, platform
    try:
        yield platform
    finally:
        _active = previous


def platform_json() -> str:
    """The platform in force, for a component that applies it at run time (the train stage
    submits RayJobs and checks the fit); empty for local runs."""
    platform = active_platform()
    return "" if platform is LOCAL else platform.model_dump_json()


def platform_from_json(text: str) -> PlatformConfig | None:
    """The inverse of ``platform_json`` (None for a local run)."""
    if not text:
        return None
    platform = PlatformConfig.model_validate_json(text)
    platform._source = "the platform config compiled into the pipeline"
    return platform


# ----------------------------------------------------------------------------- fit


def _n(value: Decimal | float) -> str:
    return f"{float(value):g}"


def check_training_fits(platform: PlatformConfig, ray: Any,
                        source: str = "task config") -> None:
    """Refuse training whose Ray workers no pod of the platform could hold (a ConfigError that
    names the task's value, the pool and its node size, and what to change).

    ``ray`` is a task's ``ray`` section: ``enabled``, ``address``, ``num_workers``, ``use_gpu``
    and ``cpus_per_worker`` are what its workers need. A RayJob puts each worker in a pod of
    ``ray_job.worker_pool`` (Ray offers that pod's CPUs); otherwise the train stage's pod runs
    every worker (Ray offers its CPU limit or, without one, every vCPU of its node). Training on
    an existing Ray cluster (``ray.address``, ``ray_job.cluster_selector``) is not checked: its
    size is the cluster's.
    """
    job = platform.ray_job
    if not ray.enabled or (job.cluster_selector if job.enabled else ray.address):
        return  # in-process (one process, CPU fallback) or a cluster of its own size
    workers, per_worker = int(ray.num_workers), Decimal(str(ray.cpus_per_worker))
    if job.enabled:
        name = job.worker_pool
        pool = platform.pool_named(name, "ray_job.worker_pool")
        pod = f"each Ray worker is a RayJob pod of pool {name!r}"
        cpus: Decimal | None = parse_quantity(pool.cpu_request, f"pools.{name}.cpu_request")
        offer = f"pools.{name}.cpu_request"
        cpu_need, most = per_worker, cpus
        cpu_what = f"ray.cpus_per_worker={ray.cpus_per_worker:g}"
        gpu_need = 1 if ray.use_gpu else 0
        gpu_fix = "set ray.use_gpu=false, or point ray_job.worker_pool at a GPU pool"
    else:
        name = platform.stages.get("train", platform.default_pool)
        pool = platform.pool_for("train")
        pod = f"the train stage runs its Ray workers in one pod of pool {name!r}"
        cpus, offer = None, ""
        if pool.cpu_limit:
            cpus = parse_quantity(pool.cpu_limit, f"pools.{name}.cpu_limit")
            offer = f"pools.{name}.cpu_limit"
        elif pool.node:
            cpus, offer = Decimal(str(pool.node.cpu)), "every vCPU of the node: no cpu_limit"
        cpu_need, most = per_worker * workers, (cpus / workers if cpus is not None else None)
        cpu_what = (f"ray.cpus_per_worker={ray.cpus_per_worker:g} x ray.num_workers={workers} "
                    f"= {_n(cpu_need)} CPUs")
        gpu_need = workers if ray.use_gpu else 0
        gpu_fix = ("set ray.use_gpu=false" if pool.accelerator_limit < 1 else
                   f"set ray.num_workers={pool.accelerator_limit} or ray.use_gpu=false")
    pod += f" (nodes: {pool.describe_node()})"
    if cpus is not None and cpu_need > cpus:
        raise ConfigError(
            f"{source}: {cpu_what} does not fit {platform.source}: {pod}, where Ray has "
            f"{_n(cpus)} CPUs ({offer}). Lower ray.cpus_per_worker to {_n(most)} or less "
            "(--set ray.cpus_per_worker=N; in a pipeline --param "
            "'overrides=[\"ray.cpus_per_worker=N\"]'), or use a platform config whose pool "
            f"{name!r} has larger nodes (pools.{name}.node, cpu_request)")
    if gpu_need > pool.accelerator_limit:
        raise ConfigError(
            f"{source}: ray.use_gpu=true with ray.num_workers={workers} needs {gpu_need} GPU(s) "
            f"in a pod, which does not fit {platform.source}: {pod}, which gets "
            f"{pool.accelerator_limit} (pools.{name}.accelerator_limit). "
            f"{gpu_fix[0].upper()}{gpu_fix[1:]}, or use a platform config whose pool {name!r} "
            "has GPUs")
