"""Start ``mlflow models serve`` for a registered model and talk to it over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from dermml.orchestration import tracking
from dermml.serving.pyfunc import request_frame


def serve_env() -> dict[str, str]:
    """Environment for the server: the venv's bin first on PATH (it spawns ``uvicorn``)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["MLFLOW_TRACKING_URI"] = tracking.tracking_uri()
    return env


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1",
                  workers: int = 1) -> list[str]:
    return [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers)]


def start_server(model_uri: str, port: int, host: str = "127.0.0.1",
                 log_file: str | None = None) -> subprocess.Popen:
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(serve_command(model_uri, port, host), env=serve_env(), stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 180) -> None:
    """Block until ``url/ping`` answers 200; raise if the server died or never answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"model server exited with code {process.returncode}")
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"model server at {url} not ready after {timeout:.0f}s")


def predict_http(url: str, images: list[np.ndarray], params: dict | None = None,
                 timeout: float = 120) -> pd.DataFrame:
    """POST images to ``url/invocations``; return the response rows."""
    frame = request_frame(images)
    body: dict = {"dataframe_split": frame.to_dict(orient="split")}
    body["dataframe_split"].pop("index", None)
    if params:
        body["params"] = params
    response = requests.post(f"{url}/invocations", json=body, timeout=timeout)
    if response.status_code != 200:
        raise RuntimeError(f"model server answered {response.status_code}: {response.text[:500]}")
    return pd.DataFrame(response.json()["predictions"])


def stop_server(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(process.pid, signal.SIGKILL)
