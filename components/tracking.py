"""Parent MLflow run of a pipeline execution: opened first, closed FINISHED by the last stage;
every stage marks it FAILED when it fails (``dermml.orchestration.tracking.failing_parent``)."""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def start_pipeline_run(task: str, pipeline: str) -> str:
    from dermml.orchestration.tracking import start_pipeline_run as start

    return start(task, pipeline)


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_pipeline_run(parent_run_id: str):
    from dermml.orchestration.tracking import finish_pipeline_run as finish

    finish(parent_run_id)
