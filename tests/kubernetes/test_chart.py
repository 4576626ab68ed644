"""The dermml Helm chart renders valid, locked-down Kubernetes objects for every profile.

Rendered offline with helm-python (no helm binary, no cluster). Built-in kinds are validated
against the Kubernetes 1.33 OpenAPI schemas in strict mode (kubernetes-validate); the RayCluster
against the KubeRay v1.7.0 CRD schema it will meet, made strict the way the API server's
field validation is (unknown fields are errors).
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dermml"
# CI clones the repository with shared/ beside it.
CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "k8s-crds"
KUBE_VERSION = "1.33"
RELEASE = NAMESPACE = "dermml"
PROFILES = {"default": None, "local": "values-local.yaml", "gpu": "values-gpu.yaml",
            # Every optional switch on (IRSA, auth, monitoring, Ingresses with cert-manager).
            "everything": "ci/everything-values.yaml"}
# Custom resources validated elsewhere: KubeRay's against its CRDs (below), Prometheus
# Operator's monitors field by field (no CRD offline: tests/kubernetes/test_observability.py).
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/")
IMAGE_UID = 10001
GPU = "nvidia.com/gpu"
# Env vars that carry credentials wherever the chart sets them.
CREDENTIAL_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_BACKEND_STORE_URI",
                  "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                  "MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                  "MLFLOW_FLASK_SERVER_SECRET_KEY",
                  "DERMML_MLFLOW_PIPELINE_USERNAME", "DERMML_MLFLOW_PIPELINE_PASSWORD",
                  "DERMML_MLFLOW_READER_USERNAME", "DERMML_MLFLOW_READER_PASSWORD"}
SECRET_LIKE_NAME = re.compile(r"PASSWORD|SECRET|KEY|TOKEN|CREDENTIAL|BACKEND_STORE_URI")


# ----------------------------------------------------------------------------- rendering
@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def profile_values(profile: str) -> dict[str, Any]:
    name = PROFILES[profile]
    return yaml.safe_load((CHART / name).read_text()) if name else {}


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every object the chart renders (hooks included), NOTES.txt left out."""
    manifests = chart().render(values=values or {}, name=RELEASE, namespace=NAMESPACE)
    return [doc for path, text in sorted(manifests.items()) if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text) if doc]


@functools.cache
def _rendered_profile(profile: str) -> tuple[str, ...]:
    return tuple(yaml.safe_dump(obj) for obj in render(profile_values(profile)))


def rendered(profile: str) -> list[dict[str, Any]]:
    """A profile's objects; a fresh copy per call so a test cannot leak edits into another."""
    return [yaml.safe_load(text) for text in _rendered_profile(profile)]


def merged_values(profile: str) -> dict[str, Any]:
    return chart().merge_values(profile_values(profile))


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [obj for obj in objects if obj["kind"] == kind]


def one(objects: list[dict], kind: str, name: str) -> dict:
    matches = [o for o in of_kind(objects, kind) if o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, got {len(matches)}"
    return matches[0]


def pod_specs(objects: list[dict]) -> dict[str, dict]:
    """Every pod template the chart renders, by a readable name."""
    specs = {}
    for obj in objects:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in ("Deployment", "Job"):
            specs[name] = obj["spec"]["template"]
        elif obj["kind"] == "RayCluster":
            specs[f"{name}/head"] = obj["spec"]["headGroupSpec"]["template"]
            for group in obj["spec"].get("workerGroupSpecs", []):
                specs[f"{name}/{group['groupName']}"] = group["template"]
    return specs


def containers(pod_spec: dict) -> list[dict]:
    return pod_spec.get("initContainers", []) + pod_spec["containers"]


def env_of(container: dict) -> dict[str, dict]:
    return {item["name"]: item for item in container.get("env", [])}


def ray_cluster(objects: list[dict]) -> dict:
    (cluster,) = of_kind(objects, "RayCluster")
    return cluster


def worker_groups(objects: list[dict]) -> dict[str, dict]:
    return {g["groupName"]: g for g in ray_cluster(objects)["spec"]["workerGroupSpecs"]}


def selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels + In/Exists expressions) matches ``labels``."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value = labels.get(expr["key"])
        if expr["operator"] == "In" and value not in expr["values"]:
            return False
        if expr["operator"] == "Exists" and value is None:
            return False
    return True


# ----------------------------------------------------------------------------- CRD schemas
def strict(schema: Any) -> Any:
    """The CRD schema with unknown fields forbidden, as ``kubectl apply`` (strict) sees it."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are large


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    """Validator for ``kind`` at ``api_version`` from the KubeRay CRDs under shared/k8s-crds."""
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR}: clone the repo with shared/ beside it")
    group, version = api_version.split("/")
    # CRD files are named <group>_<plural>.yaml; read only the candidates.
    for path in sorted(CRD_DIR.rglob(f"{group}_{kind.lower()}*.yaml")):
        for crd in yaml.load_all(path.read_text(), Loader=YAML_LOADER):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            if (crd["spec"]["group"], crd["spec"]["names"]["kind"]) != (group, kind):
                continue
            for served in crd["spec"]["versions"]:
                if served["name"] == version:
                    schema = strict(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
                    return jsonschema.Draft7Validator(schema)
    raise AssertionError(f"no CRD for {kind} {api_version} under {CRD_DIR}")


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("profile", PROFILES)
def test_chart_lints_without_warnings(profile):
    report = helm.lint(CHART, profile_values(profile), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


@pytest.mark.parametrize("profile", PROFILES)
def test_builtin_objects_are_valid_kubernetes_1_33(profile):
    builtin = [o for o in rendered(profile) if not o["apiVersion"].startswith(CUSTOM_GROUPS)]
    assert builtin
    for obj in builtin:
        try:
            # validate() falls back to an older schema set if 1.33 is missing; it must not.
            assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} ({profile}): {error.message} "
                        f"at {'/'.join(map(str, error.path))}")


@pytest.mark.parametrize("profile", PROFILES)
def test_ray_objects_match_the_kuberay_crd_schema(profile):
    ray_objects = [o for o in rendered(profile) if o["apiVersion"].startswith("ray.io/")]
    assert [o["kind"] for o in ray_objects] == ["RayCluster"]
    for obj in ray_objects:
        validator = crd_validator(obj["apiVersion"], obj["kind"])
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors[:10])


def test_crd_check_rejects_a_misspelled_field():
    """The strict CRD schema is what catches typos in the RayCluster template."""
    cluster = ray_cluster(rendered("default"))
    cluster["spec"]["headGroupSpec"]["rayStartParam"] = {}
    assert not crd_validator("ray.io/v1", "RayCluster").is_valid(cluster)


@pytest.mark.parametrize("profile", PROFILES)
def test_every_pod_runs_with_the_restricted_security_profile(profile):
    specs = pod_specs(rendered(profile))
    assert {k.split("/")[0] for k in specs} == {"Deployment", "Job", "RayCluster"}
    for name, template in specs.items():
        pod = template["spec"]
        pod_ctx = pod["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, name
        assert pod_ctx["runAsUser"] == IMAGE_UID, name
        assert pod_ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
        for forbidden in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(forbidden), f"{name}: {forbidden}"
        assert not any("hostPath" in v for v in pod.get("volumes", [])), name
        for container in containers(pod):
            ctx = container["securityContext"]
            where = f"{name}/{container['name']}"
            assert ctx["allowPrivilegeEscalation"] is False, where
            assert ctx["readOnlyRootFilesystem"] is True, where
            assert ctx["capabilities"]["drop"] == ["ALL"], where
            assert not ctx["capabilities"].get("add"), where
            assert not ctx.get("privileged"), where


@pytest.mark.parametrize("profile", PROFILES)
def test_read_only_containers_get_writable_tmp_and_home(profile):
    for name, template in pod_specs(rendered(profile)).items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        for container in containers(template["spec"]):
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            for path in ("/tmp", "/home/dermml"):
                assert path in mounts, f"{name}/{container['name']} has no {path} mount"
                assert "emptyDir" in volumes[mounts[path]], f"{name}: {path} is not an emptyDir"
            if name.startswith("RayCluster/"):
                assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", name


@pytest.mark.parametrize("profile", PROFILES)
def test_only_pods_that_call_the_kubernetes_api_get_a_token(profile):
    objects = rendered(profile)
    autoscaling = merged_values(profile)["ray"]["enableInTreeAutoscaling"]
    for name, template in pod_specs(objects).items():
        # The Ray autoscaler sidecar patches the RayCluster; nothing else talks to the API.
        expected = autoscaling and name.endswith("/head")
        assert template["spec"]["automountServiceAccountToken"] is expected, name
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind(objects, "ServiceAccount")}
    for name, account in accounts.items():
        expected = name == f"{RELEASE}-pipeline-runner"
        assert account["automountServiceAccountToken"] is expected, name


def test_autoscaler_sidecar_is_restricted_too():
    cluster = ray_cluster(rendered("gpu"))
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    ctx = cluster["spec"]["autoscalerOptions"]["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"]["drop"] == ["ALL"]
    # KubeRay then names the head's ServiceAccount after the cluster and binds its autoscaler
    # Role to it; our own Ray ServiceAccount (no token) must not be used there.
    assert "serviceAccountName" not in cluster["spec"]["headGroupSpec"]["template"]["spec"]


@pytest.mark.parametrize("profile", PROFILES)
def test_ray_head_takes_no_work_and_serves_its_dashboard(profile):
    head = ray_cluster(rendered(profile))["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    (container,) = head["template"]["spec"]["containers"]
    assert {p["containerPort"] for p in container["ports"]} >= {6379, 8265, 10001}
    assert GPU not in str(container["resources"])


def test_gpu_profile_puts_gpu_workers_on_the_tainted_gpu_pool():
    objects = rendered("gpu")
    gpu_groups = [g for g in worker_groups(objects).values()
                  if GPU in g["template"]["spec"]["containers"][0]["resources"]["limits"]]
    assert len(gpu_groups) == 1
    group = gpu_groups[0]
    pod = group["template"]["spec"]
    (worker,) = pod["containers"]
    assert worker["resources"]["limits"][GPU] == 1
    assert worker["resources"]["requests"][GPU] == 1
    assert worker["image"].startswith("ghcr.io/dermml/dermml-gpu:")
    assert pod["nodeSelector"] == {"dermml.io/pool": "gpu", "nvidia.com/gpu.present": "true"}
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    # Scale to zero: no GPU node is paid for while nothing trains.
    assert (group["minReplicas"], group["maxReplicas"]) == (0, 4)
    assert ray_cluster(objects)["spec"]["enableInTreeAutoscaling"] is True


def test_gpu_profile_autoscales_the_model_servers():
    objects = rendered("gpu")
    (hpa,) = of_kind(objects, "HorizontalPodAutoscaler")
    deployment = one(objects, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
    # The HPA owns the replica count; a fixed one would fight it on every upgrade.
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert "cpu" in container["resources"]["requests"]


def test_local_profile_asks_for_no_gpu_and_no_autoscaling():
    objects = rendered("local")
    assert "nvidia.com" not in yaml.safe_dump_all(objects)
    for group in worker_groups(objects).values():
        assert group["template"]["spec"]["containers"][0]["image"].startswith(
            "ghcr.io/dermml/dermml:")
    assert not of_kind(objects, "HorizontalPodAutoscaler")
    assert not of_kind(objects, "PodDisruptionBudget")
    (serving,) = [d for d in of_kind(objects, "Deployment")
                  if d["metadata"]["labels"]["app.kubernetes.io/component"] == "serving"]
    assert serving["spec"]["replicas"] == 1
    (mlflow,) = [d for d in of_kind(objects, "Deployment")
                 if d["metadata"]["labels"]["app.kubernetes.io/component"] == "mlflow"]
    env = env_of(mlflow["spec"]["template"]["spec"]["containers"][0])
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio.dermml.svc:9000"


@pytest.mark.parametrize("profile", PROFILES)
def test_pipeline_runner_rbac_is_least_privilege(profile):
    objects = rendered(profile)
    assert not of_kind(objects, "ClusterRole") and not of_kind(objects, "ClusterRoleBinding")
    (role,) = of_kind(objects, "Role")
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert "*" not in rule.get(field, []), f"wildcard in {field}: {rule}"
    granted = {(group, resource): rule for rule in role["rules"]
               for group in rule["apiGroups"] for resource in rule["resources"]}
    assert set(granted) == {("ray.io", "rayjobs"), ("ray.io", "rayclusters"), ("", "secrets"),
                            ("", "pods"), ("", "pods/log")}
    assert sorted(granted["ray.io", "rayjobs"]["verbs"]) == [
        "create", "delete", "get", "list", "watch"]
    assert sorted(granted["ray.io", "rayclusters"]["verbs"]) == ["get", "list", "watch"]
    assert sorted(granted["", "pods/log"]["verbs"]) == ["get", "list", "watch"]
    secrets = granted["", "secrets"]
    assert secrets["verbs"] == ["get"]
    values = merged_values(profile)
    # S3 keys only without IRSA (then the pods get AWS credentials from their ServiceAccount).
    s3_keys = [] if values["s3"]["irsa"]["enabled"] else [values["s3"]["existingSecret"]]
    assert sorted(secrets["resourceNames"]) == sorted(
        s3_keys + [values["mlflowClient"]["existingSecret"]])
    (binding,) = of_kind(objects, "RoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": f"{RELEASE}-pipeline-runner",
            "namespace": NAMESPACE} in binding["subjects"]


@pytest.mark.parametrize("profile", PROFILES)
def test_network_policies_deny_by_default_and_allow_only_dermml_flows(profile):
    objects = rendered(profile)
    policies = {p["metadata"]["name"]: p["spec"] for p in of_kind(objects, "NetworkPolicy")}
    deny = policies[f"{RELEASE}-default-deny"]
    assert sorted(deny["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in deny and "egress" not in deny
    for name, template in pod_specs(objects).items():
        assert selects(deny["podSelector"], template["metadata"]["labels"]), name

    dns = policies[f"{RELEASE}-allow-dns"]["egress"][0]
    assert dns["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "kube-system"}
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}

    labels = {c: {"app.kubernetes.io/part-of": "dermml", "app.kubernetes.io/component": c}
              for c in ("serving", "ray", "pipeline-runner", "mlflow")}
    mlflow = policies[f"{RELEASE}-mlflow"]
    (clients,) = mlflow["ingress"]
    assert clients["ports"] == [{"protocol": "TCP", "port": 5000}]
    pod_peers = [p["podSelector"] for p in clients["from"] if "namespaceSelector" not in p]
    for component in ("serving", "ray", "pipeline-runner"):
        assert any(selects(s, labels[component]) for s in pod_peers), component
    # From kubeflow, DermML's step pods only (tests/kubernetes/test_network_policies.py).
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "dermml",
                                            "app.kubernetes.io/component": "pipeline-runner"}}
            } in clients["from"]
    assert not [p for p in clients["from"] if "namespaceSelector" in p and "podSelector" not in p
                and p["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] ==
                "kubeflow"]
    egress_ports = {p["port"] for rule in mlflow["egress"] for p in rule["ports"]}
    assert 5432 in egress_ports and egress_ports & {443, 9000}
    assert all(rule["to"] for rule in mlflow["egress"]), "an egress rule without peers allows all"

    serving = policies[f"{RELEASE}-serving"]
    (ingress,) = serving["ingress"]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8080}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"}
    (to_mlflow,) = serving["egress"]
    assert to_mlflow["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "mlflow")

    ray = policies[f"{RELEASE}-ray"]
    ray_self = ray["podSelector"]
    assert {"from": [{"podSelector": ray_self}]} in ray["ingress"]  # head <-> workers, all ports
    assert {"to": [{"podSelector": ray_self}]} in ray["egress"]
    ray_to_mlflow = [r for r in ray["egress"] if r.get("ports") == [
        {"protocol": "TCP", "port": 5000}]]
    assert ray_to_mlflow


def test_kube_api_egress_is_opened_only_for_the_autoscaling_head():
    def api_policies(profile):
        return [p for p in of_kind(rendered(profile), "NetworkPolicy")
                if p["metadata"]["name"].endswith("-head-kube-api")]

    assert not api_policies("local")
    (policy,) = api_policies("gpu")
    assert policy["spec"]["podSelector"]["matchLabels"]["ray.io/node-type"] == "head"


@pytest.mark.parametrize("typo", [
    {"mlflow": {"replicaz": 2}},
    {"mlfow": {"replicas": 2}},
    {"serving": {"models": [{"name": "seg", "modelUri": "models:/m@champion", "replica": 2}]}},
    {"ray": {"workerGroups": [{"groupName": "gpu", "replicas": 0, "minReplicas": 0,
                               "maxReplicas": 1, "gpus": 1}]}},
    {"networkPolicy": {"enable": False}},
    {"s3": {"existingSecert": "dermml-s3"}},
], ids=["mlflow.replicaz", "mlfow", "models.replica", "workerGroups.gpus", "networkPolicy.enable",
        "s3.existingSecert"])
def test_a_typo_in_values_is_rejected_by_the_schema(typo):
    with pytest.raises(helm.HelmValuesError, match="additional properties"):
        render(typo)


def undocumented_values(lines: list[str]) -> list[str]:
    """Keys of a values file without a helm-docs ("# --") comment.

    A key with a "# --" comment is documented together with everything nested under it (its
    default value). A key opening a block without one is a section: its children are checked.
    """
    missing, skip_deeper_than = [], None
    for number, line in enumerate(lines):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        if skip_deeper_than is not None and indent > skip_deeper_than:
            continue
        skip_deeper_than = None
        key = re.match(r"^\s*([A-Za-z][\w./-]*):(.*)$", line)
        if not key:
            continue
        above = number - 1
        comment = []
        while above >= 0 and lines[above].strip().startswith("#"):
            comment.append(lines[above].strip())
            above -= 1
        if any(c.startswith("# --") for c in comment):
            skip_deeper_than = indent
        elif key.group(2).strip():
            missing.append(f"values.yaml:{number + 1}: {line.strip()}")
    return missing


def test_the_values_file_documents_every_value():
    lines = (CHART / "values.yaml").read_text().splitlines()
    assert not undocumented_values(lines), "\n".join(undocumented_values(lines))
    assert undocumented_values(["a:", "  # -- documented", "  b: 1", "  c: 2"]) == [
        "values.yaml:4: c: 2"]


SECRET_VALUES = {
    "s3": {"existingSecret": "my-s3-secret", "accessKeyIdKey": "id",
           "secretAccessKeyKey": "secret"},
    "mlflow": {"backendStore": {"existingSecret": "my-db-secret", "uriKey": "uri"},
               "auth": {"enabled": True, "existingSecret": "my-auth-secret"}},
    "mlflowClient": {"existingSecret": "my-client-secret"},
    "mlflowReader": {"existingSecret": "my-reader-secret"},
}


def test_credentials_are_referenced_from_existing_secrets_never_inlined():
    objects = render(SECRET_VALUES)
    assert not of_kind(objects, "Secret"), "the chart must not create Secrets"
    expected_secret = {"AWS_ACCESS_KEY_ID": "my-s3-secret", "AWS_SECRET_ACCESS_KEY": "my-s3-secret",
                       "MLFLOW_BACKEND_STORE_URI": "my-db-secret",
                       "MLFLOW_TRACKING_USERNAME": "my-client-secret",
                       "MLFLOW_TRACKING_PASSWORD": "my-client-secret",
                       "MLFLOW_AUTH_ADMIN_USERNAME": "my-auth-secret",
                       "MLFLOW_AUTH_ADMIN_PASSWORD": "my-auth-secret",
                       "MLFLOW_FLASK_SERVER_SECRET_KEY": "my-auth-secret",
                       "DERMML_MLFLOW_PIPELINE_USERNAME": "my-client-secret",
                       "DERMML_MLFLOW_PIPELINE_PASSWORD": "my-client-secret",
                       "DERMML_MLFLOW_READER_USERNAME": "my-reader-secret",
                       "DERMML_MLFLOW_READER_PASSWORD": "my-reader-secret"}
    # The model servers are MLflow readers; everyone else with MLflow credentials is the
    # pipeline identity (steps, Ray).
    reader = {"MLFLOW_TRACKING_USERNAME": "my-reader-secret",
              "MLFLOW_TRACKING_PASSWORD": "my-reader-secret"}
    seen = set()
    for pod, template in pod_specs(objects).items():
        for container in containers(template["spec"]):
            expected = {**expected_secret, **(reader if "-serving-" in pod else {})}
            for name, item in env_of(container).items():
                if SECRET_LIKE_NAME.search(name):
                    assert "value" not in item, f"{container['name']}: {name} has a literal value"
                if name in CREDENTIAL_ENV:
                    seen.add(name)
                    assert item["valueFrom"]["secretKeyRef"]["name"] == expected[name], (pod, name)
    assert seen == CREDENTIAL_ENV
    # The auth config file (it names the auth DB) comes from the Secret as a volume.
    mlflow_pod = one(objects, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in mlflow_pod["volumes"]}
    assert volumes["auth-config"]["secret"]["secretName"] == "my-auth-secret"


@pytest.mark.parametrize("where", [
    {"s3": {"secretAccessKey": "s3cr3t-password"}},
    {"s3": {"accessKeyId": "AKIAFAKEFAKEFAKE"}},
    {"mlflow": {"backendStore": {"uri": "postgresql+psycopg2://mlflow:s3cr3t-password@db/mlflow"}}},
    {"mlflow": {"auth": {"adminPassword": "s3cr3t-password"}}},
], ids=["s3.secretAccessKey", "s3.accessKeyId", "backendStore.uri", "auth.adminPassword"])
def test_there_is_no_value_that_takes_a_credential(where):
    with pytest.raises(helm.HelmValuesError, match="additional properties"):
        render(where)


CREDENTIAL_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{12,}"),  # AWS access key id
    re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^/\s@'\"]+@"),  # URI with a password
    re.compile(r"(?im)(password|secret_?key|token)\s*[:=]\s*['\"]?[A-Za-z0-9/+=_-]{6,}['\"]?$"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]


@pytest.mark.parametrize("profile", PROFILES)
def test_rendered_output_holds_no_credential(profile, monkeypatch):
    """Grep every rendered file (NOTES.txt included) of each profile, with the secret names of a
    test values file and credentials in the rendering shell, for anything credential-shaped."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-fake-value")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2-fake")
    values = {**profile_values(profile), **SECRET_VALUES}
    text = "\n".join(chart().render(values=values, name=RELEASE, namespace=NAMESPACE).values())
    assert "my-s3-secret" in text  # the test values were used
    for fake in ("s3cr3t-fake-value", "hunter2-fake"):
        assert fake not in text
    for pattern in CREDENTIAL_PATTERNS:
        match = pattern.search(text)
        assert match is None, f"credential-like text in the rendered chart: {match.group(0)!r}"
    # The patterns do find what they are for.
    leaks = ["key: AKIAIOSFODNN7EXAMPLE", "uri: postgresql+psycopg2://mlflow:pw123456@db/mlflow",
             "  password: hunter2abc", "-----BEGIN RSA PRIVATE KEY-----"]
    assert all(p.search(leak) for p, leak in zip(CREDENTIAL_PATTERNS, leaks, strict=True))


def test_mlflow_server_uses_postgres_and_proxied_s3_artifacts():
    objects = rendered("default")
    pod = one(objects, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    args = server["args"]
    assert args[0] == "server" and "--host=0.0.0.0" in args and "--serve-artifacts" in args
    assert "--artifacts-destination=s3://dermml-mlflow/artifacts" in args
    # The server reads the URI from the env: the DB password is never an argument.
    assert not any("backend-store-uri" in a for a in args)
    assert "MLFLOW_BACKEND_STORE_URI" in env_of(server)
    allowed = next(a for a in args if a.startswith("--allowed-hosts=")).split("=", 1)[1]
    assert f"{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:*" in allowed.split(",")
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"


def test_database_migration_runs_as_a_hook_before_install_and_upgrade():
    objects = rendered("default")
    job = one(objects, "Job", f"{RELEASE}-mlflow-migrate")
    annotations = job["metadata"]["annotations"]
    assert annotations["helm.sh/hook"] == "pre-install,pre-upgrade"
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "dermml.orchestration.mlflow_db"]
    account = one(objects, "ServiceAccount", job["spec"]["template"]["spec"]["serviceAccountName"])
    # Created before the Job: pre-install hooks run before the release's own objects exist.
    assert int(account["metadata"]["annotations"]["helm.sh/hook-weight"]) < int(
        annotations["helm.sh/hook-weight"])


@pytest.mark.parametrize("profile", PROFILES)
def test_no_secret_reaches_a_command_line(profile):
    """Credentials are Secret-backed env vars that no command or argument refers to: Kubernetes
    expands ``$(VAR)`` in command/args into the process's argv, readable in
    /proc/<pid>/cmdline and ps. The migration Job reads the DB URI from its env var."""
    objects = render({**profile_values(profile), **SECRET_VALUES})
    for name, template in pod_specs(objects).items():
        for container in containers(template["spec"]):
            secret_env = {env for env, item in env_of(container).items()
                          if "secretKeyRef" in item.get("valueFrom", {})}
            argv = container.get("command", []) + container.get("args", [])
            for arg in argv:
                assert not {v for v in re.findall(r"\$\((\w+)\)", arg)} & secret_env, (
                    f"{name}/{container['name']}: {arg!r} puts a Secret on the command line")
    job = one(objects, "Job", f"{RELEASE}-mlflow-migrate")
    (migrate,) = job["spec"]["template"]["spec"]["containers"]
    assert "args" not in migrate and "$(" not in " ".join(migrate["command"])
    uri = env_of(migrate)["MLFLOW_BACKEND_STORE_URI"]
    assert uri["valueFrom"]["secretKeyRef"] == {"name": "my-db-secret", "key": "uri"}


def test_the_migration_command_reads_the_uri_from_the_environment(tmp_path):
    """What the Job runs: MLflow's `db upgrade` with the URI from $MLFLOW_BACKEND_STORE_URI
    (a SQLite file stands in for PostgreSQL); without it, a clear error."""
    import sqlite3
    import subprocess
    import sys

    command = [sys.executable, "-m", "dermml.orchestration.mlflow_db"]
    db = tmp_path / "mlflow.db"
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{db}"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    tables = {row[0] for row in sqlite3.connect(db).execute(
        "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"alembic_version", "experiments", "runs", "registered_models"} <= tables
    env.pop("MLFLOW_BACKEND_STORE_URI")
    missing = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                             cwd=ROOT)
    assert missing.returncode == 2 and "MLFLOW_BACKEND_STORE_URI is not set" in missing.stderr


@pytest.mark.parametrize("profile", PROFILES)
def test_each_listed_model_is_served_from_the_registry(profile):
    objects = rendered(profile)
    models = merged_values(profile)["serving"]["models"]
    for model in models:
        name = f"{RELEASE}-serving-{model['name']}"
        pod = one(objects, "Deployment", name)["spec"]["template"]["spec"]
        (server,) = pod["containers"]
        assert server["command"] + server["args"][:2] == ["mlflow", "models", "serve"]
        assert f"--model-uri={model['modelUri']}" in server["args"]
        assert {"--env-manager=local", "--host=0.0.0.0", "--port=8080"} <= set(server["args"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert server[probe]["httpGet"] == {"path": "/ping", "port": "http"}
        assert env_of(server)["MLFLOW_TRACKING_URI"]["value"] == (
            f"http://{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000")
        service = one(objects, "Service", name)
        assert service["spec"]["ports"][0]["port"] == 8080
        assert selects({"matchLabels": service["spec"]["selector"]},
                       one(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"])
    assert models[0]["modelUri"] == "models:/dermml-segmentation@champion"


def test_a_second_model_gets_its_own_server_autoscaler_and_budget():
    models = [{"name": "segmentation", "modelUri": "models:/dermml-segmentation@champion"},
              {"name": "classification", "modelUri": "models:/dermml-classification@champion",
               "replicas": 3, "resources": {"requests": {"cpu": "1"}},
               "hpa": {"enabled": True, "maxReplicas": 5}, "pdb": {"enabled": True}}]
    objects = render({"serving": {"models": models}})
    name = f"{RELEASE}-serving-classification"
    assert one(objects, "HorizontalPodAutoscaler", name)["spec"]["maxReplicas"] == 5
    assert one(objects, "PodDisruptionBudget", name)["spec"]["minAvailable"] == 1
    # Defaults fill what the entry leaves out: one replica, no HPA, no PDB.
    first = one(objects, "Deployment", f"{RELEASE}-serving-segmentation")
    assert first["spec"]["replicas"] == 1
    assert [h["metadata"]["name"] for h in of_kind(objects, "HorizontalPodAutoscaler")] == [name]


def test_hpa_without_a_cpu_request_fails_with_the_reason():
    models = [{"name": "seg", "modelUri": "models:/m@champion", "hpa": {"enabled": True}}]
    with pytest.raises(helm.HelmRenderError, match="needs resources.requests.cpu"):
        render({"serving": {"models": models}})


def test_an_egress_target_without_peers_fails_instead_of_allowing_everything():
    with pytest.raises(helm.HelmRenderError, match="networkPolicy.postgres needs cidrs"):
        render({"networkPolicy": {"postgres": {"cidrs": [], "podSelector": {}}}})


def test_optional_objects_are_valid_kubernetes_too():
    """Switches the profiles leave off: Ingress with TLS, auth, PDBs, pull secrets, autoscaling."""
    objects = render({
        "imagePullSecrets": [{"name": "ghcr-pull"}],
        "mlflow": {"ingress": {"enabled": True, "tlsSecretName": "mlflow-tls"},
                   "auth": {"enabled": True}, "pdb": {"enabled": True},
                   "corsAllowedOrigins": ["https://mlflow.example.com"]},
        "ray": {"enableInTreeAutoscaling": True},
        "networkPolicy": {"ingressController": {"podSelector": {
            "app.kubernetes.io/name": "ingress-nginx"}}},
    })
    kinds = {o["kind"] for o in objects}
    assert {"Ingress", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    for obj in objects:
        if obj["apiVersion"].startswith("ray.io/"):
            errors = list(crd_validator(obj["apiVersion"], obj["kind"]).iter_errors(obj))
            assert not errors, errors[0].message
        else:
            kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    for template in pod_specs(objects).values():
        assert template["spec"]["imagePullSecrets"] == [{"name": "ghcr-pull"}]
    mlflow = one(objects, "NetworkPolicy", f"{RELEASE}-mlflow")["spec"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}}
            } in mlflow["ingress"][0]["from"]
    args = one(objects, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--app-name=basic-auth" in args
    assert any(a.startswith("--allowed-hosts=") and "mlflow.example.com" in a for a in args)


IRSA_ROLES = {"mlflow": "arn:aws:iam::123456789012:role/dermml-mlflow-s3",
              "ray": "arn:aws:iam::123456789012:role/dermml-ray-s3",
              "pipelineRunner": "arn:aws:iam::123456789012:role/dermml-pipeline-runner-s3"}


def test_irsa_annotates_the_s3_service_accounts_and_drops_the_static_keys():
    objects = rendered("everything")
    assert merged_values("everything")["s3"]["irsa"]["roleArns"] == IRSA_ROLES
    annotated = {sa["metadata"]["name"]: sa["metadata"].get("annotations", {}).get(
        "eks.amazonaws.com/role-arn") for sa in of_kind(objects, "ServiceAccount")}
    assert annotated[f"{RELEASE}-mlflow"] == IRSA_ROLES["mlflow"]
    assert annotated[f"{RELEASE}-ray"] == IRSA_ROLES["ray"]
    assert annotated[f"{RELEASE}-pipeline-runner"] == IRSA_ROLES["pipelineRunner"]
    # Model servers read models through MLflow's proxy: no AWS role.
    assert annotated[f"{RELEASE}-serving"] is None
    for name, template in pod_specs(objects).items():
        for container in containers(template["spec"]):
            env = env_of(container)
            assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(env), name
            if (name.startswith(("RayCluster/", f"Deployment/{RELEASE}-mlflow"))
                    and container["name"] != "metrics"):
                assert env["AWS_DEFAULT_REGION"]["value"] == "eu-west-1", name
    assert "dermml-s3" not in yaml.safe_dump_all(objects)  # not even referenced
    # Static keys (kind/MinIO) are still the default.
    mlflow = one(rendered("local"), "Deployment", f"{RELEASE}-mlflow")
    assert "AWS_ACCESS_KEY_ID" in env_of(mlflow["spec"]["template"]["spec"]["containers"][0])


def test_irsa_without_a_role_fails_with_the_value_to_set():
    with pytest.raises(helm.HelmRenderError, match="s3.irsa.roleArns.ray is required"):
        render({"s3": {"irsa": {"enabled": True, "roleArns": {
            "mlflow": IRSA_ROLES["mlflow"], "pipelineRunner": IRSA_ROLES["pipelineRunner"]}}}})
    with pytest.raises(helm.HelmValuesError):
        render({"s3": {"irsa": {"enabled": True, "roleArns": {"mlflow": "dermml-mlflow"}}}})


def test_the_auth_bootstrap_job_runs_after_install_and_upgrade_with_secret_env_only():
    from dermml.orchestration.mlflow_auth import default_models

    objects = rendered("everything")
    job = one(objects, "Job", f"{RELEASE}-mlflow-auth")
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "post-install,post-upgrade"
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "dermml.orchestration.mlflow_auth"]
    values = merged_values("everything")["mlflow"]["auth"]["bootstrap"]
    assert sorted(values["registeredModels"]) == sorted(default_models())  # every task
    assert {f"--model={m}" for m in default_models()} | {"--reader=alice"} <= set(
        container["args"])
    env = env_of(container)
    assert env["MLFLOW_TRACKING_URI"]["value"] == (
        f"http://{RELEASE}-mlflow.{NAMESPACE}.svc.cluster.local:5000")
    secrets = {name: item["valueFrom"]["secretKeyRef"]["name"] for name, item in env.items()
               if "valueFrom" in item}
    assert secrets == {"MLFLOW_AUTH_ADMIN_USERNAME": "dermml-mlflow-auth",
                       "MLFLOW_AUTH_ADMIN_PASSWORD": "dermml-mlflow-auth",
                       "DERMML_MLFLOW_PIPELINE_USERNAME": "dermml-mlflow",
                       "DERMML_MLFLOW_PIPELINE_PASSWORD": "dermml-mlflow",
                       "DERMML_MLFLOW_READER_USERNAME": "dermml-mlflow-reader",
                       "DERMML_MLFLOW_READER_PASSWORD": "dermml-mlflow-reader"}
    assert pod["automountServiceAccountToken"] is False
    # The default deny is in force when it runs: its own egress to MLflow, and MLflow admits it.
    from test_network_policies import admitted_ports

    policies = {p["metadata"]["name"]: p for p in of_kind(objects, "NetworkPolicy")}
    labels = job["spec"]["template"]["metadata"]["labels"]
    assert admitted_ports(policies[f"{RELEASE}-mlflow"], NAMESPACE, labels, {5000}) == {5000}
    (egress,) = policies[f"{RELEASE}-mlflow-auth"]["spec"]["egress"]
    assert egress["ports"] == [{"protocol": "TCP", "port": 5000}]
    assert selects(policies[f"{RELEASE}-mlflow-auth"]["spec"]["podSelector"], labels)
    # Without auth there is no Job and MLflow admits no bootstrap pod.
    plain = rendered("default")
    assert not [j for j in of_kind(plain, "Job") if j["metadata"]["name"].endswith("-auth")]
    mlflow = {p["metadata"]["name"]: p for p in of_kind(plain, "NetworkPolicy")}[
        f"{RELEASE}-mlflow"]
    assert not admitted_ports(mlflow, NAMESPACE, labels, {5000})


def test_the_mlflow_server_runs_the_basic_auth_app_from_secrets_only():
    objects = rendered("everything")
    pod = one(objects, "Deployment", f"{RELEASE}-mlflow")["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert "--app-name=basic-auth" in server["args"]
    env = env_of(server)
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow-auth/basic_auth.ini"
    mounts = {m["mountPath"]: m for m in server["volumeMounts"]}
    volume = {v["name"]: v for v in pod["volumes"]}[mounts["/etc/mlflow-auth"]["name"]]
    assert mounts["/etc/mlflow-auth"]["readOnly"] is True
    assert volume["secret"]["secretName"] == "dermml-mlflow-auth"
    for name in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "dermml-mlflow-auth"
