"""Observability of the chart: Prometheus Operator monitors, the Grafana dashboard, the Ingresses.

No Prometheus Operator CRD is available offline, so the ServiceMonitor and PodMonitors are
checked field by field against what the operator needs (the monitoring.coreos.com/v1 fields used
here, unknown fields refused, durations and label selectors well formed) and, more to the point,
for what they select: each monitor must select the pods or Service it is meant for, and those
must expose the port it scrapes under that name. Built-in kinds are validated strictly against
the Kubernetes 1.33 schemas, the RayCluster against its CRD.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from test_chart import (
    CHART,
    CUSTOM_GROUPS,
    KUBE_VERSION,
    NAMESPACE,
    RELEASE,
    containers,
    crd_validator,
    of_kind,
    one,
    pod_specs,
    render,
    rendered,
    selects,
)
from test_network_policies import admitted_ports

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = CHART / "dashboards" / "dermml-overview.json"
MONITORING = "monitoring"
PROMETHEUS = {"app.kubernetes.io/name": "prometheus"}  # ci/everything-values.yaml podSelector

# ----------------------------------------------------------------------------- monitor schema
# The monitoring.coreos.com/v1 fields (Prometheus Operator v0.8x) this chart may use; anything
# else (a typo, a field of another kind) is refused, as the API server's strict field
# validation would with the CRD installed.
DURATION = (r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?"
            r"(([0-9]+)ms)?)$")
LABEL_SELECTOR = {
    "type": "object", "additionalProperties": False, "minProperties": 1,
    "properties": {
        "matchLabels": {"type": "object", "minProperties": 1,
                        "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": {"type": "array", "items": {"type": "string"}}}}}}}
NAMESPACE_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"any": {"type": "boolean"},
                   "matchNames": {"type": "array", "minItems": 1, "items": {"type": "string"}}}}
ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {
        # A port *name*: of the Service (ServiceMonitor) or of a container (PodMonitor).
        "port": {"type": "string", "pattern": r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", "maxLength": 15},
        "path": {"type": "string", "pattern": "^/"},
        "scheme": {"enum": ["http", "https"]},
        "interval": {"type": "string", "pattern": DURATION},
        "scrapeTimeout": {"type": "string", "pattern": DURATION},
        "honorLabels": {"type": "boolean"},
        "relabelings": {"type": "array"}, "metricRelabelings": {"type": "array"}}}
METADATA = {"type": "object", "required": ["name", "namespace", "labels"],
            "properties": {"name": {"type": "string", "maxLength": 63},
                           "namespace": {"type": "string"},
                           "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                           "annotations": {"type": "object"}}}


def monitor_schema(kind: str) -> dict:
    endpoints = "endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"
    spec = {"type": "object", "additionalProperties": False, "required": ["selector", endpoints],
            "properties": {
                "selector": LABEL_SELECTOR, "namespaceSelector": NAMESPACE_SELECTOR,
                endpoints: {"type": "array", "minItems": 1, "items": ENDPOINT},
                "jobLabel": {"type": "string"},
                "podTargetLabels": {"type": "array", "items": {"type": "string"}},
                "sampleLimit": {"type": "integer"}}}
    if kind == "ServiceMonitor":
        spec["properties"]["targetLabels"] = {"type": "array", "items": {"type": "string"}}
    return {"type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": "monitoring.coreos.com/v1"},
                           "kind": {"const": kind}, "metadata": METADATA, "spec": spec}}


def monitors(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects
            if o["apiVersion"].startswith("monitoring.coreos.com/")}


@pytest.fixture(scope="module")
def everything() -> list[dict]:
    """The ci/everything-values.yaml profile: monitoring, auth, IRSA, Ingresses with TLS."""
    return rendered("everything")


# ----------------------------------------------------------------------------- tests
def test_monitors_are_well_formed_for_the_prometheus_operator(everything):
    found = monitors(everything)
    assert {(m["kind"], name) for name, m in found.items()} == {
        ("ServiceMonitor", f"{RELEASE}-mlflow"), ("PodMonitor", f"{RELEASE}-serving"),
        ("PodMonitor", f"{RELEASE}-ray"), ("PodMonitor", f"{RELEASE}-kuberay-operator")}
    for name, monitor in found.items():
        errors = list(jsonschema.Draft7Validator(monitor_schema(monitor["kind"])).iter_errors(
            monitor))
        assert not errors, (name, [f"{list(e.path)}: {e.message}" for e in errors])
        # kube-prometheus-stack's Prometheus picks monitors by this label (monitoring.labels).
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack", name
        assert monitor["metadata"]["namespace"] == NAMESPACE
    # The schema does catch what it is for.
    broken = json.loads(json.dumps(found[f"{RELEASE}-serving"]))
    broken["spec"]["podMetricsEndpoints"][0]["intervall"] = "30s"
    assert not jsonschema.Draft7Validator(monitor_schema("PodMonitor")).is_valid(broken)
    broken = json.loads(json.dumps(found[f"{RELEASE}-mlflow"]))
    broken["spec"]["endpoints"][0]["port"] = 9102
    assert not jsonschema.Draft7Validator(monitor_schema("ServiceMonitor")).is_valid(broken)


def test_every_other_object_is_valid_with_monitoring_on(everything):
    for obj in everything:
        if obj["apiVersion"].startswith("ray.io/"):
            errors = list(crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj))
            assert not errors, errors[0].message
        elif not obj["apiVersion"].startswith(CUSTOM_GROUPS):
            assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION


def container_ports(template: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for c in containers(template["spec"])
            for p in c.get("ports", []) if "name" in p}


def test_the_mlflow_service_monitor_scrapes_the_metrics_sidecar(everything):
    monitor = monitors(everything)[f"{RELEASE}-mlflow"]
    (endpoint,) = monitor["spec"]["endpoints"]
    services = [s for s in of_kind(everything, "Service")
                if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in services] == [f"{RELEASE}-mlflow"]
    (port,) = [p for p in services[0]["spec"]["ports"] if p["name"] == endpoint["port"]]
    deployment = one(everything, "Deployment", f"{RELEASE}-mlflow")
    template = deployment["spec"]["template"]
    assert selects({"matchLabels": services[0]["spec"]["selector"]}, template["metadata"]["labels"])
    assert container_ports(template)[port["targetPort"]] == 9102
    server, sidecar = template["spec"]["containers"]
    assert "--expose-prometheus=/prometheus" in server["args"]
    assert sidecar["command"] == ["python", "-m", "dermml.orchestration.mlflow_metrics"]
    assert "--dir=/prometheus" in sidecar["args"] and "--port=9102" in sidecar["args"]
    shared = {m["name"] for m in server["volumeMounts"] if m["mountPath"] == "/prometheus"}
    assert shared == {m["name"] for m in sidecar["volumeMounts"] if m["mountPath"] == "/prometheus"}
    # The sidecar needs no credential: it has none.
    assert not [e for e in sidecar.get("env", []) if "valueFrom" in e]


def test_the_serving_pod_monitor_selects_every_model_server_and_its_metrics_port(everything):
    monitor = monitors(everything)[f"{RELEASE}-serving"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    servers = {name: t for name, t in pod_specs(everything).items() if "-serving-" in name}
    assert len(servers) == 2
    for name, template in pod_specs(everything).items():
        chosen = selects(monitor["spec"]["selector"], template["metadata"]["labels"])
        assert chosen == (name in servers), name
    for name, template in servers.items():
        assert container_ports(template)[endpoint["port"]] == 8082, name  # MLServer's
        assert "dermml.io/model" in template["metadata"]["labels"]
    assert monitor["spec"]["podTargetLabels"] == ["dermml.io/model"]


def test_the_ray_pod_monitor_selects_every_ray_node_and_rayjob_pod(everything):
    from test_rayjob import gpu_cfg, rayjob_platform

    from dermml.orchestration.rayjob import pod_labels, rayjob_manifest

    monitor = monitors(everything)[f"{RELEASE}-ray"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    ray_pods = {n: t for n, t in pod_specs(everything).items() if n.startswith("RayCluster/")}
    assert {n.rsplit("/", 1)[1] for n in ray_pods} == {"head", "cpu"}
    for name, template in pod_specs(everything).items():
        assert selects(monitor["spec"]["selector"], template["metadata"]["labels"]) == (
            name in ray_pods), name
    for name, template in ray_pods.items():
        assert container_ports(template)[endpoint["port"]] == 8080, name
    # The RayJobs pipeline steps submit carry the same labels (release ray_job.helm_release).
    platform = rayjob_platform()
    assert selects(monitor["spec"]["selector"], pod_labels(platform))
    job = rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123", platform)
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    assert selects(monitor["spec"]["selector"], head["metadata"]["labels"])


def test_the_kuberay_operator_pod_monitor_selects_the_operator_infra_installs(everything):
    monitor = monitors(everything)[f"{RELEASE}-kuberay-operator"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    kustomize = ROOT / "infra" / "kustomize" / "kuberay-operator"
    namespace = yaml.safe_load((kustomize / "namespace.yaml").read_text())["metadata"]["name"]
    deployment = yaml.safe_load((kustomize / "deployment.yaml").read_text())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}
    template = deployment["spec"]["template"]
    assert selects(monitor["spec"]["selector"], template["metadata"]["labels"])
    (operator,) = template["spec"]["containers"]
    assert endpoint["port"] in {p["name"] for p in operator["ports"]}
    assert operator["readinessProbe"]["httpGet"]["path"] == endpoint["path"] == "/metrics"


def test_only_prometheus_reaches_the_metrics_ports(everything):
    policies = {p["metadata"]["name"]: p for p in of_kind(everything, "NetworkPolicy")}
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for component, port in (("mlflow", 9102), ("serving", 8082), ("ray", 8080)):
        policy = policies[f"{RELEASE}-{component}-metrics"]
        labels = {"app.kubernetes.io/name": "dermml", "app.kubernetes.io/instance": RELEASE,
                  "app.kubernetes.io/component": component}
        assert selects(policy["spec"]["podSelector"], labels)
        assert admitted_ports(policy, MONITORING, prometheus, {port, 5000}) == {port}
        assert not admitted_ports(policy, MONITORING, {"app": "grafana"}, {port})
        assert not admitted_ports(policy, "kubeflow", prometheus, {port})


def test_nothing_of_monitoring_renders_unless_asked():
    objects = rendered("default")
    assert not [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert not [p for p in of_kind(objects, "NetworkPolicy")
                if p["metadata"]["name"].endswith("-metrics")]
    mlflow = one(objects, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"]
    assert [c["name"] for c in mlflow["containers"]] == ["mlflow"]


# ----------------------------------------------------------------------------- dashboard
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_dashboard_parses_and_every_panel_has_a_query():
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    variables = {v["name"] for v in board["templating"]["list"]}
    assert {"datasource", "namespace"} <= variables
    panels = board["panels"]
    assert len(panels) >= 8
    ids = [p["id"] for p in panels]
    assert len(set(ids)) == len(ids)
    for panel in panels:
        assert panel["title"] and panel["type"] in ("timeseries", "stat", "gauge"), panel
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        targets = panel["targets"]
        assert targets and all(t["expr"].strip() and t["refId"] for t in targets), panel["title"]
        for target in targets:  # balanced and not obviously broken PromQL
            expr = target["expr"]
            assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), expr
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    # Training throughput, GPU use, serving latency and errors, MLflow, KubeRay.
    for metric in ("ray_dermml_epoch_seconds", "ray_dermml_sec_per_kimg", "DCGM_FI_DEV_GPU_UTIL",
                   "ray_node_gpus_utilization", "rest_server_request_duration_seconds_bucket",
                   'status_code=~"5.."', "mlflow_http_request_total",
                   "controller_runtime_reconcile_errors_total"):
        assert metric in exprs, metric
    assert "histogram_quantile(0.95" in exprs


def test_the_dashboard_ships_as_a_configmap_grafana_loads(everything):
    (configmap,) = of_kind(everything, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["dermml-overview.json"]) == dashboard()
    assert kubernetes_validate.validate(configmap, KUBE_VERSION, strict=True)
    elsewhere = render({"monitoring": {"enabled": True, "dashboards": {"namespace": MONITORING}}})
    (configmap,) = of_kind(elsewhere, "ConfigMap")
    assert configmap["metadata"]["namespace"] == MONITORING


def test_the_dashboards_training_gauges_are_what_training_exports(monkeypatch):
    """ray_dermml_<name>: DermML's training hooks set these Ray gauges on each epoch when
    training runs in Ray (here a stand-in for ray.util.metrics.Gauge)."""
    import ray
    import ray.util.metrics

    from dermml.orchestration import training_hooks

    set_values = {}

    class Gauge:
        def __init__(self, name, description="", tag_keys=()):
            self.name, self.tag_keys = name, tag_keys

        def set(self, value, tags=None):
            assert set(tags) == set(self.tag_keys)
            set_values[self.name] = (value, tags)

    assert training_hooks.ray_gauges("run") is None or ray.is_initialized()
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray.util.metrics, "Gauge", Gauge)
    record = training_hooks.ray_gauges("0123abcd")
    record({"epoch_seconds": 12.0, "optimizer_steps": 60, "epoch": 3, "train_loss": 0.5})
    assert set_values["dermml_epoch_seconds"] == (12.0, {"mlflow_run_id": "0123abcd"})
    assert set_values["dermml_steps_per_second"][0] == 5.0
    assert "dermml_train_loss" not in set_values
    exprs = " ".join(t["expr"] for p in dashboard()["panels"] for t in p["targets"])
    used = set(re.findall(r"ray_dermml_(\w+)", exprs))
    assert used and used <= set(training_hooks.RAY_GAUGES)


# ----------------------------------------------------------------------------- ingress
def test_serving_and_mlflow_ingresses_serve_tls_from_cert_manager(everything):
    services = {s["metadata"]["name"]: s for s in of_kind(everything, "Service")}
    ingresses = {i["metadata"]["name"]: i for i in of_kind(everything, "Ingress")}
    assert set(ingresses) == {f"{RELEASE}-mlflow", f"{RELEASE}-serving"}
    for name, ingress in ingresses.items():
        assert ingress["metadata"]["annotations"]["cert-manager.io/cluster-issuer"] == (
            "letsencrypt")
        spec = ingress["spec"]
        hosts = [rule["host"] for rule in spec["rules"]]
        (tls,) = spec["tls"]
        assert sorted(tls["hosts"]) == sorted(hosts) and tls["secretName"] == f"{name}-tls"
        for rule in spec["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                port_names = {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
                assert backend["port"]["name"] in port_names, (name, backend)
    assert sorted(r["host"] for r in ingresses[f"{RELEASE}-serving"]["spec"]["rules"]) == [
        "classification.serving.dermml.example.org", "segmentation.serving.dermml.example.org"]
    # MLflow accepts its public host name.
    args = one(everything, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert any(a.startswith("--allowed-hosts=") and "mlflow.dermml.example.org" in a
               for a in args)


def test_an_existing_tls_secret_needs_no_cert_manager():
    objects = render({"serving": {"ingress": {"enabled": True, "tlsSecretName": "wildcard"}},
                      "mlflow": {"ingress": {"enabled": True}}})
    serving = one(objects, "Ingress", f"{RELEASE}-serving")
    assert serving["spec"]["tls"][0]["secretName"] == "wildcard"
    assert "annotations" not in serving["metadata"]
    assert "tls" not in one(objects, "Ingress", f"{RELEASE}-mlflow")["spec"]  # plain HTTP
    for ingress in of_kind(objects, "Ingress"):
        assert kubernetes_validate.validate(ingress, KUBE_VERSION, strict=True)
