"""Training pipeline: data -> validate -> train (Ray) -> register -> evaluate -> promote.

One MLflow parent run per execution; each stage is a child run. A failing stage marks the parent
FAILED (see ``tracking.stage_run``); the last step closes it.
"""

from typing import NamedTuple

from kfp import dsl

from components import (
    evaluate_model,
    finish_pipeline_run,
    prepare_data,
    promote_model,
    register_model,
    start_pipeline_run,
    train_model,
    validate_data,
)
from dermml.orchestration.k8s import place
from dermml.orchestration.platform import platform_json


class TrainingOutputs(NamedTuple):
    parent_run_id: str
    train_run_id: str
    model_version: str
    promoted: bool


def training_pipeline(task: str = "segmentation", config: str = "", overrides: list = [],  # noqa: B006
                      manifest_uri: str = "", demo_root: str = "", demo_n: int = 160,
                      demo_size: int = 64, seed: int = 0,
                      required_splits: str = "train,val,test", test_split: str = "test",
                      min_delta: float = 0.0, bootstrap_resamples: int = 200,
                      validation_suite: str = "", validation_overrides: list = [],  # noqa: B006
                      validation_warn_only: bool = False,
                      synthetic_views: str = "") -> TrainingOutputs:
    parent = start_pipeline_run(task=task, pipeline="training")
    data = prepare_data(manifest_uri=manifest_uri, demo_root=demo_root, demo_n=demo_n,
                        demo_size=demo_size, seed=seed, parent_run_id=parent.output)
    checked = validate_data(manifest_uri=data.output, suite=task,
                            required_splits=required_splits, parent_run_id=parent.output,
                            custom_suite=validation_suite, overrides=validation_overrides,
                            warn_only=validation_warn_only)
    trained = train_model(task=task, config=config, overrides=overrides,
                          manifest_uri=checked.outputs["Output"],
                          parent_run_id=parent.output, platform=platform_json(),
                          synthetic_manifest=synthetic_views)
    registered = register_model(model_uri=trained.outputs["model_uri"], task=task,
                                parent_run_id=parent.output)
    evaluated = evaluate_model(model_uri=registered.outputs["version_uri"],
                               manifest_uri=checked.outputs["Output"], splits=test_split,
                               parent_run_id=parent.output, n_resamples=bootstrap_resamples)
    promoted = promote_model(task=task, version=registered.outputs["version"],
                             manifest_uri=checked.outputs["Output"], split=test_split,
                             min_delta=min_delta, parent_run_id=parent.output).after(evaluated)
    finished = finish_pipeline_run(parent_run_id=parent.output).after(promoted)
    stages = {"tracking": parent, "data": data, "validate": checked, "train": trained,
              "register": registered, "evaluate": evaluated, "promote": promoted,
              "finish": finished}
    for stage, task_ in stages.items():
        place(task_, stage)  # pools, resources, secrets, env from the platform config
        # Every stage writes to MLflow or the registry: a cached result would skip that.
        task_.set_caching_options(False)
    return TrainingOutputs(parent_run_id=parent.output, train_run_id=trained.outputs["run_id"],
                   model_version=registered.outputs["version"], promoted=promoted.output)


def build_training_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-training", description="Validate data, train with Ray, "
                        "register and gate-promote in MLflow.")(training_pipeline)
