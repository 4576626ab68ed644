"""Register models as ``dermml-<task>``, gate promotion to ``champion``, keep an audit trail.

Evaluation results are stored as tags on the model version, keyed by dataset version and split
(``dermml.eval.<dataset12>.<split>.<metric>``), so a gate always compares the challenger and the
champion on the very same test set; a champion never scored on that set is evaluated first. The
metrics per skin-tone group are one JSON tag per split (``dermml.eval_groups.<dataset12>.<split>``),
which the gate's optional per-group floors (``min_per_group``) read.

Every move of an alias (register -> challenger, promote -> champion, rollback) is also appended
to the registered model as one ``dermml.alias_event.<time>`` tag (``alias_history``), so the
lineage of a version shows who moved which alias when, and why. This module knows nothing of
where a model is served: the orchestration layer (``orchestration/kserve.py``) follows the
champion after ``promote`` and ``rollback``.
"""

from __future__ import annotations

import datetime as dt
import getpass
import json
import math
from dataclasses import asdict, dataclass, field

from mlflow.tracking import MlflowClient

from dermml.evaluation.run import EvaluationResult, evaluate
from dermml.orchestration import tracking
from dermml.tasks import get_task

CHALLENGER = "challenger"
CHAMPION = "champion"


def model_name(task: str) -> str:
    return f"dermml-{task}"


def champion_uri(task: str) -> str:
    """``models:/dermml-<task>@champion``: what serving loads for a task."""
    return f"models:/{model_name(task)}@{CHAMPION}"


def _client() -> MlflowClient:
    uri = tracking.configure()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


ALIAS_EVENT = "dermml.alias_event."
"""Prefix of the registered model's alias-history tags (one per move, keyed by its time)."""


def task_of(name: str) -> str:
    """The task of registered model ``dermml-<task>`` (the inverse of ``model_name``)."""
    if not name.startswith("dermml-"):
        raise ValueError(f"{name!r} is not a DermML registered model (dermml-<task>)")
    return name.removeprefix("dermml-")


def _eval_key(dataset_version: str, split: str, metric: str) -> str:
    return f"dermml.eval.{dataset_version[:12]}.{split}.{metric}"


def _groups_key(dataset_version: str, split: str) -> str:
    return f"dermml.eval_groups.{dataset_version[:12]}.{split}"


def parse_model_uri(model_uri: str) -> tuple[str, str] | None:
    """(name, version) of a ``models:/name/version`` or ``models:/name@alias`` URI, else None."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    if "@" not in ref and "/" not in ref:  # models:/m-<id>: a logged model, not a version
        return None
    client = _client()
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, client.get_model_version_by_alias(name, alias).version
    name, _, version = ref.partition("/")
    return name, version


def register(model_uri: str, task: str, description: str = "") -> str:
    """Register ``model_uri`` (e.g. ``runs:/<id>/model``) and make it the challenger."""
    import mlflow

    tracking.configure()
    name = model_name(task)
    version = mlflow.register_model(model_uri, name).version
    client = _client()
    previous = _alias_version(client, name, CHALLENGER)
    client.set_registered_model_alias(name, CHALLENGER, version)
    _record_alias_event(client, name, CHALLENGER, str(version), previous, "register")
    client.set_model_version_tag(name, version, "dermml.registered_at", _now())
    client.set_model_version_tag(name, version, "dermml.registered_by", getpass.getuser())
    if description:
        client.update_model_version(name, version, description=description)
    return str(version)


def record_evaluation(result: EvaluationResult) -> bool:
    """Store the split metrics of ``result`` on the model version it evaluated, for the gate.

    Nothing is stored (False) for a ``runs:/`` URI, or for a result under serving params: gate
    scores are for the model as it serves by default.
    """
    ref = None if result.params else parse_model_uri(result.model_uri)
    if ref is None:
        return False
    name, version = ref
    dataset_version, eval_run_id = result.dataset_version, result.run_id
    client = _client()
    for split, values in result.metrics.items():
        for metric, value in values.items():
            client.set_model_version_tag(name, version, _eval_key(dataset_version, split, metric),
                                         repr(float(value)))
        client.set_model_version_tag(name, version,
                                     f"dermml.eval_run.{dataset_version[:12]}.{split}",
                                     eval_run_id)
        if split in result.groups:
            groups = [{"stratifier": g.stratifier, "group": g.group, "n": g.n,
                       "reported": g.reported,
                       "metrics": {k: v for k, v in g.metrics.items() if math.isfinite(v)}}
                      for g in result.groups[split]]
            client.set_model_version_tag(name, version, _groups_key(dataset_version, split),
                                         json.dumps({"min_group_size": result.min_group_size,
                                                     "groups": groups}))
    return True


def stored_score(name: str, version: str, dataset_version: str, split: str,
                 metric: str) -> float | None:
    tags = _client().get_model_version(name, version).tags
    value = tags.get(_eval_key(dataset_version, split, metric))
    return None if value is None else float(value)


@dataclass
class GateDecision:
    promoted: bool
    version: str
    metric: str
    challenger_score: float
    champion_version: str | None
    champion_score: float | None
    reason: str
    group_floors: list[dict] = field(default_factory=list)
    """The per-group floors checked (``min_per_group``): stratifier, group, n, metric, value,
    floor, passed, for every reported (not too few) skin-tone group."""


def _score(name: str, version: str, manifest_uri: str, split: str, metric: str,
           parent_run_id: str | None) -> float:
    from dermml.data.manifest import read_manifest

    dataset_version = read_manifest(manifest_uri).version
    score = stored_score(name, version, dataset_version, split, metric)
    if score is None:
        record_evaluation(evaluate(f"models:/{name}/{version}", manifest_uri, [split],
                                   parent_run_id, n_resamples=200))
        score = stored_score(name, version, dataset_version, split, metric)
    if score is None:
        raise RuntimeError(f"{name} v{version}: evaluation produced no {metric!r}")
    return score


def stored_groups(name: str, version: str, dataset_version: str, split: str) -> dict | None:
    """The metrics per skin-tone group stored by ``record_evaluation`` (None: none stored)."""
    value = _client().get_model_version(name, version).tags.get(
        _groups_key(dataset_version, split))
    return None if value is None else json.loads(value)


def _groups(name: str, version: str, manifest_uri: str, split: str,
            parent_run_id: str | None) -> dict:
    from dermml.data.manifest import read_manifest

    dataset_version = read_manifest(manifest_uri).version
    groups = stored_groups(name, version, dataset_version, split)
    if groups is None:  # scored before evaluation reported groups
        record_evaluation(evaluate(f"models:/{name}/{version}", manifest_uri, [split],
                                   parent_run_id, n_resamples=200))
        groups = stored_groups(name, version, dataset_version, split)
    if groups is None:
        raise RuntimeError(f"{name} v{version}: evaluation on {split} reported no skin-tone "
                           "groups (a task scored as a set has none)")
    return groups


def parse_floors(items: list[str]) -> dict[str, float]:
    """``["dice=0.7"]`` (``--min-per-group``) -> {"dice": 0.7}."""
    from dermml.config import ConfigError, parse_key_value

    floors = {}
    for item in items:
        metric, value = parse_key_value(item, "--min-per-group", "dice=0.7")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"--min-per-group {item!r}: the floor must be a number, e.g. "
                              "--min-per-group dice=0.7")
        floors[metric] = float(value)
    return floors


def check_group_floors(groups: dict, floors: dict[str, float], split: str) -> tuple[list[dict],
                                                                                    str]:
    """(checks, failure text) of ``floors`` (metric -> lowest value) on every reported group;
    the text names each group below its floor, empty when none is."""
    from dermml.config import ConfigError

    reported = [g for g in groups["groups"] if g["reported"]]
    known = {m for g in reported for m in g["metrics"]}
    unknown = sorted(m for m in floors if reported and m not in known)
    if unknown:
        raise ConfigError(f"min_per_group: no metric {', '.join(unknown)} in the groups of "
                          f"{split} (metrics: {', '.join(sorted(known))})")
    checks = []
    for g in reported:
        for metric, floor in floors.items():
            value = g["metrics"].get(metric)
            checks.append({"stratifier": g["stratifier"], "group": g["group"], "n": g["n"],
                           "metric": metric, "value": value, "floor": float(floor),
                           "passed": value is None or value >= floor})
    failed = [c for c in checks if not c["passed"]]
    text = "; ".join(f"{split} {c['metric']} of skin-tone group {c['stratifier']}:{c['group']} "
                     f"(n={c['n']}) {c['value']:.4f} is below the floor {c['floor']}"
                     for c in failed)
    return checks, text


def promote(task: str, version: str, manifest_uri: str, split: str = "test",
            metric: str | None = None, min_delta: float = 0.0,
            parent_run_id: str | None = None,
            min_per_group: dict[str, float] | None = None) -> GateDecision:
    """Make ``version`` the champion if it beats the champion by ``min_delta`` on ``split``
    and, with ``min_per_group`` (metric -> floor), no reported skin-tone group of ``split``
    (ITA groups, and the manifest's skin-type column) scores below the metric's floor. Groups
    of too few images are not checked; a floor is a lowest value (for metrics where higher
    is better)."""
    t = get_task(task)
    if min_per_group and not t.scores_per_sample:
        from dermml.config import ConfigError

        raise ConfigError(f"min_per_group: task {task!r} is scored as a set, not per image, so "
                          "it has no metrics per skin-tone group")
    metric = metric or t.gate_metric
    sign = 1.0 if t.gate_mode == "max" else -1.0
    name, client = model_name(task), _client()
    version = str(version)
    challenger = _score(name, version, manifest_uri, split, metric, parent_run_id)
    champion_version = _champion_version(client, name)
    if champion_version is None:
        decision = GateDecision(True, version, metric, challenger, None, None,
                                "first model: no champion to beat")
    elif champion_version == version:
        decision = GateDecision(True, version, metric, challenger, version, challenger,
                                "already champion")
    else:
        champion = _score(name, champion_version, manifest_uri, split, metric, parent_run_id)
        delta = sign * (challenger - champion)
        passed = delta >= min_delta
        verdict = "beats" if passed else "does not beat"
        decision = GateDecision(passed, version, metric, challenger, champion_version, champion,
                                f"{split} {metric} {challenger:.4f} {verdict} champion "
                                f"v{champion_version} {champion:.4f} (min_delta {min_delta})")
    if min_per_group:
        groups = _groups(name, version, manifest_uri, split, parent_run_id)
        decision.group_floors, failures = check_group_floors(groups, min_per_group, split)
        if failures:
            decision.promoted = False
            decision.reason = f"{failures} (and: {decision.reason})"
        elif not decision.group_floors:
            decision.reason += (f"; per-group floors not checked: no skin-tone group of {split} "
                                f"has {groups['min_group_size']} images")
    _record_decision(client, name, decision)
    return decision


def _record_decision(client: MlflowClient, name: str, decision: GateDecision) -> None:
    record = {**asdict(decision), "at": _now(), "by": getpass.getuser()}
    client.set_model_version_tag(name, decision.version, "dermml.gate", json.dumps(record))
    if not decision.promoted or decision.champion_version == decision.version:
        return
    client.set_registered_model_alias(name, CHAMPION, decision.version)
    _record_alias_event(client, name, CHAMPION, decision.version, decision.champion_version,
                        "promote", decision.reason)
    for key, value in (("promoted_at", record["at"]), ("promoted_by", record["by"]),
                       ("promotion_reason", decision.reason),
                       ("previous_champion", decision.champion_version or "")):
        client.set_model_version_tag(name, decision.version, f"dermml.{key}", value)


def rollback(task: str, reason: str = "rollback") -> str:
    """Give the champion alias back to the version it replaced; returns that version."""
    name, client = model_name(task), _client()
    current = client.get_model_version_by_alias(name, CHAMPION)
    previous = current.tags.get("dermml.previous_champion")
    if not previous:
        raise ValueError(f"{name} v{current.version} replaced no champion; nothing to roll back to")
    client.set_registered_model_alias(name, CHAMPION, previous)
    _record_alias_event(client, name, CHAMPION, previous, str(current.version), "rollback",
                        reason)
    client.set_model_version_tag(name, current.version, "dermml.rolled_back",
                                 json.dumps({"at": _now(), "by": getpass.getuser(),
                                             "reason": reason, "restored": previous}))
    return previous


def history(task: str) -> list[dict]:
    """Every version with its aliases and gate record, newest first (the audit trail)."""
    name, client = model_name(task), _client()
    versions = client.search_model_versions(f"name='{name}'")
    if not versions:
        return []
    # search_model_versions leaves every version's aliases empty: the registered model has them.
    aliases: dict[str, list[str]] = {}
    for alias, version in client.get_registered_model(name).aliases.items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in versions:
        version = str(mv.version)
        rows.append({"version": version, "aliases": sorted(aliases.get(version, [])),
                     "run_id": mv.run_id, "gate": json.loads(mv.tags.get("dermml.gate", "null")),
                     "previous_champion": mv.tags.get("dermml.previous_champion")})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def _record_alias_event(client: MlflowClient, name: str, alias: str, version: str,
                        previous: str | None, action: str, reason: str = "") -> None:
    """Append one alias move to the registered model's history (never overwritten: the key is
    the time of the move, to the microsecond)."""
    at = dt.datetime.now(dt.UTC)
    event = {"alias": alias, "version": str(version), "previous": previous, "action": action,
             "reason": reason, "at": at.isoformat(timespec="seconds"), "by": getpass.getuser()}
    client.set_registered_model_tag(name, f"{ALIAS_EVENT}{at.strftime('%Y%m%dT%H%M%S.%fZ')}",
                                    json.dumps(event))


def alias_history(name: str, alias: str | None = None) -> list[dict]:
    """The alias moves of registered model ``name`` (of ``alias`` only, when given), oldest
    first: alias, version, previous, action (register, promote, rollback), reason, at, by."""
    tags = _client().get_registered_model(name).tags
    events = [json.loads(value) for key, value in sorted(tags.items())
              if key.startswith(ALIAS_EVENT)]
    return [e for e in events if alias is None or e["alias"] == alias]


def version_of(name: str, alias: str) -> str:
    """The version ``name@alias`` points at (an MlflowException when there is none)."""
    return str(_client().get_model_version_by_alias(name, alias).version)


def storage_location(name: str, version: str) -> str:
    """Where the artifacts of ``name`` version ``version`` are stored (the model's folder in
    the artifact store: ``s3://...``, or ``mlflow-artifacts:/...`` behind a proxying server)."""
    return _client().get_model_version_download_uri(name, str(version))


def record_serving(name: str, version: str, record: dict) -> None:
    """Note on the version how it was rolled out (``dermml.serving``: where, which revision,
    the verdict), for its lineage; written by the orchestration layer that serves it."""
    _client().set_model_version_tag(name, str(version), "dermml.serving",
                                    json.dumps({**record, "at": _now()}))


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _champion_version(client, name: str) -> str | None:
    """The champion's version, or None when there is none yet. Any other failure (the server
    unreachable, no permission) is raised: it must never count as "no champion to beat"."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") or \
                exc.get_http_status_code() == 404:
            return None
        raise
