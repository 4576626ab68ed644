"""Start a model server for a logged or registered model and talk to it over HTTP.

Two protocols serve the same pyfunc (``dermml.serving.pyfunc.DermmlModel``):

- ``mlflow``: ``mlflow models serve``, ``POST /invocations`` with ``dataframe_split`` + ``params``;
- ``v2``: MLServer with its MLflow runtime, the Open Inference Protocol (KServe V2),
  ``POST /v2/models/NAME/infer`` with ``inputs`` (one per column) + ``parameters``.

A ``models:/NAME@ALIAS`` URI is resolved through the registry once, before the server starts,
and the server loads ``models:/NAME/VERSION``: the identity it reports (``model_name`` and
``model_version``: columns of every row on ``mlflow``, the response's fields on ``v2``) is the
version it serves, even if the alias moves while it starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from dermml.orchestration import tracking
from dermml.serving.client import PROTOCOLS, predict_http  # noqa: F401 (its old home)
from dermml.serving.pyfunc import MODEL_NAME_ENV, MODEL_VERSION_ENV

V2_RUNTIME = "dermml.serving.mlserver_runtime.DermmlMLflowRuntime"
"""MLServer's ``mlserver_mlflow.MLflowRuntime``, refused V2 requests mapped to HTTP 400."""
UNREGISTERED_NAME = "model"
"""The V2 model name of a model served from a run or a path (no registered name)."""


@dataclass(frozen=True)
class ServedModel:
    """What a server loads (``uri``) and the registered identity it reports, if any."""

    uri: str
    name: str | None = None
    version: str | None = None

    @property
    def v2_name(self) -> str:
        return self.name or UNREGISTERED_NAME


def resolve_model(model_uri: str) -> ServedModel:
    """``models:/NAME@ALIAS`` (or ``/latest``) -> ``models:/NAME/VERSION`` and its identity;
    a ``runs:/`` URI, a logged model (``models:/m-<id>``) or a path is served as it is."""
    from mlflow.tracking import MlflowClient

    from dermml.registry.gate import parse_model_uri

    parsed = parse_model_uri(model_uri)
    if parsed is None:
        return ServedModel(model_uri)
    name, version = parsed
    if str(version) == "latest":
        uri = tracking.configure()
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        versions = client.search_model_versions(f"name = '{name}'")
        if not versions:
            raise ValueError(f"{model_uri}: the registered model {name!r} has no versions")
        version = max(int(v.version) for v in versions)
    return ServedModel(f"models:/{name}/{version}", name, str(version))


def serve_env(served: ServedModel | None = None) -> dict[str, str]:
    """Environment for the server: the venv's bin first on PATH (it spawns ``uvicorn``), and
    the served model's registered identity (none for an unregistered model)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # The registry is the tracking server's (as everywhere in DermML): an MLFLOW_REGISTRY_URI
    # left in this environment must not send models:/ lookups to another store.
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = tracking.tracking_uri()
    env.pop(MODEL_NAME_ENV, None)
    env.pop(MODEL_VERSION_ENV, None)
    if served is not None and served.name and served.version:
        env[MODEL_NAME_ENV], env[MODEL_VERSION_ENV] = served.name, served.version
    return env


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1",
                  workers: int = 1) -> list[str]:
    return [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", host, "--port", str(port),
            "--workers", str(workers)]


def mlserver_command(folder: str | Path) -> list[str]:
    return [str(Path(sys.executable).parent / "mlserver"), "start", str(folder)]


def fetch_model(served: ServedModel, folder: str | Path) -> str:
    """The model's files on local disk for MLServer (``parameters.uri``): a local folder as
    it is, anything else downloaded (from the registry or the run) into ``folder/model``."""
    local = Path(served.uri.removeprefix("file://"))
    if "://" not in served.uri.removeprefix("file://") and (local / "MLmodel").exists():
        return str(local.resolve())
    import mlflow

    tracking.configure()
    target = Path(folder, "model")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    return mlflow.artifacts.download_artifacts(artifact_uri=served.uri, dst_path=str(target))


def write_mlserver_settings(folder: str | Path, served: ServedModel, model_path: str,
                            ports: tuple[int, int, int], host: str = "127.0.0.1",
                            workers: int = 1) -> None:
    """``settings.json`` (ports: HTTP, gRPC, metrics) and ``model-settings.json`` for
    ``mlserver start folder``. gRPC cannot be switched off in MLServer 1.7, so it gets a port
    of its own, as the Prometheus metrics do; ``workers`` are MLServer's parallel inference
    processes (0: inference in the server's event loop)."""
    folder = Path(folder)
    http_port, grpc_port, metrics_port = ports
    settings = {"host": host, "http_port": http_port, "grpc_port": grpc_port,
                "metrics_port": metrics_port, "parallel_workers": workers, "debug": False,
                "metrics_dir": str(folder / ".metrics"),
                "environments_dir": str(folder / ".envs")}
    parameters = {"uri": model_path}
    if served.version:
        parameters["version"] = served.version
    model = {"name": served.v2_name, "implementation": V2_RUNTIME, "parameters": parameters}
    (folder / "settings.json").write_text(json.dumps(settings, indent=2))
    (folder / "model-settings.json").write_text(json.dumps(model, indent=2))


@dataclass(frozen=True)
class Launch:
    """One server start: its command, environment and folder, where it answers and how to
    tell that it is ready (or failed)."""

    command: list[str]
    env: dict[str, str]
    url: str
    ready_path: str = "/ping"
    cwd: str | None = None
    fail_on: tuple[str, ...] = ()
    bound_line: str | None = None


def prepare(model_uri: str, protocol: str, workdir: str | Path | None = None
            ) -> tuple[ServedModel, str | None, str | None]:
    """Resolve ``model_uri`` and, for ``v2``, fetch the model into ``workdir`` (default
    ``$DERMML_HOME/serving/NAME-VERSION``); returns the served model, the workdir and the
    model's local path (both None for ``mlflow``, which loads the URI itself)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}")
    served = resolve_model(model_uri)
    if protocol != "v2":
        return served, None, None
    if workdir is None:
        from dermml.config import dermml_home

        workdir = dermml_home() / "serving" / (
            f"{served.name}-{served.version}" if served.version
            else f"{UNREGISTERED_NAME}-{os.getpid()}")
    Path(workdir).mkdir(parents=True, exist_ok=True)
    return served, str(workdir), fetch_model(served, workdir)


def launch(served: ServedModel, protocol: str, port: int, host: str = "127.0.0.1",
           workers: int = 1, workdir: str | Path | None = None,
           model_path: str | None = None) -> Launch:
    """The start of ``served`` on ``port`` over ``protocol`` (for ``v2``: writes MLServer's
    settings into ``workdir``, gRPC and metrics on free ports of their own)."""
    url = f"http://{host}:{port}"
    if protocol == "v2":
        assert workdir is not None and model_path is not None, "prepare() the model first"
        write_mlserver_settings(workdir, served, model_path,
                                (port, *free_ports(2, host, avoid=(port,))), host, workers)
        # No identity variables: the V2 response carries MLServer's model_name/version.
        return Launch(mlserver_command(workdir), serve_env(None), url,
                      f"/v2/models/{served.v2_name}/ready", str(workdir), BIND_FAILURES,
                      f"Uvicorn running on {url}")
    return Launch(serve_command(served.uri, port, host, workers), serve_env(served), url)


def start_server(model_uri: str, port: int, host: str = "127.0.0.1",
                 log_file: str | None = None, spec: Launch | None = None) -> subprocess.Popen:
    """Start ``spec`` (default: ``mlflow models serve`` of ``model_uri``) in a session of its
    own, its output into ``log_file``."""
    spec = spec or launch(ServedModel(model_uri), "mlflow", port, host)
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(spec.command, env=spec.env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, cwd=spec.cwd)


class ServerFailed(RuntimeError):
    """The model server could not start: it exited, or (MLServer) could not bind a port, before
    it answered; the message ends with its log's tail."""


def log_tail(log_file: str | None, lines: int = 25) -> str:
    if not log_file or not Path(log_file).exists():
        return ""
    text = Path(log_file).read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _log_since(log_file: str | None, offset: int) -> str:
    if not log_file or not Path(log_file).exists():
        return ""
    with open(log_file, "rb") as handle:
        handle.seek(offset)
        return handle.read().decode(errors="replace")


BIND_FAILURES = ("address already in use", "failed to bind to address")
"""What a server's log says when a port it was given is taken (uvicorn; gRPC for MLServer)."""


def wait_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 180,
               log_file: str | None = None, path: str = "/ping", log_start: int = 0,
               fail_on: tuple[str, ...] = (), bound_line: str | None = None) -> None:
    """Block until ``url + path`` answers 200; raise if the server died (with the tail of
    ``log_file``) or never answered.

    MLServer does not exit when one of its ports is taken (the other servers keep running), so
    for it ``fail_on`` names log lines (since ``log_start``) that end the wait as a failure, and
    ``bound_line`` one that must be in its log before an answer counts (else the answer could
    come from whoever holds the port)."""
    deadline = time.monotonic() + timeout
    where = f" (log: {log_file})" if log_file else ""
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_tail(log_file)
            raise ServerFailed(f"model server exited with code {process.returncode}{where}"
                               + (f"; its last lines:\n{tail}" if tail else ""))
        log = _log_since(log_file, log_start).lower() if fail_on or bound_line else ""
        failure = next((line for line in fail_on if line in log), None)
        if failure:
            raise ServerFailed(f"model server failed to start: {failure!r} in its log{where}; "
                               f"its last lines:\n{log_tail(log_file)}")
        try:
            answered = requests.get(f"{url}{path}", timeout=2).status_code == 200
        except requests.RequestException:
            answered = False
        if answered and (bound_line is None or bound_line.lower() in log):
            return
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


def free_ports(count: int, host: str = "127.0.0.1", avoid: tuple[int, ...] = ()) -> list[int]:
    """``count`` distinct free ports from the OS (held together while picked), none in
    ``avoid``."""
    sockets: list[socket.socket] = []
    try:
        ports: list[int] = []
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind((host, 0))
            if s.getsockname()[1] not in avoid:
                ports.append(s.getsockname()[1])
        return ports
    finally:
        for s in sockets:
            s.close()


def serve_model(model_uri: str, log_file: str, port: int | None = None,
                host: str = "127.0.0.1", attempts: int = 3, timeout: float = 180,
                protocol: str = "mlflow", workers: int = 1,
                workdir: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start the model server and wait until it answers; returns ``(process, url)``.

    ``protocol``: ``mlflow`` (``mlflow models serve``) or ``v2`` (MLServer with ``workers``
    parallel inference processes; its settings and the downloaded model in ``workdir``,
    default: next to ``log_file``, ``serve.log`` -> ``serve.mlserver/``). A registry alias is
    resolved first (see the module's docstring). A port is only free until someone binds it
    (Ray workers, other servers on a busy machine take ports at random), so a server that
    fails because a port was taken in between is started again on other ports; any other
    failure raises with the tail of ``log_file``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}")
    if protocol == "v2" and workdir is None:
        workdir = str(Path(log_file).with_name(f"{Path(log_file).stem}.mlserver"))
    try:
        served, workdir, model_path = prepare(model_uri, protocol, workdir)
    except Exception as exc:  # the registry or the artifact store said no
        raise ServerFailed(f"cannot serve {model_uri}: {exc}") from exc
    for attempt in range(attempts):
        chosen = pick_port(port if attempt == 0 else None, host)
        spec = launch(served, protocol, chosen, host, workers, workdir, model_path)
        start = Path(log_file).stat().st_size if Path(log_file).exists() else 0
        process = start_server(served.uri, chosen, host, log_file, spec)
        try:
            wait_ready(spec.url, process, timeout, log_file, spec.ready_path, start,
                       spec.fail_on, spec.bound_line)
            return process, spec.url
        except ServerFailed:
            stop_server(process, timeout=5)
            log = _log_since(log_file, start).lower()
            if not any(line in log for line in BIND_FAILURES) or attempt == attempts - 1:
                raise
        except BaseException:
            stop_server(process)
            raise
    raise AssertionError("unreachable")


def stop_server(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop the server's whole process group: SIGTERM, SIGKILL after ``timeout`` seconds, and
    SIGKILL to what is left of the group once its leader is gone (MLServer's inference workers
    ignore SIGTERM; a server that never bound its ports does not stop on it)."""
    import signal

    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
