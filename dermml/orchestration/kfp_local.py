"""KFP adapter: run pipelines with ``kfp.local`` (SubprocessRunner) and compile them to YAML.

The adapter takes a pipeline as a ``PipelineDef`` handed over by its caller (the CLI looks it up
in ``pipelines.PIPELINES``); nothing in ``dermml`` imports ``pipelines/``, the layer above it.
"""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dermml.config import ConfigError, dermml_home
from dermml.orchestration.k8s import PlatformConfig, load_platform, using_platform


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


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "overrides=[a=1]"]`` -> values parsed as YAML."""
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected key=value")
        params[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return params


def check_params(pipeline: PipelineDef, params: dict[str, Any]) -> None:
    """Refuse parameters the pipeline does not have, naming the ones it has."""
    signature = inspect.signature(pipeline.function)
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ConfigError(f"pipeline {pipeline.name!r} has no parameter(s) {unknown}; "
                          f"parameters: {', '.join(signature.parameters)}")


def local_environment() -> None:
    """Make component subprocesses see this venv's tools and the same DERMML_HOME / MLflow."""
    bin_dir = str(Path(sys.executable).parent)
    if not os.environ.get("PATH", "").startswith(bin_dir):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    os.environ["DERMML_HOME"] = str(dermml_home())


class PipelineFailed(RuntimeError):
    """A local pipeline run failed; the message names the stage (its log is printed above)."""


def _failure_message(name: str, kfp_message: str) -> str:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", kfp_message)  # kfp colours its messages
    stage = re.search(r"Inner task failed: '([^']+)'", plain)
    if stage is None:
        return f"pipeline {name} failed: {plain}"
    return (f"pipeline {name} failed at stage {stage.group(1)!r}; its error is in the log "
            "above, and the pipeline's MLflow run is marked FAILED")


def run_local(pipeline: PipelineDef, params: dict[str, Any]) -> dict[str, Any]:
    """Execute ``pipeline`` locally; every component runs as a subprocess here."""
    import kfp.local

    check_params(pipeline, params)
    local_environment()
    kfp.local.init(runner=kfp.local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(dermml_home() / "kfp"), raise_on_error=True)
    # Cluster placement and env (MLflow URI, secrets) must not leak into local runs.
    with warnings.catch_warnings(), using_platform(PlatformConfig()):
        # kfp warns that base_image is not used locally: expected, components run in this venv.
        warnings.filterwarnings("ignore", message=".*custom or non-Python base image.*")
        # ... and that CPU/memory requests are ignored locally: they are for the cluster.
        warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
        try:
            task = pipeline.build()(**params)  # built inside the local platform
        except RuntimeError as exc:
            raise PipelineFailed(_failure_message(pipeline.name, str(exc))) from None
    outputs = getattr(task, "outputs", None) or {}
    return dict(outputs) if isinstance(outputs, dict) else {"output": outputs}


def compile_pipeline(pipeline: PipelineDef, out: str, platform: str | None = None) -> str:
    """Write the IR YAML with the platform config's placement (default: the shipped one)."""
    from kfp import compiler

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with using_platform(load_platform(platform)):
        compiler.Compiler().compile(pipeline.build(), out)
    return out
