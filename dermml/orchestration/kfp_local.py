"""KFP adapter: run pipelines with ``kfp.local`` (SubprocessRunner) and compile them to YAML.

The adapter takes a pipeline as a ``PipelineDef`` handed over by its caller (the CLI looks it up
in ``pipelines.PIPELINES``); nothing in ``dermml`` imports ``pipelines/``, the layer above it.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO
from unittest import mock

from dermml.config import ConfigError, dermml_home, shipped_config
from dermml.orchestration.platform import (
    LOCAL,
    PlatformConfig,
    check_training_fits,
    load_platform,
    using_platform,
)


@dataclass(frozen=True)
class PipelineDef:
    """A pipeline as the adapters take it: defined in ``pipelines/``, handed over by the CLI."""

    name: str
    """Short name, e.g. ``training``; uploaded to KFP as ``dermml-<name>``."""
    function: Callable[..., Any]
    """The pipeline function: its parameters and their defaults are the pipeline's."""
    build: Callable[[], Any]
    """Returns the pipeline graph, built now under the platform config in force (KFP runs a
    pipeline body when it is decorated, and ``place`` reads the platform then)."""
    trains: bool | tuple[tuple[str, str, str], ...] = False
    """True: its parameters ``task``, ``config`` and ``overrides`` configure a train stage;
    or ``(task, config parameter, overrides parameter)`` per train stage (the
    gan-augmentation pipeline trains a GAN and classifiers). Compiling and submitting check
    that each training fits the platform's pools."""


def check_params(pipeline: PipelineDef, params: dict[str, Any]) -> None:
    """Refuse parameters the pipeline does not have, naming the ones it has."""
    signature = inspect.signature(pipeline.function)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ConfigError(f"pipeline {pipeline.name!r} has no parameter(s) {unknown}; "
                          f"parameters: {', '.join(signature.parameters)}")


def _config_here(config: str) -> str | None:
    """A pipeline's task config file as this machine sees it: the path itself, else the same
    file among the shipped configs (``configs/segdiff/ph2.yaml`` or the image's
    ``/app/configs/segdiff/ph2.yaml``), else None."""
    path = Path(config)
    if path.is_file():
        return str(path)
    if "configs" in path.parts:
        parts = path.parts[len(path.parts) - path.parts[::-1].index("configs"):]
        shipped = shipped_config(*parts) if parts else None
        if shipped is not None and shipped.is_file():
            return str(shipped)
    return None


def check_training_fit(pipeline: PipelineDef, params: dict[str, Any],
                       platform: PlatformConfig) -> None:
    """Refuse a training pipeline whose task (its ``task``, ``config`` and ``overrides``
    parameters, or their defaults) asks for more per Ray worker than ``platform``'s pools have,
    before anything is compiled or submitted (``check_training_fits`` says what to change)."""
    if not pipeline.trains:
        return
    defaults = {name: p.default for name, p in
                inspect.signature(pipeline.function).parameters.items()
                if p.default is not inspect.Parameter.empty}
    given = {**defaults, **params}
    stages = (("", "config", "overrides"),) if pipeline.trains is True else pipeline.trains
    for task_name, config_key, overrides_key in stages:
        _check_one_training(task_name or str(given.get("task") or ""),
                            str(given.get(config_key) or ""),
                            [str(o) for o in given.get(overrides_key) or []],
                            int(given.get("concurrent") or 1), platform)


def _check_one_training(task: str, config: str, overrides: list[str], concurrent: int,
                        platform: PlatformConfig) -> None:
    from dermml.training.run import resolve_config

    here = _config_here(config) if config else None
    if config and here is None:
        warnings.warn(f"config {config} is not on this machine: whether task {task!r} fits "
                      f"{platform.source} is checked when the train stage starts", stacklevel=3)
        return
    source = f"task {task!r}" + (f" with config {config}" if config else " (its defaults)") + \
        (f" and overrides {overrides}" if overrides else "")
    ray = resolve_config(task, here, overrides).ray
    if concurrent > 1 and not platform.ray_job.enabled:  # a search: trainings in one pod
        ray = ray.model_copy(update={"num_workers": ray.num_workers * concurrent})
        source += f" with concurrent={concurrent} trials in the stage's pod"
    check_training_fits(platform, ray, source)


def local_environment() -> None:
    """Make component subprocesses see this venv's tools and the same DERMML_HOME / MLflow."""
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["DERMML_HOME"] = str(dermml_home())


class PipelineFailed(RuntimeError):
    """A local pipeline run failed; the message names the stage and its log file."""


def _failure_message(name: str, kfp_message: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", kfp_message)  # kfp colours its messages
    stage = re.search(r"Inner task failed: '([^']+)'", plain)
    if stage is None:
        return f"pipeline {name} failed: {plain}"
    return (f"pipeline {name} failed at stage {stage.group(1)!r}; its error is in its log, "
            "and the pipeline's MLflow run is marked FAILED")


class StageRunner:
    """Runs each component's subprocess in place of ``kfp.local``'s runner (which prints the
    executor input and every line of output): the output goes to ``<log_dir>/<task>.log``,
    the console gets one line per stage and the epoch lines, and a failed stage its log's
    path and its last line (the exception)."""

    def __init__(self, log_dir: Path, console: TextIO):
        self.log_dir, self.console = log_dir, console
        self.failed: tuple[str, Path] | None = None

    def __call__(self, full_command: list[str], env_vars: dict[str, str] | None = None) -> int:
        from dermml.orchestration import tracking
        from dermml.orchestration.console import StageLog, stage_line

        stage, parent_run_id = _task_of(full_command)
        log_file = self.log_dir / f"{stage}.log"
        env = {**os.environ, **(env_vars or {}), tracking.STAGE_LOG_ENV: str(log_file)}
        start = time.monotonic()
        with StageLog(log_file, self.console, indent="    ") as log, subprocess.Popen(
                full_command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                bufsize=1, env=env) as process:
            assert process.stdout is not None
            for line in process.stdout:
                log.line(line)
            code = process.wait()
        # The stage's own runs get its log, and so does the pipeline's run.
        tracking.log_stage_log(str(log_file), (parent_run_id,) if parent_run_id else ())
        self.console.write(stage_line(stage, code == 0, time.monotonic() - start) + "\n")
        if code != 0:
            self.failed = (stage, log_file)
            self.console.write(f"    {log.last_line}\n    full log: {log_file}\n")
        self.console.flush()
        return code

    def failure_message(self, name: str, kfp_message: str) -> str:
        if self.failed is None:
            return _failure_message(name, kfp_message)
        stage, log_file = self.failed
        return (f"pipeline {name} failed at stage {stage!r}; its log: {log_file} (the "
                "pipeline's MLflow run is marked FAILED)")


def _task_of(full_command: list[str]) -> tuple[str, str]:
    """The KFP task a component command runs (its output folder's name) and the pipeline's
    parent MLflow run it was given, read from the command's ``--executor_input``."""
    try:
        executor_input = json.loads(full_command[full_command.index("--executor_input") + 1])
    except (ValueError, IndexError):
        return "component", ""
    output_file = executor_input.get("outputs", {}).get("outputFile", "")
    stage = Path(output_file).parent.name or "component"
    parent = executor_input.get("inputs", {}).get("parameterValues", {}).get("parent_run_id")
    return stage, str(parent or "")


def run_local(pipeline: PipelineDef, params: dict[str, Any], console: TextIO | None = None,
              log_dir: Path | None = None) -> dict[str, Any]:
    """Execute ``pipeline`` locally; every component runs as a subprocess here.

    ``console`` (default stderr) gets one line per stage and the epoch lines; each stage's
    output goes to ``log_dir/<task>.log`` (default ``$DERMML_HOME/logs/<pipeline>-<time>``),
    and kfp's own to ``pipeline.log`` there.
    """
    import kfp.local
    from kfp.local import subprocess_task_handler

    from dermml.orchestration.console import StageLog, new_log_dir

    check_params(pipeline, params)
    local_environment()
    console = console or sys.stderr
    log_dir = log_dir or new_log_dir(pipeline.name)
    log_dir.mkdir(parents=True, exist_ok=True)
    console.write(f"pipeline {pipeline.name} (KFP local): stage logs in {log_dir}\n")
    console.flush()
    runner = StageRunner(log_dir, console)
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(dermml_home() / "kfp"), raise_on_error=True)
    # Cluster placement and env (MLflow URI, secrets) must not leak into local runs.
    # kfp's own messages (task outputs, colours) go to pipeline.log; if kfp moves the function
    # patched here, patch.object fails loudly (and so do the local pipeline tests).
    with warnings.catch_warnings(), using_platform(LOCAL), \
            StageLog(log_dir / "pipeline.log", console) as kfp_log, \
            contextlib.redirect_stdout(kfp_log.stream()), \
            contextlib.redirect_stderr(kfp_log.stream()), \
            mock.patch.object(subprocess_task_handler, "run_local_subprocess", runner):
        # kfp warns that base_image is not used locally: expected, components run in this venv.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        # ... and that CPU/memory requests are ignored locally: they are for the cluster.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            task = pipeline.build()(**params)  # built inside the local platform
        except RuntimeError as exc:
            raise PipelineFailed(runner.failure_message(pipeline.name, str(exc))) from None
    outputs = getattr(task, "outputs", None) or {}
    return dict(outputs) if isinstance(outputs, dict) else {"output": outputs}


def compile_pipeline(pipeline: PipelineDef, out: str, platform: str | None = None,
                     params: dict[str, Any] | None = None) -> str:
    """Write the IR YAML with the platform config's placement (default: the shipped one).

    ``params`` become the compiled pipeline's parameter defaults; they (or the pipeline's own
    defaults) must fit the platform (``check_training_fit``).
    """
    from kfp import compiler

    params = params or {}
    check_params(pipeline, params)
    placed = load_platform(platform)
    check_training_fit(pipeline, params, placed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with using_platform(placed):
        compiler.Compiler().compile(pipeline.build(), out, pipeline_parameters=params or None)
    return out
