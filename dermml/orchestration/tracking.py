"""MLflow adapter: embedded or remote tracking, one experiment per task, parent/child runs.

Embedded default: ``$DERMML_HOME/mlflow.db`` (SQLite) with artifacts in ``$DERMML_HOME/artifacts``.
``MLFLOW_TRACKING_URI`` selects a remote server instead.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from dermml.config import dermml_home, flatten

log = logging.getLogger(__name__)

TAG_DATASET_VERSION = "dermml.dataset_version"
TAG_DATASET_URI = "dermml.dataset_uri"
TAG_GIT_COMMIT = "dermml.git_commit"
TAG_STAGE = "dermml.stage"
TAG_TASK = "dermml.task"
TAG_PIPELINE_RUN = "dermml.pipeline_run_id"

STAGE_LOG_ENV = "DERMML_STAGE_LOG"
"""Set (by ``console``) to the log file of the stage running in this process: the runs a stage
starts are listed next to it (``<log>.runs``), to be given the log when the stage ends."""


def tracking_uri() -> str:
    """The tracking URI in force: ``$MLFLOW_TRACKING_URI`` or the embedded SQLite store."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = dermml_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"


def is_embedded() -> bool:
    """True when runs go to a local store."""
    return tracking_uri().startswith(("sqlite:", "file:", "/"))


def configure() -> str:
    """Point the mlflow client at the tracking URI in force; returns it."""
    import mlflow

    uri = tracking_uri()
    before = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # "Downloading artifacts" bars each time a model is logged or loaded say nothing worth a
    # line (set the variable to true to see them).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # mlflow exports the URIs into the environment; undo that so MLFLOW_TRACKING_URI keeps
    # meaning "the user chose a server" (and a later DERMML_HOME change is honoured).
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
    return uri


def experiment_name(task: str) -> str:
    return f"dermml/{task}"


def ensure_experiment(task: str) -> str:
    """Id of the task's experiment, created on first use (embedded: artifacts under DERMML_HOME)."""
    import mlflow

    configure()
    name = experiment_name(task)
    exp = mlflow.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if is_embedded():
        location = (dermml_home() / "artifacts" / task).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another stage
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit() -> str:
    """Commit of the running code: ``$DERMML_GIT_COMMIT`` (set in images) or ``git rev-parse``."""
    if os.environ.get("DERMML_GIT_COMMIT"):
        return os.environ["DERMML_GIT_COMMIT"]
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def stage_run(task: str, stage: str, parent_run_id: str | None = None,
              run_name: str | None = None, run_id: str | None = None,
              system_metrics: bool = False) -> Iterator[Any]:
    """Start (or resume) a run for one stage, as a child of ``parent_run_id`` when given."""
    import mlflow

    experiment_id = ensure_experiment(task)
    tags = {TAG_STAGE: stage, TAG_TASK: task, TAG_GIT_COMMIT: git_commit()}
    if parent_run_id:
        tags[TAG_PIPELINE_RUN] = parent_run_id
    kwargs: dict[str, Any] = {"run_id": run_id} if run_id else {
        "experiment_id": experiment_id, "run_name": run_name or stage, "tags": tags,
        "parent_run_id": parent_run_id or None, "nested": bool(parent_run_id)}
    if system_metrics:
        kwargs["log_system_metrics"] = True
    # Runs are started explicitly with parent_run_id, never nested in a caller's active run.
    while mlflow.active_run() is not None:
        mlflow.end_run()
    # The pipeline's parent run fails with its stage.
    with mlflow.start_run(**kwargs) as run, failing_parent(parent_run_id):
        record_stage_run(run.info.run_id)
        yield run


def record_stage_run(run_id: str) -> None:
    """Note ``run_id`` as a run of the stage whose log ``$DERMML_STAGE_LOG`` names, so that
    ``log_stage_log`` gives it the log; nothing when no stage log is kept."""
    log_file = os.environ.get(STAGE_LOG_ENV)
    if log_file:
        with open(f"{log_file}.runs", "a", encoding="utf-8") as f:
            f.write(run_id + "\n")


def log_stage_log(log_file: str, run_ids: tuple[str, ...] = ()) -> None:
    """Log a stage's log file as ``logs/<file name>`` into the runs the stage started
    (``record_stage_run``) and ``run_ids``. A log is never worth a stage: failures only warn."""
    from mlflow.tracking import MlflowClient

    listed = Path(f"{log_file}.runs")
    recorded = listed.read_text().split() if listed.exists() else []
    listed.unlink(missing_ok=True)
    runs = [r for r in dict.fromkeys([*recorded, *run_ids]) if r]
    if not runs or not Path(log_file).exists():
        return
    client = MlflowClient(tracking_uri())
    for run_id in runs:
        try:
            client.log_artifact(run_id, log_file, "logs")
        except Exception as exc:  # the stage's own outcome matters more
            log.warning("could not log %s into run %s: %s", log_file, run_id, exc)


@contextlib.contextmanager
def failing_parent(parent_run_id: str | None) -> Iterator[None]:
    """Mark the pipeline's parent run FAILED when a stage fails, whatever failed (a bad
    override before any stage run exists, the registry, ...); the error is re-raised."""
    try:
        yield
    except BaseException:
        if parent_run_id:
            from mlflow.tracking import MlflowClient

            try:
                MlflowClient(tracking_uri()).set_terminated(parent_run_id, "FAILED")
            except Exception as exc:  # the stage's own error matters more
                log.warning("could not mark pipeline run %s FAILED: %s", parent_run_id, exc)
        raise


def config_params(config: Any, skip_prefixes: tuple[str, ...] = ()) -> dict[str, str]:
    """A config's flattened keys and values as MLflow params (less ``skip_prefixes``)."""
    data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    return {k: ("" if v is None else str(v))[:6000] for k, v in flatten(data).items()
            if not k.startswith(skip_prefixes)}


def config_yaml(config: Any) -> str:
    import yaml

    data = config.model_dump() if hasattr(config, "model_dump") else dict(config)
    return yaml.safe_dump(data, sort_keys=False)


def log_config(config: Any, skip_prefixes: tuple[str, ...] = ()) -> None:
    """Config as params (flattened keys, less those under ``skip_prefixes``: settings that do
    not apply to this run) and, complete, as ``config.yaml``."""
    import mlflow

    mlflow.log_params(config_params(config, skip_prefixes))
    mlflow.log_text(config_yaml(config), "config.yaml")


def config_from_run(run_id: str) -> dict[str, Any]:
    """The config a run was started with (its ``config.yaml`` artifact)."""
    import mlflow
    import yaml

    configure()
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/config.yaml")
    except Exception as exc:
        raise ValueError(f"run {run_id}: no config.yaml to resume from ({exc})") from None
    return yaml.safe_load(text) or {}


def log_dataset(manifest_uri: str, version: str,
                split_counts: dict[str, int] | None = None, context: str | None = None) -> None:
    """Tags and params that tie a run to the exact dataset version it used; with ``context``
    (e.g. ``training``) also an MLflow dataset input, shown in the UI's Datasets column."""
    import mlflow

    mlflow.set_tags({TAG_DATASET_VERSION: version, TAG_DATASET_URI: manifest_uri})
    if split_counts:
        mlflow.log_params({f"data.n_{k}": v for k, v in split_counts.items()})
    if context:
        mlflow.log_input(manifest_dataset(manifest_uri, version), context=context,
                         tags={TAG_DATASET_VERSION: version})


DATASET_DIGEST_LENGTH = 36
"""MLflow stores at most 36 characters of a dataset digest: the SHA-256's first 36 hex digits
(the whole version is the input's ``dermml.dataset_version`` tag)."""


def manifest_dataset(manifest_uri: str, version: str):
    """The manifest as an MLflow dataset: source = its URI, digest = its SHA-256 (the dataset
    version), name = the dataset's (the manifest's folder for ``.../NAME/manifest.parquet``,
    else the file's stem)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    from dermml import storage
    from dermml.data.manifest import MANIFEST_FILENAME

    uri = storage.resolve(manifest_uri, os.getcwd())
    path = uri.rstrip("/")
    name = posixpath.basename(path)
    if name == MANIFEST_FILENAME:
        name = posixpath.basename(posixpath.dirname(path))
    with warnings.catch_warnings():  # two registered local sources match a path: same class
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(uri)
    return MetaDataset(source, name=name.removesuffix(".parquet") or "manifest",
                       digest=version[:DATASET_DIGEST_LENGTH])


def get_run(run_id: str):
    """The MLflow run ``run_id`` (tags, metrics, params, status) from the tracking server."""
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri()).get_run(run_id)


def log_params(params: dict[str, Any]) -> None:
    """Params of the active run."""
    import mlflow

    mlflow.log_params(params)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    """Finite metrics of the active run, as floats (NaN/inf, e.g. an undefined precision, are
    left out: MLflow would store them but charts and comparisons break on them)."""
    import mlflow

    values = {k: float(v) for k, v in metrics.items() if np.isfinite(float(v))}
    if values:
        mlflow.log_metrics(values, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    """Tags of the active run."""
    import mlflow

    mlflow.set_tags(tags)


def log_text(text: str, artifact_file: str) -> None:
    import mlflow

    mlflow.log_text(text, artifact_file)


def log_files(paths: list[str], artifact_path: str) -> None:
    """Each existing file of ``paths`` into ``artifact_path`` of the active run."""
    import mlflow

    for path in paths:
        if os.path.isfile(path):
            mlflow.log_artifact(path, artifact_path)


def log_folder(folder: str, artifact_path: str) -> None:
    """A whole local folder (e.g. Data Docs) into ``artifact_path``, if it exists."""
    import mlflow

    if os.path.isdir(folder):
        mlflow.log_artifacts(folder, artifact_path)


def log_image(image: np.ndarray, artifact_file: str) -> None:
    import mlflow

    mlflow.log_image(image, artifact_file)


def log_figure(fig: Any, artifact_file: str) -> None:
    import mlflow

    mlflow.log_figure(fig, artifact_file)


@contextlib.contextmanager
def figure_guard(artifact: str) -> Iterator[None]:
    """Drawing or logging a figure for humans (``artifact``) never fails its run: an error is
    a warning (with its traceback under DERMML_DEBUG=1) and a ``dermml.figure_error.*`` tag on
    the active run, and the run goes on to log its metrics and tables."""
    try:
        yield
    except Exception as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        message = f"{type(exc).__name__}: {first_line}"
        log.warning("could not draw or log %s (%s); the run continues without it", artifact,
                    message, exc_info=bool(os.environ.get("DERMML_DEBUG")))
        import mlflow

        if mlflow.active_run() is not None:
            key = "dermml.figure_error." + re.sub(r"[^\w./-]+", "_", artifact)
            try:
                mlflow.set_tag(key, message[:5000])
            except Exception as tag_exc:  # the figure's own error is what matters
                log.warning("could not tag the figure error on the run: %s", tag_exc)


class RunLog:
    """Writes into one run by id, with no active run needed (Ray workers, training hooks)."""

    def __init__(self, run_id: str, uri: str = ""):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient(uri or tracking_uri())

    def metrics(self, metrics: dict[str, float], step: int) -> None:
        """One request for all of ``metrics`` at ``step``."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step)
                                                    for k, v in metrics.items()])

    def tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def history(self, key: str) -> list[tuple[int, float]]:
        """(step, value) of metric ``key``; a step logged twice (an epoch trained again after
        a restart) keeps its latest value."""
        by_step: dict[int, float] = {}
        for m in sorted(self.client.get_metric_history(self.run_id, key),
                        key=lambda m: m.timestamp):
            by_step[m.step] = m.value
        return sorted(by_step.items())

    def figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def image(self, image: np.ndarray, artifact_file: str) -> None:
        self.client.log_image(self.run_id, image, artifact_file)

    def file(self, data: bytes, artifact_file: str) -> None:
        """``data`` as the artifact ``artifact_file`` (folders included in the path)."""
        import tempfile

        folder, _, name = artifact_file.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, name)
            with open(path, "wb") as handle:
                handle.write(data)
            self.client.log_artifact(self.run_id, path, folder or None)

    def params(self, params: dict[str, Any]) -> None:
        """One request for all of ``params`` (values as text)."""
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a request
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def config(self, config: Any) -> None:
        """What ``log_config`` logs into the active run, into this one."""
        self.params(config_params(config))
        self.text(config_yaml(config), "config.yaml")

    def text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def get(self):
        """The run as MLflow has it now (info, params, metrics, tags)."""
        return self.client.get_run(self.run_id)

    def set_status(self, status: str) -> None:
        """``RUNNING`` reopens the run (a resumed search); ``FINISHED``/``FAILED`` close it."""
        if status == "RUNNING":
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.client.set_terminated(self.run_id, status)


def create_run(experiment_id: str, run_name: str, tags: dict[str, str],
               parent_run_id: str | None = None, uri: str = "") -> str:
    """A new run by id (no active run needed: Tune trials), child of ``parent_run_id``."""
    from mlflow.tracking import MlflowClient

    all_tags = {TAG_GIT_COMMIT: git_commit(), **tags}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = MlflowClient(uri or tracking_uri()).create_run(experiment_id, run_name=run_name,
                                                         tags=all_tags)
    return run.info.run_id


def find_runs(experiment_id: str, tags: dict[str, str], uri: str = "") -> list:
    """Runs of an experiment with all of ``tags`` (``mlflow.parentRunId`` too), newest first."""
    from mlflow.tracking import MlflowClient

    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    return MlflowClient(uri or tracking_uri()).search_runs(
        [experiment_id], where, order_by=["attributes.start_time DESC"], max_results=5000)


def load_python_model(model_uri: str):
    """The ``DermmlModel`` behind a ``runs:/`` or ``models:/`` URI (the one way a stage loads a
    logged model: evaluation, fine-tuning, weak-label relabelling, ``dermml predict``)."""
    import mlflow

    configure()
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model()


def log_table_csv(df, artifact_file: str, run_id: str | None = None) -> None:
    """A table as CSV, into the active run or the run ``run_id``."""
    import mlflow

    buf = io.StringIO()
    df.to_csv(buf, index=False)
    if run_id:
        from mlflow.tracking import MlflowClient

        MlflowClient(tracking_uri()).log_text(run_id, buf.getvalue(), artifact_file)
    else:
        mlflow.log_text(buf.getvalue(), artifact_file)


def ui_command() -> str:
    """How to open the MLflow UI on the runs made with the tracking URI in force."""
    if is_embedded():
        return (f"mlflow ui --backend-store-uri {tracking_uri()} --port 5000"
                "  # then open http://127.0.0.1:5000")
    return f"open {tracking_uri()} in a browser"


def create_parent_run(task: str, stage: str, run_name: str, parent_run_id: str | None = None,
                      params: dict[str, Any] | None = None,
                      tags: dict[str, str] | None = None) -> str:
    """Create an open run that parents other runs (pipelines, CV, weak-label rounds).

    It is driven by id through MlflowClient, never as the fluent "active" run, so the stage runs
    started under it cannot end it by accident.
    """
    from mlflow.tracking import MlflowClient

    experiment_id = ensure_experiment(task)
    client = MlflowClient(tracking_uri())
    all_tags = {TAG_STAGE: stage, TAG_TASK: task, TAG_GIT_COMMIT: git_commit(), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
        all_tags[TAG_PIPELINE_RUN] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    for key, value in (params or {}).items():
        client.log_param(run.info.run_id, key, str(value)[:6000])
    return run.info.run_id


@contextlib.contextmanager
def parent_run(task: str, stage: str, parent_run_id: str | None = None,
               params: dict[str, Any] | None = None) -> Iterator[str]:
    """A parent run for the duration of the block: FINISHED on success, FAILED on error."""
    from mlflow.tracking import MlflowClient

    run_id = create_parent_run(task, stage, stage, parent_run_id, params)
    client = MlflowClient(tracking_uri())
    try:
        yield run_id
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")


def start_pipeline_run(task: str, pipeline: str, params: dict[str, Any] | None = None) -> str:
    """Create the parent run of one pipeline execution and leave it open; returns its id."""
    run_id = create_parent_run(task, "pipeline", f"pipeline-{pipeline}", params=params,
                               tags={"dermml.pipeline": pipeline})
    record_stage_run(run_id)
    return run_id


def finish_pipeline_run(run_id: str, status: str = "FINISHED") -> None:
    """Close a parent run; a child that failed marks it FAILED."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri())
    children = client.search_runs([client.get_run(run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{run_id}'")
    if any(c.info.status == "FAILED" for c in children):
        status = "FAILED"
    client.set_terminated(run_id, status)
