"""Shared fixtures: isolated DERMML_HOME, tiny demo data, and real servers (mlflow, moto S3)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {url} exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code < 500:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(autouse=True)
def dermml_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own embedded MLflow store and Ray results folder."""
    home = tmp_path / "dermml-home"
    monkeypatch.setenv("DERMML_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    return home


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> str:
    """90 procedural samples at 32 px (train/val/test), shared read-only by the session."""
    from dermml.data.demo import generate_demo

    return generate_demo(str(tmp_path_factory.mktemp("demo") / "data"), n=90, size=32, seed=0)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` (SQLite backend, proxied artifacts) on a free port."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    log = open(root / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process)
        yield url
    finally:
        stop(process)
        log.close()


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory):
    """A real S3 endpoint (moto server) with bucket ``dermml``; credentials are dummies."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION", "DERMML_S3_ENDPOINT")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", DERMML_S3_ENDPOINT=url)
    try:
        wait_http(url, process)
        import boto3

        boto3.client("s3", endpoint_url=url).create_bucket(Bucket="dermml")
        yield url
    finally:
        stop(process)
        log.close()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture()
def tracking_server(mlflow_server, monkeypatch) -> str:
    """Point this test's MLflow client at the real server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


def tiny_overrides(manifest: str, epochs: int = 2, ray: bool = False) -> list[str]:
    """Config overrides for a seconds-long training run on the 32 px demo data."""
    return [f"data.manifest={manifest}", "data.image_size=32", "data.batch_size=8",
            "model.base_channels=8", "model.depth=2", f"train.epochs={epochs}",
            "train.lr=0.01", f"ray.enabled={str(ray).lower()}"]
