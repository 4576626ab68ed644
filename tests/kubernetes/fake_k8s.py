"""A local fake of the Kubernetes API for RayJobs: it 'runs' a job by executing its entrypoint.

No cluster can run here; the real ``kubernetes`` client talks to this server through a
kubeconfig, and KubeRay's part (start a cluster, run the entrypoint, report jobStatus) is
played by a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROUTE = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/]+))?$")


class FakeKubeRay:
    def __init__(self, log_dir: Path):
        self.jobs: dict[str, dict] = {}
        self.processes: dict[str, subprocess.Popen] = {}
        self.log_dir = log_dir
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubeRay:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.kill()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return path

    def _start(self, name: str, job: dict) -> None:
        argv = shlex.split(job["spec"]["entrypoint"])
        argv[0] = str(Path(sys.executable).parent / argv[0])
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115
        self.processes[name] = subprocess.Popen(argv, env=dict(os.environ), stdout=log,
                                                stderr=subprocess.STDOUT)

    def status(self, name: str) -> dict:
        proc = self.processes[name]
        if proc.poll() is None:
            return {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"}
        if proc.returncode == 0:
            return {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
        return {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed",
                "message": f"entrypoint exited with {proc.returncode}"}

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # noqa: N802
                match = ROUTE.match(self.path.split("?")[0])
                if not match:
                    return self._send(404, {"kind": "Status", "code": 404})
                job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != "Bearer fake-token":
                    return self._send(401, {"kind": "Status", "code": 401})
                name = job["metadata"]["name"]
                fake.jobs[name] = job
                fake._start(name, job)
                return self._send(201, job)

            def do_GET(self):  # noqa: N802
                match = ROUTE.match(self.path.split("?")[0])
                if not match or match.group(2) not in fake.jobs:
                    return self._send(404, {"kind": "Status", "code": 404})
                name = match.group(2)
                return self._send(200, {**fake.jobs[name], "status": fake.status(name)})

        return Handler
