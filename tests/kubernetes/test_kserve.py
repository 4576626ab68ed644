"""KServe serving that follows the registry.

The chart's KServe mode renders an InferenceService and a ServingRuntime that are valid against
the KServe v0.20.0 CRDs and equal to what ``dermml.orchestration.kserve`` builds. Against a fake
Kubernetes API that plays KServe's traffic split (fake_kserve) and a real registry: a promotion
puts the new champion on a canary; a healthy canary is rolled out, an unhealthy one is rolled
back (previous storageUri, ``@champion`` moved back); ``dermml registry rollback`` restores the
previous storageUri.
"""

from __future__ import annotations

import importlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from fake_kserve import FakeKServe
from test_chart import (
    CHART,
    KUBE_VERSION,
    NAMESPACE,
    PROFILES,
    RELEASE,
    crd_validator,
    merged_values,
    of_kind,
    one,
    profile_values,
    render,
)

from dermml.orchestration import kserve
from dermml.orchestration.platform import CanaryAnalysis, PlatformConfig, ServingConfig

SEG = "models:/dermml-segmentation@champion"
STORE = "s3://dermml-mlflow/artifacts/1/models"
ISVC = f"{RELEASE}-serving-segmentation"


def kserve_values(profile: str = "default", **model) -> dict:
    """A profile's values in KServe mode, serving segmentation from version 1's artifacts."""
    values = profile_values(profile)
    serving = dict(values.get("serving") or {})
    entry = dict((serving.get("models") or merged_values("default")["serving"]["models"])[0])
    entry.update({"storageUri": f"{STORE}/m-1/artifacts", "version": "1", **model})
    serving.update(mode="kserve", models=[entry])
    return {**values, "serving": serving}


def crd_errors(obj: dict) -> list[str]:
    validator = crd_validator(obj["apiVersion"], obj["kind"])
    return [f"{'/'.join(map(str, e.path))}: {e.message}"
            for e in sorted(validator.iter_errors(obj), key=lambda e: list(e.path))]


# ----------------------------------------------------------------------------- the chart
@pytest.mark.parametrize("profile", PROFILES)
def test_kserve_mode_renders_valid_kserve_0_20_objects_instead_of_deployments(profile):
    objects = render(kserve_values(profile))
    isvc = one(objects, "InferenceService", ISVC)
    runtime = one(objects, "ServingRuntime", f"{RELEASE}-mlserver")
    for obj in (isvc, runtime):
        assert not crd_errors(obj), crd_errors(obj)[:5]
    for obj in objects:
        if obj["apiVersion"].startswith(("serving.kserve.io/", "ray.io/",
                                         "monitoring.coreos.com/")):  # test_observability
            continue
        assert kubernetes_validate.validate(obj, KUBE_VERSION, strict=True) == KUBE_VERSION
    # No Deployment-mode server: the InferenceService is the only model server.
    serving = [o for o in objects if o["kind"] in ("Deployment", "Service",
                                                   "HorizontalPodAutoscaler",
                                                   "PodDisruptionBudget")
               and o["metadata"]["labels"].get("app.kubernetes.io/component") == "serving"]
    assert not serving
    model = isvc["spec"]["predictor"]["model"]
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["storageUri"] == f"{STORE}/m-1/artifacts"
    notes = isvc["metadata"]["annotations"]
    assert notes[kserve.DEPLOYMENT_MODE] == "Knative" and notes[kserve.MODEL_VERSION] == "1"
    assert isvc["metadata"]["labels"][kserve.LABEL_REGISTERED_MODEL] == "dermml-segmentation"
    # KServe copies these labels onto the predictor pods: not the release's selector labels,
    # which the default-deny NetworkPolicy selects (Knative must reach them).
    assert "app.kubernetes.io/instance" not in isvc["metadata"]["labels"]
    (container,) = runtime["spec"]["containers"]
    assert container["image"].startswith("ghcr.io/dermml/dermml:")  # the DermML image
    assert container["command"] == ["mlserver", "start", "/mnt/models"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MLSERVER_MODEL_IMPLEMENTATION"] == "mlserver_mlflow.MLflowRuntime"
    assert env["MLSERVER_MODEL_NAME"] == "{{.Name}}"  # KServe's placeholder, not Helm's
    assert env["MLSERVER_MODEL_URI"] == "/mnt/models"
    assert runtime["spec"]["protocolVersions"] == ["v2"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/tmp", "/home/dermml"} <= mounts


def test_kserve_mode_lints_without_warnings():
    report = helm.lint(CHART, kserve_values("gpu"), strict=True, namespace=NAMESPACE,
                       kube_version=f"v{KUBE_VERSION}.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], problems or report["errors"]


def test_the_crd_check_catches_a_misspelled_kserve_field():
    isvc = one(render(kserve_values()), "InferenceService", ISVC)
    isvc["spec"]["predictor"]["model"]["storageURI"] = "s3://typo"
    assert crd_errors(isvc)


def test_the_chart_and_the_python_builder_agree():
    """One object, two renderings: the chart's values and kserve.inference_service /
    serving_runtime given the same inputs build the same InferenceService and runtime."""
    values = kserve_values("gpu")
    values["serving"]["tolerations"] = [{"key": "dermml.io/serving", "operator": "Exists",
                                         "effect": "NoSchedule"}]
    objects = render(values)
    merged = helm.Chart.load(CHART).merge_values(values)
    (entry,) = merged["serving"]["models"]
    isvc, runtime = (one(objects, "InferenceService", ISVC),
                     one(objects, "ServingRuntime", f"{RELEASE}-mlserver"))
    built = kserve.inference_service(kserve.ServedModel(
        name=ISVC, namespace=NAMESPACE, model_uri=entry["modelUri"],
        storage_uri=entry["storageUri"], version=entry["version"],
        runtime=f"{RELEASE}-mlserver", key=entry["name"],
        deployment_mode=merged["serving"]["kserve"]["deploymentMode"],
        service_account=f"{RELEASE}-serving", min_replicas=entry["hpa"]["minReplicas"],
        max_replicas=entry["hpa"]["maxReplicas"], resources=entry["resources"],
        labels={k: v for k, v in isvc["metadata"]["labels"].items()
                if not k.startswith("dermml.io/m") and not k.startswith("dermml.io/reg")},
        security_context=merged["podSecurityContext"],
        node_selector=merged["serving"]["nodeSelector"],
        tolerations=merged["serving"]["tolerations"]))
    assert built == isvc
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    image = f"{merged['image']['repository']}:{merged['image']['tag'] or app_version}"
    built_runtime = kserve.serving_runtime(kserve.RuntimeSpec(
        name=f"{RELEASE}-mlserver", namespace=NAMESPACE, image=image,
        image_pull_policy=merged["image"]["pullPolicy"], labels=runtime["metadata"]["labels"],
        resources=merged["serving"]["kserve"]["runtimeResources"],
        security_context=merged["containerSecurityContext"], home=merged["homeDir"],
        scratch_size=merged["scratchSizeLimit"]))
    assert built_runtime == runtime
    # And the objects a promotion patches keep that shape.
    assert kserve.model_spec(entry["storageUri"], f"{RELEASE}-mlserver",
                             entry["resources"]) == isvc["spec"]["predictor"]["model"]


@pytest.mark.parametrize(("model", "message"), [
    ({"storageUri": ""}, "storageUri is required with serving.mode=kserve"),
    ({"modelUri": "runs:/abc/model"}, "must be models:/<name>@<alias>"),
    ({"name": "a-20-character-model"}, None),
], ids=["no-storage-uri", "not-an-alias", "name-fits"])
def test_kserve_mode_refuses_what_it_could_not_follow(model, message):
    if message is None:
        render(kserve_values(**model))  # 20 characters, the schema's maximum, still fits
        return
    with pytest.raises(helm.HelmRenderError, match=message):
        render(kserve_values(**model))


def test_an_inference_service_name_knative_could_not_use_is_refused():
    with pytest.raises(helm.HelmRenderError, match="longer than 47 characters"):
        render({**kserve_values(), "fullnameOverride": "a-release-name-of-forty-characters-long"})


def test_the_storage_initializer_reads_s3_with_the_serving_account():
    objects = render(kserve_values("local"))
    account = one(objects, "ServiceAccount", f"{RELEASE}-serving")
    assert account["automountServiceAccountToken"] is False
    assert account["secrets"] == [{"name": "dermml-s3"}]
    notes = account["metadata"]["annotations"]
    assert notes["serving.kserve.io/s3-endpoint"] == "minio.dermml.svc:9000"
    assert notes["serving.kserve.io/s3-usehttps"] == "0"
    isvc = one(objects, "InferenceService", ISVC)
    assert isvc["spec"]["predictor"]["serviceAccountName"] == f"{RELEASE}-serving"
    # Deployment mode's account lists no Secret.
    plain = one(render(profile_values("local")), "ServiceAccount", f"{RELEASE}-serving")
    assert "secrets" not in plain


def test_pipeline_steps_may_patch_inference_services_in_kserve_mode_only():
    def kserve_rules(values):
        (role,) = of_kind(render(values), "Role")
        return [r for r in role["rules"] if "serving.kserve.io" in r["apiGroups"]]

    assert not kserve_rules({})
    (rule,) = kserve_rules(kserve_values())
    assert rule["resources"] == ["inferenceservices"]
    assert sorted(rule["verbs"]) == ["get", "list", "patch", "watch"]  # no create, no delete


def test_the_runtime_implementation_is_importable_where_dermml_is():
    """MLSERVER_MODEL_IMPLEMENTATION names a class that imports next to dermml (the image
    installs both: its pyfunc is loaded in the same process)."""
    pytest.importorskip("mlserver_mlflow")
    module, _, cls = kserve.MLFLOW_RUNTIME.rpartition(".")
    assert getattr(importlib.import_module(module), cls)
    assert shutil.which("mlserver") or (Path(importlib.import_module("sys").executable).parent
                                        / "mlserver").exists()


def test_storage_uris_come_from_the_artifact_store():
    dest = "s3://dermml-mlflow/artifacts"
    assert kserve.artifact_storage_uri("mlflow-artifacts:/3/models/m-ab/artifacts", dest) == \
        "s3://dermml-mlflow/artifacts/3/models/m-ab/artifacts"
    assert kserve.artifact_storage_uri(
        "mlflow-artifacts://mlflow:5000/3/models/m-ab/artifacts", dest + "/") == \
        "s3://dermml-mlflow/artifacts/3/models/m-ab/artifacts"
    assert kserve.artifact_storage_uri("s3://other/m", dest) == "s3://other/m"
    with pytest.raises(ValueError, match="cannot be served by KServe"):
        kserve.artifact_storage_uri("file:///home/me/.dermml/artifacts/m", dest)


# ----------------------------------------------------------------------------- canary analysis
@pytest.mark.parametrize(("requests", "errors", "p95", "final", "verdict"), [
    (500, 2, 300.0, True, "healthy"),
    (500, 2, 300.0, False, "pending"),
    (500, 50, 300.0, False, "unhealthy"),  # over the error limit: at once
    (500, 0, 5000.0, True, "unhealthy"),
    (5, 0, 100.0, True, "unhealthy"),  # too few requests: when_no_traffic=rollback
    (5, 5, 100.0, False, "pending"),  # five errors in five requests prove nothing yet
])
def test_a_canary_is_judged_on_error_rate_and_p95_latency(requests, errors, p95, final,
                                                          verdict):
    analysis = CanaryAnalysis()
    got, why = kserve.judge(kserve.CanaryMetrics(requests, errors, p95), analysis, final)
    assert got == verdict, why
    promote = analysis.model_copy(update={"when_no_traffic": "promote"})
    if requests < analysis.min_requests and final:
        assert kserve.judge(kserve.CanaryMetrics(requests, errors, p95), promote, True)[0] == \
            "healthy"


# ----------------------------------------------------------------------------- following
@pytest.fixture
def cluster(tmp_path, monkeypatch):
    with FakeKServe() as fake:
        monkeypatch.setenv("KUBECONFIG", str(fake.kubeconfig(tmp_path / "kubeconfig")))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield fake


def serving_config(fake: FakeKServe, **changes) -> ServingConfig:
    analysis = CanaryAnalysis(prometheus_url=fake.url, analysis_seconds=0.3, poll_seconds=0.02,
                              ready_timeout_seconds=5)
    return ServingConfig(kserve=True, namespace=NAMESPACE, analysis=analysis, **changes)


@dataclass
class Registry:
    """dermml-segmentation with versions whose artifacts are on S3 and whose gate scores on
    the demo test split are stored, promoted through the real gate."""

    manifest: str
    dataset: str
    metric: str

    @staticmethod
    def uri(version: str) -> str:
        return f"{STORE}/m-{version}/artifacts"

    def add(self, score: float) -> str:
        from mlflow.tracking import MlflowClient

        from dermml.orchestration import tracking
        from dermml.registry import gate

        client = MlflowClient(tracking.configure())
        name = "dermml-segmentation"
        if not client.search_registered_models(f"name='{name}'"):
            client.create_registered_model(name)
        n = len(client.search_model_versions(f"name='{name}'")) + 1
        version = str(client.create_model_version(name, self.uri(str(n))).version)
        client.set_model_version_tag(name, version, gate._eval_key(self.dataset, "test",
                                                                   self.metric), repr(score))
        return version

    def promote(self, version: str) -> None:
        from dermml.registry.gate import promote

        assert promote("segmentation", version, self.manifest).promoted

    @staticmethod
    def champion() -> str:
        from dermml.registry.gate import version_of

        return version_of("dermml-segmentation", "champion")


@pytest.fixture
def registry(demo_data) -> Registry:
    from dermml.data.manifest import read_manifest
    from dermml.tasks import get_task

    return Registry(demo_data, read_manifest(demo_data).version,
                    get_task("segmentation").gate_metric)


def served_by_v1(fake: FakeKServe, registry: Registry) -> None:
    """Version 1 is the champion and the chart's InferenceService serves it."""
    registry.promote(registry.add(0.70))
    fake.create(kserve.inference_service(kserve.ServedModel(
        ISVC, NAMESPACE, SEG, registry.uri("1"), "1", f"{RELEASE}-mlserver",
        key="segmentation", service_account=f"{RELEASE}-serving")))
    assert fake.served(NAMESPACE, ISVC) == {registry.uri("1"): 100}


def promote_v2(fake: FakeKServe, registry: Registry, serving: ServingConfig):
    registry.promote(registry.add(0.80))
    return kserve.follow_promotion("segmentation", "2", serving)


def test_a_promotion_puts_the_new_champion_on_a_canary(cluster, registry):
    served_by_v1(cluster, registry)
    serving = serving_config(cluster)
    (change,) = promote_v2(cluster, registry, serving)

    assert (change.action, change.canary_percent) == ("canary", 10)
    isvc = cluster.get(NAMESPACE, ISVC)
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == registry.uri("2")
    assert predictor["canaryTrafficPercent"] == 10
    notes = isvc["metadata"]["annotations"]
    assert notes[kserve.MODEL_VERSION] == "2" and notes[kserve.ROLLOUT] == "canary"
    assert (notes[kserve.PREVIOUS_VERSION], notes[kserve.PREVIOUS_URI]) == ("1", registry.uri("1"))
    # What the API server would have refused it could not store: the patched object is valid.
    assert not crd_errors({k: v for k, v in isvc.items() if k != "status"})
    # KServe splits the traffic once the new revision is ready: 10% latest, 90% prev.
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("2"): 10, registry.uri("1"): 90}
    # The patch carried the resourceVersion it was computed from (no lost update).
    name, patch = cluster.patches[0]
    assert name == ISVC and patch["metadata"]["resourceVersion"]
    assert kserve.follow_promotion("segmentation", "2", serving)[0].action == "unchanged"


def test_a_healthy_canary_is_rolled_out(cluster, registry):
    from mlflow.tracking import MlflowClient

    served_by_v1(cluster, registry)
    serving = serving_config(cluster)
    promote_v2(cluster, registry, serving)
    cluster.metrics[registry.uri("2")] = {"requests": 400, "errors": 1, "p95_ms": 180.0}

    (change,) = kserve.rollout("segmentation", serving)

    assert change.action == "rolled-out", change.message
    isvc = cluster.get(NAMESPACE, ISVC)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][kserve.ROLLOUT] == "rolled-out"
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("2"): 100}
    canary = change.revision
    assert canary == f"{ISVC}-predictor-00002"
    assert isvc["status"]["components"]["predictor"]["latestRolledoutRevision"] == canary
    # The canary's own revision was judged, on Knative's queue-proxy metrics.
    assert any(f'revision_name="{canary}"' in q and "5xx" in q for q in cluster.queries)
    assert any(q.startswith("histogram_quantile(0.95") for q in cluster.queries)
    assert registry.champion() == "2"
    tag = MlflowClient().get_model_version("dermml-segmentation", "2").tags["dermml.serving"]
    assert '"result": "rolled-out"' in tag and canary in tag


@pytest.mark.parametrize("failure", ["errors", "latency", "never-ready", "no-traffic"])
def test_an_unhealthy_canary_is_rolled_back_with_the_champion(cluster, registry, failure):
    from dermml.registry.gate import alias_history

    served_by_v1(cluster, registry)
    serving = serving_config(cluster)
    if failure == "never-ready":
        cluster.failing.add(registry.uri("2"))
    promote_v2(cluster, registry, serving)
    cluster.metrics[registry.uri("2")] = {
        "errors": {"requests": 400, "errors": 40, "p95_ms": 180.0},
        "latency": {"requests": 400, "errors": 0, "p95_ms": 9000.0},
        "no-traffic": {"requests": 3, "errors": 0, "p95_ms": 100.0},
    }.get(failure, {"requests": 400, "errors": 0, "p95_ms": 100.0})

    with pytest.raises(kserve.CanaryRolledBack) as rolled_back:
        kserve.rollout("segmentation", serving)

    (change,) = rolled_back.value.changes
    assert change.action == "rolled-back"
    expected = {"errors": "error rate over the limit", "latency": "p95 latency over the limit",
                "never-ready": "RevisionFailed", "no-traffic": "when_no_traffic=rollback"}
    assert expected[failure] in change.message, change.message
    isvc = cluster.get(NAMESPACE, ISVC)
    predictor = isvc["spec"]["predictor"]
    assert predictor["model"]["storageUri"] == registry.uri("1")
    assert "canaryTrafficPercent" not in predictor
    notes = isvc["metadata"]["annotations"]
    assert (notes[kserve.MODEL_VERSION], notes[kserve.ROLLOUT]) == ("1", "rolled-back")
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("1"): 100}
    # From the pin on, the canary had no traffic: v1 got it back at once.
    splits = [t for name, t in cluster.traffic_history if name == ISVC]
    pinned = next(i for i, t in enumerate(splits) if t and t[0]["percent"] == 0)
    for split in splits[pinned:]:
        assert all(cluster.revision_uri(t["revisionName"]) == registry.uri("1")
                   for t in split if t["percent"]), split
    # The registry followed: @champion is v1 again, and the history says why.
    assert registry.champion() == "1"
    last = alias_history("dermml-segmentation", "champion")[-1]
    assert (last["action"], last["version"], last["previous"]) == ("rollback", "1", "2")
    assert expected[failure] in last["reason"]


def test_registry_rollback_restores_the_previous_inference_service(cluster, registry, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app

    served_by_v1(cluster, registry)
    serving = serving_config(cluster)
    promote_v2(cluster, registry, serving)
    cluster.metrics[registry.uri("2")] = {"requests": 400, "errors": 0, "p95_ms": 100.0}
    kserve.rollout("segmentation", serving)
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("2"): 100}
    platform = tmp_path / "platform.yaml"
    platform.write_text(yaml.safe_dump({"serving": serving.model_dump(mode="json")}))

    result = CliRunner().invoke(app, ["registry", "rollback", "--task", "segmentation",
                                      "--reason", "dermatologists saw bad masks",
                                      "--platform", str(platform)])

    assert result.exit_code == 0, result.output
    assert "champion is now version 1" in result.output
    assert f"{NAMESPACE}/{ISVC}: rolled-back v1" in result.output
    isvc = cluster.get(NAMESPACE, ISVC)
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == registry.uri("1")
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["metadata"]["annotations"][kserve.PREVIOUS_URI] == registry.uri("2")
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("1"): 100}
    assert registry.champion() == "1"


def test_standard_mode_rolls_out_at_once(cluster, registry):
    """Standard (raw Deployment) mode cannot split traffic: no canary, readiness only."""
    registry.promote(registry.add(0.70))
    cluster.create(kserve.inference_service(kserve.ServedModel(
        ISVC, NAMESPACE, SEG, registry.uri("1"), "1", f"{RELEASE}-mlserver",
        deployment_mode="Standard")))
    serving = serving_config(cluster)
    (change,) = promote_v2(cluster, registry, serving)
    assert (change.action, change.canary_percent) == ("rolling-out", None)
    assert "canaryTrafficPercent" not in cluster.get(NAMESPACE, ISVC)["spec"]["predictor"]
    (done,) = kserve.rollout("segmentation", serving)
    assert done.action == "rolled-out"
    assert not cluster.queries  # nothing to compare: no canary


def test_a_promotion_with_nothing_served_yet_changes_nothing(cluster, registry):
    registry.promote(registry.add(0.70))
    assert kserve.follow_promotion("segmentation", "1", serving_config(cluster)) == []


def test_the_training_pipeline_ends_with_a_rollout_step_with_kserve_serving(tmp_path):
    from test_kubernetes_pipeline import executor_of, k8s_config, load_docs

    from dermml.orchestration.kfp_local import compile_pipeline
    from pipelines import get_pipeline

    root = Path(__file__).resolve().parents[2]
    platform = yaml.safe_load((root / "configs/platform/default.yaml").read_text())
    plain, _ = load_docs(compile_pipeline(get_pipeline("training"), str(tmp_path / "a.yaml")))
    assert "roll-out-model" not in plain["root"]["dag"]["tasks"]
    path = tmp_path / "platform.yaml"
    path.write_text(yaml.safe_dump({**platform, "serving": {"kserve": True}}))
    spec, k8s = load_docs(compile_pipeline(get_pipeline("training"), str(tmp_path / "t.yaml"),
                                           str(path)))
    tasks = spec["root"]["dag"]["tasks"]
    rollout = tasks["roll-out-model"]
    assert "promote-model" in rollout["dependentTasks"]
    assert "roll-out-model" in tasks["finish-pipeline-run"]["dependentTasks"]
    executor = executor_of(spec, "roll-out-model")
    container = spec["deploymentSpec"]["executors"][executor]["container"]
    assert container["image"].startswith("ghcr.io/dermml/dermml:")  # CPU image
    assert "accelerator" not in container["resources"]
    assert k8s_config(k8s, executor)["nodeSelector"]["labels"] == {"dermml.io/pool": "cpu"}
    compiled = rollout["inputs"]["parameters"]["platform"]["runtimeValue"]["constant"]
    assert PlatformConfig.model_validate_json(compiled).serving.kserve is True


def test_the_rollout_stage_records_the_outcome_in_the_pipeline_run(cluster, registry):
    """What the pipelines' rollout step runs: a canary judged healthy, the verdict on a
    ``rollout`` child run of the pipeline; a second promotion whose canary fails fails the
    stage and its pipeline run."""
    from mlflow.tracking import MlflowClient

    from dermml.orchestration import tracking
    from dermml.serving.rollout import roll_out

    served_by_v1(cluster, registry)
    platform = PlatformConfig(serving=serving_config(cluster))
    assert "not promoted" in roll_out("segmentation", "9", False, platform)
    registry.promote(registry.add(0.80))
    cluster.metrics[registry.uri("2")] = {"requests": 400, "errors": 0, "p95_ms": 100.0}
    parent = tracking.start_pipeline_run("segmentation", "training")

    summary = roll_out("segmentation", "2", True, platform, parent)

    assert f"{ISVC}: rolled-out v2" in summary
    client = MlflowClient(tracking.configure())
    (run,) = client.search_runs([client.get_run(parent).info.experiment_id],
                                "tags.`dermml.stage` = 'rollout'")
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["dermml.serving.result"] == "rolled-out"
    assert f"{ISVC}-predictor-00002" in run.data.tags["dermml.serving.revisions"]
    assert run.data.metrics[f"canary.{ISVC}.error_rate"] == 0.0

    registry.promote(registry.add(0.90))
    cluster.metrics[registry.uri("3")] = {"requests": 400, "errors": 400, "p95_ms": 100.0}
    with pytest.raises(kserve.CanaryRolledBack):
        roll_out("segmentation", "3", True, platform, parent)
    assert client.get_run(parent).info.status == "FAILED"
    assert registry.champion() == "2"
    assert cluster.served(NAMESPACE, ISVC) == {registry.uri("2"): 100}


def test_serving_rollout_exits_1_after_a_rollback(cluster, registry, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app

    served_by_v1(cluster, registry)
    serving = serving_config(cluster)
    promote_v2(cluster, registry, serving)
    cluster.metrics[registry.uri("2")] = {"requests": 400, "errors": 100, "p95_ms": 100.0}
    platform = tmp_path / "platform.yaml"
    platform.write_text(yaml.safe_dump({"serving": serving.model_dump(mode="json")}))

    result = CliRunner().invoke(app, ["serving", "rollout", "--task", "segmentation",
                                      "--platform", str(platform)])

    assert result.exit_code == 1, result.output
    assert "rolled back" in result.output and "error rate over the limit" in result.output
    status = CliRunner().invoke(app, ["serving", "status", "--task", "segmentation",
                                      "--platform", str(platform)])
    (row,) = yaml.safe_load(status.output)
    assert (row["version"], row["rollout"]) == ("1", "rolled-back")


def test_serving_manifest_prints_valid_objects_for_the_champion(registry, tmp_path):
    from typer.testing import CliRunner

    from dermml.cli import app

    registry.promote(registry.add(0.70))
    platform = tmp_path / "platform.yaml"
    platform.write_text(yaml.safe_dump({"serving": {"kserve": True}}))
    result = CliRunner().invoke(app, ["serving", "manifest", SEG, "--name", ISVC,
                                      "--platform", str(platform)])
    assert result.exit_code == 0, result.output
    runtime, isvc = yaml.safe_load_all(result.output)
    for obj in (runtime, isvc):
        assert not crd_errors(obj), crd_errors(obj)[:5]
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == registry.uri("1")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == runtime["metadata"]["name"]
    assert isvc["metadata"]["annotations"][kserve.MODEL_VERSION] == "1"
    uri = CliRunner().invoke(app, ["serving", "storage-uri", SEG, "--platform", str(platform)])
    assert uri.output.strip() == registry.uri("1")


@pytest.mark.parametrize(("status", "state"), [
    ({"observedGeneration": 1}, "pending"),  # KServe has not seen generation 2 yet
    ({"observedGeneration": 2, "components": {"predictor": {
        "latestCreatedRevision": "r-2", "latestReadyRevision": "r-1"}}}, "pending"),
    ({"observedGeneration": 2, "components": {"predictor": {
        "latestCreatedRevision": "r-2", "latestReadyRevision": "r-2"}}}, "ready"),
    ({"observedGeneration": 2, "components": {"predictor": {"latestCreatedRevision": "r-2"}},
      "conditions": [{"type": "PredictorConfigurationReady", "status": "False",
                      "reason": "RevisionFailed"}]}, "failed"),
    ({"observedGeneration": 2, "components": {"predictor": {"latestCreatedRevision": "r-2"}},
      "modelStatus": {"transitionStatus": "BlockedByFailedLoad",
                      "lastFailureInfo": {"reason": "ModelLoadFailed"}}}, "failed"),
])
def test_the_newest_revision_is_ready_failed_or_pending(status, state):
    isvc = {"metadata": {"generation": 2}, "status": status}
    assert kserve.revision_state(isvc)[0] == state
