"""Training schemes built from ``train()``: the weak-label loop and K-fold cross-validation.

Each scheme is one MLflow parent run whose rounds or folds are child runs, so the whole
experiment reads as one tree in the UI. Derived manifests (relabelled weak sets, fold splits) are
written under ``$DERMML_HOME/schemes/<parent run>/``; user data is never modified.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermml import storage
from dermml.config import ConfigError, dermml_home
from dermml.data.images import load_image
from dermml.data.manifest import Manifest, read_manifest, write_manifest
from dermml.orchestration import tracking
from dermml.tasks import get_task
from dermml.tasks.base import Task, TaskConfig
from dermml.training.run import TrainOutcome, train

URI_COLUMNS = ("image_uri", "mask_uri", "anatomy_uri", "depth_uri")


def _absolute(manifest: Manifest, rows: pd.DataFrame) -> pd.DataFrame:
    """Rows with URIs made absolute, so a derived manifest can live in another folder."""
    rows = rows.copy()
    for col in URI_COLUMNS:
        rows[col] = [manifest.resolve(u) for u in rows[col]]
    rows["attribute_mask_uris"] = [
        {k: manifest.resolve(v) for k, v in m.items()} if isinstance(m, dict) else None
        for m in rows["attribute_mask_uris"]]
    return rows


def _with(cfg: TaskConfig, **data) -> TaskConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data)}, deep=True)


# ----------------------------------------------------------------------------- weak labels
@dataclass
class WeakLabelOutcome:
    run_id: str
    model_uri: str
    rounds: list[dict] = field(default_factory=list)
    """Per round: fraction of weak labels changed, the relabelled manifest, child run ids."""


def train_with_weak_labels(task_name: str, cfg: TaskConfig, wl_split: str, sl_split: str,
                           repeats: int = 1, finetune_lr_factor: float = 0.3,
                           parent_run_id: str | None = None) -> WeakLabelOutcome:
    """Strong labels first; then ``repeats`` times: relabel the weak set with the model, train
    on it (from the current weights), fine-tune on the strong set."""
    task = get_task(task_name)
    if type(task).relabel is Task.relabel:
        raise ConfigError(f"weak labels: task {task_name!r} cannot relabel its weak set (tasks "
                          "that can: classification, segmentation, segdiff)")
    manifest = read_manifest(cfg.data.manifest)
    weak_rows = manifest.split(wl_split)
    # Classes and class weights come from the strong set and stay fixed for every round, so
    # each round's network has the same outputs as the weights it starts from.
    cfg = task.prepare(_with(cfg, train_split=sl_split), manifest)
    params = {"wl_split": wl_split, "sl_split": sl_split, "repeats": repeats}
    with tracking.parent_run(task_name, "weak-labels", parent_run_id, params) as parent:
        run_log = tracking.RunLog(parent)
        strong = train(task_name, _with(cfg, train_split=sl_split), parent, progress=False)
        outcome = WeakLabelOutcome(parent, strong.model_uri)
        labels = weak_rows
        for r in range(1, repeats + 1):
            out_dir = str(dermml_home() / "schemes" / parent / f"round{r}")
            relabeled, changed = _relabel(task, outcome.model_uri, manifest, labels, out_dir)
            labels = relabeled[relabeled["split"] == wl_split]
            weak = train(task_name, _with(cfg, manifest=relabeled.attrs["uri"],
                                          train_split=wl_split).model_copy(
                                              update={"init_from": outcome.model_uri}),
                         parent, progress=False)
            finetune_cfg = _with(cfg, train_split=sl_split).model_copy(
                update={"init_from": weak.model_uri,
                        "train": cfg.train.model_copy(
                            update={"lr": cfg.train.lr * finetune_lr_factor})})
            tuned = train(task_name, finetune_cfg, parent, progress=False)
            outcome.model_uri = tuned.model_uri
            outcome.rounds.append({"round": r, "weak_labels_changed": changed,
                                   "manifest": relabeled.attrs["uri"],
                                   "weak_run_id": weak.run_id, "finetune_run_id": tuned.run_id})
            run_log.metrics({"weak_labels_changed": changed}, step=r)
        run_log.tags({"dermml.model_uri": outcome.model_uri})
    return outcome


def _relabel(task, model_uri: str, manifest: Manifest, weak_rows: pd.DataFrame,
             out_dir: str) -> tuple[pd.DataFrame, float]:
    """A manifest where the weak split carries the model's labels; fraction that changed."""
    from dermml.orchestration.tracking import load_python_model

    model = load_python_model(model_uri)
    images = [load_image(manifest.resolve(u)) for u in weak_rows["image_uri"]]
    predictions = model.predict_images(images)
    new_weak = task.relabel(predictions, _absolute(manifest, weak_rows), out_dir)
    changed = _fraction_changed(weak_rows, new_weak, manifest)
    others = _absolute(manifest, manifest.df[~manifest.df["sample_id"].isin(
        weak_rows["sample_id"])])
    rows = pd.concat([others, new_weak], ignore_index=True)
    uri = storage.join(out_dir, "manifest.parquet")
    write_manifest(rows, uri)
    rows.attrs["uri"] = uri
    return rows, changed


def _fraction_changed(before: pd.DataFrame, after: pd.DataFrame, manifest: Manifest) -> float:
    """Relabelled masks: mean fraction of pixels changed (a new mask where there was none counts
    1); relabelled classes (masks untouched): fraction of labels changed."""
    from dermml.data.images import load_mask

    old_masks = [None if _missing(u) else manifest.resolve(u) for u in before["mask_uri"]]
    new_masks = [None if _missing(u) else u for u in after["mask_uri"]]
    if old_masks == new_masks:
        return float((before["label"].astype(str).to_numpy()
                      != after["label"].astype(str).to_numpy()).mean())
    changed = []
    for old, new in zip(old_masks, new_masks, strict=True):
        if old is None or new is None:
            changed.append(float(old != new))
            continue
        a, b = load_mask(old), load_mask(new)
        changed.append(float((a != b).mean()) if a.shape == b.shape else 1.0)
    return float(np.mean(changed))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


# ----------------------------------------------------------------------------- cross-validation
@dataclass
class CrossValidationOutcome:
    run_id: str
    folds: list[TrainOutcome]
    mean: dict[str, float]
    std: dict[str, float]


def fold_ids(rows: pd.DataFrame, folds: int, seed: int = 0) -> np.ndarray:
    """Seeded fold of each row: stratified by label, and by patient (or lesion) when known."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold, StratifiedKFold

    if folds < 2 or folds > len(rows):
        raise ValueError(f"--folds {folds}: need 2 <= K <= {len(rows)} samples")
    labels = rows["label"].fillna("-").astype(str).to_numpy()
    group_col = next((c for c in ("patient_id", "lesion_id") if rows[c].notna().all()), None)
    out = np.empty(len(rows), int)
    index = np.arange(len(rows))
    if group_col:
        groups = rows[group_col].astype(str).to_numpy()
        splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=seed)
        try:
            splits = list(splitter.split(index, labels, groups))
        except ValueError:
            splits = list(GroupKFold(folds).split(index, labels, groups))
    else:
        splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(index,
                                                                                      labels))
    for k, (_, held_out) in enumerate(splits):
        out[held_out] = k
    return out


def cross_validate(task_name: str, cfg: TaskConfig, folds: int,
                   parent_run_id: str | None = None) -> CrossValidationOutcome:
    """Train K models, each validated on one fold of the train+val pool; log mean ± std."""
    manifest = read_manifest(cfg.data.manifest)
    pool_splits = [*cfg.data.train_split.split(","), *cfg.data.val_split.split(",")]
    pool = manifest.split(*pool_splits)
    assignment = fold_ids(pool, folds, cfg.train.seed)
    rest = manifest.df[~manifest.df["sample_id"].isin(pool["sample_id"])]
    params = {"folds": folds, "pool_splits": ",".join(pool_splits)}
    with tracking.parent_run(task_name, "cross-validation", parent_run_id, params) as parent:
        outcomes = []
        for k in range(folds):
            rows = pool.copy()
            rows["split"] = np.where(assignment == k, "cv_val", "cv_train")
            uri = storage.join(str(dermml_home() / "schemes" / parent / f"fold{k}"),
                               "manifest.parquet")
            write_manifest(pd.concat([_absolute(manifest, rows), _absolute(manifest, rest)],
                                     ignore_index=True), uri)
            fold_cfg = _with(cfg, manifest=uri, train_split="cv_train", val_split="cv_val")
            outcomes.append(train(task_name, fold_cfg, parent, progress=False))
        keys = sorted(set.intersection(*(set(o.metrics) for o in outcomes)))
        values = {k: np.array([o.metrics[k] for o in outcomes]) for k in keys}
        mean = {k: float(v.mean()) for k, v in values.items()}
        std = {k: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}
        tracking.RunLog(parent).metrics({**{f"cv_mean_{k}": v for k, v in mean.items()},
                                         **{f"cv_std_{k}": v for k, v in std.items()}}, step=0)
        table = pd.DataFrame([{"fold": i, **o.metrics} for i, o in enumerate(outcomes)])
        tracking.log_table_csv(table, "cross_validation/folds.csv", run_id=parent)
    return CrossValidationOutcome(parent, outcomes, mean, std)
