"""KServe adapter: serving that follows the registry's champion, with a canary on the way.

What the objects look like lives here and nowhere else in Python (charts/dermml renders the
same objects with ``serving.mode: kserve``; ``tests/kubernetes/test_kserve.py`` checks that
the chart and these builders agree):

- ``serving_runtime``: a ``ServingRuntime`` that runs MLServer's MLflow runtime
  (``mlserver_mlflow.MLflowRuntime``) in the DermML image, where the DermML pyfunc imports:
  ``mlserver start /mnt/models`` with ``MLSERVER_MODEL_IMPLEMENTATION``,
  ``MLSERVER_MODEL_NAME`` (``{{.Name}}``: the InferenceService's name, as the v2 protocol's
  model name) and ``MLSERVER_MODEL_URI=/mnt/models``, where KServe's storage initializer puts
  the model's artifacts.
- ``inference_service``: an ``InferenceService`` (modelFormat ``mlflow``, protocol ``v2``, that
  runtime) whose ``storageUri`` is the champion version's folder in the artifact store
  (``storage_uri``), labelled with the registered model it follows.

Following the registry (the registry itself, ``registry/gate.py``, knows nothing of this):

- ``follow_promotion``: after ``promote`` moved ``@champion``, every InferenceService following
  the model gets the new version's ``storageUri`` with ``canaryTrafficPercent`` (the platform's
  ``serving.canary_traffic_percent``): KServe sends that share to the new revision and the rest
  to the last rolled-out one.
- ``rollout``: the controller step. It waits for the canary revision to be ready, reads its
  error rate and p95 latency from Prometheus (Knative's queue-proxy metrics of that revision)
  over ``analysis_seconds``, and then either rolls it out (``canaryTrafficPercent`` removed) or
  rolls back: the previous ``storageUri`` restored and ``@champion`` moved back through the
  registry's ``rollback``.
- ``follow_rollback``: after ``dermml registry rollback``, the InferenceServices get the
  restored champion's ``storageUri`` back.

A rollback first pins the traffic (``canaryTrafficPercent: 0``: all of it to the last
rolled-out revision, which during a canary is the previous model's), then, once the restored
revision is ready, removes the pin. The state of each InferenceService is in its annotations
(``dermml.io/model-version``, ``dermml.io/previous-storage-uri``, ``dermml.io/rollout``, ...).
"""

from __future__ import annotations

import datetime as dt
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlparse

from dermml.orchestration.platform import CanaryAnalysis, ServingConfig

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
ISVC_API = f"{GROUP}/{VERSION}"
RUNTIME_API = f"{GROUP}/v1alpha1"

# ---------------------------------------------------------------------------- the objects
MODEL_FORMAT = "mlflow"
PROTOCOL = "v2"
MLFLOW_RUNTIME = "mlserver_mlflow.MLflowRuntime"
"""MLServer's MLflow runtime: loads the pyfunc with ``mlflow.pyfunc.load_model``."""
MODEL_DIR = "/mnt/models"
"""Where KServe's storage initializer downloads ``storageUri`` in the predictor pod."""
HTTP_PORT, GRPC_PORT, METRICS_PORT = 8080, 9000, 8082
RUNTIME_COMMAND = ["mlserver", "start", MODEL_DIR]
HOME = "/home/dermml"
"""The DermML images' home directory (the chart's ``homeDir``)."""
MAX_NAME_LENGTH = 47
"""Knative names the predictor's revisions ``<name>-predictor-00001``: 63 characters at most."""

LABEL_MODEL = "dermml.io/model"
"""The chart's name of the served model (``serving.models[].name``)."""
LABEL_REGISTERED_MODEL = "dermml.io/registered-model"
"""The registered model an InferenceService follows: how the platform finds it."""
LABEL_RELEASE = "dermml.io/release"
"""The Helm release that rendered it."""
MODEL_URI = "dermml.io/model-uri"
"""``models:/<name>@<alias>``: the alias it follows."""
MODEL_VERSION = "dermml.io/model-version"
"""The registry version whose artifacts ``storageUri`` holds."""
PREVIOUS_VERSION = "dermml.io/previous-model-version"
PREVIOUS_URI = "dermml.io/previous-storage-uri"
ROLLOUT = "dermml.io/rollout"
"""canary, rolling-out, rolled-out, rolling-back or rolled-back."""
ROLLOUT_STARTED = "dermml.io/rollout-started-at"
ROLLOUT_MESSAGE = "dermml.io/rollout-message"
DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
TAG_ROUTING = "serving.kserve.io/enable-tag-routing"
"""``true``: KServe tags the canary ``latest`` and the rest ``prev``, each with its own URL."""
KNATIVE = "Knative"
"""The deployment mode that splits traffic between revisions (canaryTrafficPercent)."""

IN_PROGRESS = ("canary", "rolling-out", "rolling-back")


def parse_alias_uri(model_uri: str) -> tuple[str, str]:
    """(name, alias) of ``models:/<name>@<alias>``; other URIs are an error (an
    InferenceService follows an alias, so the platform knows what to update)."""
    ref = model_uri.removeprefix("models:/")
    if ref == model_uri or "@" not in ref:
        raise ValueError(f"{model_uri!r}: KServe serving follows a registry alias, e.g. "
                         "models:/dermml-segmentation@champion")
    name, alias = ref.split("@", 1)
    return name, alias


def runtime_env(home: str = HOME) -> list[dict[str, str]]:
    """The runtime container's env. ``{{.Name}}`` is KServe's placeholder for the
    InferenceService name (the v2 protocol's model name)."""
    return [{"name": "MLSERVER_MODEL_IMPLEMENTATION", "value": MLFLOW_RUNTIME},
            {"name": "MLSERVER_MODEL_NAME", "value": "{{.Name}}"},
            {"name": "MLSERVER_MODEL_URI", "value": MODEL_DIR},
            {"name": "MLSERVER_HTTP_PORT", "value": str(HTTP_PORT)},
            {"name": "MLSERVER_GRPC_PORT", "value": str(GRPC_PORT)},
            {"name": "MLSERVER_METRICS_PORT", "value": str(METRICS_PORT)},
            {"name": "HOME", "value": home},
            {"name": "DERMML_HOME", "value": "/tmp/dermml"}]


@dataclass
class RuntimeSpec:
    """What a DermML ServingRuntime is made of (the chart's ``serving.kserve.runtime``)."""

    name: str
    namespace: str
    image: str
    image_pull_policy: str = "IfNotPresent"
    labels: dict[str, str] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    security_context: dict[str, Any] = field(default_factory=dict)
    home: str = HOME
    scratch_size: str = "4Gi"
    image_pull_secrets: list[dict[str, str]] = field(default_factory=list)


def serving_runtime(spec: RuntimeSpec) -> dict[str, Any]:
    """A namespaced ``ServingRuntime`` for MLflow models over the v2 protocol, in the DermML
    image: MLServer's MLflow runtime loads the pyfunc, which imports ``dermml``. Selected by
    name only (``autoSelect: false``): other MLflow models keep KServe's own runtime."""
    container: dict[str, Any] = {
        "name": "kserve-container", "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy, "command": list(RUNTIME_COMMAND),
        "env": runtime_env(spec.home),
        # MLServer answers ready once the model is loaded.
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT},
                           "periodSeconds": 10, "timeoutSeconds": 5},
        "resources": spec.resources,
        "securityContext": spec.security_context,
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"},
                         {"name": "home", "mountPath": spec.home}]}
    body: dict[str, Any] = {
        "annotations": {"prometheus.kserve.io/port": str(METRICS_PORT),
                        "prometheus.kserve.io/path": "/metrics"},
        "supportedModelFormats": [{"name": MODEL_FORMAT, "version": "3", "autoSelect": False}],
        "protocolVersions": [PROTOCOL],
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": spec.scratch_size}},
                    {"name": "home", "emptyDir": {"sizeLimit": spec.scratch_size}}]}
    if spec.image_pull_secrets:
        body["imagePullSecrets"] = spec.image_pull_secrets
    return {"apiVersion": RUNTIME_API, "kind": "ServingRuntime",
            "metadata": {"name": spec.name, "namespace": spec.namespace,
                         "labels": dict(spec.labels)},
            "spec": body}


def model_spec(storage_uri: str, runtime: str,
               resources: dict[str, Any] | None = None) -> dict[str, Any]:
    """The predictor's ``model``: an MLflow model over v2, from ``storage_uri``, in ``runtime``."""
    spec: dict[str, Any] = {"modelFormat": {"name": MODEL_FORMAT}, "protocolVersion": PROTOCOL,
                            "runtime": runtime, "storageUri": storage_uri}
    if resources:
        spec["resources"] = resources
    return spec


@dataclass
class ServedModel:
    """What an InferenceService serving a registry alias is made of (one
    ``serving.models`` entry of the chart)."""

    name: str
    """Object name."""
    namespace: str
    model_uri: str
    """``models:/<registered model>@<alias>``."""
    storage_uri: str
    """The alias's version's artifacts (``storage_uri``)."""
    version: str
    """That version."""
    runtime: str
    """The ServingRuntime's name."""
    key: str = ""
    """The chart's name of the model (``serving.models[].name``); default: ``name``."""
    deployment_mode: str = KNATIVE
    service_account: str = ""
    min_replicas: int = 1
    max_replicas: int = 3
    resources: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    security_context: dict[str, Any] = field(default_factory=dict)
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[dict[str, Any]] = field(default_factory=list)


def inference_service(model: ServedModel) -> dict[str, Any]:
    """The ``InferenceService`` that serves ``model.model_uri``'s version ``model.version``."""
    registered, _alias = parse_alias_uri(model.model_uri)
    if len(model.name) > MAX_NAME_LENGTH:
        raise ValueError(f"InferenceService name {model.name!r} is longer than "
                         f"{MAX_NAME_LENGTH} characters (Knative's revision names would pass 63)")
    predictor: dict[str, Any] = {"minReplicas": model.min_replicas,
                                 "maxReplicas": model.max_replicas}
    if model.service_account:
        # The storage initializer takes its S3 credentials from this account's secrets; the
        # model server never calls the Kubernetes API.
        predictor["serviceAccountName"] = model.service_account
        predictor["automountServiceAccountToken"] = False
    if model.security_context:
        predictor["securityContext"] = model.security_context
    if model.node_selector:
        predictor["nodeSelector"] = model.node_selector
    if model.tolerations:
        predictor["tolerations"] = model.tolerations
    predictor["model"] = model_spec(model.storage_uri, model.runtime, model.resources)
    annotations = {DEPLOYMENT_MODE: model.deployment_mode, MODEL_URI: model.model_uri,
                   MODEL_VERSION: str(model.version), ROLLOUT: "rolled-out"}
    if model.deployment_mode == KNATIVE:
        annotations[TAG_ROUTING] = "true"
    return {"apiVersion": ISVC_API, "kind": "InferenceService",
            "metadata": {"name": model.name, "namespace": model.namespace,
                         "labels": {**model.labels, LABEL_MODEL: model.key or model.name,
                                    LABEL_REGISTERED_MODEL: registered},
                         "annotations": annotations},
            "spec": {"predictor": predictor}}


# ---------------------------------------------------------------------------- registry -> storage
STORAGE_SCHEMES = ("s3", "gs", "https", "http", "pvc", "hdfs", "webhdfs", "hf", "oci")
"""URI schemes KServe's storage initializer downloads from."""


def artifact_storage_uri(location: str, artifacts_destination: str) -> str:
    """The ``storageUri`` of artifacts stored at ``location``: an MLflow server that proxies
    artifacts (``mlflow-artifacts:/PATH``) keeps them at ``<artifacts_destination>/PATH``."""
    parsed = urlparse(location)
    if parsed.scheme == "mlflow-artifacts":
        return f"{artifacts_destination.rstrip('/')}/{parsed.path.lstrip('/')}"
    if parsed.scheme in STORAGE_SCHEMES:
        return location
    raise ValueError(f"model artifacts at {location!r} cannot be served by KServe (its storage "
                     f"initializer reads {', '.join(STORAGE_SCHEMES)}): log models to an MLflow "
                     "server whose artifacts are on S3 (charts/dermml: mlflow."
                     "artifactsDestination)")


def storage_uri(name: str, version: str, serving: ServingConfig) -> str:
    """Where KServe downloads registered model ``name`` version ``version`` from."""
    from dermml.registry.gate import storage_location

    return artifact_storage_uri(storage_location(name, version), serving.artifacts_destination)


# ---------------------------------------------------------------------------- the API
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _say(isvc: dict, message: str) -> None:
    meta = isvc["metadata"]
    print(f"[inferenceservice {meta['namespace']}/{meta['name']}] {message}", flush=True)


class Cluster:
    """The InferenceServices of a namespace, through the Kubernetes API."""

    def __init__(self, namespace: str, api_client=None):
        from kubernetes import client

        from dermml.orchestration.k8s import api_client as k8s_api_client

        self.namespace = namespace
        self.api = client.CustomObjectsApi(k8s_api_client(api_client))

    def following(self, registered_model: str, alias: str | None = None) -> list[dict]:
        """The InferenceServices that serve ``registered_model`` (``@alias`` when given)."""
        items = self.api.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL,
            label_selector=f"{LABEL_REGISTERED_MODEL}={registered_model}",
            _request_timeout=60)["items"]
        if alias is not None:
            items = [i for i in items if _annotations(i).get(MODEL_URI, "").endswith(
                f"@{alias}")]
        return sorted(items, key=lambda i: i["metadata"]["name"])

    def get(self, name: str) -> dict:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL,
                                                     name, _request_timeout=60)

    def patch(self, isvc: dict, patch: dict) -> dict:
        """A JSON merge patch (``None`` removes a field), refused (409) if the object changed
        since ``isvc`` was read: another rollout or a ``helm upgrade`` is never overwritten."""
        patch = {**patch, "metadata": {**patch.get("metadata", {}),
                                       "resourceVersion": isvc["metadata"]["resourceVersion"]}}
        return self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, isvc["metadata"]["name"], patch,
            _request_timeout=60)


def _annotations(isvc: dict) -> dict[str, str]:
    return isvc["metadata"].get("annotations") or {}


def _predictor(isvc: dict) -> dict:
    return isvc["spec"]["predictor"]


def served_uri(isvc: dict) -> str:
    return _predictor(isvc).get("model", {}).get("storageUri", "")


def can_split_traffic(isvc: dict) -> bool:
    """Only Knative mode splits traffic between revisions (canaryTrafficPercent)."""
    return _annotations(isvc).get(DEPLOYMENT_MODE, KNATIVE) in (KNATIVE, "Serverless")


def predictor_status(isvc: dict) -> dict:
    return ((isvc.get("status") or {}).get("components") or {}).get("predictor") or {}


def _condition(isvc: dict, kind: str) -> dict | None:
    for condition in (isvc.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return condition
    return None


def revision_state(isvc: dict) -> tuple[str, str]:
    """("ready" | "failed" | "pending", why) of the newest revision of the predictor."""
    status = isvc.get("status") or {}
    if status.get("observedGeneration", 0) < isvc["metadata"].get("generation", 0):
        return "pending", "KServe has not seen the change yet"
    predictor = predictor_status(isvc)
    created, ready = predictor.get("latestCreatedRevision"), predictor.get("latestReadyRevision")
    # Knative marks the configuration failed when its newest revision cannot start (e.g. the
    # model does not load); KServe's model status says the same for a failed load.
    config = _condition(isvc, "PredictorConfigurationReady")
    if config is not None and config.get("status") == "False":
        return "failed", (f"revision {created}: {config.get('reason', '')} "
                          f"{config.get('message', '')}").strip()
    model = status.get("modelStatus") or {}
    if model.get("transitionStatus") in ("BlockedByFailedLoad", "InvalidSpec"):
        failure = model.get("lastFailureInfo") or {}
        return "failed", (f"revision {created}: {model['transitionStatus']} "
                          f"{failure.get('reason', '')} {failure.get('message', '')}").strip()
    if created and created == ready:
        return "ready", f"revision {created} ready"
    return "pending", f"revision {created or '(none yet)'} not ready (ready: {ready or 'none'})"


def traffic(isvc: dict) -> str:
    """The predictor's traffic split as KServe reports it, e.g. ``rev-2 10% (latest), rev-1
    90% (prev)``."""
    parts = [f"{t.get('revisionName', '?')} {t.get('percent', 0)}%"
             + (f" ({t['tag']})" if t.get("tag") else "")
             for t in predictor_status(isvc).get("traffic") or []]
    return ", ".join(parts) or "no traffic reported yet"


# ---------------------------------------------------------------------------- following
@dataclass
class Change:
    """What happened to one InferenceService."""

    isvc: str
    namespace: str
    action: str
    """canary, rolled-out, rolled-back, unchanged, pinned."""
    version: str
    storage_uri: str
    previous_version: str | None = None
    previous_uri: str | None = None
    canary_percent: int | None = None
    message: str = ""
    revision: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)

    def line(self) -> str:
        return f"{self.namespace}/{self.isvc}: {self.action} v{self.version} ({self.message})"


class CanaryRolledBack(RuntimeError):
    """The canary failed its analysis: serving and ``@champion`` are back on the previous
    version."""

    def __init__(self, changes: list[Change]):
        super().__init__("; ".join(c.line() for c in changes))
        self.changes = changes


def _canary_percent(isvc: dict, serving: ServingConfig) -> int | None:
    percent = serving.canary_traffic_percent
    if not can_split_traffic(isvc) or percent in (0, 100) or not predictor_status(isvc).get(
            "latestRolledoutRevision"):
        return None  # at once: Standard mode, no split asked, or nothing rolled out to split with
    return percent


def follow_promotion(task: str, version: str, serving: ServingConfig,
                     api_client=None) -> list[Change]:
    """Point every InferenceService following ``dermml-<task>@champion`` at ``version``'s
    artifacts, as a canary with ``serving.canary_traffic_percent`` of the traffic. None when
    none follows it (nothing is served yet: the chart renders it with the first champion's
    storageUri)."""
    from dermml.registry.gate import CHAMPION, model_name

    name, version = model_name(task), str(version)
    uri = storage_uri(name, version, serving)
    cluster = Cluster(serving.namespace, api_client)
    changes = []
    for isvc in cluster.following(name, CHAMPION):
        meta = isvc["metadata"]
        current, current_version = served_uri(isvc), _annotations(isvc).get(MODEL_VERSION)
        if current == uri:
            changes.append(Change(meta["name"], meta["namespace"], "unchanged", version, uri,
                                  message="already serves it"))
            continue
        percent = _canary_percent(isvc, serving)
        state = "canary" if percent is not None else "rolling-out"
        message = (f"{percent}% of the traffic to v{version}, the rest stays on "
                   f"v{current_version}" if percent is not None else
                   f"v{version} takes all the traffic once ready")
        cluster.patch(isvc, {
            "metadata": {"annotations": {MODEL_VERSION: version, PREVIOUS_VERSION: current_version,
                                         PREVIOUS_URI: current, ROLLOUT: state,
                                         ROLLOUT_STARTED: _now(), ROLLOUT_MESSAGE: message}},
            "spec": {"predictor": {"model": {"storageUri": uri},
                                   "canaryTrafficPercent": percent}}})
        _say(isvc, f"{state}: {message}")
        changes.append(Change(meta["name"], meta["namespace"], state, version, uri,
                              current_version, current, percent, message))
    return changes


def follow_rollback(task: str, serving: ServingConfig, api_client=None,
                    reason: str = "registry rollback") -> list[Change]:
    """After ``@champion`` moved back (``dermml registry rollback``): every InferenceService
    following it serves the champion's artifacts again (``restore``)."""
    from dermml.registry.gate import CHAMPION, model_name, version_of

    name = model_name(task)
    version = version_of(name, CHAMPION)
    uri = storage_uri(name, version, serving)
    cluster = Cluster(serving.namespace, api_client)
    changes = []
    for isvc in cluster.following(name, CHAMPION):
        meta = isvc["metadata"]
        if served_uri(isvc) == uri and _annotations(isvc).get(ROLLOUT) not in IN_PROGRESS:
            changes.append(Change(meta["name"], meta["namespace"], "unchanged", version, uri,
                                  message="already serves it"))
            continue
        changes.append(restore(cluster, isvc, uri, version, reason, serving.analysis))
    return changes


def restore(cluster: Cluster, isvc: dict, uri: str, version: str, reason: str,
            analysis: CanaryAnalysis, sleep: Callable[[float], None] = time.sleep) -> Change:
    """Serve ``uri`` (version ``version``) again. Knative: the traffic is pinned first
    (``canaryTrafficPercent: 0``: all of it to the last rolled-out revision; during a canary,
    the previous model's), and the pin is removed once the restored revision is ready. A
    restored revision that does not get ready in ``ready_timeout_seconds`` leaves the pin in
    place (action ``pinned``)."""
    meta, notes = isvc["metadata"], _annotations(isvc)
    current, current_version = served_uri(isvc), notes.get(MODEL_VERSION)
    if current == uri:  # finishing a rollback left pinned: what it replaced stays recorded
        current, current_version = notes.get(PREVIOUS_URI), notes.get(PREVIOUS_VERSION)
    pin = 0 if can_split_traffic(isvc) else None
    message = reason if reason.startswith("back to v") else f"back to v{version}: {reason}"
    isvc = cluster.patch(isvc, {
        "metadata": {"annotations": {MODEL_VERSION: version, PREVIOUS_VERSION: current_version,
                                     PREVIOUS_URI: current, ROLLOUT: "rolling-back",
                                     ROLLOUT_STARTED: _now(), ROLLOUT_MESSAGE: message}},
        "spec": {"predictor": {"model": {"storageUri": uri}, "canaryTrafficPercent": pin}}})
    _say(isvc, f"rolling back: {message}")
    state, why = wait_ready(cluster, meta["name"], analysis, sleep)
    isvc = cluster.get(meta["name"])
    if state != "ready":
        note = f"{message}; restored revision not ready ({why}): traffic stays pinned"
        cluster.patch(isvc, {"metadata": {"annotations": {ROLLOUT_MESSAGE: note}}})
        _say(isvc, note)
        return Change(meta["name"], meta["namespace"], "pinned", version, uri, current_version,
                      current, pin, note, predictor_status(isvc).get("latestCreatedRevision"))
    isvc = cluster.patch(isvc, {
        "metadata": {"annotations": {ROLLOUT: "rolled-back", ROLLOUT_MESSAGE: message}},
        "spec": {"predictor": {"canaryTrafficPercent": None}}})
    _say(isvc, f"rolled back: {message}")
    return Change(meta["name"], meta["namespace"], "rolled-back", version, uri, current_version,
                  current, None, message, predictor_status(isvc).get("latestCreatedRevision"))


def wait_ready(cluster: Cluster, name: str, analysis: CanaryAnalysis,
               sleep: Callable[[float], None] = time.sleep) -> tuple[str, str]:
    """Poll until the newest revision is ready or failed, at most ``ready_timeout_seconds``."""
    deadline = time.monotonic() + analysis.ready_timeout_seconds
    while True:
        state, why = revision_state(cluster.get(name))
        if state != "pending":
            return state, why
        if time.monotonic() >= deadline:
            return "failed", f"not ready after {analysis.ready_timeout_seconds:.0f}s ({why})"
        sleep(analysis.poll_seconds)


# ---------------------------------------------------------------------------- canary analysis
@dataclass
class CanaryMetrics:
    """What the canary revision served in the window."""

    requests: float
    errors: float
    p95_ms: float | None

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class Prometheus:
    """Reads a revision's requests, 5xx answers and p95 latency (``CanaryAnalysis`` queries)
    from the Prometheus HTTP API."""

    def __init__(self, analysis: CanaryAnalysis):
        self.analysis = analysis

    def _value(self, query: str) -> float | None:
        import requests

        response = requests.get(f"{self.analysis.prometheus_url.rstrip('/')}/api/v1/query",
                                params={"query": query}, timeout=30)
        response.raise_for_status()
        body = response.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus refused {query!r}: {body.get('error')}")
        result = body["data"]["result"]
        if not result:
            return None
        value = float(result[0]["value"][1])
        return None if math.isnan(value) else value

    def canary(self, namespace: str, revision: str, window_seconds: float) -> CanaryMetrics:
        fill = {"namespace": namespace, "revision": revision,
                "window": f"{max(60, int(window_seconds))}s"}
        a = self.analysis
        return CanaryMetrics(requests=self._value(a.requests_query.format(**fill)) or 0.0,
                             errors=self._value(a.errors_query.format(**fill)) or 0.0,
                             p95_ms=self._value(a.p95_query.format(**fill)))


def judge(metrics: CanaryMetrics, analysis: CanaryAnalysis, final: bool) -> tuple[str, str]:
    """("healthy" | "unhealthy" | "pending", why): over the limits with at least
    ``min_requests`` is unhealthy at once; at the end of the window (``final``) a canary within
    the limits is healthy, and one with too few requests gets ``when_no_traffic``."""
    a = analysis
    seen = (f"{metrics.requests:.0f} requests, error rate {metrics.error_rate:.2%} "
            f"(max {a.max_error_rate:.2%}), p95 "
            + (f"{metrics.p95_ms:.0f} ms" if metrics.p95_ms is not None else "n/a")
            + f" (max {a.max_p95_latency_ms:.0f} ms)")
    if metrics.requests >= a.min_requests:
        if metrics.error_rate > a.max_error_rate:
            return "unhealthy", f"error rate over the limit: {seen}"
        if metrics.p95_ms is not None and metrics.p95_ms > a.max_p95_latency_ms:
            return "unhealthy", f"p95 latency over the limit: {seen}"
        return ("healthy" if final else "pending"), seen
    if not final:
        return "pending", seen
    verdict = "healthy" if a.when_no_traffic == "promote" else "unhealthy"
    return verdict, (f"only {metrics.requests:.0f} requests (min {a.min_requests}): "
                     f"when_no_traffic={a.when_no_traffic}; {seen}")


def analyse(cluster: Cluster, name: str, analysis: CanaryAnalysis, metrics: Prometheus,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> tuple[str, str, dict]:
    """Judge the canary of InferenceService ``name``: its revision must get ready, then hold
    the limits for ``analysis_seconds``. Returns (verdict, why, last metrics)."""
    state, why = wait_ready(cluster, name, analysis, sleep)
    if state != "ready":
        return "unhealthy", f"canary {why}", {}
    isvc = cluster.get(name)
    revision = predictor_status(isvc)["latestCreatedRevision"]
    _say(isvc, f"canary revision {revision} ready ({traffic(isvc)}); analysing for "
               f"{analysis.analysis_seconds:.0f}s")
    start = clock()
    while True:
        elapsed = clock() - start
        final = elapsed >= analysis.analysis_seconds
        seen = metrics.canary(cluster.namespace, revision, max(elapsed, analysis.poll_seconds))
        verdict, why = judge(seen, analysis, final)
        state, failure = revision_state(cluster.get(name))
        if state == "failed":  # the canary's pods crashed after it got ready
            verdict, why = "unhealthy", f"canary {failure}"
        if verdict != "pending":
            return verdict, why, {"requests": seen.requests, "error_rate": seen.error_rate,
                                  "p95_ms": seen.p95_ms}
        sleep(min(analysis.poll_seconds, max(0.0, analysis.analysis_seconds - elapsed)))


def rollout(task: str, serving: ServingConfig, api_client=None, metrics: Prometheus | None = None,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> list[Change]:
    """The rollout controller step: finish every rollout in progress of ``dermml-<task>``.

    A canary whose revision gets ready and holds the error-rate and latency limits
    (``serving.analysis``) gets all the traffic (``canaryTrafficPercent`` removed); one that
    does not is rolled back: its previous ``storageUri`` restored (``restore``) and, if
    ``@champion`` still names the canary's version, the registry's ``rollback`` moves it back.
    A rollout without a canary (Standard mode, or nothing to split with) only has to get
    ready. Raises ``CanaryRolledBack`` after rolling back."""
    from dermml.registry.gate import CHAMPION, model_name, record_serving, rollback, version_of

    name = model_name(task)
    analysis = serving.analysis
    metrics = metrics or Prometheus(analysis)
    cluster = Cluster(serving.namespace, api_client)
    changes, rolled_back = [], []
    for isvc in cluster.following(name, CHAMPION):
        meta, notes = isvc["metadata"], _annotations(isvc)
        state, version = notes.get(ROLLOUT), notes.get(MODEL_VERSION, "")
        if state == "rolling-back":  # a rollback left pinned: finish it
            changes.append(restore(cluster, isvc, served_uri(isvc), version,
                                   notes.get(ROLLOUT_MESSAGE, "rollback"), analysis, sleep))
            continue
        if state not in ("canary", "rolling-out"):
            changes.append(Change(meta["name"], meta["namespace"], "unchanged", version,
                                  served_uri(isvc), message=f"no rollout in progress ({state})"))
            continue
        if state == "canary":
            verdict, why, seen = analyse(cluster, meta["name"], analysis, metrics, sleep, clock)
        else:
            ready, why = wait_ready(cluster, meta["name"], analysis, sleep)
            verdict, seen = ("healthy" if ready == "ready" else "unhealthy"), {}
        isvc = cluster.get(meta["name"])
        revision = predictor_status(isvc).get("latestCreatedRevision")
        if verdict == "healthy":
            isvc = cluster.patch(isvc, {
                "metadata": {"annotations": {ROLLOUT: "rolled-out", ROLLOUT_MESSAGE: why}},
                "spec": {"predictor": {"canaryTrafficPercent": None}}})
            _say(isvc, f"rolled out v{version} ({revision}): {why}")
            change = Change(meta["name"], meta["namespace"], "rolled-out", version,
                            served_uri(isvc), notes.get(PREVIOUS_VERSION),
                            notes.get(PREVIOUS_URI), None, why, revision, seen)
        else:
            _say(isvc, f"canary v{version} ({revision}) unhealthy: {why}")
            previous_uri, previous = notes.get(PREVIOUS_URI), notes.get(PREVIOUS_VERSION)
            if not previous_uri:
                raise RuntimeError(f"{meta['name']}: v{version} is unhealthy ({why}) and no "
                                   "previous storageUri is recorded to roll back to")
            change = restore(cluster, isvc, previous_uri, previous or "",
                             f"canary v{version} unhealthy: {why}", analysis, sleep)
            change.metrics, change.revision = seen, revision
            rolled_back.append(change)
        changes.append(change)
        record_serving(name, version, {"inference_service": f"{meta['namespace']}/{meta['name']}",
                                       "revision": revision, "result": change.action,
                                       "reason": why, **{k: v for k, v in seen.items()
                                                         if v is not None}})
    if rolled_back:
        # The registry follows serving back, unless someone promoted another version meanwhile.
        for bad, change in {c.previous_version: c for c in rolled_back}.items():
            if bad and version_of(name, CHAMPION) == bad:
                restored = rollback(task, change.message)
                print(f"[registry] {name}@{CHAMPION} moved back to v{restored}", flush=True)
        raise CanaryRolledBack(rolled_back)
    return changes


def status(registered_model: str, namespace: str, api_client=None) -> list[dict]:
    """What serves ``registered_model`` now: each InferenceService's alias, version,
    storageUri, rollout state, revisions and traffic."""
    cluster = Cluster(namespace, api_client)
    rows = []
    for isvc in cluster.following(registered_model):
        notes, predictor = _annotations(isvc), predictor_status(isvc)
        rows.append({"inference_service": f"{namespace}/{isvc['metadata']['name']}",
                     "model_uri": notes.get(MODEL_URI), "version": notes.get(MODEL_VERSION),
                     "storage_uri": served_uri(isvc), "rollout": notes.get(ROLLOUT),
                     "message": notes.get(ROLLOUT_MESSAGE),
                     "canary_traffic_percent": _predictor(isvc).get("canaryTrafficPercent"),
                     "latest_ready_revision": predictor.get("latestReadyRevision"),
                     "latest_rolled_out_revision": predictor.get("latestRolledoutRevision"),
                     "traffic": traffic(isvc), "url": (isvc.get("status") or {}).get("url")})
    return rows


def change_dicts(changes: list[Change]) -> list[dict]:
    return [asdict(c) for c in changes]


def describe(changes: list[Change]) -> str:
    return "\n".join(c.line() for c in changes) or "no InferenceService follows this model"

