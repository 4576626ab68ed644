"""The rollout stage: after the gate, serving follows the new champion (KServe, canary first).

``roll_out`` is what the pipelines' last model step runs (``components/serving.py``) when the
platform config has ``serving.kserve: true``: the InferenceServices that serve
``dermml-<task>@champion`` get the promoted version as a canary, the canary is judged
(``orchestration/kserve.py``: readiness, error rate and p95 latency) and either rolled out or
rolled back, with ``@champion`` moved back. The outcome is a ``rollout`` child run of the
pipeline (tags and the canary's metrics), and a failed canary fails the stage.
"""

from __future__ import annotations

from dermml.orchestration import tracking
from dermml.orchestration.platform import PlatformConfig


def roll_out(task: str, version: str, promoted: bool, platform: PlatformConfig,
             parent_run_id: str | None = None, api_client=None) -> str:
    """Follow the promotion of ``version`` on KServe; returns what happened, one line per
    InferenceService. Raises ``kserve.CanaryRolledBack`` when the canary was rolled back."""
    from dermml.orchestration import kserve

    if not promoted:
        return f"v{version} was not promoted: serving unchanged"
    serving = platform.serving
    with tracking.stage_run(task, "rollout", parent_run_id):
        tracking.set_tags({"dermml.model_version": str(version),
                           "dermml.serving.namespace": serving.namespace})
        started = kserve.follow_promotion(task, version, serving, api_client)
        if not any(c.action in kserve.IN_PROGRESS for c in started):
            summary = kserve.describe(started)
            tracking.set_tags({"dermml.serving.result": "unchanged" if started else "none",
                               "dermml.serving.changes": summary[:5000]})
            return summary
        try:
            changes = kserve.rollout(task, serving, api_client)
        except kserve.CanaryRolledBack as failed:
            _log(failed.changes, "rolled-back")
            raise
        _log(changes, "rolled-out")
        return kserve.describe(changes)


def _log(changes, result: str) -> None:
    from dermml.orchestration import kserve

    tracking.set_tags({"dermml.serving.result": result,
                       "dermml.serving.changes": kserve.describe(changes)[:5000],
                       "dermml.serving.revisions": ",".join(
                           f"{c.isvc}={c.revision}" for c in changes if c.revision)})
    for change in changes:
        tracking.log_metrics({f"canary.{change.isvc}.{key}": value
                              for key, value in change.metrics.items() if value is not None})
