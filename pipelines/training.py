"""Training pipeline: data -> validate -> train (Ray) -> register -> evaluate -> promote.

One MLflow parent run per execution; each stage is a child run. A failing stage marks the parent
FAILED (see ``tracking.stage_run``); the last step closes it.
"""

from typing import NamedTuple

from kfp import dsl

from components import (
    prepare_data,
    start_pipeline_run,
    train_model,
    validate_data,
)
from dermml.orchestration.platform import platform_json
from pipelines.gate import place_steps, register_evaluate_promote


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
                      synthetic_views: str = "",
                      gate_min_per_group: list = []) -> TrainingOutputs:  # noqa: B006
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
    tail = register_evaluate_promote(task, trained.outputs["model_uri"],
                                     checked.outputs["Output"], parent, test_split, min_delta,
                                     bootstrap_resamples, gate_min_per_group)
    place_steps({"tracking": parent, "data": data, "validate": checked, "train": trained,
                 **tail})
    registered, promoted = tail["register"], tail["promote"]
    return TrainingOutputs(parent_run_id=parent.output, train_run_id=trained.outputs["run_id"],
                   model_version=registered.outputs["version"], promoted=promoted.output)


def build_training_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-training", description="Validate data, train with Ray, "
                        "register and gate-promote in MLflow.")(training_pipeline)
