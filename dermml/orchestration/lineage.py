"""Lineage of a served model: ``NAME@ALIAS`` back to its data, and forward to what serves it.

``lineage("dermml-segmentation@champion")`` follows what the stages write to MLflow:

- the registry version behind the alias (``source``, storage location, who registered it) and
  its training run (``ModelVersion.run_id``);
- the dataset version the training run used (``dermml.dataset_version``/``dataset_uri`` tags);
- the validation report of that data: the ``validate`` stage run of the same pipeline run
  (the training run's parent), else the newest ``validate`` run of that dataset version;
- the evaluation runs the gate scored the version with (``dermml.eval_run.*`` tags on the
  version) and the gate's decision (``dermml.gate``);
- the alias history (``dermml.alias_event.*`` tags of the registered model, written by
  ``registry/gate.py``);
- the InferenceServices that serve the alias, read from the cluster (``kserve.status``) when a
  kube context is available, else "no cluster" and the last rollout the platform recorded on
  the version (``dermml.serving``).
"""

from __future__ import annotations

import json
from typing import Any

from dermml.orchestration import tracking
from dermml.orchestration.platform import ServingConfig


def parse_ref(ref: str) -> tuple[str, str]:
    """(name, alias) of ``NAME@ALIAS`` or ``models:/NAME@ALIAS``."""
    body = ref.removeprefix("models:/")
    name, sep, alias = body.partition("@")
    if not sep or not name or not alias:
        raise ValueError(f"{ref!r}: give a registered model and alias, e.g. "
                         "dermml-segmentation@champion")
    return name, alias


def _run(client, run_id: str | None):
    if not run_id:
        return None
    try:
        return client.get_run(run_id)
    except Exception:  # deleted, or another tracking server's
        return None


def _run_info(run) -> dict[str, Any]:
    tags = run.data.tags
    return {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
            "stage": tags.get(tracking.TAG_STAGE), "experiment_id": run.info.experiment_id,
            "dataset_version": tags.get(tracking.TAG_DATASET_VERSION),
            "dataset_uri": tags.get(tracking.TAG_DATASET_URI),
            "git_commit": tags.get(tracking.TAG_GIT_COMMIT),
            "parent_run_id": tags.get("mlflow.parentRunId")}


def _validation(client, train, pipeline_id: str | None) -> dict[str, Any] | None:
    """The validate run of the training run's pipeline, else the newest one of its data."""
    experiment = train.info.experiment_id
    dataset = train.data.tags.get(tracking.TAG_DATASET_VERSION)
    runs = []
    if pipeline_id:
        runs = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{pipeline_id}' "
                                  f"and tags.`{tracking.TAG_STAGE}` = 'validate'",
                                  order_by=["attributes.start_time DESC"])
    if not runs and dataset:
        runs = client.search_runs([experiment], f"tags.`{tracking.TAG_STAGE}` = 'validate' and "
                                  f"tags.`{tracking.TAG_DATASET_VERSION}` = '{dataset}'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    if not runs:
        return None
    run = runs[0]
    info = _run_info(run)
    info.update(result=run.data.tags.get("dermml.validation"),
                suite=run.data.tags.get("dermml.validation_suite"),
                report=f"runs:/{run.info.run_id}/validation/report.json",
                same_pipeline=bool(pipeline_id) and info["parent_run_id"] == pipeline_id)
    return info


def _evaluations(client, mv) -> list[dict[str, Any]]:
    """The runs the gate's scores came from (``dermml.eval_run.<dataset12>.<split>``)."""
    out = []
    for key, run_id in sorted(mv.tags.items()):
        if not key.startswith("dermml.eval_run."):
            continue
        dataset12, split = key.removeprefix("dermml.eval_run.").split(".", 1)
        prefix = f"dermml.eval.{dataset12}.{split}."
        scores = {k.removeprefix(prefix): float(v) for k, v in mv.tags.items()
                  if k.startswith(prefix)}
        run = _run(client, run_id)
        out.append({"run_id": run_id, "split": split, "dataset_version": dataset12,
                    "status": run.info.status if run else "not found",
                    "parent_run_id": run.data.tags.get("mlflow.parentRunId") if run else None,
                    "scores": scores})
    return out


def _serving(name: str, alias: str, version: str, namespace: str, api_client) -> dict:
    from dermml.orchestration import kserve
    from dermml.orchestration.k8s import NoCluster

    try:
        rows = kserve.status(name, namespace, api_client)
    except NoCluster as error:
        return {"cluster": "no cluster", "detail": str(error), "inference_services": []}
    except Exception as error:  # unreachable, forbidden: say so, the rest still stands
        return {"cluster": "unreachable", "detail": str(error), "inference_services": []}
    rows = [r for r in rows if (r["model_uri"] or "").endswith(f"@{alias}")]
    for row in rows:
        row["serves_this_version"] = row["version"] == version
    return {"cluster": "reachable", "namespace": namespace, "inference_services": rows}


def lineage(ref: str, serving: ServingConfig | None = None,
            api_client=None) -> dict[str, Any]:
    """Everything known about ``NAME@ALIAS``, oldest link first (see the module doc);
    ``serving`` (the platform's) names the InferenceServices' namespace and where KServe
    reads the artifacts from."""
    from mlflow.tracking import MlflowClient

    from dermml.orchestration.kserve import artifact_storage_uri
    from dermml.registry.gate import alias_history, storage_location

    serving = serving or ServingConfig()

    name, alias = parse_ref(ref)
    uri = tracking.configure()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    mv = client.get_model_version_by_alias(name, alias)
    version = str(mv.version)
    aliases = sorted(a for a, v in client.get_registered_model(name).aliases.items()
                     if str(v) == version)
    train = _run(client, mv.run_id)
    pipeline_id = None
    if train is not None:
        pipeline_id = (train.data.tags.get(tracking.TAG_PIPELINE_RUN)
                       or train.data.tags.get("mlflow.parentRunId"))
    pipeline = _run(client, pipeline_id)
    tags = mv.tags
    location = storage_location(name, version)
    try:
        storage_uri = artifact_storage_uri(location, serving.artifacts_destination)
    except ValueError:  # e.g. a local store: nothing KServe could serve
        storage_uri = None
    return {
        "model": name, "alias": alias, "version": version,
        "dataset": ({"version": train.data.tags.get(tracking.TAG_DATASET_VERSION),
                     "uri": train.data.tags.get(tracking.TAG_DATASET_URI)}
                    if train is not None else None),
        "validation": _validation(client, train, pipeline_id) if train is not None else None,
        "training_run": {**_run_info(train), "metrics": dict(train.data.metrics)}
                        if train is not None else None,
        "pipeline_run": ({**_run_info(pipeline),
                          "pipeline": pipeline.data.tags.get("dermml.pipeline")}
                         if pipeline is not None else None),
        "evaluations": _evaluations(client, mv),
        "registry": {"name": name, "version": version, "aliases": aliases, "source": mv.source,
                     "storage_location": location, "storage_uri": storage_uri,
                     "run_id": mv.run_id, "registered_at": tags.get("dermml.registered_at"),
                     "registered_by": tags.get("dermml.registered_by"),
                     "gate": json.loads(tags.get("dermml.gate", "null")),
                     "previous_champion": tags.get("dermml.previous_champion"),
                     "last_rollout": json.loads(tags.get("dermml.serving", "null"))},
        "alias_history": alias_history(name, alias),
        "serving": _serving(name, alias, version, serving.namespace, api_client),
    }


def _short(value: str | None, n: int = 12) -> str:
    return (value or "?")[:n]


def render(info: dict[str, Any]) -> str:
    """The lineage as lines, from the data to what serves it."""
    lines = [f"{info['model']}@{info['alias']} = version {info['version']}"]

    def add(label: str, text: str) -> None:
        lines.append(f"  {label:<14} {text}")

    dataset = info["dataset"]
    add("dataset", f"{dataset['version']} ({dataset['uri']})" if dataset and dataset["version"]
        else "unknown (the training run has no dermml.dataset_version)")
    v = info["validation"]
    add("-> validation", (f"run {_short(v['run_id'])} {v['result'] or '?'} (suite {v['suite']}, "
                          f"dataset {_short(v['dataset_version'])}"
                          f"{', same pipeline run' if v['same_pipeline'] else ''}): {v['report']}")
        if v else "no validation run found for this data")
    t = info["training_run"]
    if t:
        best = t["metrics"].get("best_val_gate")
        p = info["pipeline_run"]
        add("-> training", f"run {_short(t['run_id'])} {t['status']}"
            + (f", best_val_gate {best:.4f}" if best is not None else "")
            + f", git {_short(t['git_commit'])}"
            + (f", pipeline run {_short(p['run_id'])} ({p['pipeline'] or p['name']}, "
               f"{p['status']})" if p else ", outside a pipeline"))
    else:
        add("-> training", "unknown (the version has no run)")
    for e in info["evaluations"] or [None]:
        add("-> evaluation", "no stored evaluation" if e is None else
            f"run {_short(e['run_id'])} {e['status']} on {e['split']} of dataset "
            f"{e['dataset_version']}: " + ", ".join(f"{k} {v:.4f}"
                                                    for k, v in sorted(e["scores"].items())))
    r = info["registry"]
    add("-> registry", f"{r['name']} v{r['version']} (aliases: {', '.join(r['aliases'])}), "
        f"registered {r['registered_at'] or '?'} by {r['registered_by'] or '?'}, "
        f"stored at {r['storage_location']}"
        + (f" (KServe: {r['storage_uri']})" if r["storage_uri"] not in
           (None, r["storage_location"]) else ""))
    gate = r["gate"]
    if gate:
        add("   gate", f"{'promoted' if gate['promoted'] else 'refused'}: {gate['reason']}")
    history = info["alias_history"]
    if not history:
        add("-> aliases", f"no alias history recorded for @{info['alias']}")
    for i, event in enumerate(history):
        add("-> aliases" if i == 0 else "",
            f"{event['at']} {event['action']} @{event['alias']} -> v{event['version']}"
            + (f" (was v{event['previous']})" if event.get("previous") else "")
            + f" by {event['by']}" + (f": {event['reason']}" if event.get("reason") else ""))
    serving = info["serving"]
    if serving["cluster"] != "reachable":
        add("-> serving", f"{serving['cluster']} ({serving['detail']})")
        last = r["last_rollout"]
        if last:
            add("", f"last rollout recorded on v{r['version']}: {last['result']} on "
                f"{last['inference_service']}, revision {last.get('revision')} ({last['at']})")
    elif not serving["inference_services"]:
        add("-> serving", f"no InferenceService in {serving['namespace']} serves "
            f"{info['model']}@{info['alias']}")
    for i, row in enumerate(serving["inference_services"]):
        add("-> serving" if i == 0 else "",
            f"{row['inference_service']}: v{row['version']} {row['rollout']}"
            f"{'' if row['serves_this_version'] else ' (NOT this version)'}, revision "
            f"{row['latest_ready_revision']} (rolled out: {row['latest_rolled_out_revision']}), "
            f"traffic {row['traffic']}")
    return "\n".join(lines)
