"""Users, roles and permissions of an MLflow server that runs its basic-auth app.

``mlflow server --app-name basic-auth`` creates only its admin user. This bootstrap, run as that
admin (the chart runs it as a Job after every install and upgrade), makes the server look like
this, and converges to it when run again:

- role ``dermml-pipeline`` (EDIT on every experiment and registered model): log runs and models,
  register versions, tag them and move registry aliases (``challenger``, ``champion``). Held by
  the pipelines' service identity: pipeline steps and the Ray pods they start.
- role ``dermml-reader`` (READ on every experiment and registered model): read runs, resolve
  ``models:/name@alias`` and download models. Held by the model servers' identity and by the
  users named with ``--reader`` (people created by an admin in the MLflow UI).
- the two service users, with the passwords of their Secrets (a rotated Secret is applied on
  the next run) and no admin flag;
- the registered models ``dermml-<task>`` of every task, created by the admin, so that nobody
  else can take a name first and own it.

Aliases are moved only by ``dermml-pipeline`` members and admins: setting one needs ``can_update``
on the registered model (EDIT), which READ lacks. What a user without a role may do depends on the
server's ``default_permission`` (basic_auth.ini): ``NO_PERMISSIONS`` (recommended, see
infra/README.md) lets them read nothing; any user can still create experiments and models of
their own (MLflow allows that without workspaces), never touch DermML's.

Credentials come from the environment only (Secret-backed env vars in the chart's Job), never
from the command line::

    MLFLOW_TRACKING_URI=http://dermml-mlflow.dermml.svc.cluster.local:5000 \\
    MLFLOW_AUTH_ADMIN_USERNAME=... MLFLOW_AUTH_ADMIN_PASSWORD=... \\
    DERMML_MLFLOW_PIPELINE_USERNAME=... DERMML_MLFLOW_PIPELINE_PASSWORD=... \\
    DERMML_MLFLOW_READER_USERNAME=... DERMML_MLFLOW_READER_PASSWORD=... \\
    python -m dermml.orchestration.mlflow_auth [--reader alice] [--model dermml-segmentation]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import requests

WORKSPACE = "default"
"""Roles live in a workspace; without MLflow workspaces everything is in ``default``."""
ADMIN_ENV = ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD")
PIPELINE_ENV = ("DERMML_MLFLOW_PIPELINE_USERNAME", "DERMML_MLFLOW_PIPELINE_PASSWORD")
READER_ENV = ("DERMML_MLFLOW_READER_USERNAME", "DERMML_MLFLOW_READER_PASSWORD")


@dataclass(frozen=True)
class Role:
    name: str
    description: str
    permissions: dict[tuple[str, str], str]
    """(resource type, pattern) -> permission."""


PIPELINE_ROLE = Role(
    "dermml-pipeline",
    "DermML pipelines and their Ray jobs: log runs and models, register versions, move aliases.",
    {("experiment", "*"): "EDIT", ("registered_model", "*"): "EDIT"})
READER_ROLE = Role(
    "dermml-reader",
    "Read DermML's runs and registered models (model servers, people).",
    {("experiment", "*"): "READ", ("registered_model", "*"): "READ"})
ROLES = (PIPELINE_ROLE, READER_ROLE)


@dataclass
class Report:
    """What a run changed, for the Job's log."""

    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def change(self, message: str) -> None:
        self.changes.append(message)
        print(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr)


class AuthAdmin:
    """MLflow's auth REST API as its admin (``mlflow.server.auth.client.AuthServiceClient``
    with explicit credentials instead of the process's ``MLFLOW_TRACKING_*``)."""

    def __init__(self, tracking_uri: str, username: str, password: str):
        from mlflow.server.auth.client import AuthServiceClient
        from mlflow.utils.rest_utils import MlflowHostCreds, http_request, verify_rest_response

        self.tracking_uri = tracking_uri.rstrip("/")
        self.creds = MlflowHostCreds(self.tracking_uri, username=username, password=password)
        creds = self.creds

        class _Client(AuthServiceClient):
            def _request(self, endpoint, method, *, expected_status: int = 200, **kwargs):
                response = http_request(creds, endpoint, method, **kwargs)
                response = verify_rest_response(response, endpoint,
                                                expected_status=expected_status)
                if response.status_code == 204 or not response.content:
                    return {}
                return response.json()

        self.client = _Client(self.tracking_uri)

    # -- users
    def user(self, username: str):
        from mlflow.exceptions import RestException

        try:
            return self.client.get_user(username)
        except RestException as error:
            if error.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise

    def ensure_user(self, username: str, password: str, report: Report) -> None:
        user = self.user(username)
        if user is None:
            self.client.create_user(username, password)
            report.change(f"created user {username}")
            return
        if not self._password_works(username, password):
            self.client.update_user_password(username, password)
            report.change(f"set the password of {username} to its Secret's")
        if user.is_admin:
            self.client.update_user_admin(username, False)
            report.change(f"removed the admin flag of {username}")

    def _password_works(self, username: str, password: str) -> bool:
        response = requests.get(f"{self.tracking_uri}/api/2.0/mlflow/users/current",
                                auth=(username, password), timeout=30)
        return response.status_code == 200

    # -- roles
    def ensure_role(self, role: Role, report: Report) -> int:
        existing = {r.name: r for r in self.client.list_roles(WORKSPACE)}
        if role.name in existing:
            role_id = existing[role.name].id
        else:
            role_id = self.client.create_role(WORKSPACE, role.name, role.description).id
            report.change(f"created role {role.name}")
        granted = {(p.resource_type, p.resource_pattern): p
                   for p in self.client.list_role_permissions(role_id)}
        for key, permission in role.permissions.items():
            current = granted.pop(key, None)
            if current is None:
                self.client.add_role_permission(role_id, *key, permission)
                report.change(f"role {role.name}: {permission} on {key[0]} {key[1]}")
            elif current.permission != permission:
                self.client.update_role_permission(current.id, permission)
                report.change(f"role {role.name}: {current.permission} -> {permission} on "
                              f"{key[0]} {key[1]}")
        for (kind, pattern), extra in granted.items():  # the role is ours: nothing else in it
            self.client.remove_role_permission(extra.id)
            report.change(f"role {role.name}: removed {extra.permission} on {kind} {pattern}")
        return role_id

    def set_roles(self, username: str, wanted: set[int], managed: set[int],
                  report: Report) -> None:
        """Give ``username`` the roles ``wanted`` and take away the other ``managed`` ones."""
        have = {r.id: r.name for r in self.client.list_user_roles(username)}
        for role_id in sorted(wanted - set(have)):
            self.client.assign_role(username, role_id)
            report.change(f"assigned role {role_id} to {username}")
        for role_id in sorted((managed - wanted) & set(have)):
            self.client.unassign_role(username, role_id)
            report.change(f"took role {have[role_id]} from {username}")

    # -- registered models
    def ensure_registered_model(self, name: str, report: Report) -> None:
        from mlflow.exceptions import MlflowException
        from mlflow.store.model_registry.rest_store import RestStore

        store = RestStore(lambda: self.creds)
        try:
            store.get_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            store.create_registered_model(
                name, description="DermML model; aliases are moved by the dermml-pipeline role.")
            report.change(f"created registered model {name}")


def wait_for_server(tracking_uri: str, timeout: float) -> None:
    """Wait for ``/health``: the chart's Job may start before the server is ready."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"MLflow at {tracking_uri} did not answer /health in {timeout:.0f}s")
        time.sleep(2)


def default_models() -> list[str]:
    from dermml.registry.gate import model_name
    from dermml.tasks import task_names

    return [model_name(task) for task in task_names()]


def credentials(names: tuple[str, str], env: dict[str, str]) -> tuple[str, str] | None:
    username, password = (env.get(n, "").strip() for n in names)
    if not username and not password:
        return None
    if not username or not password:
        raise ValueError(f"set both {names[0]} and {names[1]} (one is empty)")
    return username, password


def check_identities(admin: tuple[str, str], pipeline: tuple[str, str],
                     reader: tuple[str, str] | None) -> None:
    """The three identities are different users: a pipeline identity that is the admin (or a
    reader that is the pipeline) would defeat the roles."""
    names = [admin[0], pipeline[0]] + ([reader[0]] if reader else [])
    if len(set(names)) != len(names):
        raise ValueError("the admin, pipeline and reader identities must be different users "
                         f"(got {', '.join(names)})")


def bootstrap(tracking_uri: str, admin: tuple[str, str], pipeline: tuple[str, str],
              reader: tuple[str, str] | None = None, readers: Iterable[str] = (),
              models: Sequence[str] = ()) -> Report:
    """Converge the server to DermML's users, roles and registered models (see module doc)."""
    check_identities(admin, pipeline, reader)
    report = Report()
    api = AuthAdmin(tracking_uri, *admin)
    role_ids = {role.name: api.ensure_role(role, report) for role in ROLES}
    managed = set(role_ids.values())
    api.ensure_user(*pipeline, report)
    api.set_roles(pipeline[0], {role_ids[PIPELINE_ROLE.name]}, managed, report)
    if reader:
        api.ensure_user(*reader, report)
        api.set_roles(reader[0], {role_ids[READER_ROLE.name]}, managed, report)
    for username in readers:
        if api.user(username) is None:
            report.warn(f"reader {username} does not exist: an admin creates people's users "
                        "(MLflow UI or auth API), then run this again")
            continue
        api.set_roles(username, {role_ids[READER_ROLE.name]}, managed, report)
    for name in models:
        api.ensure_registered_model(name, report)
    return report


def main(argv: Sequence[str] | None = None, env: dict[str, str] | None = None) -> int:
    env = dict(os.environ if env is None else env)
    parser = argparse.ArgumentParser(
        prog="python -m dermml.orchestration.mlflow_auth",
        description="Create DermML's MLflow users, roles and permissions (idempotent). "
                    "Credentials come from the environment: " + ", ".join(
                        ADMIN_ENV + PIPELINE_ENV + READER_ENV) + ".")
    parser.add_argument("--tracking-uri", default=env.get("MLFLOW_TRACKING_URI", ""),
                        help="MLflow server (default: $MLFLOW_TRACKING_URI)")
    parser.add_argument("--reader", action="append", default=[], metavar="USER",
                        help="an existing user (a person) to give the reader role; repeatable")
    parser.add_argument("--model", action="append", default=None, metavar="NAME",
                        help="registered model to create if missing (default: dermml-<task> "
                             "of every task); repeatable")
    parser.add_argument("--no-models", action="store_true", help="create no registered model")
    parser.add_argument("--wait", type=float, default=300.0,
                        help="seconds to wait for the server's /health (default 300)")
    args = parser.parse_args(argv)
    if not args.tracking_uri.startswith(("http://", "https://")):
        print("error: --tracking-uri / $MLFLOW_TRACKING_URI must be the server's http(s) URL",
              file=sys.stderr)
        return 2
    try:
        admin = credentials(ADMIN_ENV, env)
        pipeline = credentials(PIPELINE_ENV, env)
        reader = credentials(READER_ENV, env)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if admin is None or pipeline is None:
        print(f"error: set {' and '.join(ADMIN_ENV)} (the server's admin) and "
              f"{' and '.join(PIPELINE_ENV)} (the pipelines' identity)", file=sys.stderr)
        return 2
    try:
        check_identities(admin, pipeline, reader)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = [] if args.no_models else (args.model or default_models())
    wait_for_server(args.tracking_uri, args.wait)
    report = bootstrap(args.tracking_uri, admin, pipeline, reader, args.reader, models)
    print(f"MLflow auth is up to date ({len(report.changes)} changes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
