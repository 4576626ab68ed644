"""Ray Tune adapter: a search is configuration over the ordinary training run.

Each trial is a Tune function trainable (``run_trial``) that trains the task exactly as
``dermml train`` does, through ``ray_train.fit_with_ray`` (a ``TorchTrainer``: Ray 2.60 runs
Train V2, where a TorchTrainer goes inside a Tune function, never ``Tuner(TorchTrainer)``), into
its own MLflow child run of the search's parent run. Rank 0 logs the curves as in any run; every
epoch's metrics and checkpoint go on to Tune, so ASHA can stop a trial, PBT can restart one from
another's checkpoint and ``Tuner.restore`` can resume a killed search from the last ones.

Why each trial's TorchTrainer runs in a detached ``TrialTraining`` actor: Tune places a trial in
a placement group that captures everything the trial starts, and removes that group the moment
its scheduler stops (ASHA) or pauses (PBT) the trial. A Train controller started inside it dies
with it, before it can release the placement group of its workers (Train's own cleaner needs the
dashboard's state API, which DermML's Ray does not run), so every stopped trial would keep its
workers' CPUs or GPUs until the search ended. The runner lives outside the trial's group; when
the trial goes (its last call, or missed heartbeats) it aborts the Train run gracefully.
"""

from __future__ import annotations

import contextlib
import pickle
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dermml import storage
from dermml.orchestration import tracking
from dermml.orchestration.ray_train import STATE_FILE, ensure_ray, ray_storage, storage_path
from dermml.tuning.space import Distribution, SearchConfig, plain, trial_config

TAG_TRIAL = "dermml.tune.trial_id"
TAG_SEARCH = "dermml.tune.name"
TAG_STOP = "dermml.tune.stop_reason"
STAGE_TRIAL = "tune-trial"
TRIAL_MEMORY = 256 * 1024**2
"""What a trial's own process reserves: memory only, as it waits on its Train run (whose workers
reserve the CPUs and GPUs); Tune refuses a trial that reserves nothing."""
RUNNER_PREFIX = "dermml-trial-"
"""Name prefix of the runner actors: ``dermml-trial-<trial id>-<attempt>``."""
HEARTBEAT_S = 2.0
HEARTBEAT_TIMEOUT_S = 15.0
"""A runner that hears nothing from its trial this long aborts its Train run."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares (sent once through Ray's object store)."""

    task: str
    base: dict
    """The search's task config (data-dependent settings prepared), as a dict."""
    keys: tuple[str, ...]
    """The searched config keys."""
    search_name: str
    parent_run_id: str
    experiment_id: str
    tracking_uri: str
    dataset_version: str
    scheduler: str
    gpus_per_worker: float | None = None


# ----------------------------------------------------------------------------- the trial


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: the task's normal training with the sampled values."""
    import ray
    from ray import tune

    from dermml.tasks import get_task

    trial_id = tune.get_context().get_trial_id()
    sample = {key: plain(config[key]) for key in context.keys}
    cfg = trial_config(get_task(context.task).config_cls, context.base, sample)
    run = tracking.RunLog(trial_run_id(context, trial_id, cfg), context.tracking_uri)
    start_state, start_epoch = _start_state(cfg)
    if start_epoch >= cfg.train.epochs:  # restored from a last-epoch checkpoint (PBT, resume)
        run.tags({TAG_STOP: "completed"})
        return
    if context.scheduler == "pbt":  # perturbed values, from the epoch they apply
        run.metrics({f"hp/{k}": v for k, v in sample.items()
                     if isinstance(v, int | float) and not isinstance(v, bool)}, start_epoch)
    attempt = uuid.uuid4().hex[:6]
    train_run = f"{context.search_name}-{trial_id}-{attempt}"
    runner = ray.remote(TrialTraining).options(
        name=f"{RUNNER_PREFIX}{trial_id}-{attempt}", lifetime="detached",
        scheduling_strategy="DEFAULT", num_cpus=0, max_concurrency=4,
    ).remote(context.task, cfg.model_dump(), train_run, context.tracking_uri, run.run_id,
             start_state, context.gpus_per_worker)
    stop_beating = _heartbeat(runner)
    try:
        while True:
            item = ray.get(runner.next_report.remote(1.0))
            if item is None:
                continue
            kind, payload, checkpoint = item
            if kind == "error":
                raise payload
            if kind == "done":
                run.tags({TAG_STOP: _finished_reason(cfg, payload["epochs_run"],
                                                     get_task(context.task).gate_metric)})
                return
            tune.report(payload, checkpoint=None if checkpoint is None else
                        tune.Checkpoint(checkpoint.path, checkpoint.filesystem))
    finally:
        stop_beating.set()
        runner.stop.remote()  # also when Tune stops the trial: SystemExit in tune.report


def _finished_reason(cfg: Any, epochs_run: int, gate_metric: str) -> str:
    if epochs_run < cfg.train.epochs:
        return (f"early stopping: val_{gate_metric} did not improve for "
                f"{cfg.train.early_stopping_patience} epochs (epoch {epochs_run}/"
                f"{cfg.train.epochs})")
    return "completed"


def _start_state(cfg: Any) -> tuple[bytes | None, int]:
    """The trial's Tune checkpoint (a resumed trial's own, or under PBT another trial's) set to
    this trial's values, as bytes, and the epoch it continues from."""
    from ray import tune

    from dermml.training.checkpoint import state_from_bytes, state_to_bytes
    from dermml.training.loop import with_hyperparameters

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, 0
    with checkpoint.as_directory() as folder:
        state = state_from_bytes(Path(folder, STATE_FILE).read_bytes())
    return state_to_bytes(with_hyperparameters(state, cfg.train)), int(state["epoch"]) + 1


def _heartbeat(runner) -> threading.Event:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(HEARTBEAT_S):
            runner.heartbeat.remote()

    threading.Thread(target=beat, daemon=True, name="dermml-trial-heartbeat").start()
    return stop


def trial_run_id(context: TrialContext, trial_id: str, cfg: Any) -> str:
    """The trial's MLflow child run: found again when the trial restarts (resume, PBT), so a
    trial never has two runs; else created with the trial's config as params."""
    found = tracking.find_runs(context.experiment_id, {TAG_TRIAL: trial_id,
                                                        "mlflow.parentRunId":
                                                            context.parent_run_id},
                               context.tracking_uri)
    if found:
        return found[0].info.run_id
    tags = {tracking.TAG_STAGE: STAGE_TRIAL, tracking.TAG_TASK: context.task,
            TAG_TRIAL: trial_id, TAG_SEARCH: context.search_name,
            tracking.TAG_DATASET_VERSION: context.dataset_version,
            "dermml.tune.searched": ",".join(context.keys)}
    run_id = tracking.create_run(context.experiment_id, f"trial-{trial_id.rsplit('_', 1)[-1]}",
                                 tags, context.parent_run_id, context.tracking_uri)
    run = tracking.RunLog(run_id, context.tracking_uri)
    run.config(cfg)
    # The sampled values under their own keys too: loss.0.weight is inside the param "loss".
    sampled = {f"tune.{k}": plain(v) for k, v in _dotted_values(cfg, context.keys).items()}
    run.params({"seed": cfg.train.seed, **sampled})
    return run_id


def _dotted_values(cfg: Any, keys: tuple[str, ...]) -> dict[str, Any]:
    """``{"loss.0.weight": 1.3}``: the values of dotted keys in a config."""
    out = {}
    for key in keys:
        node: Any = cfg
        for part in key.split("."):
            node = node[int(part)] if isinstance(node, list) else getattr(node, part)
        out[key] = node
    return out


class TrialTraining:
    """One trial's Train run, outside the trial's placement group (see the module docstring):
    trains on a thread, hands every report to the trial (``next_report``), and aborts the Train
    run gracefully when the trial says ``stop`` or stops sending heartbeats."""

    def __init__(self, task: str, cfg: dict, run_name: str, tracking_uri: str, run_id: str,
                 start_state: bytes | None, gpus_per_worker: float | None):
        self._reports: queue.Queue = queue.Queue()
        self._controller = None
        self._beat = time.monotonic()
        self._stopping = threading.Lock()
        self._run_uri = storage.join(cfg["ray"]["storage_path"], run_name)
        self._training = threading.Thread(
            target=self._train, daemon=True, name="dermml-trial-training",
            args=(task, cfg, run_name, tracking_uri, run_id, start_state, gpus_per_worker))
        self._training.start()
        threading.Thread(target=self._watch, daemon=True, name="dermml-trial-watch").start()

    def _train(self, task, cfg, run_name, tracking_uri, run_id, start_state, gpus) -> None:
        import ray

        from dermml.orchestration.ray_train import fit_with_ray
        from dermml.tasks import get_task
        from dermml.training.inputs import training_inputs

        try:
            me = ray.get_runtime_context().current_actor
            # The search's config is prepared (class weights) already; a trial's values may
            # change the datasets (image size, augmentation), so each trial builds its own.
            inputs = training_inputs(task, get_task(task).config_cls.model_validate(cfg))
            result = fit_with_ray(
                inputs, run_name, tracking_uri, run_id, callbacks=_train_callbacks(me),
                start_state=None if start_state is None else ray.put(start_state),
                gpus_per_worker=gpus)
            self._reports.put(("done", {"epochs_run": result.epochs_run}, None))
        except BaseException as exc:  # handed to the trial, which fails with it
            self._reports.put(("error", _picklable(exc), None))

    def push(self, item: tuple) -> None:
        self._reports.put(item)

    def set_controller(self, controller) -> None:
        self._controller = controller

    def heartbeat(self) -> None:
        self._beat = time.monotonic()

    def next_report(self, timeout: float) -> tuple | None:
        self._beat = time.monotonic()
        try:
            return self._reports.get(timeout=timeout)
        except queue.Empty:
            return None

    def stop(self) -> None:
        """Abort the Train run if it still runs, drop its folder (the trial's checkpoints are
        Tune's copies), and end this actor."""
        import ray

        if not self._stopping.acquire(blocking=False):
            return
        if self._training.is_alive() and self._controller is not None:
            # The controller exits while aborting (an error here): that is the success case.
            with contextlib.suppress(Exception):
                ray.get(self._controller.abort.remote(), timeout=120)
        with contextlib.suppress(Exception):  # a leftover folder is not worth a failed trial
            storage.delete(self._run_uri)
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)

    def _watch(self) -> None:
        while True:
            time.sleep(HEARTBEAT_S)
            if time.monotonic() - self._beat > HEARTBEAT_TIMEOUT_S:
                self.stop()
                return


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _train_callbacks(runner) -> list:
    """Ray Train callbacks (run by the Train controller) that tell the runner each report and
    the controller's handle (to abort it)."""
    import ray
    from ray.train.v2._internal.execution.callback import ControllerCallback
    from ray.train.v2.api.callback import UserCallback

    class ForwardReports(UserCallback):
        def __init__(self, target):
            self.target = target

        def after_report(self, run_context, metrics, checkpoint):
            ray.get(self.target.push.remote(("report", dict(metrics[0]), checkpoint)))

    class ControllerHandle(ControllerCallback):
        def __init__(self, target):
            self.target = target

        def after_controller_start(self, train_run_context):
            ray.get(self.target.set_controller.remote(ray.get_runtime_context().current_actor))

    return [ForwardReports(runner), ControllerHandle(runner)]


# ----------------------------------------------------------------------------- the driver


@dataclass
class TrialOutcome:
    """One trial as the search left it (from Tune's results)."""

    trial_id: str
    sample: dict[str, Any]
    last: dict[str, Any]
    best: float | None
    error: str | None
    checkpoint: Any = None


def tune_domain(dist: Distribution):
    from ray import tune

    if dist.kind == "choice":
        return tune.choice(list(dist.args[0]))
    return getattr(tune, dist.kind)(*dist.args)


def _search_algorithm(search: SearchConfig, metric: str, mode: str):
    if search.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode, seed=search.seed)
    if search.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(metric=metric, mode=mode, random_state_seed=search.seed)
    from ray.tune.search import BasicVariantGenerator

    # A generator, not a Searcher: Tune ignores max_concurrent_trials for it.
    return BasicVariantGenerator(random_state=search.seed, max_concurrent=search.concurrent)


def _scheduler(search: SearchConfig, distributions: list[Distribution], epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    if search.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs,
                             grace_period=search.grace_period,
                             reduction_factor=search.reduction_factor)
    if search.scheduler == "pbt":
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=search.perturbation_interval,
            hyperparam_mutations={d.key: tune_domain(d) for d in distributions}, synch=False)
    return FIFOScheduler()


def experiment_path(cfg: Any, name: str) -> str:
    """Where Tune keeps the search: ``<ray.storage_path>/<name>`` (local or s3://)."""
    return storage.join(storage_path(cfg), name)


def can_resume(cfg: Any, name: str) -> bool:
    """Whether a search called ``name`` left a Tune experiment to restore."""
    from ray import tune

    path, fs_kwargs = ray_storage(experiment_path(cfg, name))
    return tune.Tuner.can_restore(path, **fs_kwargs)


class TrialRuns:
    """Closes each trial's MLflow child run as Tune ends the trial: final metrics, stop reason
    (completed, early stopping, stopped by the scheduler, error) and status."""

    def __init__(self, context: TrialContext, metric: str, mode: str, gate_metric: str,
                 gate_mode: str, epochs: int):
        self.context, self.metric, self.mode = context, metric, mode
        self.gate_metric, self.gate_mode, self.epochs = gate_metric, gate_mode, epochs

    def run_of(self, trial_id: str) -> tracking.RunLog | None:
        found = tracking.find_runs(self.context.experiment_id,
                                   {TAG_TRIAL: trial_id,
                                    "mlflow.parentRunId": self.context.parent_run_id},
                                   self.context.tracking_uri)
        return tracking.RunLog(found[0].info.run_id, self.context.tracking_uri) if found else None

    def finish(self, trial_id: str, last: dict, best_gate: float | None,
               error: str | None) -> None:
        run = self.run_of(trial_id)
        if run is None:
            return
        epochs_run = int(last.get("epoch", -1)) + 1
        metrics = {"epochs_run": float(epochs_run)}
        if best_gate is not None:
            metrics["best_val_gate"] = float(best_gate)
        metrics.update({f"final_{k}": float(v) for k, v in last.items()
                        if k.startswith("val_") and isinstance(v, int | float)})
        run.metrics(metrics, max(0, epochs_run - 1))
        reason = run.get().data.tags.get(TAG_STOP)
        if error:
            reason = f"error: {error}"
        elif not reason:
            reason = "completed" if epochs_run >= self.epochs else \
                f"stopped by {self.context.scheduler} after epoch {epochs_run}/{self.epochs}"
        run.tags({TAG_STOP: reason})
        run.set_status("FAILED" if error else "FINISHED")

    def callback(self):
        """The Tune callback (driver side) calling ``finish`` live."""
        from ray import tune

        outer = self

        class FinishTrialRuns(tune.Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                stop_runners(trial.trial_id)  # a PBT restart: the paused run's runner

            def on_trial_result(self, iteration, trials, trial, result, **info):
                _fault_kill_search()

            def on_trial_complete(self, iteration, trials, trial, **info):
                stop_runners(trial.trial_id)
                gate = trial.metric_analysis.get(f"val_{outer.gate_metric}", {})
                outer.finish(trial.trial_id, trial.last_result, gate.get(outer.gate_mode), None)

            def on_trial_error(self, iteration, trials, trial, **info):
                stop_runners(trial.trial_id)
                gate = trial.metric_analysis.get(f"val_{outer.gate_metric}", {})
                outer.finish(trial.trial_id, trial.last_result, gate.get(outer.gate_mode),
                             error_line(trial.get_pickled_error()))

        return FinishTrialRuns()


_results_seen = 0


def _fault_kill_search() -> None:
    """Chaos knob for resume drills: ``DERMML_FAULT_KILL_SEARCH_AT_RESULT=N`` kills this
    process (the search's driver) at the N-th trial result, as a lost pod or a Ctrl-C'd shell
    would end it."""
    import os
    import signal

    global _results_seen
    at = os.environ.get("DERMML_FAULT_KILL_SEARCH_AT_RESULT")
    _results_seen += 1
    if at is not None and _results_seen == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def stop_runners(trial_id: str) -> None:
    """Tell the runners of an ended trial to abort now: the trial's own last call may not get
    out before Tune removes it (the heartbeat timeout would, later)."""
    import ray

    for name in ray.util.list_named_actors():
        if name.startswith(f"{RUNNER_PREFIX}{trial_id}-"):
            with contextlib.suppress(ValueError):  # gone meanwhile
                ray.get_actor(name).stop.remote()


def error_line(exc: BaseException | None) -> str:
    """The user-facing line of a trial's error (Ray wraps it: its cause is what went wrong)."""
    while exc is not None and getattr(exc, "cause", None) is not None:
        exc = exc.cause
    if exc is None:
        return "unknown error"
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def run_search(cfg: Any, search: SearchConfig, distributions: list[Distribution],
               context: TrialContext, trial_runs: TrialRuns, resume: bool) -> list[TrialOutcome]:
    """Run (or, with ``resume``, restore and finish) the search; one outcome per trial."""
    import os

    from ray import tune

    # The experiment state (which trials exist, their last checkpoints) is what --resume
    # restores: saved every 2 s rather than Tune's 10 s or more, so a killed search loses less.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    ensure_ray(cfg.ray.address)
    path, fs_kwargs = ray_storage(storage_path(cfg))
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context),
                                    {"CPU": 0, "memory": TRIAL_MEMORY})
    if resume:
        exp_path, _ = ray_storage(experiment_path(cfg, context.search_name))
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True,
                                   resume_errored=True, **fs_kwargs)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={d.key: tune_domain(d) for d in distributions},
            tune_config=tune.TuneConfig(
                metric=trial_runs.metric, mode=trial_runs.mode, num_samples=search.trials,
                max_concurrent_trials=search.concurrent,
                search_alg=_search_algorithm(search, trial_runs.metric, trial_runs.mode),
                scheduler=_scheduler(search, distributions, cfg.train.epochs),
                reuse_actors=False),
            run_config=tune.RunConfig(
                name=context.search_name, storage_path=path, **fs_kwargs,
                # PBT restores trials from others' checkpoints: keep enough of them.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=4 if search.scheduler == "pbt" else 2),
                failure_config=tune.FailureConfig(max_failures=0),
                callbacks=[trial_runs.callback()], verbose=1))
    grid = tuner.fit()
    outcomes = []
    for result in grid:
        frame = result.metrics_dataframe
        gate = f"val_{trial_runs.gate_metric}"
        best = None
        if frame is not None and trial_runs.metric in frame:
            column = frame[trial_runs.metric].dropna()
            best = float(column.max() if trial_runs.mode == "max" else column.min()) \
                if len(column) else None
        best_gate = None
        if frame is not None and gate in frame and len(frame[gate].dropna()):
            column = frame[gate].dropna()
            best_gate = float(column.max() if trial_runs.gate_mode == "max" else column.min())
        last = dict(result.metrics or {})
        error = error_line(result.error) if result.error else None
        trial_id = last.get("trial_id", "")
        if trial_id:  # finished here if Tune's callback could not (a search killed meanwhile)
            run = trial_runs.run_of(trial_id)
            if run is not None and run.get().info.status == "RUNNING":
                trial_runs.finish(trial_id, last, best_gate, error)
        outcomes.append(TrialOutcome(trial_id, {k: plain(result.config.get(k))
                                                for k in context.keys},
                                     last, best, error, result.checkpoint))
    return outcomes


def read_state(checkpoint) -> dict:
    """The training state in a trial's Tune checkpoint (weights, history, best weights)."""
    from dermml.training.checkpoint import state_from_bytes

    with checkpoint.as_directory() as folder:
        return state_from_bytes(Path(folder, STATE_FILE).read_bytes())
