"""The validation stage: a manifest in; a report, a quarantine list and a clean manifest out.

Report folder (``--report``, local or s3://; always logged to MLflow under ``validation/``):
``validation.json`` (summary), ``facts.csv`` (per-sample facts and rule columns),
``quarantine.csv`` (failing samples and why), ``data_docs/`` (great-expectations Data Docs) and,
with a drift reference, ``drift.png``. The dataset itself is only read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass

import pandas as pd

from dermml import storage
from dermml.data.manifest import Manifest, read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.validation.checks import validate_manifest
from dermml.validation.report import Problem, ValidationReport
from dermml.validation.suite import SuiteConfig, load_suite

REPORT_FILE = "validation.json"
FACTS_FILE = "facts.csv"
QUARANTINE_FILE = "quarantine.csv"
_URI_COLUMNS = ("image_uri", "mask_uri", "anatomy_uri", "depth_uri")
_NESTED_COLUMNS = ("attribute_mask_uris", "boxes", "box_labels")


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
             track: bool = True, progress: bool = True, overrides: list[str] | None = None,
             drift_against: str | None = None,
             processes: int | None = None) -> ValidationOutcome:
    """Check every sample against a suite; raise ``ValidationFailed`` unless ``warn_only``.

    ``suite`` is a shipped suite name or a YAML/JSON path; ``overrides`` are ``rule.param=value``
    thresholds; ``drift_against`` compares this manifest with a reference manifest.
    """
    config = load_suite(suite, overrides, tuple(required_splits))
    if drift_against and not config.drift.enabled:
        config.drift.enabled = True
    if write_clean and storage.exists(write_clean):
        raise FileExistsError(f"{write_clean} exists; choose another --write-clean path")
    manifest = read_manifest(manifest_uri)  # an unreadable manifest fails before any MLflow run
    run = (tracking.stage_run(config.experiment_task, "validate", parent_run_id) if track
           else nullcontext())
    with run:  # failing inside the run marks it (and the pipeline's parent run) FAILED
        return _validate(manifest, config, report_dir, warn_only, write_clean, track,
                         progress, drift_against, processes)


def _validate(manifest: Manifest, config: SuiteConfig, report_dir: str | None, warn_only: bool,
              write_clean: str | None, track: bool, progress: bool, drift_against: str | None,
              processes: int | None) -> ValidationOutcome:
    reference = read_manifest(drift_against) if drift_against else None
    with tempfile.TemporaryDirectory(prefix="dermml-validation-") as scratch:
        folder = _local_report_folder(report_dir, scratch) if (report_dir or track) else None
        report, table = validate_manifest(manifest, config, processes, progress, reference,
                                          folder)
        if folder:
            start = time.perf_counter()
            _write_report_files(report, table, folder)
            report.timings["report"] = time.perf_counter() - start
            if report_dir and storage.is_remote(report_dir):
                storage.upload_dir(folder, report_dir)
        clean_uri = _write_clean(manifest, report, write_clean) if write_clean else None
        if track:
            _log(report, folder)
    if not report.passed and not warn_only:
        raise ValidationFailed(report)
    report_uri = storage.join(report_dir, REPORT_FILE) if report_dir else None
    return ValidationOutcome(report, report_uri, clean_uri)


def _local_report_folder(report_dir: str | None, scratch: str) -> str:
    """The local folder report files are written to (a scratch one for s3:// or no report)."""
    if not report_dir or storage.is_remote(report_dir):
        return scratch
    folder = report_dir.removeprefix("file://")
    os.makedirs(folder, exist_ok=True)
    # Ours, from a previous run into the same folder: a drift plot must not outlive its run.
    shutil.rmtree(os.path.join(folder, "data_docs"), ignore_errors=True)
    for name in ("drift.png", REPORT_FILE, FACTS_FILE, QUARANTINE_FILE):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, name))
    return folder


def _write_report_files(report: ValidationReport, table: pd.DataFrame, folder: str) -> None:
    report.artifacts.update(json=REPORT_FILE, facts=FACTS_FILE, quarantine=QUARANTINE_FILE)
    # Nested manifest columns (attribute masks, boxes) are summarised by rule columns instead.
    facts = table.drop(columns=["_row", *(c for c in _NESTED_COLUMNS if c in table.columns)])
    storage.write_bytes(os.path.join(folder, FACTS_FILE), facts.to_csv(index=False).encode())
    storage.write_bytes(os.path.join(folder, QUARANTINE_FILE),
                        quarantine_frame(report.problems, table).to_csv(index=False).encode())
    storage.write_bytes(os.path.join(folder, REPORT_FILE), report.to_json().encode())


def quarantine_frame(problems: list[Problem], table: pd.DataFrame) -> pd.DataFrame:
    """One row per quarantined sample: its files, the failed checks and the reasons."""
    rows: dict[str, dict] = {}
    for p in problems:
        if not p.sample_id:
            continue
        row = rows.setdefault(p.sample_id, {"sample_id": p.sample_id, "checks": [],
                                            "reasons": [], "files": []})
        row["checks"].append(p.check)
        row["reasons"].append(f"{p.check}: {p.reason}")
        row["files"].append(p.file)
    uris = table.drop_duplicates("sample_id").set_index("sample_id")[["image_uri", "mask_uri"]]
    out = pd.DataFrame([{"sample_id": r["sample_id"],
                         "checks": ";".join(dict.fromkeys(r["checks"])),
                         "files": ";".join(dict.fromkeys(r["files"])),
                         "reasons": " | ".join(r["reasons"])} for r in rows.values()],
                       columns=["sample_id", "checks", "files", "reasons"])
    return out.join(uris, on="sample_id")


def _write_clean(manifest, report: ValidationReport, uri: str) -> str:
    clean = manifest.df[~manifest.df["sample_id"].isin(report.quarantine)].copy()
    # Relative URIs would break when the clean manifest lives elsewhere.
    for col in _URI_COLUMNS:
        clean[col] = [manifest.resolve(u) for u in clean[col]]
    clean["attribute_mask_uris"] = [
        {k: manifest.resolve(v) for k, v in u.items()} if isinstance(u, dict) else u
        for u in clean["attribute_mask_uris"]]
    write_manifest(clean, uri)
    return uri


def _log(report: ValidationReport, folder: str | None) -> None:
    tracking.log_dataset(report.manifest_uri, report.dataset_version, report.split_counts)
    tracking.log_metrics({**report.counts(),
                          **{f"drift_{f['feature']}": f["value"]
                             for f in (report.drift or {}).get("features", [])}})
    tracking.set_tags({"dermml.validation": "passed" if report.passed else "failed",
                       "dermml.validation_suite": report.suite})
    tracking.log_text(report.to_json(), "validation/report.json")
    if not folder:
        return
    tracking.log_files([os.path.join(folder, name)
                        for name in (FACTS_FILE, QUARANTINE_FILE, "drift.png")], "validation")
    tracking.log_folder(os.path.join(folder, "data_docs"), "validation/data_docs")
