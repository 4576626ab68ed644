"""Validation component: fails the pipeline run (so training never starts) on bad data."""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(manifest_uri: str, suite: str, required_splits: str, parent_run_id: str,
                  report: dsl.Output[dsl.Artifact]) -> str:
    from dermml.validation.run import validate

    splits = tuple(s for s in required_splits.split(",") if s)
    validate(manifest_uri, suite, report.path, splits, parent_run_id=parent_run_id,
             progress=False)
    return manifest_uri
