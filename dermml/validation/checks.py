"""Validation of a manifest: the facts of every sample (``pool``), the tables built from them
(``table``), then the suite's expectations (``expectations``) over them."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pandas as pd

from dermml.data.manifest import Manifest
from dermml.validation.pool import facts_frame
from dermml.validation.report import ValidationReport

if TYPE_CHECKING:
    from dermml.validation.suite import SuiteConfig


def validate_manifest(manifest: Manifest, suite: SuiteConfig | str = "segmentation",
                      processes: int | None = None, progress: bool = False,
                      reference: Manifest | None = None,
                      report_folder: str | None = None) -> tuple[ValidationReport, pd.DataFrame]:
    """Facts of every sample, then the suite's expectations (great-expectations) over them.

    Returns the report and the samples table (manifest columns + facts + rule columns). With
    ``report_folder`` (local), Data Docs and the drift plot are written there.
    """
    from dermml.validation.expectations import run_suite
    from dermml.validation.suite import load_suite
    from dermml.validation.table import samples_table

    suite = load_suite(suite) if isinstance(suite, str) else suite
    report = ValidationReport(manifest.uri, manifest.version, len(manifest.df), suite=suite.name)
    report.split_counts = {str(k): int(v) for k, v in
                           manifest.df["split"].fillna("-").value_counts().items()}
    needs = suite.fact_needs()
    start = time.perf_counter()
    facts = facts_frame(manifest, processes, progress, needs.attribute_masks, needs.companions)
    reference_facts = facts_frame(reference, processes, progress) if reference else None
    report.timings["facts"] = time.perf_counter() - start
    table = samples_table(manifest, facts, suite)
    reference_table = (samples_table(reference, reference_facts, suite, leakage=False)
                       if reference else None)
    report.timings["tables"] = time.perf_counter() - start - report.timings["facts"]
    start = time.perf_counter()
    run_suite(report, table, suite, reference_table, reference.uri if reference else None,
              report_folder)
    report.timings["expectations"] = time.perf_counter() - start
    return report, table
