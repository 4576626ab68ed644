"""Serve the MLflow server's Prometheus metrics on their own port, without MLflow credentials.

``mlflow server --expose-prometheus DIR`` has every worker write its metrics (request counts
and latencies by endpoint and status, ``mlflow_http_request_*``) to files in DIR and serves
them at ``/metrics`` of the tracking port. With the basic-auth app on, that path is protected
like any other: a scraper would need MLflow credentials, and only an admin may read it (the
auth app denies routes without a permission rule). The chart therefore runs this next to the
server, as a sidecar sharing DIR (an emptyDir), and Prometheus scrapes this port instead; the
NetworkPolicy admits only the monitoring namespace to it::

    python -m dermml.orchestration.mlflow_metrics --dir /prometheus --port 9102

It reads the files the way the server's own endpoint does (``prometheus_client``'s
multiprocess collector), and never imports MLflow.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path


def registry_for(directory: str | Path):
    """A registry that aggregates the metric files of every worker in ``directory``."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def serve(directory: str | Path, port: int, host: str = "0.0.0.0"):
    """Start serving ``/metrics`` in a background thread; returns (server, thread)."""
    from prometheus_client import start_http_server

    if not Path(directory).is_dir():
        raise FileNotFoundError(f"{directory} is not a directory: it must be the server's "
                                "--expose-prometheus folder")
    return start_http_server(port, addr=host, registry=registry_for(directory))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dermml.orchestration.mlflow_metrics",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="the server's --expose-prometheus folder")
    parser.add_argument("--port", type=int, default=9102)
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args(argv)
    try:
        server, _thread = serve(args.dir, args.port, args.host)
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    print(f"serving the metrics of {args.dir} on {args.host}:{args.port}/metrics", flush=True)
    stop.wait()
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
