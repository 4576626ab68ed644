"""Tuning pipeline: data -> validate -> tune (Ray Tune) -> register the best -> evaluate ->
promote (gate).

The search runs in the tune step with local Ray (``--local``), or, when the platform config has
``ray_job.enabled``, as a KubeRay RayJob on the GPU pool whose ``concurrent x ray.num_workers``
worker pods hold the concurrent trials. One MLflow parent run per execution; the search is a
child run with one child run per trial.
"""

from typing import NamedTuple

from kfp import dsl

from components import (
    prepare_data,
    start_pipeline_run,
    tune_model,
    validate_data,
)
from dermml.orchestration.platform import platform_json
from pipelines.gate import place_steps, register_evaluate_promote


class TuningOutputs(NamedTuple):
    parent_run_id: str
    search_run_id: str
    best_run_id: str
    model_version: str
    promoted: bool


def tuning_pipeline(task: str = "segmentation", config: str = "", overrides: list = [],  # noqa: B006
                    space: str = "configs/tune/segmentation.yaml", search: str = "random",
                    scheduler: str = "asha", trials: int = 8, concurrent: int = 2,
                    metric: str = "", seed: int = 0, manifest_uri: str = "",
                    demo_root: str = "", demo_n: int = 160, demo_size: int = 64,
                    required_splits: str = "train,val,test", test_split: str = "test",
                    min_delta: float = 0.0, bootstrap_resamples: int = 200,
                    validation_suite: str = "", validation_overrides: list = [],  # noqa: B006
                    validation_warn_only: bool = False,
                    gate_min_per_group: list = []) -> TuningOutputs:  # noqa: B006
    parent = start_pipeline_run(task=task, pipeline="tuning")
    data = prepare_data(manifest_uri=manifest_uri, demo_root=demo_root, demo_n=demo_n,
                        demo_size=demo_size, seed=seed, parent_run_id=parent.output)
    checked = validate_data(manifest_uri=data.output, suite=task,
                            required_splits=required_splits, parent_run_id=parent.output,
                            custom_suite=validation_suite, overrides=validation_overrides,
                            warn_only=validation_warn_only)
    tuned = tune_model(task=task, config=config, overrides=overrides, space=space,
                       search=search, scheduler=scheduler, trials=trials,
                       concurrent=concurrent, metric=metric, seed=seed,
                       manifest_uri=checked.outputs["Output"], parent_run_id=parent.output,
                       platform=platform_json())
    tail = register_evaluate_promote(task, tuned.outputs["model_uri"],
                                     checked.outputs["Output"], parent, test_split, min_delta,
                                     bootstrap_resamples, gate_min_per_group)
    place_steps({"tracking": parent, "data": data, "validate": checked, "tune": tuned,
                 **tail})
    registered, promoted = tail["register"], tail["promote"]
    return TuningOutputs(parent_run_id=parent.output, search_run_id=tuned.outputs["run_id"],
                         best_run_id=tuned.outputs["best_run_id"],
                         model_version=registered.outputs["version"], promoted=promoted.output)


def build_tuning_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-tuning", description="Validate data, search "
                        "hyper-parameters with Ray Tune, register the best model and "
                        "gate-promote it in MLflow.")(tuning_pipeline)
