"""The chart's ValidatingAdmissionPolicy on RayJobs: what a RayJob's pods may run, as whom, and
with which Secrets.

The policy and its binding are built-in kinds (admissionregistration.k8s.io/v1), validated
strictly against the Kubernetes 1.33 schemas. Their CEL is evaluated here with cel-python, the
way the API server would (variables in order, then every validation), on the RayJobs DermML's
own builder writes (allowed) and on RayJobs changed in one place each (refused).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import celpy
import helm_python as helm
import kubernetes_validate
import pytest
from test_chart import KUBE_VERSION, NAMESPACE, PROFILES, merged_values, of_kind, render, rendered
from test_rayjob import gpu_cfg, rayjob_platform

from dermml.orchestration.platform import load_platform
from dermml.orchestration.rayjob import rayjob_manifest
from dermml.training.run import resolve_config

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = {"default": ROOT / "configs" / "platform" / "default.yaml",
             "local": ROOT / "configs" / "platform" / "local.yaml"}


# ----------------------------------------------------------------------------- CEL
@functools.cache
def _environment() -> celpy.Environment:
    return celpy.Environment()


@functools.cache
def _program(expression: str):
    env = _environment()
    return env.program(env.compile(expression))


def evaluate_policy(policy: dict, obj: dict) -> list[str]:
    """The messages of the validations ``obj`` fails, as the API server evaluates a
    ValidatingAdmissionPolicy: each variable in order (visible to the later ones as
    ``variables.<name>``), then each validation; an evaluation error counts as a failure
    (failurePolicy: Fail)."""
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    variables: dict[str, Any] = {}

    def activation() -> dict:
        return {"object": celpy.json_to_cel(obj),
                "variables": celpy.json_to_cel({}) if not variables else
                celpy.celtypes.MapType({celpy.celtypes.StringType(k): v
                                        for k, v in variables.items()})}

    for variable in spec.get("variables", []):
        variables[variable["name"]] = _program(variable["expression"]).evaluate(activation())
    failed = []
    for validation in spec["validations"]:
        try:
            ok = _program(validation["expression"]).evaluate(activation())
        except Exception as error:  # CELEvalError: denied under failurePolicy Fail
            ok = error
        if ok is not True and not (isinstance(ok, celpy.celtypes.BoolType) and bool(ok)):
            failed.append(validation["message"])
    return failed


def policy_of(objects: list[dict]) -> dict:
    (policy,) = of_kind(objects, "ValidatingAdmissionPolicy")
    return policy


@functools.cache
def _default_policy() -> dict:
    return policy_of(rendered("default"))


def allowed(rayjob: dict, policy: dict | None = None) -> bool:
    return not evaluate_policy(policy or _default_policy(), rayjob)


def dermml_rayjob(**ray_job) -> dict:
    """What a training step submits: the RayJob DermML's builder writes for the shipped cloud
    platform (GPU workers, the platform's Secrets, ServiceAccount and image)."""
    return rayjob_manifest("segmentation", gpu_cfg(), "0123456789abcdef0123",
                           rayjob_platform(**ray_job))


def templates(rayjob: dict) -> dict[str, dict]:
    spec = rayjob["spec"]
    out = {"submitter": spec["submitterPodTemplate"]}
    if "rayClusterSpec" in spec:
        out["head"] = spec["rayClusterSpec"]["headGroupSpec"]["template"]
        for group in spec["rayClusterSpec"]["workerGroupSpecs"]:
            out[group["groupName"]] = group["template"]
    return out


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("profile", PROFILES)
def test_policy_and_binding_are_valid_kubernetes_1_33_and_bind_the_release_namespace(profile):
    objects = rendered(profile)
    policy = policy_of(objects)
    (binding,) = of_kind(objects, "ValidatingAdmissionPolicyBinding")
    for obj in (policy, binding):
        assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION
        assert "namespace" not in obj["metadata"]  # cluster-scoped
        assert NAMESPACE in obj["metadata"]["name"]  # one per release namespace
    rule = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule == [{"apiGroups": ["ray.io"], "apiVersions": ["*"],
                     "operations": ["CREATE", "UPDATE"], "resources": ["rayjobs"]}]
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]
    assert binding["spec"]["matchResources"] == {"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": NAMESPACE}}}


def test_every_cel_expression_compiles():
    """Parsed and checked by cel-python (the API server compiles them when the policy is
    created; a syntax error would leave RayJobs unchecked or, with Fail, refused)."""
    spec = _default_policy()["spec"]
    expressions = [v["expression"] for v in spec["variables"]]
    expressions += [v["expression"] for v in spec["validations"]]
    assert len(expressions) == 10
    for expression in expressions:
        _program(expression)
    with pytest.raises(celpy.CELParseError):
        _program("variables.podSpecs.all(s, ")


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_rayjobs_dermml_submits_are_allowed(profile, platform):
    """The contract: the platform configs' images, ServiceAccount and Secrets are the policy's
    defaults (without IRSA; with it the S3 Secret is refused, see below)."""
    policy = policy_of(rendered(profile))
    config = load_platform(PLATFORMS[platform])
    if platform == "local":  # kind: one CPU pool, the CPU image
        job = config.ray_job.model_copy(update={"enabled": True, "worker_pool": "cpu",
                                                "image": "cpu"})
        cfg = resolve_config("segmentation", None, [
            "ray.use_gpu=false", "ray.num_workers=1", "ray.cpus_per_worker=0.5",
            "ray.storage_path=s3://dermml/ray"])
    else:
        job, cfg = config.ray_job.model_copy(update={"enabled": True}), gpu_cfg()
    manifest = rayjob_manifest("segmentation", cfg, "0123456789abcdef0123",
                               config.model_copy(update={"ray_job": job}))
    failures = evaluate_policy(policy, manifest)
    if merged_values(profile)["s3"]["irsa"]["enabled"]:
        assert failures and all("Secrets" in f for f in failures), failures
        return
    assert not failures, failures
    # An existing cluster (clusterSelector): only the submitter pod is KubeRay's to create.
    on_cluster = dermml_rayjob(cluster_selector={"ray.io/cluster": "dermml-ray"})
    assert "rayClusterSpec" not in on_cluster["spec"]
    assert not evaluate_policy(policy, on_cluster)


def refused(change) -> list[str]:
    rayjob = dermml_rayjob()
    change(rayjob)
    return evaluate_policy(_default_policy(), rayjob)


SECRET = "dermml-mlflow-auth"  # the MLflow admin's Secret, in the same namespace


def mutate(where: str, what):
    def change(rayjob):
        what(templates(rayjob)[where]["spec"])
    return change


@pytest.mark.parametrize("change, reason", [
    (mutate("gpu-workers", lambda s: s["containers"][0]["env"].append(
        {"name": "ADMIN", "valueFrom": {"secretKeyRef": {"name": SECRET,
                                                         "key": "MLFLOW_AUTH_ADMIN_PASSWORD"}}})),
     "env vars only from the Secrets"),
    (mutate("head", lambda s: s["containers"][0].setdefault("envFrom", []).append(
        {"secretRef": {"name": SECRET}})), "env vars only from the Secrets"),
    (mutate("submitter", lambda s: (
        s["volumes"].append({"name": "auth", "secret": {"secretName": SECRET}}))),
     "mount only the Secrets"),
    (mutate("gpu-workers", lambda s: s["volumes"].append(
        {"name": "auth", "projected": {"sources": [{"secret": {"name": SECRET}}]}})),
     "mount only the Secrets"),
    (mutate("head", lambda s: s["containers"][0].update(image="docker.io/evil/miner:1")),
     "only the images"),
    (mutate("gpu-workers", lambda s: s["containers"][0].update(
        image="ghcr.io/dermml/dermml-gpu-evil:0.1.0")), "only the images"),  # prefix trick
    (mutate("gpu-workers", lambda s: s["containers"][0].update(image="ghcr.io/dermml/dermml-gpu")),
     "only the images"),  # no tag: :latest of whatever is pushed there
    (mutate("submitter", lambda s: s.setdefault("initContainers", []).append(
        {"name": "x", "image": "busybox:1.36"})), "only the images"),
    (mutate("submitter", lambda s: s.update(serviceAccountName="dermml-pipeline-runner")),
     "only as the ServiceAccounts"),  # the one with a token and RBAC
    (mutate("head", lambda s: s.pop("serviceAccountName")), "only as the ServiceAccounts"),
    (lambda job: job["spec"]["rayClusterSpec"].update(
        autoscalerOptions={"image": "docker.io/evil/autoscaler:1"}), "autoscaler"),
], ids=["env-secretKeyRef", "envFrom-secretRef", "secret-volume", "projected-secret",
        "foreign-image", "image-prefix-trick", "untagged-image", "init-container-image",
        "token-serviceaccount", "default-serviceaccount", "autoscaler-image"])
def test_a_rayjob_that_steps_outside_is_refused_with_the_reason(change, reason):
    failures = refused(change)
    assert len(failures) == 1 and reason in failures[0], failures


def test_allowed_variants_pass():
    """A digest instead of a tag, and an allowed Secret mounted as a volume, are fine."""
    def digest(rayjob):
        spec = templates(rayjob)["head"]["spec"]
        spec["containers"][0]["image"] = "ghcr.io/dermml/dermml-gpu@sha256:" + "a" * 64
        spec["volumes"].append({"name": "s3", "secret": {"secretName": "dermml-s3"}})
    assert not refused(digest)


def test_the_lists_follow_the_values():
    values = {"rayJobPolicy": {"allowedImages": ["registry.example.org/dermml"],
                               "allowedServiceAccounts": ["trainer"],
                               "allowedSecrets": ["only-this"],
                               "validationActions": ["Warn", "Audit"]}}
    objects = render(values)
    policy = policy_of(objects)
    failures = evaluate_policy(policy, dermml_rayjob())
    # Image, ServiceAccount and env Secrets; the builder mounts no Secret volume.
    assert [f.split(" only ")[0] for f in failures] == [
        "RayJob pods may run", "RayJob pods may run", "RayJob containers may take env vars"]
    assert "registry.example.org/dermml" in failures[0] and "trainer" in failures[1]
    (binding,) = of_kind(objects, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    # With IRSA the S3 keys are not a RayJob's to read any more.
    irsa = render({"s3": {"irsa": {"enabled": True, "roleArns": {
        "mlflow": "arn:aws:iam::123456789012:role/m", "ray": "arn:aws:iam::123456789012:role/r",
        "pipelineRunner": "arn:aws:iam::123456789012:role/p"}}}})
    job = dermml_rayjob()
    assert evaluate_policy(policy_of(irsa), job) == [
        "RayJob containers may take env vars only from the Secrets dermml-mlflow "
        "(rayJobPolicy.allowedSecrets)"]
    assert not of_kind(render({"rayJobPolicy": {"enabled": False}}), "ValidatingAdmissionPolicy")


def test_deny_and_warn_together_are_refused():
    with pytest.raises(helm.HelmRenderError, match="Deny and Warn together"):
        render({"rayJobPolicy": {"validationActions": ["Deny", "Warn"]}})


def test_an_evaluation_error_denies():
    """A RayJob the expressions cannot read (a container without an image field) fails closed."""
    rayjob = copy.deepcopy(dermml_rayjob())
    del templates(rayjob)["head"]["spec"]["containers"][0]["image"]
    assert evaluate_policy(_default_policy(), rayjob)
