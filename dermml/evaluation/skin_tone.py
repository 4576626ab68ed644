"""Evaluation by skin tone: every metric of a split per ITA group (and per the manifest's own
skin-type column when it has one), with bootstrap CIs and the count per group.

Groups smaller than ``min_group_size`` are reported as "too few": their count is shown, their
metrics are not computed (a Dice of 3 images is noise, not evidence). Names (docs/evaluation.md):

- per-sample records gain ``ita`` (degrees) and ``ita_group`` (and the skin-type column);
- MLflow metrics ``{split}_{metric}.{stratifier}_{group}`` (``test_dice.ita_light``,
  ``test_dice.fitzpatrick_3``), ``{split}_{metric}_ci_low.{stratifier}_{group}`` /
  ``_ci_high``, and ``{split}_n.{stratifier}_{group}`` (every group, too few ones included);
- artifacts ``evaluation/{split}_by_skin_tone.csv`` (long: one row per group and metric) and
  ``.md`` (one row per group), and the figure
  ``evaluation/{split}_{gate_metric}_by_skin_tone.png``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermml.data.images import ImageReadError, load_mask
from dermml.data.manifest import Manifest, ManifestError, is_missing
from dermml.metrics.bootstrap import bootstrap_metrics
from dermml.metrics.skin_tone import ITA_GROUPS, UNKNOWN, image_ita, ita_group

log = logging.getLogger(__name__)

ITA = "ita"
"""The stratifier of the measured ITA groups (per-sample column ``ita_group``)."""
ITA_COLUMN = "ita_group"
SKIN_TYPE_COLUMNS = ("fitzpatrick", "fitzpatrick_skin_type", "fitzpatrick_scale", "skin_type",
                     "skin_tone")
"""Manifest columns read as a known skin type (first one present with values); the demo data
writes ``fitzpatrick`` (1..6)."""
MIN_GROUP_SIZE = 10
TOO_FEW = "too few"


@dataclass
class GroupScores:
    """The metrics of one group of one stratification of a split."""

    stratifier: str
    """``ita`` or the manifest's skin-type column."""
    group: str
    n: int
    reported: bool
    """False: fewer than the minimum group size (count shown, no metrics)."""
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``{stratifier}_{group}``: the suffix of the group's metric names."""
        return safe_name(f"{self.stratifier}_{self.group}")


def safe_name(text: str) -> str:
    """``text`` with every character MLflow and KFP metric names refuse replaced by ``_``."""
    return re.sub(r"[^\w.-]+", "_", str(text))


def skin_type_column(manifest: Manifest, column: str | None = None) -> str | None:
    """The manifest's known skin-type column: ``column`` when given (it must exist), else the
    first of ``SKIN_TYPE_COLUMNS`` that has values; None when there is none."""
    df = manifest.df
    if column:
        if column not in df.columns:
            raise ManifestError(f"{manifest.uri}: no skin-type column {column!r} (columns: "
                                f"{', '.join(map(str, df.columns))})")
        return column
    for name in SKIN_TYPE_COLUMNS:
        if name in df.columns and not is_missing(df[name]).all():
            return name
    return None


def group_label(value) -> str:
    """A skin-type value as a group name: whole numbers without ``.0``, missing = unknown."""
    if value is None or (isinstance(value, float) and np.isnan(value)) or \
            (isinstance(value, str) and not value.strip()):
        return UNKNOWN
    if isinstance(value, (int, np.integer)) or (isinstance(value, (float, np.floating))
                                                and float(value).is_integer()):
        return str(int(value))
    return str(value).strip()


def sample_skin_tones(images: list[np.ndarray], rows: pd.DataFrame,
                      manifest: Manifest) -> pd.DataFrame:
    """``ita`` and ``ita_group`` of each image of ``rows``: outside its lesion mask where the
    row has one, of the whole image (hair and vignette filtered) where it has none."""
    masks = rows["mask_uri"] if "mask_uri" in rows else pd.Series([None] * len(rows))
    missing = is_missing(masks).to_numpy()
    itas = []
    for image, uri, no_mask in zip(images, masks, missing, strict=True):
        mask = None
        if not no_mask:
            try:
                mask = load_mask(manifest.resolve(uri))
            except ImageReadError as exc:
                log.warning("skin tone of %s measured without its mask (%s)", uri, exc)
        itas.append(image_ita(image, mask))
    return pd.DataFrame({"ita": np.round(itas, 3), ITA_COLUMN: [ita_group(v) for v in itas]})


def _groups(stratifier: str, labels: pd.Series) -> list[str]:
    present = set(labels)
    if stratifier == ITA:  # all six, in order, absent ones too (n = 0 is worth knowing)
        return list(ITA_GROUPS) + ([UNKNOWN] if UNKNOWN in present else [])

    def order(label: str):
        try:
            return (0, float(label), label)
        except ValueError:
            return (1 if label != UNKNOWN else 2, 0.0, label)
    return sorted(present, key=order)


def stratify(per_sample: pd.DataFrame, aggregate: Callable[[pd.DataFrame], dict[str, float]],
             stratifiers: dict[str, str], min_group_size: int = MIN_GROUP_SIZE,
             n_resamples: int = 1000, alpha: float = 0.05,
             seed: int = 0) -> list[GroupScores]:
    """Every group of each stratifier (name -> per-sample column of group names): the
    task's ``aggregate`` of the group's samples and its bootstrap CIs (resampling within the
    group), or "too few" below ``min_group_size``."""
    scores = []
    for stratifier, column in stratifiers.items():
        labels = per_sample[column].astype(str)
        for group in _groups(stratifier, labels):
            idx = np.flatnonzero((labels == group).to_numpy())
            if len(idx) < max(1, min_group_size):
                scores.append(GroupScores(stratifier, group, len(idx), False))
                continue
            rows = per_sample.iloc[idx]
            metrics = {k: float(v) for k, v in aggregate(rows).items()}
            intervals = bootstrap_metrics(lambda i, r=rows: aggregate(r.iloc[i]), len(idx),
                                          n_resamples, alpha, seed) if n_resamples else {}
            scores.append(GroupScores(stratifier, group, len(idx), True, metrics, intervals))
    return scores


def group_metrics(split: str, scores: list[GroupScores], key) -> dict[str, float]:
    """MLflow metrics of the groups of ``split`` (``key(split, name)`` names a split metric)."""
    values: dict[str, float] = {}
    for g in scores:
        values[f"{key(split, 'n')}.{g.key}"] = float(g.n)
        for metric, value in g.metrics.items():
            values[f"{key(split, metric)}.{g.key}"] = value
            low, high = g.intervals.get(metric, (np.nan, np.nan))
            if np.isfinite(low) and np.isfinite(high):
                values[f"{key(split, f'{metric}_ci_low')}.{g.key}"] = low
                values[f"{key(split, f'{metric}_ci_high')}.{g.key}"] = high
    return {k: v for k, v in values.items() if np.isfinite(v)}


def group_table(split: str, scores: list[GroupScores], metrics: list[str]) -> pd.DataFrame:
    """Long table: one row per group and metric (``status``: reported / too few, whose
    value and CI are empty)."""
    rows = []
    for g in scores:
        for metric in metrics:
            low, high = g.intervals.get(metric, (np.nan, np.nan))
            rows.append({"split": split, "stratifier": g.stratifier, "group": g.group,
                         "n": g.n, "status": "reported" if g.reported else TOO_FEW,
                         "metric": metric, "value": g.metrics.get(metric, np.nan),
                         "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["split", "stratifier", "group", "n", "status", "metric",
                                       "value", "ci_low", "ci_high"])


def group_markdown(scores: list[GroupScores], metrics: list[str], min_group_size: int) -> str:
    """One row per group, a column per metric: ``value [low, high]`` or ``too few``."""
    def cell(g: GroupScores, metric: str) -> str:
        if not g.reported:
            return TOO_FEW
        value = g.metrics.get(metric, np.nan)
        if not np.isfinite(value):
            return "-"
        low, high = g.intervals.get(metric, (np.nan, np.nan))
        ci = f" [{low:.3f}, {high:.3f}]" if np.isfinite(low) and np.isfinite(high) else ""
        return f"{value:.3f}{ci}"

    table = pd.DataFrame([{"stratifier": g.stratifier, "group": g.group, "n": g.n,
                           **{m: cell(g, m) for m in metrics}} for g in scores])
    note = (f"Groups with fewer than {min_group_size} images are reported as \"{TOO_FEW}\". "
            "Values: metric [bootstrap CI]; ITA groups after Chardon et al. / Del Bino et al.")
    return f"{table.to_markdown(index=False)}\n\n{note}\n"


def group_figure(split: str, scores: list[GroupScores], metric: str, min_group_size: int):
    """``metric`` by group with its CI, one panel per stratifier; too few groups marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stratifiers = list(dict.fromkeys(g.stratifier for g in scores))
    fig, axes = plt.subplots(1, len(stratifiers), squeeze=False,
                             figsize=(4.5 * len(stratifiers), 3.6))
    for ax, stratifier in zip(axes[0], stratifiers, strict=True):
        groups = [g for g in scores if g.stratifier == stratifier]
        x = np.arange(len(groups))
        for i, g in enumerate(groups):
            value = g.metrics.get(metric, np.nan)
            if g.reported and np.isfinite(value):
                low, high = g.intervals.get(metric, (value, value))
                low, high = (value, value) if not np.isfinite(low) else (low, high)
                ax.errorbar(i, value, yerr=[[value - low], [high - value]], fmt="o",
                            color="tab:blue", capsize=4)
            else:
                ax.plot(i, 0, "x", color="grey")
        ax.set_xticks(x, [f"{g.group}\nn={g.n}" + ("" if g.reported else f"\n{TOO_FEW}")
                          for g in groups], fontsize=7)
        ax.set_ylim(bottom=0)
        by = "ITA group" if stratifier == ITA else stratifier
        ax.set(title=f"{split}: {metric} by {by}", ylabel=metric)
        ax.grid(axis="y", alpha=0.3)
    fig.text(0.01, 0.01, f"x: fewer than {min_group_size} images", fontsize=7, color="grey")
    fig.tight_layout()
    return fig
