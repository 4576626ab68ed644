"""The synth3d stage: bodies x views in parallel (one Ray task per body, a GPU each when the
cluster has them), resumable, then the dataset's data.csv and manifest, all logged to MLflow.

``synthesize(cfg, out)`` is what ``dermml synth3d`` and the KFP component call. Rerunning it on
the same ``out`` with the same settings skips every body and view already written.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import yaml
from tqdm import tqdm

from dermml import storage
from dermml.config import ConfigError, load_config
from dermml.synth3d.bodies import find_bodies
from dermml.synth3d.config import Synth3DConfig
from dermml.synth3d.generate import BodyJob, BodyResult, run_body
from dermml.synth3d.lesions import LesionSource, lesion_sources
from dermml.synth3d.outputs import read_records, write_dataset
from dermml.synth3d.procedural import procedural_skin_tone

TASK = "synth3d"
"""MLflow experiment ``dermml/synth3d``."""
SETTINGS_FILE = "synth3d.yaml"
RUN_INDEPENDENT = ("device", "views.per_body")
"""Settings a resumed run may change: the device does not change what is written, and a view
depends on its own index only, so more views per body extend a run."""


@dataclass
class SynthesisOutcome:
    manifest_uri: str
    version: str
    n_views: int
    run_id: str | None = None
    counts: dict[str, float] = field(default_factory=dict)


def resolve_config(path: str | None = None, overrides: list[str] | None = None
                   ) -> Synth3DConfig:
    """Defaults, then a YAML file, then ``--set key=value`` items."""
    return load_config(Synth3DConfig, path, overrides)


def default_out(cfg: Synth3DConfig, root: str = "") -> str:
    """Where a synthesis without an explicit output goes: ``root`` (default
    ``$DERMML_HOME/synthetic``) / ``synth3d-<digest of the settings>``, so the same settings
    resume the same folder and other settings never overwrite it."""
    import hashlib
    import json

    from dermml.config import dermml_home

    digest = hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
                            .encode()).hexdigest()[:12]
    return storage.join(root or str(dermml_home() / "synthetic"), f"synth3d-{digest}")


def procedural_seed(cfg: Synth3DConfig, index: int) -> int:
    return cfg.seed * 100_003 + index


def plan_jobs(cfg: Synth3DConfig) -> list[BodyJob]:
    """One job per body with its split: bodies split 70/15/15 (``split_fractions``), each body
    whole in one split, stratified by skin type where it is known before rendering."""
    from dermml.data.splits import assign_splits

    count = cfg.bodies.procedural_count()
    if count is not None:
        ids = [f"p{i:04d}" for i in range(count)]
        sources = [None] * count
        tones = [procedural_skin_tone(procedural_seed(cfg, i), tuple(cfg.bodies.skin_types))[0]
                 for i in range(count)]
    else:
        found = find_bodies(cfg.bodies.source, cfg.bodies.nonskin_dir or None,
                            cfg.bodies.anatomy_dir or None)
        ids, sources, tones = [s.body_id for s in found], found, [None] * len(found)
    frame = pd.DataFrame({"sample_id": ids, "skin_type": tones})
    splits = assign_splits(frame, cfg.split_fractions, cfg.seed, stratify="skin_type")
    views = tuple(range(cfg.views.per_body))
    return [BodyJob(i, body_id, source, split, views)
            for i, (body_id, source, split) in enumerate(zip(ids, sources, splits, strict=True))]


def _settings(cfg: Synth3DConfig) -> dict:
    data = cfg.model_dump(mode="json")  # tuples as lists, as YAML reads them back
    for key in RUN_INDEPENDENT:
        *path, last = key.split(".")
        node = data
        for part in path:
            node = node[part]
        node.pop(last, None)
    return data


def check_settings(out: str, cfg: Synth3DConfig) -> None:
    """Record the settings in ``out``; refuse to resume an ``out`` made with other ones."""
    uri = storage.join(out, SETTINGS_FILE)
    wanted = _settings(cfg)
    if storage.exists(uri):
        found = yaml.safe_load(storage.read_bytes(uri)) or {}
        from dermml.config import flatten

        diff = sorted(k for k in set(flatten(found)) | set(flatten(wanted))
                      if flatten(found).get(k) != flatten(wanted).get(k))
        if diff:
            raise ConfigError(f"{out} holds a synthesis made with other settings ({', '.join(diff)}"
                             f" differ); resume with the same settings or choose another --out")
        return
    storage.write_bytes(uri, yaml.safe_dump(wanted, sort_keys=False).encode())


def _one_body(cfg_data: dict, job: BodyJob, out: str, lesions: list[LesionSource],
              existing: set[str]) -> BodyResult:
    """A Ray task (or an in-process call): one body, all its views."""
    cfg = Synth3DConfig.model_validate(cfg_data)
    return run_body(cfg, job, out, lesions, existing)


def _existing_views(out: str) -> set[str]:
    uris = storage.list_files(storage.join(out, "params"), (".json",))
    return {u.rsplit("/", 1)[-1][: -len(".json")] for u in uris}


def _run_jobs(cfg: Synth3DConfig, jobs: list[BodyJob], out: str, lesions: list[LesionSource],
              use_ray: bool, ray_address: str, progress: bool) -> list[BodyResult]:
    existing = _existing_views(out)
    total = sum(len(j.views) for j in jobs)
    bar = tqdm(total=total, desc="synth3d views", unit="view", disable=not progress,
               file=sys.stderr)
    results = []

    def report(result: BodyResult) -> None:
        results.append(result)
        done = len(result.records)
        seconds = sum(result.seconds.values())
        tqdm.write(f"{result.body_id}: {done} views written, {result.views_skipped} already "
                   f"there, {result.views_failed} given up ({seconds:.1f} s)", file=sys.stderr)

    if use_ray:
        from dermml.orchestration.ray_tasks import map_unordered

        data = cfg.model_dump()
        items = [(data, job, out, lesions, existing) for job in jobs]
        for result in map_unordered(_one_body, items, ray_address):
            bar.update(len(result.records) + result.views_skipped + result.views_failed)
            report(result)
    else:
        for job in jobs:
            result = run_body(cfg, job, out, lesions, existing, progress=bar.update)
            report(result)
    bar.close()
    return results


def summarise(results: list[BodyResult]) -> dict[str, float]:
    """Counts for MLflow: views written / skipped / given up, rejections by reason."""
    placements, views = Counter(), Counter()
    for r in results:
        placements.update(r.placement_rejections)
        views.update(r.view_rejections)
    counts: dict[str, float] = {
        "bodies": len(results), "views_written": sum(len(r.records) for r in results),
        "views_skipped": sum(r.views_skipped for r in results),
        "views_given_up": sum(r.views_failed for r in results),
        "lesions_placed": sum(len(r.body.get("lesions", {})) for r in results)}
    counts.update({f"rejected_placements.{k}": v for k, v in sorted(placements.items())})
    counts.update({f"rejected_views.{k}": v for k, v in sorted(views.items())})
    tones = Counter(r.body.get("skin_type") or "unknown" for r in results)
    counts.update({f"bodies_skin_type.{k}": v for k, v in sorted(tones.items())})
    for stage in ("body", "paste", "blend", "views"):
        seconds = sum(r.seconds.get(stage, 0.0) for r in results)
        if seconds:
            counts[f"seconds.{stage}"] = round(seconds, 2)
    return counts


def synthesize(cfg: Synth3DConfig, out: str, *, use_ray: bool = True, ray_address: str = "",
               parent_run_id: str | None = None, track: bool = True,
               progress: bool = True) -> SynthesisOutcome:
    """Render ``cfg`` into ``out`` (local folder or ``s3://`` prefix) and write its manifest."""
    lesions = lesion_sources(cfg.lesions)  # bad lesion input fails before any work
    if not storage.is_remote(out):
        out = os.path.abspath(out)
    jobs = plan_jobs(cfg)
    check_settings(out, cfg)
    if not track:
        return _synthesize(cfg, out, jobs, lesions, use_ray, ray_address, progress)[0]
    from dermml.orchestration import tracking

    with tracking.stage_run(TASK, "synthesize", parent_run_id) as run:
        tracking.log_config(cfg)
        tracking.log_params({"out": out, "n_bodies": len(jobs), "ray": use_ray})
        outcome, results = _synthesize(cfg, out, jobs, lesions, use_ray, ray_address, progress)
        outcome.run_id = run.info.run_id
        log_outcome(outcome, results, out)
    return outcome


def _synthesize(cfg, out, jobs, lesions, use_ray, ray_address, progress):
    started = time.perf_counter()
    results = _run_jobs(cfg, jobs, out, lesions, use_ray, ray_address, progress)
    manifest_uri, version, n = write_dataset(out)
    counts = summarise(results)
    counts["seconds.total"] = round(time.perf_counter() - started, 2)
    return SynthesisOutcome(manifest_uri, version, n, counts=counts), results


# --------------------------------------------------------------------------- MLflow


def log_outcome(outcome: SynthesisOutcome, results: list[BodyResult], out: str) -> None:
    """Counts, the dataset version, body records, a grid of views with their masks and the
    distributions of scene parameters and skin tones."""
    from dermml.orchestration import tracking

    tracking.log_metrics(outcome.counts)
    tracking.log_dataset(outcome.manifest_uri, outcome.version, context="synthesis")
    features = sorted({r.body.get("blend_features") or "" for r in results} - {""})
    tracking.set_tags({"synth3d.blend_features": ",".join(features) or "none",
                       "synth3d.out": out})
    bodies = pd.DataFrame([{k: v for k, v in r.body.items() if k != "params"} for r in results])
    if not bodies.empty:
        tracking.log_table_csv(bodies, "bodies.csv")
    records = read_records(out)
    with tracking.figure_guard("samples/views.png"):
        tracking.log_image(sample_grid(out, records), "samples/views.png")
    with tracking.figure_guard("plots/scene_parameters.png"):
        fig = distributions_figure(records)
        tracking.log_figure(fig, "plots/scene_parameters.png")
        import matplotlib.pyplot as plt

        plt.close(fig)
    data_csv = storage.join(out, "data.csv")
    tracking.log_text(storage.read_bytes(data_csv).decode(), "data.csv")


_ANATOMY_PALETTE = (np.random.default_rng(7).uniform(40, 255, (17, 3))).astype(np.uint8)


def sample_grid(out: str, records: list[dict], n: int = 8) -> np.ndarray:
    """Rows of image | lesion (red) over image | anatomy colours | depth, for up to n views."""
    from dermml.data.images import decode_image

    picks = records[:: max(1, len(records) // n)][:n]
    rows = []
    for r in picks:
        image = decode_image(storage.read_bytes(storage.join(out, r["image_uri"])))
        with storage.local_copy(storage.join(out, r["target_uri"])) as path:
            target = np.load(path)["masks"]
        lesion = target[..., 0] > 0.5
        overlay = image.copy()
        overlay[lesion] = (0.4 * overlay[lesion] + [153, 0, 0]).astype(np.uint8)
        anatomy = _ANATOMY_PALETTE[target[..., 3].astype(int)]
        anatomy[target[..., 3] == 0] = 0
        depth = target[..., 4]
        shade = np.zeros(depth.shape, dtype=np.uint8)
        if (depth > 0).any():
            d = depth[depth > 0]
            shade[depth > 0] = (255 - 200 * (d - d.min()) / max(float(np.ptp(d)), 1e-6)) \
                .astype(np.uint8)
        rows.append(np.concatenate([image, overlay, anatomy, np.stack([shade] * 3, -1)], 1))
    return np.concatenate(rows, 0)


def distributions_figure(records: list[dict]):
    """Histograms of the drawn scene parameters and the bodies' skin types / ITA."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.DataFrame(records)
    numeric = ["normal_weight", "ambient", "diffuse", "specular", "mat_specular", "shininess",
               "background_blur_radius", "skin_fraction", "lesion_fraction", "ita"]
    fig, axes = plt.subplots(3, 4, figsize=(14, 9))
    for ax, column in zip(axes.flat, numeric, strict=False):
        values = pd.to_numeric(table.get(column), errors="coerce").dropna()
        ax.hist(values, bins=20, color="#4c72b0")
        ax.set_title(column)
    types = table.get("skin_type", pd.Series(dtype=str)).fillna("?").value_counts().sort_index()
    axes.flat[len(numeric)].bar(types.index.astype(str), types.values, color="#dd8452")
    axes.flat[len(numeric)].set_title("Fitzpatrick type (views)")
    moved = table.get("light_moved_to_camera", pd.Series(dtype=bool)).fillna(False)
    axes.flat[len(numeric) + 1].bar(["light offset", "light at camera"],
                                    [int((~moved.astype(bool)).sum()), int(moved.sum())])
    axes.flat[len(numeric) + 1].set_title("light placement")
    fig.tight_layout()
    return fig
