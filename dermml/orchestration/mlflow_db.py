"""``mlflow db upgrade`` with the database URI taken from the environment, never from argv.

``mlflow db upgrade URL`` accepts the URI only as an argument. The Helm chart's migration Job
used to pass it as ``$(MLFLOW_BACKEND_STORE_URI)``, which Kubernetes expands into the process's
command line: the DB password was then readable in ``/proc/<pid>/cmdline``, ``ps`` and the
kubelet's view of the container. This runs MLflow's own command in-process with the URI read
from ``$MLFLOW_BACKEND_STORE_URI`` (the Secret-backed env var of the Job):

    python -m dermml.orchestration.mlflow_db
"""

from __future__ import annotations

import os
import sys

URI_ENV = "MLFLOW_BACKEND_STORE_URI"


def main() -> int:
    uri = os.environ.get(URI_ENV, "").strip()
    if not uri:
        print(f"error: {URI_ENV} is not set: it must hold the MLflow backend store URI "
              "(from its Secret)", file=sys.stderr)
        return 2
    from mlflow.db import upgrade

    # Same code path as `mlflow db upgrade URL` (creates the tables of an empty database,
    # migrates an existing one); the URI stays inside this process.
    upgrade.main([uri], prog_name="mlflow db upgrade", standalone_mode=False)
    print("MLflow database schema is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
