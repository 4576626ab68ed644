"""KFP adapter: run pipelines with ``kfp.local`` (SubprocessRunner) and compile them to YAML."""

from __future__ import annotations

import inspect
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml

from dermml.config import ConfigError, dermml_home
from dermml.orchestration.k8s import PlatformConfig, load_platform, using_platform


def get_pipeline(name: str):
    """Build pipeline ``name`` under the platform config in force."""
    from pipelines import PIPELINES

    if name not in PIPELINES:
        raise KeyError(f"unknown pipeline {name!r}; known pipelines: {', '.join(PIPELINES)}")
    return PIPELINES[name]()


def parse_params(items: list[str]) -> dict[str, Any]:
    """``["epochs=3", "overrides=[a=1]"]`` -> values parsed as YAML."""
    params = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--param {item!r}: expected key=value")
        params[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    return params


def _check_params(name: str, params: dict[str, Any]) -> None:
    from pipelines import SIGNATURES

    if name not in SIGNATURES:
        raise KeyError(f"unknown pipeline {name!r}; known pipelines: {', '.join(SIGNATURES)}")
    signature = inspect.signature(SIGNATURES[name])
    unknown = sorted(set(params) - set(signature.parameters))
    if unknown:
        raise ConfigError(f"pipeline {name!r} has no parameter(s) {unknown}; parameters: "
                          f"{', '.join(signature.parameters)}")


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


def run_local(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Execute pipeline ``name`` locally; every component runs as a subprocess here."""
    import kfp.local

    _check_params(name, params)
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
            task = get_pipeline(name)(**params)  # built inside the local platform
        except RuntimeError as exc:
            raise PipelineFailed(_failure_message(name, str(exc))) from None
    outputs = getattr(task, "outputs", None) or {}
    return dict(outputs) if isinstance(outputs, dict) else {"output": outputs}


def compile_pipeline(name: str, out: str, platform: str | None = None) -> str:
    """Write the IR YAML with the platform config's placement (default: the shipped one)."""
    from kfp import compiler

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with using_platform(load_platform(platform)):
        compiler.Compiler().compile(get_pipeline(name), out)
    return out
