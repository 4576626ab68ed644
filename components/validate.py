"""Validation component: fails the pipeline run (so training never starts) on bad data.

Outputs: the report folder (validation.json, Data Docs, quarantine and facts tables) and the clean
manifest (absolute URIs) as artifacts; the returned string is the manifest URI later stages read:
the input, unchanged, when nothing was quarantined; the clean manifest when ``warn_only`` let a
dataset with quarantined samples through (so training never reads a sample known to be bad).
``custom_suite`` (a shipped suite name or a YAML path) replaces the task's suite; ``overrides``
are ``rule.param=value`` settings (as ``dermml validate --set``).
"""

from kfp import dsl

from components.image import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def validate_data(manifest_uri: str, suite: str, required_splits: str, parent_run_id: str,
                  report: dsl.Output[dsl.Artifact], clean_manifest: dsl.Output[dsl.Dataset],
                  custom_suite: str = "", overrides: list = [],  # noqa: B006
                  warn_only: bool = False) -> str:
    from dermml.orchestration.tracking import failing_parent
    from dermml.validation.run import validate

    splits = tuple(s for s in required_splits.split(",") if s)
    with failing_parent(parent_run_id):
        outcome = validate(manifest_uri, custom_suite or suite, report.path, splits,
                           write_clean=clean_manifest.path, parent_run_id=parent_run_id,
                           progress=False, overrides=[str(o) for o in overrides],
                           warn_only=warn_only)
    report.metadata.update(outcome.report.counts())
    clean_manifest.metadata.update(n_samples=outcome.report.n_samples,
                                   source_version=outcome.report.dataset_version)
    if outcome.report.quarantine:  # only reached with warn_only
        return clean_manifest.uri or clean_manifest.path
    return manifest_uri
