"""The tuning stage: a task config, a search space and search settings in; one MLflow parent run
per search (the trials table, a parallel-coordinates plot, the best config), one child run per
trial, and the best trial's model logged (and registered as ``challenger``) out.

Everything that can be wrong with the input (config, space file, data, settings) is refused here
before Ray starts; ``orchestration/ray_tune.py`` runs the trials.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from dermml.config import ConfigError, load_config, validation_problems
from dermml.orchestration import tracking
from dermml.tasks import get_task
from dermml.tasks.base import TaskConfig, read_task_manifest
from dermml.tuning.space import (
    SearchConfig,
    check_search,
    check_space,
    default_name,
    metric_and_mode,
    read_space,
)

if TYPE_CHECKING:
    from dermml.orchestration.platform import PlatformConfig

log = logging.getLogger(__name__)

STAGE = "tune"
SEARCH_FILE = "tune/search.yaml"
"""The parent run's record of the search (settings, space, task config): what ``dermml tune
--run RUN_ID`` (a RayJob) reads back."""


@dataclass
class TuneOutcome:
    run_id: str
    """The search's parent run."""
    name: str
    metric: str
    mode: str
    best_run_id: str
    best_metric: float
    best_values: dict[str, Any]
    model_uri: str
    version: str | None = None
    trials: list[dict] = field(default_factory=list)


def resolve_search(task_name: str, config_path: str | None, overrides: list[str] | None,
                   space_path: str, **settings: Any) -> tuple[TaskConfig, SearchConfig]:
    """The task config and the search, every key and distribution checked (before Ray)."""
    task = get_task(task_name)
    cfg = load_config(task.config_cls, config_path, overrides, base={"task": task_name})
    try:
        search = SearchConfig.model_validate({**settings, "space": {
            str(k): v for k, v in read_space(space_path).items()}})
    except ValidationError as exc:
        raise ConfigError("; ".join(f"--{p.replace('_', '-')}"
                                    for p in validation_problems(exc))) from None
    check_space(search.space, task.config_cls, cfg.model_dump(), space_path, search.scheduler)
    return cfg, search


def tune(task_name: str, cfg: TaskConfig, search: SearchConfig, resume: bool = False,
         parent_run_id: str | None = None, register: bool = True,
         platform: PlatformConfig | None = None) -> TuneOutcome:
    """Run the search (``resume``: continue the unfinished one of the same name).

    ``platform`` (a pipeline's, or ``dermml tune --platform``): each trial's workers must fit
    its pools, and with ``ray_job.enabled`` the search runs as a KubeRay RayJob whose worker
    pods hold ``concurrent`` trials. ``register``: the best model becomes the challenger.
    """
    from dermml.orchestration.ray_train import storage_path
    from dermml.orchestration.ray_tune import can_resume

    task = get_task(task_name)
    metric, mode = metric_and_mode(search, task.gate_metric, task.gate_mode)
    distributions = check_space(search.space, task.config_cls, cfg.model_dump(), "search space",
                                search.scheduler)
    check_search(search, cfg.train.epochs)
    cfg = _placed_per_trial(cfg, search)
    as_rayjob = platform is not None and platform.ray_job.enabled
    if platform is not None:
        _check_trials_fit(platform, cfg, search, task_name)
    if as_rayjob:
        from dermml.orchestration.rayjob import check_config

        check_config(cfg)
    cfg, manifest = _prepared(task, cfg)
    name = search.name or default_name(task_name, cfg.model_dump(), manifest.version, search)
    search = search.model_copy(update={"name": name})
    cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(
        update={"storage_path": storage_path(cfg)})})  # trials and runners see the same place
    exists = not as_rayjob and can_resume(cfg, name)
    if exists and not resume:
        raise ConfigError(f"search {name!r} exists in {storage_path(cfg)}: add --resume to "
                          "continue it, or --name NEW to start another")
    if resume and not exists and not as_rayjob:
        raise ConfigError(f"--resume: no search {name!r} in {storage_path(cfg)} to continue; "
                          "run the same command without --resume to start it")
    uri = tracking.configure()
    experiment_id = tracking.ensure_experiment(task_name)
    run_id = _search_run(task_name, cfg, search, manifest, experiment_id, parent_run_id, resume)
    parent = tracking.RunLog(run_id, uri)
    with tracking.failing_parent(parent_run_id):
        try:
            if as_rayjob:
                outcome = _tune_as_rayjob(task_name, cfg, search, run_id, platform)
            else:
                outcome = _search(task_name, cfg, search, distributions, run_id, experiment_id,
                                  manifest, resume=exists)
            if register:
                from dermml.registry.gate import register as register_model

                outcome.version = register_model(outcome.model_uri, task_name,
                                                 f"best of search {name} ({metric} "
                                                 f"{outcome.best_metric:.4f})")
        except BaseException:
            parent.set_status("FAILED")
            raise
    parent.set_status("FINISHED")
    return outcome


def tune_in_run(run_id: str) -> TuneOutcome:
    """The search recorded in parent run ``run_id`` (``dermml tune --run``, a RayJob's
    entrypoint): started, or continued where a lost job left it. Never registers."""
    import mlflow

    tracking.configure()
    try:
        record = yaml.safe_load(mlflow.artifacts.load_text(f"runs:/{run_id}/{SEARCH_FILE}"))
    except Exception as exc:
        raise ConfigError(f"run {run_id}: no {SEARCH_FILE} to run a search from ({exc})") from None
    from dermml.orchestration.ray_tune import can_resume

    task_name = record["task"]
    task = get_task(task_name)
    cfg = task.config_cls.model_validate(record["config"])
    search = SearchConfig.model_validate(record["search"])
    distributions = check_space(search.space, task.config_cls, cfg.model_dump(), "search space",
                                search.scheduler)
    manifest = read_task_manifest(cfg)
    parent = tracking.RunLog(run_id)
    experiment_id = parent.get().info.experiment_id
    parent.set_status("RUNNING")
    try:
        outcome = _search(task_name, cfg, search, distributions, run_id, experiment_id,
                          manifest, resume=can_resume(cfg, search.name))
    except BaseException:
        parent.set_status("FAILED")
        raise
    parent.set_status("FINISHED")
    return outcome


def _check_trials_fit(platform: PlatformConfig, cfg: TaskConfig, search: SearchConfig,
                      task_name: str) -> None:
    """A RayJob puts each trial worker in a pod of its own; otherwise the tune stage's pod
    holds every concurrent trial's workers (whole GPUs each, unless shared by a fraction)."""
    from dermml.orchestration.platform import check_training_fits

    ray = cfg.ray
    if not platform.ray_job.enabled:
        shares_gpu = search.gpus_per_trial is not None and search.gpus_per_trial < 1
        ray = ray.model_copy(update={"num_workers": ray.num_workers * search.concurrent,
                                     "use_gpu": ray.use_gpu and not shares_gpu})
    check_training_fits(platform, ray, f"task {task_name!r} with --concurrent "
                                       f"{search.concurrent}")


def _placed_per_trial(cfg: TaskConfig, search: SearchConfig) -> TaskConfig:
    """``--gpus-per-trial``: GPUs on or off for the trials' workers."""
    if search.gpus_per_trial is None:
        return cfg
    return cfg.model_copy(update={"ray": cfg.ray.model_copy(
        update={"use_gpu": search.gpus_per_trial > 0, "enabled": True})})


def _prepared(task, cfg: TaskConfig):
    """What ``train`` checks before any worker starts, once for every trial (data, files,
    weights), and the data-dependent settings (class weights) every trial shares."""
    from dermml.training.inputs import training_inputs

    if not cfg.ray.enabled:  # trials always train through Ray Train
        cfg = cfg.model_copy(update={"ray": cfg.ray.model_copy(update={"enabled": True})})
    inputs = training_inputs(task, cfg, prepare=True)
    inputs.check_files()
    if getattr(inputs.cfg.model, "pretrained", ""):
        task.build_model(inputs.cfg)
    return inputs.cfg, inputs.manifest


def _search_run(task_name: str, cfg: TaskConfig, search: SearchConfig, manifest,
                experiment_id: str, parent_run_id: str | None, resume: bool) -> str:
    """The search's parent run: found again by name on --resume, else created and described."""
    from dermml.orchestration.ray_tune import TAG_SEARCH

    if resume:
        found = tracking.find_runs(experiment_id, {TAG_SEARCH: search.name,
                                                   tracking.TAG_STAGE: STAGE})
        if found:
            run = tracking.RunLog(found[0].info.run_id)
            run.set_status("RUNNING")
            return run.run_id
    run_id = tracking.create_parent_run(
        task_name, STAGE, f"tune-{search.name}", parent_run_id,
        params={"search": search.search, "scheduler": search.scheduler,
                "trials": search.trials, "concurrent": search.concurrent,
                "metric": search.metric, "mode": search.mode, "seed": search.seed,
                **{f"space.{k}": v for k, v in search.space.items()}},
        tags={TAG_SEARCH: search.name, tracking.TAG_DATASET_VERSION: manifest.version,
              tracking.TAG_DATASET_URI: manifest.uri})
    run = tracking.RunLog(run_id)
    run.text(yaml.safe_dump({"task": task_name, "search": search.model_dump(),
                             "config": cfg.model_dump()}, sort_keys=False), SEARCH_FILE)
    run.text(yaml.safe_dump(search.space, sort_keys=False), "tune/space.yaml")
    run.text(tracking.config_yaml(cfg), "config.yaml")
    return run_id


def _search(task_name: str, cfg: TaskConfig, search: SearchConfig, distributions,
            run_id: str, experiment_id: str, manifest, resume: bool) -> TuneOutcome:
    """Run the trials here (local Ray, or the Ray cluster this runs in) and report the search."""
    from dermml.orchestration.ray_tune import TrialContext, TrialRuns, run_search

    task = get_task(task_name)
    metric, mode = metric_and_mode(search, task.gate_metric, task.gate_mode)
    gpus_per_worker = (search.gpus_per_trial / cfg.ray.num_workers
                       if search.gpus_per_trial else None)
    context = TrialContext(
        task=task_name, base=cfg.model_dump(), keys=tuple(d.key for d in distributions),
        search_name=search.name, parent_run_id=run_id, experiment_id=experiment_id,
        tracking_uri=tracking.tracking_uri(), dataset_version=manifest.version,
        scheduler=search.scheduler, gpus_per_worker=gpus_per_worker)
    trial_runs = TrialRuns(context, metric, mode, task.gate_metric, task.gate_mode,
                           cfg.train.epochs)
    outcomes = run_search(cfg, search, distributions, context, trial_runs, resume)
    return _report(task_name, cfg, search, outcomes, trial_runs, manifest)


def _report(task_name: str, cfg: TaskConfig, search: SearchConfig, outcomes, trial_runs,
            manifest) -> TuneOutcome:
    """The parent run's trials table, plot, best config and metrics; the best model logged."""
    import pandas as pd

    from dermml.orchestration.ray_tune import TAG_STOP, read_state
    from dermml.training.inputs import training_inputs
    from dermml.training.loop import FitResult
    from dermml.training.run import _log_model_and_preview
    from dermml.tuning.space import trial_config
    from dermml.visualization import parallel_coordinates_figure

    context, metric, mode = trial_runs.context, trial_runs.metric, trial_runs.mode
    parent = tracking.RunLog(context.parent_run_id)
    rows = []
    for outcome in outcomes:
        run = trial_runs.run_of(outcome.trial_id) if outcome.trial_id else None
        info = run.get() if run is not None else None
        rows.append({"trial_id": outcome.trial_id, "run_id": run.run_id if run else "",
                     "status": info.info.status if info else "", **outcome.sample,
                     f"best_{metric}": outcome.best,
                     "epochs_run": int(outcome.last.get("epoch", -1)) + 1,
                     "stop_reason": (info.data.tags.get(TAG_STOP) if info else "") or
                     (f"error: {outcome.error}" if outcome.error else "")})
    table = pd.DataFrame(rows)
    tracking.log_table_csv(table, "tune/trials.csv", run_id=parent.run_id)
    scored = [o for o in outcomes if o.best is not None and o.checkpoint is not None]
    if not scored:
        errors = sorted({o.error for o in outcomes if o.error})
        raise RuntimeError(f"search {search.name}: no trial reported {metric}"
                           + (f"; trial errors: {' | '.join(errors)}" if errors else ""))
    best = (max if mode == "max" else min)(scored, key=lambda o: o.best)
    with tracking.figure_guard("tune/parallel_coordinates.png"):
        keys = list(context.keys)
        plot_rows = [{**r, metric: r[f"best_{metric}"]} for r in rows]
        log_keys = tuple(k for k in keys if any(d == k for d in _log_keys(search)))
        parent.figure(parallel_coordinates_figure(plot_rows, keys, metric, log_keys),
                      "tune/parallel_coordinates.png")
    task = get_task(task_name)
    best_cfg = trial_config(task.config_cls, context.base, best.sample)
    parent.text(tracking.config_yaml(best_cfg), "tune/best_config.yaml")
    best_run = trial_runs.run_of(best.trial_id)
    parent.metrics({f"best_{metric}": best.best, "trials": float(len(outcomes)),
                    "trials_failed": float(sum(bool(o.error) for o in outcomes)),
                    "trials_stopped_early": float(sum(
                        str(r["stop_reason"]).startswith(("stopped by", "early"))
                        for r in rows))}, 0)
    parent.tags({"dermml.tune.best_run_id": best_run.run_id,
                 "dermml.tune.best_trial_id": best.trial_id})
    state = read_state(best.checkpoint)
    result = FitResult(epochs_run=int(state["epoch"]) + 1, history=state["history"],
                       best_metric=state["best_metric"], best_model=state["best_model"])
    with tracking.stage_run(task_name, "tune-trial", run_id=best_run.run_id):
        model_uri = _log_model_and_preview(training_inputs(task, best_cfg), result)
        tracking.RunLog(best_run.run_id).tags({"dermml.model_uri": model_uri})
    parent.tags({"dermml.model_uri": model_uri})
    log.info("best trial %s (%s %s = %.4f): %s", best.trial_id, mode, metric, best.best,
             best.sample)
    return TuneOutcome(run_id=parent.run_id, name=search.name, metric=metric, mode=mode,
                       best_run_id=best_run.run_id, best_metric=float(best.best),
                       best_values=best.sample, model_uri=model_uri,
                       trials=table.to_dict("records"))


def _log_keys(search: SearchConfig) -> list[str]:
    return [k for k, v in search.space.items() if str(v).strip().startswith("loguniform")]


def _tune_as_rayjob(task_name: str, cfg: TaskConfig, search: SearchConfig, run_id: str,
                    platform: PlatformConfig) -> TuneOutcome:
    """The search as a KubeRay RayJob: ``dermml tune --run RUN_ID`` in a cluster of
    ``concurrent x ray.num_workers`` worker pods; read back what it logged."""
    from dermml.orchestration.rayjob import tune_as_rayjob

    tune_as_rayjob(task_name, cfg, search.concurrent, run_id, platform)
    run = tracking.RunLog(run_id).get()
    tags, metrics = run.data.tags, run.data.metrics
    metric, mode = metric_and_mode(search, get_task(task_name).gate_metric,
                                   get_task(task_name).gate_mode)
    if "dermml.model_uri" not in tags:
        raise RuntimeError(f"RayJob for search run {run_id} succeeded but logged no model")
    best_run = tags["dermml.tune.best_run_id"]
    params = tracking.RunLog(best_run).get().data.params
    return TuneOutcome(run_id=run_id, name=search.name, metric=metric, mode=mode,
                       best_run_id=best_run, best_metric=metrics.get(f"best_{metric}", 0.0),
                       best_values={k: params.get(f"tune.{k}") for k in search.space},
                       model_uri=tags["dermml.model_uri"])
