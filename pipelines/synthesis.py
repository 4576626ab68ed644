"""Synthesis pipeline: validate the lesions -> synthesise views (GPU pool) -> validate the
synthetic set with the synth3d suite. One MLflow parent run; each stage a child run."""

from kfp import dsl

from components import finish_pipeline_run, start_pipeline_run, synthesize_views, validate_data
from dermml.orchestration.k8s import place


def synthesis_pipeline(lesions_uri: str, out_uri: str, bodies: str = "procedural:4",
                       views: int = 20, size: int = 512, blend: str = "deep", seed: int = 0,
                       config: str = "", overrides: list = [],  # noqa: B006
                       lesion_suite: str = "segmentation",
                       validation_warn_only: bool = False) -> str:
    parent = start_pipeline_run(task="synth3d", pipeline="synthesis")
    lesions = validate_data(manifest_uri=lesions_uri, suite=lesion_suite, required_splits="",
                            parent_run_id=parent.output, warn_only=validation_warn_only)
    synthesized = synthesize_views(lesions_uri=lesions.outputs["Output"], out_uri=out_uri,
                                   bodies=bodies, views=views, size=size, blend=blend,
                                   seed=seed, config=config, overrides=overrides,
                                   parent_run_id=parent.output)
    checked = validate_data(manifest_uri=synthesized.output, suite="synth3d",
                            required_splits="", parent_run_id=parent.output,
                            warn_only=validation_warn_only)
    finished = finish_pipeline_run(parent_run_id=parent.output).after(checked)
    stages = {"tracking": parent, "validate": lesions, "synthesize": synthesized,
              "validate-synthetic": checked, "finish": finished}
    for stage, task_ in stages.items():
        place(task_, "validate" if stage == "validate-synthetic" else stage)
        task_.set_caching_options(False)  # every stage writes to MLflow
    return checked.outputs["Output"]


def build_synthesis_pipeline():
    """The pipeline graph, built now so placement follows the platform config in force."""
    return dsl.pipeline(name="dermml-synthesis", description="Validate lesions, synthesise "
                        "annotated views from 3D bodies, validate the synthetic set.")(
        synthesis_pipeline)
