"""The chart's NetworkPolicies admit DermML's pipeline step pods from the kubeflow namespace to
MLflow and the Ray job API, and no other pod of that namespace.

The step pods' labels are read from the compiled pipelines (kfp-kubernetes ``add_pod_label``,
set by ``k8s.place`` from the platform config's ``step_labels``); the policies from the chart
rendered offline; and who may connect is worked out with NetworkPolicy's own semantics (a peer
with a namespace and a pod selector matches pods that satisfy both; a pod selector alone, pods
of the policy's namespace).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import yaml
from test_chart import (
    NAMESPACE,
    PROFILES,
    RELEASE,
    merged_values,
    of_kind,
    profile_values,
    render,
    rendered,
    selects,
)

from dermml.orchestration.kfp_local import compile_pipeline
from dermml.orchestration.platform import STEP_LABELS, load_platform
from pipelines import PIPELINES, get_pipeline

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = {"default": ROOT / "configs" / "platform" / "default.yaml",
             "local": ROOT / "configs" / "platform" / "local.yaml"}
KUBEFLOW = "kubeflow"
MLFLOW_PORTS = {5000}
RAY_JOB_API_PORTS = {6379, 8265, 10001}  # GCS, dashboard (job API), Ray client
# What KFP and Argo put on every step pod, DermML's or not.
KFP_POD_LABELS = {"pipelines.kubeflow.org/v2_component": "true",
                  "workflows.argoproj.io/workflow": "run-x",
                  "pipeline/runid": "0f1e2d3c"}
OTHER_KUBEFLOW_PODS = {
    "another team's pipeline step": dict(KFP_POD_LABELS),
    "KFP UI": {"app": "ml-pipeline-ui", "application-crd-id": "kubeflow-pipelines"},
    "KFP API server": {"app": "ml-pipeline", "application-crd-id": "kubeflow-pipelines"},
    "a step with only part of the labels": {**KFP_POD_LABELS,
                                            "app.kubernetes.io/part-of": "dermml"},
    "a pod labelled as a Ray pod": {"app.kubernetes.io/part-of": "dermml",
                                    "app.kubernetes.io/component": "ray"},
    "a pod labelled as a model server": {"app.kubernetes.io/part-of": "dermml",
                                         "app.kubernetes.io/component": "serving"},
}


def namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def peer_matches(peer: dict, policy_namespace: str, pod_namespace: str,
                 pod_labels: dict[str, str]) -> bool:
    """Whether a NetworkPolicy ``from`` peer matches a pod (ipBlocks match no pod here)."""
    if "ipBlock" in peer:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(pod_namespace)):
            return False
    elif pod_namespace != policy_namespace:
        return False
    return selects(peer.get("podSelector", {}), pod_labels)


def admitted_ports(policy: dict, pod_namespace: str, pod_labels: dict[str, str],
                   ports: set[int]) -> set[int]:
    """Which of ``ports`` of the policy's pods the given pod may connect to."""
    spec, namespace = policy["spec"], policy["metadata"]["namespace"]
    admitted: set[int] = set()
    for rule in spec.get("ingress", []):
        peers = rule.get("from")
        if peers and not any(peer_matches(p, namespace, pod_namespace, pod_labels)
                             for p in peers):
            continue
        rule_ports = {p["port"] for p in rule.get("ports", [])} or ports
        admitted |= ports & rule_ports
    return admitted


@functools.cache
def compiled_step_labels(platform: str) -> dict[str, dict[str, str]]:
    """``pipeline/executor`` -> the labels of its pod, for every shipped pipeline compiled
    with ``platform``."""
    import tempfile

    steps = {}
    with tempfile.TemporaryDirectory() as folder:
        for name in PIPELINES:
            path = compile_pipeline(get_pipeline(name), str(Path(folder, f"{name}.yaml")),
                                    str(PLATFORMS[platform]))
            pipeline, kubernetes = list(yaml.safe_load_all(Path(path).read_text()))
            executors = kubernetes["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
            assert set(executors) == set(pipeline["deploymentSpec"]["executors"]), name
            for executor, config in executors.items():
                labels = config.get("podMetadata", {}).get("labels", {})
                steps[f"{name}/{executor}"] = {**KFP_POD_LABELS, **labels}
    assert steps
    return steps


def client_policies(profile: str) -> dict[str, tuple[dict, set[int]]]:
    policies = {p["metadata"]["name"]: p for p in of_kind(rendered(profile), "NetworkPolicy")}
    return {"MLflow": (policies[f"{RELEASE}-mlflow"], MLFLOW_PORTS),
            "the Ray job API": (policies[f"{RELEASE}-ray"], RAY_JOB_API_PORTS)}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_compiled_step_carries_the_platforms_step_labels(platform):
    labels = load_platform(PLATFORMS[platform]).step_labels
    assert labels == STEP_LABELS
    for step, pod_labels in compiled_step_labels(platform).items():
        assert labels.items() <= pod_labels.items(), step


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("profile", PROFILES)
def test_pipeline_steps_in_kubeflow_reach_mlflow_and_the_ray_job_api(profile, platform):
    assert merged_values(profile)["networkPolicy"]["clientNamespaces"] == [KUBEFLOW]
    for target, (policy, ports) in client_policies(profile).items():
        for step, pod_labels in compiled_step_labels(platform).items():
            assert admitted_ports(policy, KUBEFLOW, pod_labels, ports) == ports, (target, step)


@pytest.mark.parametrize("profile", PROFILES)
def test_no_other_pod_of_kubeflow_gets_in(profile):
    for target, (policy, ports) in client_policies(profile).items():
        for what, pod_labels in OTHER_KUBEFLOW_PODS.items():
            assert not admitted_ports(policy, KUBEFLOW, pod_labels, ports), (target, what)
        # Whatever else a pod there carries: every peer that matches kubeflow also asks for
        # exactly the step labels.
        for rule in policy["spec"]["ingress"]:
            for peer in rule["from"]:
                if peer_matches(peer, NAMESPACE, KUBEFLOW, dict(STEP_LABELS)):
                    assert peer["podSelector"] == {"matchLabels": STEP_LABELS}, (target, peer)
                    assert selects(peer["namespaceSelector"], namespace_labels(KUBEFLOW))


@pytest.mark.parametrize("profile", PROFILES)
def test_step_labels_admit_nothing_outside_the_client_namespaces(profile):
    step = {**KFP_POD_LABELS, **STEP_LABELS}
    for target, (policy, ports) in client_policies(profile).items():
        for namespace in ("default", "kube-system", "team-a"):
            assert not admitted_ports(policy, namespace, step, ports), (target, namespace)
    # The KubeRay operator still reaches the Ray dashboard (it polls the job), nothing more.
    ray, _ = client_policies(profile)["the Ray job API"]
    operator = merged_values(profile)["networkPolicy"]["kuberayOperatorNamespace"]
    assert admitted_ports(ray, operator, {"app.kubernetes.io/name": "kuberay"},
                          RAY_JOB_API_PORTS) == {8265}


def test_the_chart_and_the_platform_configs_agree_on_the_step_labels():
    for profile in PROFILES:
        assert merged_values(profile)["networkPolicy"]["pipelinePodLabels"] == STEP_LABELS
    for path in PLATFORMS.values():
        assert load_platform(path).step_labels == STEP_LABELS


def test_custom_step_labels_are_what_the_policies_then_admit(tmp_path):
    custom = tmp_path / "platform.yaml"
    custom.write_text("step_labels: {team: derm, dermml.io/step: 'true'}\n")
    path = compile_pipeline(get_pipeline("training"), str(tmp_path / "t.yaml"), str(custom))
    _, kubernetes = list(yaml.safe_load_all(Path(path).read_text()))
    executors = kubernetes["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    labels = {name: e["podMetadata"]["labels"] for name, e in executors.items()}
    assert all(v == {"team": "derm", "dermml.io/step": "true"} for v in labels.values())
    values = {**profile_values("default"), "networkPolicy": {
        "pipelinePodLabels": {"team": "derm", "dermml.io/step": "true",
                              "app.kubernetes.io/part-of": None,
                              "app.kubernetes.io/component": None}}}
    policies = {p["metadata"]["name"]: p for p in of_kind(render(values), "NetworkPolicy")}
    mlflow = policies[f"{RELEASE}-mlflow"]
    pod = {**KFP_POD_LABELS, "team": "derm", "dermml.io/step": "true"}
    assert admitted_ports(mlflow, KUBEFLOW, pod, MLFLOW_PORTS) == MLFLOW_PORTS
    assert not admitted_ports(mlflow, KUBEFLOW, {**KFP_POD_LABELS, **STEP_LABELS},
                              MLFLOW_PORTS)


def test_empty_step_labels_in_the_chart_are_refused():
    """An empty pod selector next to the namespace selector would admit all of kubeflow."""
    import helm_python as helm

    values = {"networkPolicy": {"pipelinePodLabels": {
        "app.kubernetes.io/part-of": None, "app.kubernetes.io/component": None}}}
    with pytest.raises(helm.HelmError, match="pipelinePodLabels must not be empty"):
        render(values)
