"""Does synthetic data help here, by how much, with what uncertainty, and for whom?

``measure_synthetic_value`` trains the same model on real data only and on real + each
synthetic source (3D synthesis, GAN, both) at several synthetic fractions and seeds, evaluates
every model on the same real test split, and compares each arm with real-only: the metric,
its paired bootstrap difference from real-only (samples resampled jointly across arms and
seeds), overall and per skin-tone group where the evaluation recorded one. One table
(``synthetic_value/table.csv|md``) and one plot (``synthetic_value/plot.png``: the gate metric
against the synthetic fraction, a line per source with its interval, real-only as the
reference) go to the parent run; every training and evaluation is a child run.

A synthetic *fraction* f adds ``f × |real training split|`` synthetic samples (capped by what
the source has), drawn with the arm's seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermml import storage
from dermml.config import dermml_home
from dermml.data.manifest import MANIFEST_FILENAME, read_manifest, write_manifest
from dermml.evaluation.compare import compare_arms, per_sample_records
from dermml.orchestration import tracking

GROUP_COLUMNS = ("skin_group", "ita_group", "fitzpatrick_group")
"""Per-sample columns an evaluation may have recorded a skin-tone group in (first found)."""


@dataclass
class Arm:
    source: str
    """``real`` or the name of a synthetic source (``synth3d``, ``gan``, ``both``)."""
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        return "real" if self.source == "real" else f"{self.source}@{self.fraction:g}"


@dataclass
class SyntheticValue:
    table: pd.DataFrame
    """Per arm (source, fraction), metric and group: value, CI, delta from real-only, its CI."""
    runs: dict[str, list[str]] = field(default_factory=dict)
    """Arm name -> the training run ids (one per seed)."""


def plan_arms(sources: list[str], fractions: list[float], seeds: list[int]) -> list[Arm]:
    """Real-only and every source at every fraction, each for every seed."""
    if not seeds:
        raise ValueError("give at least one seed")
    bad = [f for f in fractions if f <= 0]
    if bad:
        raise ValueError(f"synthetic fractions must be positive (got {bad})")
    arms = [Arm("real", 0.0, s) for s in seeds]
    arms += [Arm(src, f, s) for src in sources for f in fractions for s in seeds]
    return arms


def combine_manifests(uris: dict[str, str], out: str, split: str = "train") -> str:
    """One manifest of ``split`` of several (absolute image/mask URIs, sample ids prefixed by
    the source name); written once under ``out``."""
    manifest_uri = storage.join(out, MANIFEST_FILENAME)
    if storage.exists(manifest_uri):
        return manifest_uri
    frames = []
    for name, uri in uris.items():
        manifest = read_manifest(uri)
        rows = manifest.split(split).copy()
        for column in ("image_uri", "mask_uri", "anatomy_uri", "depth_uri"):
            if column in rows:
                rows[column] = [manifest.resolve(u) if isinstance(u, str) and u else u
                                for u in rows[column]]
        rows["sample_id"] = [f"{name}:{s}" for s in rows["sample_id"]]
        rows["source"] = name
        frames.append(rows)
    df = pd.concat(frames, ignore_index=True)
    df = df.drop(columns=[c for c in df.columns if df[c].isna().all()
                          and c not in ("sample_id", "image_uri")])
    write_manifest(df, manifest_uri)
    return manifest_uri


def usable_sources(task: str, cfg, sources: dict[str, str]) -> dict[str, str]:
    """Drop (in place) the sources ``task`` cannot train on (e.g. 3D views without diagnosis
    labels for classification); returns name -> why for each one dropped."""
    from dermml.tasks import get_task
    from dermml.training.inputs import training_inputs

    skipped = {}
    for name in list(sources):
        probe = cfg.model_copy(update={"mix": cfg.mix.model_copy(update={
            "synthetic_manifest": sources[name]})})
        try:
            training_inputs(get_task(task), probe, prepare=True)
        except (ValueError, KeyError) as exc:
            skipped[name] = str(exc).splitlines()[0][:300]
            del sources[name]
    return skipped


def synthetic_share(n_real: int, n_synthetic: int, fraction: float) -> float:
    """``mix.synthetic_fraction`` that adds ``fraction × n_real`` synthetic samples."""
    if n_synthetic <= 0:
        raise ValueError("the synthetic source has no training samples")
    return float(min(1.0, fraction * n_real / n_synthetic))


def measure_synthetic_value(task: str, manifest_uri: str, sources: dict[str, str],
                            fractions: list[float], seeds: list[int], config: str | None = None,
                            overrides: list[str] | None = None, test_split: str = "test",
                            parent_run_id: str | None = None, n_resamples: int = 200,
                            alpha: float = 0.05, work_dir: str = "",
                            min_group_size: int = 10) -> SyntheticValue:
    """Train and evaluate every arm; return (and log to ``parent_run_id``) the table."""
    from dermml.evaluation.run import evaluate
    from dermml.tasks import get_task
    from dermml.training.run import resolve_config, train

    sources = dict(sources)
    if len(sources) >= 2 and "both" not in sources:
        root = work_dir or str(dermml_home() / "synthetic" / "combined")
        key = "-".join(sorted(sources))
        sources["both"] = combine_manifests(sources, storage.join(root, key))
    base = resolve_config(task, config, [*(overrides or []), f"data.manifest={manifest_uri}"])
    skipped = usable_sources(task, base, sources)
    n_real = len(read_manifest(manifest_uri).split(*base.data.train_split.split(",")))
    sizes = {name: len(read_manifest(uri).split(base.mix.synthetic_split))
             for name, uri in sources.items()}
    records: dict[str, dict[int, pd.DataFrame]] = {}
    runs: dict[str, list[str]] = {}
    for arm in plan_arms(list(sources), fractions, seeds):
        sets = [*(overrides or []), f"data.manifest={manifest_uri}",
                f"train.seed={arm.seed}", f"mix.seed={arm.seed}"]
        synthetic = ""
        if arm.source != "real":
            synthetic = sources[arm.source]
            sets.append(f"mix.synthetic_fraction="
                        f"{synthetic_share(n_real, sizes[arm.source], arm.fraction)}")
        cfg = resolve_config(task, config, sets, synthetic_manifest=synthetic)
        outcome = train(task, cfg, parent_run_id=parent_run_id, progress=False)
        tracking.RunLog(outcome.run_id).tags({"dermml.arm": arm.name,
                                              "dermml.arm.seed": str(arm.seed)})
        result = evaluate(outcome.model_uri, manifest_uri, [test_split], parent_run_id,
                          n_resamples=0)
        records.setdefault(arm.name, {})[arm.seed] = per_sample_records(result.run_id,
                                                                        test_split)
        runs.setdefault(arm.name, []).append(outcome.run_id)
    gate = get_task(task).gate_metric
    table = value_table(task, records, gate, n_resamples, alpha, min_group_size)
    if skipped:
        table = pd.concat([table, pd.DataFrame([{"arm": name, "source": name, "group": "all",
                                                 "note": f"skipped: {why}"}
                                                for name, why in skipped.items()])],
                          ignore_index=True)
    if parent_run_id:
        log_synthetic_value(table, gate, parent_run_id)
    return SyntheticValue(table, runs)


def stacked(records: dict[int, pd.DataFrame]) -> pd.DataFrame:
    """Per-sample records of several seeds as one set (``sample_id#seed``): a metric over it
    averages the seeds, and a paired bootstrap resamples every seed's copy of a sample."""
    return pd.concat([df.assign(sample_id=[f"{s}#{seed}" for s in df["sample_id"]])
                      for seed, df in sorted(records.items())], ignore_index=True)


def value_table(task: str, records: dict[str, dict[int, pd.DataFrame]], metric: str,
                n_resamples: int, alpha: float, min_group_size: int = 10) -> pd.DataFrame:
    """Every arm against real-only, overall and per skin-tone group (too-small groups are
    listed with their count and no value)."""
    arms = {"real": stacked(records["real"])}
    arms.update({name: stacked(r) for name, r in records.items() if name != "real"})
    rows = [_with_arm_columns(compare_arms(task, arms, metric, n_resamples, alpha).table,
                              "all")]
    group_column = next((c for c in GROUP_COLUMNS if c in arms["real"]), None)
    if group_column:
        for group, members in arms["real"].groupby(group_column):
            ids = set(members["sample_id"])
            n_images = len(ids) // max(1, len(records["real"]))
            if n_images < min_group_size:
                rows.append(pd.DataFrame([{"arm": name, "metric": metric, "group": str(group),
                                           "n": n_images, "note": "too few images"}
                                          for name in arms]))
                continue
            subset = {n: df[df["sample_id"].isin(ids)] for n, df in arms.items()}
            part = compare_arms(task, subset, metric, n_resamples, alpha).table
            rows.append(_with_arm_columns(part, str(group)).assign(n=n_images))
    table = pd.concat(rows, ignore_index=True)
    return table


def _with_arm_columns(table: pd.DataFrame, group: str) -> pd.DataFrame:
    table = table.copy()
    table["group"] = group
    table["source"] = [a.split("@")[0] for a in table["arm"]]
    table["fraction"] = [float(a.split("@")[1]) if "@" in a else 0.0 for a in table["arm"]]
    return table


def value_figure(table: pd.DataFrame, metric: str):
    """The gate metric against the synthetic fraction, one line per source (all images)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[(table["metric"] == metric) & (table["group"] == "all")]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    real = rows[rows["source"] == "real"]
    if not real.empty:
        r = real.iloc[0]
        ax.axhline(r["value"], color="black", lw=1, label="real only")
        ax.axhspan(r["ci_low"], r["ci_high"], color="black", alpha=0.08)
    for source, part in rows[rows["source"] != "real"].groupby("source"):
        part = part.sort_values("fraction")
        ax.plot(part["fraction"], part["value"], marker="o", label=f"real + {source}")
        ax.fill_between(part["fraction"], part["ci_low"], part["ci_high"], alpha=0.15)
    ax.set_xlabel("synthetic samples per real training sample")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} on the real test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def log_synthetic_value(table: pd.DataFrame, metric: str, run_id: str) -> None:
    run = tracking.RunLog(run_id)
    run.text(table.to_csv(index=False), "synthetic_value/table.csv")
    run.text(table.to_markdown(index=False, floatfmt=".4f"), "synthetic_value/table.md")
    overall = table[(table["group"] == "all") & (table["metric"] == metric)]
    run.metrics({f"sv_{a.replace('@', '_at_')}_{metric}": float(v)
                 for a, v in zip(overall["arm"], overall["value"], strict=True)
                 if np.isfinite(v)}, 0)
    with tracking.figure_guard("synthetic_value/plot.png"):
        import matplotlib.pyplot as plt

        fig = value_figure(table, metric)
        try:
            run.figure(fig, "synthetic_value/plot.png")
        finally:
            plt.close(fig)

