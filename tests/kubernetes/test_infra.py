"""Cluster bootstrap (infra/) builds offline into valid objects that agree with the chart.

Every kustomization is built with ``kubectl kustomize`` (or, where kubectl is missing, a small
builder for the plain ``resources`` lists these kustomizations use) and each object is validated
against the Kubernetes 1.33 schemas in strict mode. The kind and eksctl configs must put the
GPU pool's label and taint where the chart's GPU profile expects them.
"""

from __future__ import annotations

import concurrent.futures
import functools
import importlib.metadata
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
KUSTOMIZE = INFRA / "kustomize"
CHART = ROOT / "charts" / "dermml"
SHARED_CRDS = Path(__file__).resolve().parents[3] / "shared" / "k8s-crds" / "kuberay-v1.7.0"
KUBE_VERSION = "1.33"
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are large
GPU = "nvidia.com/gpu"
# Built offline; infra/kustomize/kfp only points at remote bases (see the test for it).
OFFLINE = ["base", "kuberay-operator", "nvidia-device-plugin", "local-services",
           "overlays/local", "overlays/gpu"]
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PriorityClass", "StorageClass"}


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=YAML_LOADER)


# ----------------------------------------------------------------------------- building
def build_without_kubectl(directory: Path) -> list[dict]:
    """Build a kustomization made only of ``resources`` (and ``namespace``), as kustomize would."""
    kustomization = load_yaml(directory / "kustomization.yaml")
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "namespace"}
    if unsupported:
        pytest.skip(f"kubectl is not installed and {directory} uses {sorted(unsupported)}")
    objects = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        if path.is_dir():
            objects += build_without_kubectl(path)
        else:
            objects += [o for o in yaml.load_all(path.read_text(), Loader=YAML_LOADER) if o]
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    return objects


@functools.cache
def _parse_document(text: str) -> dict | None:
    return yaml.load(text, Loader=YAML_LOADER)


def build_with_kubectl(directory: Path) -> list[dict]:
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {directory}:\n{result.stderr}"
    # The overlays repeat the large CRDs verbatim: parse each distinct document once (the
    # objects are shared between builds, so tests only read them).
    documents = re.split(r"^---\n", result.stdout, flags=re.M)
    return [o for o in map(_parse_document, documents) if o]


@functools.cache
def _builds() -> dict[str, list[dict]]:
    # Two cores: the CRD-heavy builds take seconds each, so run them side by side.
    builder = build_with_kubectl if shutil.which("kubectl") else build_without_kubectl
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(builder, KUSTOMIZE / name) for name in OFFLINE}
        return {name: future.result() for name, future in futures.items()}


def built(name: str) -> list[dict]:
    return _builds()[name]


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


@functools.cache
def gpu_worker_group() -> dict:
    """The GPU worker group of the chart's cloud GPU profile."""
    values = load_yaml(CHART / "values-gpu.yaml")
    (group,) = [g for g in values["ray"]["workerGroups"] if g.get("gpu", 0) > 0]
    return group


def gpu_taint_keys() -> set[str]:
    return {t["key"] for t in gpu_worker_group()["tolerations"] if t["effect"] == "NoSchedule"}


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("name", OFFLINE)
def test_kustomization_builds_offline_into_valid_kubernetes_1_33(name):
    objects = built(name)
    assert objects, f"{name} built nothing"
    for obj in objects:
        try:
            # validate() falls back to an older schema set if 1.33 is missing; it must not.
            assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']}: {error.message} "
                        f"at {'/'.join(map(str, error.path))}")


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
@pytest.mark.parametrize("name", ["base", "local-services", "nvidia-device-plugin"])
def test_fallback_builder_agrees_with_kubectl(name):
    def key(obj):
        return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]

    assert sorted(build_without_kubectl(KUSTOMIZE / name), key=key) == sorted(built(name), key=key)


def test_overlays_compose_the_components_of_their_profile():
    def kinds(name):
        return {(o["kind"], o["metadata"]["name"]) for o in built(name)}

    local, gpu = kinds("overlays/local"), kinds("overlays/gpu")
    for both in (("Namespace", "dermml"), ("Deployment", "kuberay-operator"),
                 ("CustomResourceDefinition", "rayclusters.ray.io"),
                 ("CustomResourceDefinition", "rayjobs.ray.io")):
        assert both in local and both in gpu, both
    # No GPUs on kind, so no device plugin in the local profile.
    assert ("DaemonSet", "nvidia-device-plugin") in gpu
    assert ("DaemonSet", "nvidia-device-plugin") not in local


def test_dermml_namespace_enforces_the_restricted_pod_security_standard():
    (namespace,) = [n for n in of_kind(built("base"), "Namespace")
                    if n["metadata"]["name"] == "dermml"]
    labels = namespace["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted", mode


def restricted_violations(pod: dict) -> list[str]:
    """What the restricted Pod Security Standard would reject in a pod spec."""
    problems = []
    pod_ctx = pod.get("securityContext", {})
    for container in pod.get("initContainers", []) + pod["containers"]:
        ctx = {**pod_ctx, **container.get("securityContext", {})}
        name = container["name"]
        if ctx.get("runAsNonRoot") is not True or ctx.get("runAsUser") == 0:
            problems.append(f"{name}: may run as root")
        if ctx.get("seccompProfile", {}).get("type") not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: no seccomp profile")
        if ctx.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: privilege escalation allowed")
        if ctx.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append(f"{name}: capabilities not dropped")
    if any("hostPath" in v for v in pod.get("volumes", [])):
        problems.append("hostPath volume")
    return problems


@pytest.mark.parametrize("name", ["kuberay-operator", "local-services"])
def test_pods_in_restricted_namespaces_meet_the_restricted_standard(name):
    workloads = [o for o in built(name) if o["kind"] in ("Deployment", "StatefulSet")]
    assert workloads
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert not restricted_violations(pod), (workload["metadata"]["name"],
                                                restricted_violations(pod))


def test_kuberay_operator_matches_the_crds_it_ships_with():
    (deployment,) = of_kind(built("kuberay-operator"), "Deployment")
    (operator,) = deployment["spec"]["template"]["spec"]["containers"]
    assert operator["image"].endswith(":v1.7.0")
    copies = sorted((KUSTOMIZE / "kuberay-operator" / "crds").glob("*.yaml"))
    assert [p.name for p in copies] == [
        "ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_rayservices.yaml"]
    if SHARED_CRDS.is_dir():  # the copies are verbatim upstream v1.7.0 files
        for copy in copies:
            assert copy.read_bytes() == (SHARED_CRDS / copy.name).read_bytes(), copy.name


def test_kuberay_operator_can_do_its_job_and_no_more():
    objects = built("kuberay-operator")
    (role,) = of_kind(objects, "ClusterRole")
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
    for kind in ("rayclusters", "rayjobs", "rayservices"):
        assert {("ray.io", kind, v) for v in ("get", "list", "watch", "update")} <= granted
        assert ("ray.io", f"{kind}/status", "update") in granted
    assert {("", "pods", "create"), ("", "pods", "delete"), ("", "services", "create"),
            ("batch", "jobs", "create")} <= granted
    # The autoscaler's RBAC, created per RayCluster.
    assert {("", "serviceaccounts", "create"), ("rbac.authorization.k8s.io", "roles", "create"),
            ("rbac.authorization.k8s.io", "rolebindings", "create")} <= granted
    (binding,) = of_kind(objects, "ClusterRoleBinding")
    (account,) = of_kind(objects, "ServiceAccount")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]


def test_device_plugin_runs_only_on_gpu_nodes_and_tolerates_their_taint():
    (daemonset,) = of_kind(built("nvidia-device-plugin"), "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert daemonset["metadata"]["namespace"] == "kube-system"
    assert pod["priorityClassName"] == "system-node-critical"
    (container,) = pod["containers"]
    assert re.search(r":v0\.17\.\d+$", container["image"]), container["image"]
    # Same pool label as the chart's GPU workers, so it lands exactly where they do.
    pool = gpu_worker_group()["nodeSelector"]
    assert pod["nodeSelector"] == {"dermml.io/pool": pool["dermml.io/pool"]}
    tolerated = {t["key"] for t in pod["tolerations"] if t.get("effect") in ("NoSchedule", None)}
    assert gpu_taint_keys() <= tolerated


def test_kfp_kustomizations_pin_every_remote_base_to_a_release_tag():
    """infra/kustomize/kfp is not built here: its resources are remote GitHub bases that
    kustomize fetches at build time, and tests run without network. What can be checked
    offline is that every remote base is pinned to one release tag (never a branch), so an
    install is reproducible."""
    tags = set()
    for path in (KUSTOMIZE / "kfp").rglob("kustomization.yaml"):
        for resource in load_yaml(path)["resources"]:
            assert resource.startswith(("https://github.com/", "github.com/")), resource
            match = re.search(r"[?&]ref=([^&]+)", resource)
            assert match, f"{path}: {resource} is not pinned with ?ref="
            assert re.fullmatch(r"v?\d+\.\d+\.\d+", match.group(1)), f"{resource}: not a tag"
            tags.add(match.group(1))
    assert len(tags) == 1, f"cluster-scoped and platform parts from different releases: {tags}"
    names = {str(p.relative_to(KUSTOMIZE)) for p in (KUSTOMIZE / "kfp").rglob("kustomization.yaml")}
    assert names == {"kfp/kustomization.yaml", "kfp/cluster-scoped/kustomization.yaml"}


KFP_SDK = ("kfp", "kfp-kubernetes")
"""The SDK distributions that compile DermML's pipelines; the backend must be their release."""


def kfp_backend_pins() -> dict[str, str]:
    """Every remote base of infra/kustomize/kfp -> the KFP release tag it is pinned to."""
    pins = {}
    for path in sorted((KUSTOMIZE / "kfp").rglob("kustomization.yaml")):
        for resource in load_yaml(path)["resources"]:
            match = re.search(r"[?&]ref=v?([^&]+)", resource)
            pins[f"{path.relative_to(ROOT)}: {resource}"] = match.group(1) if match else ""
    return pins


def sdk_backend_mismatches(sdk: dict[str, str], pins: dict[str, str]) -> list[str]:
    return [f"{where} is KFP {tag}, but {dist} {version} compiles the pipelines"
            for where, tag in pins.items() for dist, version in sdk.items() if tag != version]


def test_kfp_backend_is_the_release_of_the_installed_kfp_sdk():
    """kfp-kubernetes writes fields an older backend's driver refuses (2.17's
    ``secretAsEnv[].optional`` fails every step on a 2.14 backend, kubeflow/pipelines#12495), so
    the SDK installed here and the backend every kustomization installs must be one release; so
    must the lock file the images install."""
    sdk = {dist: importlib.metadata.version(dist) for dist in KFP_SDK}
    pins = kfp_backend_pins()
    assert len(pins) == 2, pins
    assert not sdk_backend_mismatches(sdk, pins), "\n".join(sdk_backend_mismatches(sdk, pins))
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    for dist, version in sdk.items():
        assert re.search(rf"(?m)^{re.escape(dist)}=={re.escape(version)}$", lock), (dist, version)
    # The check does catch the drift it is for.
    stale = {"infra/kustomize/kfp/kustomization.yaml: ...?ref=2.14.3": "2.14.3"}
    assert sdk_backend_mismatches({"kfp-kubernetes": "2.17.0"}, stale) == [
        "infra/kustomize/kfp/kustomization.yaml: ...?ref=2.14.3 is KFP 2.14.3, but "
        "kfp-kubernetes 2.17.0 compiles the pipelines"]


def test_kind_cluster_has_a_tainted_fake_gpu_pool_shaped_like_the_chart_expects():
    config = load_yaml(INFRA / "kind" / "cluster.yaml")
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4" and config["kind"] == "Cluster"
    roles = [n["role"] for n in config["nodes"]]
    assert sorted(roles) == ["control-plane", "worker", "worker"]
    (control_plane,) = [n for n in config["nodes"] if n["role"] == "control-plane"]
    assert {m["containerPort"] for m in control_plane["extraPortMappings"]} == {80, 443}
    selector = gpu_worker_group()["nodeSelector"]
    gpu_nodes = [n for n in config["nodes"]
                 if selector.items() <= n.get("labels", {}).items()]
    assert len(gpu_nodes) == 1, "exactly one worker must carry every GPU node-selector label"
    patches = [yaml.safe_load(p) for p in gpu_nodes[0]["kubeadmConfigPatches"]]
    taints = [t for p in patches if p["kind"] == "JoinConfiguration"
              for t in p["nodeRegistration"]["taints"]]
    assert {t["key"] for t in taints if t["effect"] == "NoSchedule"} == gpu_taint_keys()
    cpu_nodes = [n for n in config["nodes"] if n.get("labels", {}).get("dermml.io/pool") == "cpu"]
    assert len(cpu_nodes) == 1 and "kubeadmConfigPatches" not in cpu_nodes[0]


def test_eks_gpu_node_group_matches_the_chart_gpu_profile_and_scales_from_zero():
    config = load_yaml(INFRA / "eks" / "cluster.yaml")
    assert (config["apiVersion"], config["kind"]) == ("eksctl.io/v1alpha5", "ClusterConfig")
    assert config["iam"]["withOIDC"] is True
    cluster = config["metadata"]["name"]
    groups = {g["name"]: g for g in config["managedNodeGroups"]}
    selector = gpu_worker_group()["nodeSelector"]
    (gpu,) = [g for g in groups.values() if selector.items() <= g.get("labels", {}).items()]
    assert gpu["instanceType"].startswith(("g4dn.", "g5.", "g6.", "p3.", "p4d.", "p5."))
    assert gpu["minSize"] == 0 and gpu["maxSize"] >= gpu_worker_group()["maxReplicas"]
    assert {t["key"] for t in gpu["taints"] if t["effect"] == "NoSchedule"} == gpu_taint_keys()
    for group in groups.values():
        assert group["tags"]["k8s.io/cluster-autoscaler/enabled"] == "true", group["name"]
        assert group["tags"][f"k8s.io/cluster-autoscaler/{cluster}"] == "owned", group["name"]
        assert group["propagateASGTags"] is True, group["name"]
    # Without this the autoscaler cannot know that a node of an empty group offers a GPU.
    assert gpu["tags"][f"k8s.io/cluster-autoscaler/node-template/resources/{GPU}"] == "1"
    cpu = [g for g in groups.values() if g.get("labels", {}).get("dermml.io/pool") == "cpu"]
    assert cpu and all("taints" not in g for g in cpu)
    addons = {a["name"] for a in config["addons"]}
    assert {"vpc-cni", "aws-ebs-csi-driver"} <= addons


def test_eks_gives_each_s3_service_account_its_own_role_on_its_buckets_only():
    """IRSA: one IAM role per ServiceAccount that touches S3 (the chart's, by the names it
    renders, and KFP's step account), created role-only (the chart annotates its accounts),
    allowed only object access on the DermML buckets, never s3:* or every bucket."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_chart import rendered

    config = load_yaml(INFRA / "eks" / "cluster.yaml")
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]): a
                for a in config["iam"]["serviceAccounts"]}
    chart = load_yaml(CHART / "ci" / "everything-values.yaml")["s3"]["irsa"]["roleArns"]
    annotated = {sa["metadata"]["name"]: sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
                 for sa in rendered("everything") if sa["kind"] == "ServiceAccount"
                 and "eks.amazonaws.com/role-arn" in sa["metadata"].get("annotations", {})}
    assert set(annotated.values()) == set(chart.values())
    gpu_values = load_yaml(CHART / "values-gpu.yaml")
    artifacts = re.match(r"s3://([^/]+)", gpu_values["mlflow"]["artifactsDestination"]).group(1)
    buckets = {}
    for name, arn in annotated.items():
        account = accounts[("dermml", name)]
        assert account["roleOnly"] is True, name  # the chart owns the ServiceAccount
        assert arn.endswith(f":role/{account['roleName']}"), (name, arn)
    for key, account in accounts.items():
        if "attachPolicy" not in account:
            continue
        resources = set()
        for statement in account["attachPolicy"]["Statement"]:
            assert statement["Effect"] == "Allow"
            assert all(a.startswith("s3:") and "*" not in a for a in statement["Action"]), key
            resources |= set(statement["Resource"])
        assert all(re.fullmatch(r"arn:aws:s3:::dermml-[a-z-]+(/\*)?", r) for r in resources), key
        buckets[key] = {r.split(":::")[1].split("/")[0] for r in resources}
    assert buckets[("dermml", "dermml-mlflow")] == {artifacts}
    assert buckets[("dermml", "dermml-ray")] == {"dermml-data"}
    assert buckets[("dermml", "dermml-pipeline-runner")] == {"dermml-data"}
    assert "dermml-data" in buckets[("kubeflow", "pipeline-runner")]
    assert artifacts not in buckets[("kubeflow", "pipeline-runner")]


def test_eks_installs_metrics_server_for_the_serving_autoscaler():
    config = load_yaml(INFRA / "eks" / "cluster.yaml")
    assert "metrics-server" in {a["name"] for a in config["addons"]}
    hpa = load_yaml(CHART / "values-gpu.yaml")["serving"]["models"][0]["hpa"]
    assert hpa["enabled"] is True  # what needs it


def test_chart_gpu_profile_uses_the_pool_label_the_clusters_set():
    """The contract between chart and infra, stated once: pool label and GPU taint key."""
    assert gpu_worker_group()["nodeSelector"]["dermml.io/pool"] == "gpu"
    assert gpu_taint_keys() == {GPU}


def test_readme_names_the_secrets_and_keys_the_chart_reads():
    readme = (INFRA / "README.md").read_text()
    values = load_yaml(CHART / "values.yaml")
    expected = {
        values["s3"]["existingSecret"]: [values["s3"]["accessKeyIdKey"],
                                         values["s3"]["secretAccessKeyKey"]],
        values["mlflow"]["backendStore"]["existingSecret"]: [
            values["mlflow"]["backendStore"]["uriKey"]],
        values["mlflowClient"]["existingSecret"]: [values["mlflowClient"]["usernameKey"],
                                                   values["mlflowClient"]["passwordKey"]],
        values["mlflowReader"]["existingSecret"]: [values["mlflowReader"]["usernameKey"],
                                                   values["mlflowReader"]["passwordKey"]],
        values["mlflow"]["auth"]["existingSecret"]: [
            values["mlflow"]["auth"][k] for k in ("adminUsernameKey", "adminPasswordKey",
                                                  "flaskSecretKeyKey", "configKey")],
    }
    for secret, keys in expected.items():
        command = re.search(rf"create secret generic {re.escape(secret)}(?=\s)(.*?)(?:\n\n|```)",
                            readme, re.S)
        assert command, f"README does not create Secret {secret}"
        for key in keys:
            assert re.search(rf"--from-(literal|file)={re.escape(key)}=", command.group(1)), (
                secret, key)


def test_readme_refers_only_to_files_that_exist():
    readme = (INFRA / "README.md").read_text()
    paths = set(re.findall(r"\b((?:infra|charts|configs)/[\w./-]+[\w-])", readme))
    assert paths
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, missing


def test_local_services_are_where_the_local_chart_profile_looks_for_them():
    objects = built("local-services")
    values = load_yaml(CHART / "values-local.yaml")
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    pods = {w["metadata"]["name"]: w["spec"]["template"]["metadata"]["labels"]
            for w in objects if w["kind"] in ("Deployment", "StatefulSet")}
    # MLflow reaches MinIO at s3.endpointUrl, through its NetworkPolicy's pod selector.
    endpoint = re.fullmatch(r"http://([\w-]+)\.([\w-]+)\.svc:(\d+)", values["s3"]["endpointUrl"])
    assert endpoint, values["s3"]["endpointUrl"]
    minio = services[endpoint.group(1)]
    assert minio["metadata"]["namespace"] == endpoint.group(2) == "dermml"
    assert int(endpoint.group(3)) in {p["port"] for p in minio["spec"]["ports"]}
    policy = values["networkPolicy"]
    assert policy["s3"]["podSelector"].items() <= pods["minio"].items()
    # PostgreSQL answers as dermml-postgresql:5432, the host of the backend store URI.
    postgres = services["dermml-postgresql"]
    assert policy["postgres"]["port"] in {p["port"] for p in postgres["spec"]["ports"]}
    assert policy["postgres"]["podSelector"].items() <= pods["dermml-postgresql"].items()
    # The artifact bucket exists when MinIO starts.
    bucket = re.match(r"s3://([^/]+)/", values["mlflow"]["artifactsDestination"]).group(1)
    (deployment,) = [o for o in of_kind(objects, "Deployment") if o["metadata"]["name"] == "minio"]
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert f"/data/{bucket}" in init["command"]


# vCPU and GiB of the instance types a node group may use; the kubelet keeps ~0.1 CPU and
# ~1 GiB of them (EKS AMI defaults for these sizes).
INSTANCE_CAPACITY = {"g5.xlarge": (4, 16), "g5.2xlarge": (8, 32), "g6.xlarge": (4, 16),
                     "g4dn.xlarge": (4, 16), "g4dn.2xlarge": (8, 32), "m6i.2xlarge": (8, 32)}


def test_platform_pools_are_the_eks_node_groups_and_their_pods_fit_one_node():
    """The platform config's node sizes are the EKS groups' instance types (they are what the
    fit check of task presets compares with), and a pipeline step or RayJob worker asking for
    more than a node offers would stay Pending while the autoscaler never adds a node."""
    from dermml.orchestration.platform import load_platform, parse_quantity

    platform = load_platform(ROOT / "configs" / "platform" / "default.yaml")
    groups = load_yaml(INFRA / "eks" / "cluster.yaml")["managedNodeGroups"]
    assert platform.ray_job.worker_pool == platform.stages["train"]  # RayJob workers: gpu pool
    for name, pool in platform.pools.items():
        (group,) = [g for g in groups
                    if pool.node_selector.items() <= g.get("labels", {}).items()]
        vcpus, gib = INSTANCE_CAPACITY[group["instanceType"]]
        assert pool.node is not None, name
        assert pool.node.instance_type == group["instanceType"], name
        assert (pool.node.cpu, parse_quantity(pool.node.memory)) == (vcpus, gib * 2**30), name
        assert pool.node.gpus == int(group.get("tags", {}).get(
            f"k8s.io/cluster-autoscaler/node-template/resources/{GPU}", 0)), name
        cpu_free, memory_free = vcpus - 0.1, (gib - 1) * 2**30
        assert parse_quantity(pool.cpu_request) <= cpu_free, f"{name}: cpu {pool.cpu_request}"
        for memory in (pool.memory_request, pool.memory_limit):
            assert parse_quantity(memory) <= memory_free, f"{name}: memory {memory}"
