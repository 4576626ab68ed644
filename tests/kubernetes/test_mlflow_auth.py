"""MLflow's basic-auth app with DermML's roles, against a real ``mlflow server --app-name
basic-auth`` (SQLite backend and auth store, the chart's auth config shape, metrics exposed).

The bootstrap (``python -m dermml.orchestration.mlflow_auth``, the chart's auth Job) creates the
pipeline and reader identities and their roles; then only the pipeline identity (and the admin)
can move a registered model's aliases, a reader can resolve and download what they point at,
and a user without a role sees nothing. DermML's own registry code (``dermml.registry.gate``)
runs with ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD`` set.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import BIN, free_port, stop, wait_http

ROOT = Path(__file__).resolve().parents[2]
ADMIN = ("admin", "admin-password-0123")
PIPELINE = ("dermml-pipeline", "pipeline-password-0123")
READER = ("dermml-serving", "reader-password-0123")
PERSON = ("alice", "alice-password-0123")  # a person an admin created; gets the reader role
NOBODY = ("mallory", "mallory-password-0123")  # authenticated, no role
MODEL = "dermml-segmentation"
BOOTSTRAP = [sys.executable, "-m", "dermml.orchestration.mlflow_auth"]


def auth_ini(path: Path, database: Path) -> Path:
    """The basic_auth.ini the chart mounts from its Secret: no admin password in it (that comes
    from MLFLOW_AUTH_ADMIN_PASSWORD), users without a role get nothing. The credential cache
    only saves this 2-core machine a PBKDF2 hash (~0.5 s) per request; with one worker a changed
    password is seen at once."""
    path.write_text(
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{database}\n"
        f"admin_username = {ADMIN[0]}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 60\n")
    return path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    """``mlflow server --app-name basic-auth --expose-prometheus DIR``, credentials and the auth
    config from the environment as in the chart's Deployment; yields (url, metrics dir)."""
    root = tmp_path_factory.mktemp("mlflow-auth")
    metrics = root / "prometheus"
    metrics.mkdir()
    port = free_port()
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
               MLFLOW_AUTH_CONFIG_PATH=str(auth_ini(root / "basic_auth.ini", root / "auth.db")),
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0], MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
               MLFLOW_FLASK_SERVER_SECRET_KEY="test-secret-key-0123",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    cmd = [str(BIN / "mlflow"), "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
           "--port", str(port), "--workers", "1",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts",
           "--expose-prometheus", str(metrics)]
    log = open(root / "server.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/health", process, timeout=180)
        yield url, metrics
    finally:
        stop(process)
        log.close()


def bootstrap_env(url: str, **override: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env.update(MLFLOW_TRACKING_URI=url,
               MLFLOW_AUTH_ADMIN_USERNAME=ADMIN[0], MLFLOW_AUTH_ADMIN_PASSWORD=ADMIN[1],
               DERMML_MLFLOW_PIPELINE_USERNAME=PIPELINE[0],
               DERMML_MLFLOW_PIPELINE_PASSWORD=PIPELINE[1],
               DERMML_MLFLOW_READER_USERNAME=READER[0], DERMML_MLFLOW_READER_PASSWORD=READER[1])
    env.update(override)
    return env


def run_bootstrap(url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``python -m dermml.orchestration.mlflow_auth`` as the chart's Job runs it."""
    return subprocess.run([*BOOTSTRAP, *args], env=bootstrap_env(url, **env), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def bootstrap_here(capsys, url: str, *args: str, **env: str) -> tuple[int, str, str]:
    """The same, in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from dermml.orchestration.mlflow_auth import main

    capsys.readouterr()
    code = main(list(args), env=bootstrap_env(url, **env))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def bootstrapped(auth_server):
    """The server after the chart's Job ran, plus two people an admin created in the UI."""
    url, _ = auth_server
    admin = requests.Session()
    admin.auth = ADMIN
    for user in (PERSON, NOBODY):
        response = admin.post(f"{url}/api/2.0/mlflow/users/create",
                              json={"username": user[0], "password": user[1]}, timeout=30)
        assert response.status_code == 200, response.text
    done = run_bootstrap(url, "--model", MODEL, "--reader", PERSON[0], "--reader", "bob")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "created role dermml-pipeline" in done.stdout
    assert "created registered model dermml-segmentation" in done.stdout
    assert "reader bob does not exist" in done.stderr  # warned, not failed
    return url


def login(monkeypatch, url: str, user: tuple[str, str]) -> None:
    """Be ``user`` for the mlflow client, the way pods are: the two env vars."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", user[1])


def set_alias(url: str, user: tuple[str, str], alias: str, version: str) -> requests.Response:
    """SetRegisteredModelAlias over REST as ``user``."""
    return requests.post(f"{url}/api/2.0/mlflow/registered-models/alias", auth=user, timeout=30,
                         json={"name": MODEL, "alias": alias, "version": version})


def log_tiny_model(tag: str) -> str:
    """A pyfunc model logged in a run of the segmentation experiment; its models:/ URI."""
    import mlflow

    class Identity(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    from dermml.orchestration import tracking

    tracking.configure()
    mlflow.set_experiment(tracking.experiment_name("segmentation"))
    with mlflow.start_run(run_name=f"auth-test-{tag}"):
        mlflow.log_metric("epoch_seconds", 1.0)
        info = mlflow.pyfunc.log_model(name="model", python_model=Identity(),
                                       pip_requirements=["mlflow"])
    return info.model_uri


def test_only_the_pipeline_identity_moves_aliases_readers_read(bootstrapped, monkeypatch,
                                                               tmp_path):
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dermml.registry import gate

    url = bootstrapped
    # The pipeline identity trains, registers (gate.register sets `challenger`) and promotes.
    login(monkeypatch, url, PIPELINE)
    version = gate.register(log_tiny_model("pipeline"), "segmentation")
    assert set_alias(url, PIPELINE, "champion", version).status_code == 200
    assert [h["aliases"] for h in gate.history("segmentation")] == [["challenger", "champion"]]

    # A reader (the model servers' identity, or a person with the role) cannot move an alias:
    # 403 over REST and through DermML's client code.
    for user in (READER, PERSON, NOBODY):
        response = set_alias(url, user, "champion", version)
        assert response.status_code == 403, (user[0], response.status_code, response.text)
    login(monkeypatch, url, READER)
    with pytest.raises(MlflowException, match="403|Permission denied|PERMISSION_DENIED"):
        MlflowClient(url, url).set_registered_model_alias(MODEL, "champion", version)
    with pytest.raises(MlflowException, match="403|Permission denied|PERMISSION_DENIED"):
        gate.register(f"models:/{MODEL}/{version}", "segmentation")  # no new versions either
    # ... but resolves the alias and downloads the model, as `mlflow models serve` does.
    assert gate.parse_model_uri(gate.champion_uri("segmentation")) == (MODEL, version)
    local = mlflow.artifacts.download_artifacts(gate.champion_uri("segmentation"),
                                                dst_path=str(tmp_path / "served"))
    assert (Path(local) / "MLmodel").is_file()

    # Without a role (default_permission = NO_PERMISSIONS) nothing of DermML is readable.
    response = requests.get(f"{url}/api/2.0/mlflow/registered-models/get", auth=NOBODY,
                            params={"name": MODEL}, timeout=30)
    assert response.status_code == 403
    # Wrong or missing credentials are not a user at all.
    assert requests.get(f"{url}/api/2.0/mlflow/registered-models/get", params={"name": MODEL},
                        timeout=30).status_code == 401
    assert set_alias(url, (PIPELINE[0], "wrong-password-0123"), "champion",
                     version).status_code == 401
    # The admin still can (break-glass).
    assert set_alias(url, ADMIN, "previous", version).status_code == 200


def test_the_bootstrap_converges_and_applies_a_rotated_password(bootstrapped, capsys):
    url = bootstrapped
    code, out, err = bootstrap_here(capsys, url, "--model", MODEL, "--reader", PERSON[0])
    assert code == 0, err
    assert "(0 changes)" in out, out

    rotated = "pipeline-password-rotated-0123"
    code, out, err = bootstrap_here(capsys, url, "--model", MODEL,
                                    DERMML_MLFLOW_PIPELINE_PASSWORD=rotated)
    assert code == 0, err
    assert f"set the password of {PIPELINE[0]}" in out
    current = f"{url}/api/2.0/mlflow/users/current"
    assert requests.get(current, auth=(PIPELINE[0], rotated), timeout=30).status_code == 200
    assert requests.get(current, auth=PIPELINE, timeout=30).status_code == 401
    assert bootstrap_here(capsys, url, "--model", MODEL)[0] == 0  # and back

    # A permission edited by hand is put back; one added by hand is removed.
    admin = requests.Session()
    admin.auth = ADMIN
    roles = admin.get(f"{url}/api/3.0/mlflow/roles/list", params={"workspace": "default"},
                      timeout=30).json()["roles"]
    reader_role = next(r for r in roles if r["name"] == "dermml-reader")
    added = admin.post(f"{url}/api/3.0/mlflow/roles/permissions/add", timeout=30, json={
        "role_id": reader_role["id"], "resource_type": "registered_model",
        "resource_pattern": MODEL, "permission": "MANAGE"})
    assert added.status_code == 200, added.text
    assert set_alias(url, READER, "champion", "1").status_code == 200  # the hand-made hole
    code, out, _ = bootstrap_here(capsys, url, "--model", MODEL)
    assert code == 0
    assert "role dermml-reader: removed MANAGE on registered_model dermml-segmentation" in out
    assert set_alias(url, READER, "champion", "1").status_code == 403


def test_the_bootstrap_needs_its_credentials_from_the_environment(capsys):
    url = "http://127.0.0.1:9"  # never reached: the checks come first
    code, _, err = bootstrap_here(capsys, url, MLFLOW_AUTH_ADMIN_PASSWORD="")
    assert code == 2 and "MLFLOW_AUTH_ADMIN_PASSWORD" in err
    code, _, err = bootstrap_here(capsys, url, DERMML_MLFLOW_READER_PASSWORD="")
    assert code == 2 and "one is empty" in err
    code, _, err = bootstrap_here(capsys, "not-a-url", "--no-models")
    assert code == 2 and "http(s) URL" in err
    code, _, err = bootstrap_here(capsys, url, "--no-models",
                                  DERMML_MLFLOW_READER_USERNAME=PIPELINE[0])
    assert code == 2 and "must be different users" in err
    # There is no option that takes a password.
    from dermml.orchestration.mlflow_auth import main

    with pytest.raises(SystemExit):
        main(["--help"], env={})
    usage = capsys.readouterr().out
    assert "--password" not in usage and "MLFLOW_AUTH_ADMIN_PASSWORD" in usage


def test_the_default_models_are_every_tasks_registered_model():
    from dermml.orchestration.mlflow_auth import default_models
    from dermml.registry.gate import model_name
    from dermml.tasks import task_names

    assert default_models() == [model_name(t) for t in task_names()]
    assert "dermml-segmentation" in default_models()


def test_metrics_are_served_without_credentials_by_the_sidecar(bootstrapped, auth_server):
    """The server's /metrics needs an admin once auth is on; the chart's sidecar serves the
    same multiprocess files on its own port with no credentials."""
    from dermml.orchestration.mlflow_metrics import serve

    url, metrics_dir = auth_server
    assert requests.get(f"{url}/metrics", timeout=30).status_code == 401
    assert requests.get(f"{url}/metrics", auth=READER, timeout=30).status_code == 403
    assert set_alias(url, READER, "champion", "1").status_code == 403  # one to count
    port = free_port()
    server, thread = serve(metrics_dir, port, host="127.0.0.1")
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    finally:
        server.shutdown()
        thread.join(timeout=10)
    # Request counts and latencies by status.
    assert 'mlflow_http_request_total{method="POST",status="403"}' in text
    assert "mlflow_http_request_duration_seconds_bucket" in text
    with pytest.raises(FileNotFoundError, match="--expose-prometheus"):
        serve(metrics_dir / "missing", free_port())
