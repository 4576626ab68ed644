"""Validation component: fails the pipeline run (so training never starts) on bad data.

Outputs: the report folder (validation.json, Data Docs, quarantine and facts tables) and the clean
manifest (absolute URIs) as artifacts; the returned string is the manifest URI later stages read,
unchanged, since a dataset that passes has nothing quarantined.
"""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(manifest_uri: str, suite: str, required_splits: str, parent_run_id: str,
                  report: dsl.Output[dsl.Artifact],
                  clean_manifest: dsl.Output[dsl.Dataset]) -> str:
    from dermml.orchestration.tracking import failing_parent
    from dermml.validation.run import validate

    splits = tuple(s for s in required_splits.split(",") if s)
    with failing_parent(parent_run_id):
        outcome = validate(manifest_uri, suite, report.path, splits,
                           write_clean=clean_manifest.path, parent_run_id=parent_run_id,
                           progress=False)
    report.metadata.update(outcome.report.counts())
    clean_manifest.metadata.update(n_samples=outcome.report.n_samples,
                                   source_version=outcome.report.dataset_version)
    return manifest_uri
