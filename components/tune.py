"""Tuning component: a Ray Tune search over the task's training, here or as a KubeRay RayJob
when the platform config the pipeline was compiled with says so; returns the best trial's
model (registered by the next step, so the gate decides)."""

from typing import NamedTuple

from kfp import dsl

from components.image import GPU_IMAGE


@dsl.component(base_image=GPU_IMAGE, install_kfp_package=False)
def tune_model(task: str, config: str, overrides: list, space: str, search: str,
               scheduler: str, trials: int, concurrent: int, metric: str, seed: int,
               manifest_uri: str, parent_run_id: str, platform: str = ""
               ) -> NamedTuple("TuneOutputs", run_id=str, best_run_id=str, model_uri=str):
    from collections import namedtuple

    from dermml.orchestration.platform import platform_from_json
    from dermml.orchestration.tracking import failing_parent
    from dermml.tuning.run import resolve_search, tune

    with failing_parent(parent_run_id):  # a bad space fails before the search's run exists
        sets = [str(o) for o in overrides] + [f"data.manifest={manifest_uri}"]
        cfg, spec = resolve_search(task, config or None, sets, space, search=search,
                                   scheduler=scheduler, trials=trials, concurrent=concurrent,
                                   metric=metric, seed=seed)
        outcome = tune(task, cfg, spec, parent_run_id=parent_run_id, register=False,
                       platform=platform_from_json(platform))
    return namedtuple("TuneOutputs", ["run_id", "best_run_id", "model_uri"])(
        outcome.run_id, outcome.best_run_id, outcome.model_uri)
