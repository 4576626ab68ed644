"""Run a suite's expectations with great-expectations and turn its results into the report.

An ephemeral GX context holds one pandas data asset per table (samples, classes, drift), one
ExpectationSuite and ValidationDefinition per table; Data Docs are built into the report folder.
Failing rows come back as ``_row`` (or key) indices and are mapped to sample ids, files and a
reason a person can act on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import pandas as pd

from dermml.validation.report import Problem, ValidationReport
from dermml.validation.suite import GX_SEVERITY, ExpectationSpec, SuiteConfig
from dermml.validation.table import classes_table

FAILING_SHOWN = 20
"""Failing rows listed per expectation in the JSON summary (all of them are in ``problems``)."""
INDEX_COLUMNS = {"samples": ["sample_id", "_row"], "classes": ["split", "label"],
                 "drift": ["feature"], "file": []}
DATA_DOCS_SITE = "dermml"


def run_suite(report: ValidationReport, samples: pd.DataFrame, suite: SuiteConfig,
              reference: pd.DataFrame | None = None, reference_uri: str | None = None,
              report_folder: str | None = None) -> None:
    """Fill ``report`` from the suite's expectations over ``samples`` (and drift vs. reference).

    With ``report_folder`` (a local folder), Data Docs go to ``<folder>/data_docs`` and the drift
    plot to ``<folder>/drift.png``.
    """
    specs = suite.specs()
    tables = {"samples": samples}
    if any(s.table == "file" for s in specs):  # the manifest file's own columns, one row
        columns = samples.attrs.get("file_columns") or tuple(samples.columns)
        tables["file"] = pd.DataFrame({c: [None] for c in columns})
    if any(s.table == "classes" for s in specs):
        tables["classes"] = classes_table(samples)
    if reference is not None and suite.drift.enabled:
        from dermml.validation.drift import drift_summary, drift_table, plot_drift

        tables["drift"] = drift_table(reference, samples, suite.drift)
        plot = os.path.join(report_folder, "drift.png") if report_folder else None
        if plot:
            plot_drift(reference, samples, tables["drift"], suite.drift, plot)
            report.artifacts["drift_plot"] = "drift.png"
        report.drift = drift_summary(tables["drift"], suite.drift, reference_uri or "")
    else:
        specs = [s for s in specs if s.table != "drift"]
    docs = os.path.join(report_folder, "data_docs") if report_folder else None
    results = _run_gx(suite.name, tables, specs, docs)
    if docs:
        report.artifacts["data_docs"] = "data_docs/index.html"
    by_name = {s.name: s for s in specs}
    for result in results:
        spec = by_name[result["name"]]
        findings = ([] if result["success"]
                    else _findings(spec, result, tables[spec.table], report.manifest_uri))
        if findings:
            (report.problems if spec.severity == "error" else report.warnings).extend(findings)
        report.expectations.append(_summary(spec, result, findings))


def _summary(spec: ExpectationSpec, result: dict, findings: list[Problem]) -> dict:
    return {"name": spec.name, "rule": spec.rule, "description": spec.description,
            "expectation_type": spec.type, "table": spec.table, "column": spec.kwargs.get("column"),
            "kwargs": {k: v for k, v in spec.kwargs.items() if k != "column"},
            "success": result["success"], "severity": spec.severity,
            "observed": result["observed"], "unexpected_count": result["unexpected_count"],
            "failing": [{"sample_id": p.sample_id, "file": p.file, "reason": p.reason}
                        for p in findings[:FAILING_SHOWN]],
            "failing_total": len(findings)}


def _findings(spec: ExpectationSpec, result: dict, table: pd.DataFrame,
              manifest_uri: str) -> list[Problem]:
    """Problems behind a result: one per failing row, or the table-level reasons."""
    if result["exception"]:
        return [Problem("", manifest_uri, spec.name,
                        f"expectation could not run: {result['exception']}")]
    if spec.explain_result is not None:
        return [Problem("", manifest_uri, spec.name, reason)
                for reason in spec.explain_result(result["raw"]) or ["failed"]]
    out = []
    key_columns = INDEX_COLUMNS[spec.table]
    for index in result["unexpected_index_list"]:
        if spec.table == "samples":
            row = table.iloc[int(index["_row"])].to_dict()
        else:
            match = (table[key_columns] == pd.Series({c: index[c] for c in key_columns})).all(1)
            row = table[match].iloc[0].to_dict()
        reason = spec.explain(_plain(row)) if spec.explain else "failed"
        if spec.file_column is None:
            out.append(Problem("", manifest_uri, spec.name, reason))
            continue
        file = row.get(spec.file_column)
        file = row.get("image_uri") if _missing(file) else file
        out.append(Problem(str(row.get("sample_id", "")), str(file or ""), spec.name, reason))
    return out


def _missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and value != value)


def _plain(row: dict) -> dict:
    return {k: (None if _missing(v) else v) for k, v in row.items()}


# --------------------------------------------------------------------------- great-expectations


def _run_gx(suite_name: str, tables: dict[str, pd.DataFrame], specs: list[ExpectationSpec],
            docs_dir: str | None) -> list[dict]:
    """Validate each table against its expectations; results in plain dicts, suite order."""
    # Before the import: GE logs hundreds of INFO lines while importing, and KFP's executor
    # sets the root logger to INFO, which would print them all in every pipeline run.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    page_view = {"module_name": "dermml.validation.gx_views", "class_name": "CachedPageView"}
    sites = {DATA_DOCS_SITE: {
        "class_name": "SiteBuilder",
        "site_index_builder": {"class_name": "DefaultSiteIndexBuilder",
                               "view": {**page_view, "class_name": "CachedIndexPageView"}},
        "site_section_builders": {section: {"view": page_view}
                                  for section in ("expectations", "validations", "profiling")},
        "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                          "base_directory": os.path.abspath(docs_dir)}}} if docs_dir else {}
    context = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites=sites, analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False)))
    source = context.data_sources.add_pandas("dermml")
    results: dict[str, dict] = {}
    for table_name, frame in tables.items():
        table_specs = [s for s in specs if s.table == table_name]
        if not table_specs:
            continue
        # Only the columns the expectations read: GE copies what it is given.
        needed = {s.kwargs.get("column") for s in table_specs} | set(INDEX_COLUMNS[table_name])
        frame = frame[[c for c in frame.columns if c in needed]]
        batch = source.add_dataframe_asset(table_name).add_batch_definition_whole_dataframe(
            "all")
        gx_suite = context.suites.add(gx.ExpectationSuite(
            name=f"{suite_name}.{table_name}",
            expectations=[_expectation(gx, spec) for spec in table_specs]))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite_name}.{table_name}", data=batch,
                                    suite=gx_suite))
        outcome = definition.run(batch_parameters={"dataframe": frame}, result_format={
            "result_format": "COMPLETE",
            "unexpected_index_column_names": INDEX_COLUMNS[table_name]})
        for item in outcome.results:
            results[item.expectation_config.meta["dermml_name"]] = _plain_result(item)
    if docs_dir:
        context.build_data_docs(site_names=[DATA_DOCS_SITE])
    return [{"name": s.name, **results[s.name]} for s in specs if s.name in results]


def _expectation(gx, spec: ExpectationSpec):
    cls = getattr(gx.expectations, spec.type)
    return cls(**spec.kwargs, severity=GX_SEVERITY[spec.severity], notes=spec.description,
               meta={"dermml_name": spec.name, "dermml_rule": spec.rule})


def _plain_result(item) -> dict:
    raw = dict(item.result or {})
    info = item.exception_info or {}
    # Either one {"raised_exception": ...} record or one per metric.
    records = [info] if "raised_exception" in info else [
        v for v in info.values() if isinstance(v, dict)]
    exception = next((r.get("exception_message") or "unknown error" for r in records
                      if r.get("raised_exception")), None)
    observed = raw.get("observed_value")
    if observed is None and "unexpected_count" in raw:
        observed = (f"{raw['unexpected_count']} of {raw.get('element_count')} rows unexpected"
                    + (f" ({raw['unexpected_percent']:.2f}%)"
                       if raw.get("unexpected_percent") is not None else ""))
    return {"success": bool(item.success) and exception is None, "raw": raw,
            "observed": _jsonable(observed), "unexpected_count": raw.get("unexpected_count"),
            "unexpected_index_list": raw.get("unexpected_index_list") or [],
            "exception": exception}


def _jsonable(value: Any) -> Any:
    if isinstance(value, list | tuple | set):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value
