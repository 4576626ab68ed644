"""The tail that every model-producing pipeline shares: register the model as challenger,
evaluate it, promote it through the gate, (with KServe serving) roll the new champion out,
close the parent run; and the placement of steps."""

from components import (
    evaluate_model,
    finish_pipeline_run,
    promote_model,
    register_model,
    roll_out_model,
)
from dermml.orchestration.k8s import place
from dermml.orchestration.platform import active_platform, platform_json


def register_evaluate_promote(task: str, model_uri, manifest_uri, parent, test_split: str,
                              min_delta: float, bootstrap_resamples: int,
                              min_per_group=None) -> dict:
    """Steps by stage name: register -> evaluate -> promote (gate) -> [rollout] -> finish.

    The rollout step is there when the platform in force has ``serving.kserve``: the
    InferenceServices serving the champion follow the promotion (canary, judged)."""
    registered = register_model(model_uri=model_uri, task=task, parent_run_id=parent.output)
    evaluated = evaluate_model(model_uri=registered.outputs["version_uri"],
                               manifest_uri=manifest_uri, splits=test_split,
                               parent_run_id=parent.output, n_resamples=bootstrap_resamples)
    promoted = promote_model(task=task, version=registered.outputs["version"],
                             manifest_uri=manifest_uri, split=test_split,
                             min_delta=min_delta, parent_run_id=parent.output,
                             min_per_group=[] if min_per_group is None else min_per_group
                             ).after(evaluated)
    steps = {"register": registered, "evaluate": evaluated, "promote": promoted}
    last = promoted
    if active_platform().serving.kserve:
        last = steps["rollout"] = roll_out_model(
            task=task, version=registered.outputs["version"], promoted=promoted.output,
            parent_run_id=parent.output, platform=platform_json())
    steps["finish"] = finish_pipeline_run(parent_run_id=parent.output).after(last)
    return steps


def place_steps(stages: dict) -> None:
    """Pools, resources, secrets and env from the platform config; no caching, since every
    stage writes to MLflow or the registry (a cached result would skip that)."""
    for stage, step in stages.items():
        place(step, stage)
        step.set_caching_options(False)
