"""What a validation found: the findings (``Problem``) and the report that gathers them.

Its own module so that the fact checks (``checks``) and the expectations (``expectations``) both
write into it without importing each other.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class Problem:
    """One finding: the sample (empty for dataset-level findings), its file, the rule, why."""

    sample_id: str
    file: str
    check: str
    reason: str


@dataclass
class ValidationReport:
    """Everything a validation found; ``problems`` fail it, ``warnings`` do not."""

    manifest_uri: str
    dataset_version: str
    n_samples: int
    problems: list[Problem] = field(default_factory=list)
    split_counts: dict[str, int] = field(default_factory=dict)
    suite: str = ""
    warnings: list[Problem] = field(default_factory=list)
    expectations: list[dict] = field(default_factory=list)
    """Per expectation: name, rule, type, table, column, success, severity, observed,
    unexpected_count and the first failing samples (``failing``)."""
    drift: dict | None = None
    artifacts: dict[str, str] = field(default_factory=dict)
    """Report files by kind (json, facts, quarantine, data_docs, drift_plot)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per stage: facts, tables, expectations (+ Data Docs), report."""

    @property
    def passed(self) -> bool:
        return not self.problems

    @property
    def quarantine(self) -> list[str]:
        return sorted({p.sample_id for p in self.problems if p.sample_id})

    def counts(self) -> dict[str, int]:
        failed = [e for e in self.expectations if not e["success"]]
        return {"n_samples": self.n_samples, "n_problems": len(self.problems),
                "n_warnings": len(self.warnings), "n_quarantined": len(self.quarantine),
                "n_expectations": len(self.expectations),
                "n_failed_expectations": sum(e["severity"] == "error" for e in failed),
                "n_warning_expectations": sum(e["severity"] == "warning" for e in failed)}

    def to_json(self) -> str:
        data = asdict(self)
        data["passed"] = self.passed
        data["counts"] = self.counts()
        data["quarantine"] = self.quarantine
        return json.dumps(data, indent=2, default=_json_default)

    def summary(self, limit: int = 20) -> str:
        verdict = "PASSED" if self.passed else f"FAILED ({len(self.problems)} problems)"
        head = f"{self.manifest_uri}: {self.n_samples} samples, {verdict}"
        if self.warnings:
            head += f", {len(self.warnings)} warnings"
        lines = [head] + [f"  {p.sample_id or '-'} [{p.check}] {p.file}: {p.reason}"
                          for p in self.problems[:limit]]
        if len(self.problems) > limit:
            lines.append(f"  ... and {len(self.problems) - limit} more (see the JSON report)")
        lines += [f"  warning [{p.check}] {p.sample_id or p.file}: {p.reason}"
                  for p in self.warnings[: max(0, limit - len(self.problems))]]
        if self.drift is not None:
            verdict = ("no drift" if self.drift["passed"]
                       else "DRIFTED: " + ", ".join(self.drift["drifted"]))
            lines.append(f"  drift against {self.drift['reference_uri']}: {verdict}")
        return "\n".join(lines)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)
