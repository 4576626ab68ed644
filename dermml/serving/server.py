"""Start ``mlflow models serve`` for a registered model and talk to it over HTTP."""

from __future__ import annotations

import os
import socket
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
    # The registry is the tracking server's (as everywhere in DermML): an MLFLOW_REGISTRY_URI
    # left in this environment must not send models:/ lookups to another store.
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking.tracking_uri()
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


class ServerFailed(RuntimeError):
    """The model server exited before it answered; the message ends with its log's tail."""


def log_tail(log_file: str | None, lines: int = 25) -> str:
    if not log_file or not Path(log_file).exists():
        return ""
    text = Path(log_file).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 180,
               log_file: str | None = None) -> None:
    """Block until ``url/ping`` answers 200; raise if the server died (with the tail of
    ``log_file``) or never answered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_tail(log_file)
            where = f" (log: {log_file})" if log_file else ""
            raise ServerFailed(f"model server exited with code {process.returncode}{where}"
                               + (f"; its last lines:\n{tail}" if tail else ""))
        try:
            if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise TimeoutError(f"model server at {url} not ready after {timeout:.0f}s")


def pick_port(preferred: int | None = None, host: str = "127.0.0.1") -> int:
    """``preferred`` when nothing listens there, else a free port from the OS."""
    if preferred:
        with socket.socket() as s:
            if s.connect_ex((host, preferred)) != 0:
                return preferred
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_model(model_uri: str, log_file: str, port: int | None = None,
                host: str = "127.0.0.1", attempts: int = 3,
                timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """Start the model server and wait until it answers; returns ``(process, url)``.

    A port is only free until someone binds it (Ray workers, other servers on a busy machine
    take ports at random), so a server that exits because its port was taken in between is
    started again on another port; any other failure raises with the tail of ``log_file``."""
    for attempt in range(attempts):
        chosen = pick_port(port if attempt == 0 else None, host)
        url = f"http://{host}:{chosen}"
        start = Path(log_file).stat().st_size if Path(log_file).exists() else 0
        process = start_server(model_uri, chosen, host, log_file=log_file)
        try:
            wait_ready(url, process, timeout, log_file)
            return process, url
        except ServerFailed:
            with open(log_file, "rb") as handle:
                handle.seek(start)
                log = handle.read().decode(errors="replace")
            if "address already in use" not in log.lower() or attempt == attempts - 1:
                raise
        except BaseException:
            stop_server(process)
            raise
    raise AssertionError("unreachable")


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
