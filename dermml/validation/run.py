"""The validation stage: a manifest in; a report, a quarantine list and a clean manifest out."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd

from dermml import storage
from dermml.data.manifest import read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.validation.checks import ValidationReport, validate_manifest

SUITE_NEEDS_MASK = {"segmentation": True, "classification": False, "attributes": True,
                    "segdiff": True}


class ValidationFailed(RuntimeError):
    """The dataset failed validation; ``report`` holds every problem."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.summary())
        self.report = report


@dataclass
class ValidationOutcome:
    report: ValidationReport
    report_uri: str | None
    clean_manifest_uri: str | None


def validate(manifest_uri: str, suite: str = "segmentation", report_dir: str | None = None,
             required_splits: tuple[str, ...] = (), warn_only: bool = False,
             write_clean: str | None = None, parent_run_id: str | None = None,
             track: bool = True, progress: bool = True) -> ValidationOutcome:
    """Check every sample; raise ``ValidationFailed`` on problems unless ``warn_only``."""
    run = tracking.stage_run(suite, "validate", parent_run_id) if track else nullcontext()
    with run:  # failing inside the run marks it (and the pipeline's parent run) FAILED
        return _validate(manifest_uri, suite, report_dir, required_splits, warn_only,
                         write_clean, track, progress)


def _validate(manifest_uri, suite, report_dir, required_splits, warn_only, write_clean, track,
              progress) -> ValidationOutcome:
    manifest = read_manifest(manifest_uri)
    report, facts = validate_manifest(manifest, SUITE_NEEDS_MASK.get(suite, False),
                                      required_splits, progress=progress)
    report_uri = None
    if report_dir:
        report_uri = storage.join(report_dir, "validation.json")
        storage.write_bytes(report_uri, report.to_json().encode())
        facts_df = pd.DataFrame([f.__dict__ for f in facts])
        storage.write_bytes(storage.join(report_dir, "facts.csv"),
                            facts_df.to_csv(index=False).encode())
    clean_uri = None
    if write_clean:
        if storage.exists(write_clean):
            raise FileExistsError(f"{write_clean} exists; choose another --write-clean path")
        clean = manifest.df[~manifest.df["sample_id"].isin(report.quarantine)].copy()
        # Relative URIs would break when the clean manifest lives elsewhere.
        for col in ("image_uri", "mask_uri", "anatomy_uri", "depth_uri"):
            clean[col] = [manifest.resolve(u) for u in clean[col]]
        write_manifest(clean, write_clean)
        clean_uri = write_clean
    if track:
        _log(report)
    if not report.passed and not warn_only:
        raise ValidationFailed(report)
    return ValidationOutcome(report, report_uri, clean_uri)


def _log(report: ValidationReport) -> None:
    import mlflow

    tracking.log_dataset(report.manifest_uri, report.dataset_version, report.split_counts)
    mlflow.log_metrics({"n_samples": report.n_samples, "n_problems": len(report.problems),
                        "n_quarantined": len(report.quarantine)})
    mlflow.set_tag("dermml.validation", "passed" if report.passed else "failed")
    mlflow.log_text(report.to_json(), "validation/report.json")
