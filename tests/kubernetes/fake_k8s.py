"""A local fake of the Kubernetes API for RayJobs: it 'runs' a job by executing its entrypoint.

No cluster can run here; the real ``kubernetes`` client talks to this server through a
kubeconfig, and KubeRay's part is played here, as KubeRay v1.7.0's RayJob controller does it
in K8sJobMode:

- each attempt is a submitter pod (``<job>-<attempt>-<random>``, labelled
  ``batch.kubernetes.io/job-name: <job>`` like a Job's pods) whose container runs the entrypoint
  as a subprocess (env ``FAKE_RAYJOB_ATTEMPT``: 1, 2, ...); its output is the pod's log;
- a failed attempt with retries left (``status.failed < spec.backoffLimit + 1``) is reported as
  ``jobStatus: FAILED, jobDeploymentStatus: Retrying``; KubeRay then deletes the attempt's
  submitter pod and starts over (``Initializing``, then ``Running``);
- the end is ``Complete`` (``SUCCEEDED``) or ``Failed`` (``FAILED``, reason ``AppFailed``); a
  RayJob with neither ``rayClusterSpec`` nor ``clusterSelector`` is ``ValidationFailed``;
- DELETE removes the RayJob and kills its running attempt (the owned resources go with it);
- ``unavailable = n`` answers the next n RayJob GETs with 503 (an API server outage).

Every status a GET returned is kept in ``history`` for the tests.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROUTE = re.compile(r"^/apis/ray\.io/v1/namespaces/([^/]+)/rayjobs(?:/([^/]+))?$")
PODS = re.compile(r"^/api/v1/namespaces/([^/]+)/pods$")
POD_LOG = re.compile(r"^/api/v1/namespaces/([^/]+)/pods/([^/]+)/log$")
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"


@dataclass
class Attempt:
    pod: str
    uid: str
    log: Path
    process: subprocess.Popen
    created: str
    deleted: bool = False


@dataclass
class Job:
    manifest: dict
    attempts: list[Attempt] = field(default_factory=list)
    failed: int = 0
    state: str = "New"
    final: dict | None = None
    deleted: bool = False

    @property
    def backoff_limit(self) -> int:
        return int(self.manifest["spec"].get("backoffLimit", 0))


class FakeKubeRay:
    def __init__(self, log_dir: Path):
        self.jobs: dict[str, dict] = {}  # every RayJob ever created (name -> manifest)
        self.state: dict[str, Job] = {}
        self.history: dict[str, list[dict]] = {}
        self.deleted: list[str] = []
        self.unavailable = 0  # answer this many more RayJob GETs with 503
        self.log_dir = log_dir
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKubeRay:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for job in self.state.values():
            for attempt in job.attempts:
                if attempt.process.poll() is None:
                    attempt.process.kill()
                    attempt.process.wait()
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return path

    # ------------------------------------------------------------------ KubeRay's part
    def attempts(self, name: str) -> list[Attempt]:
        return self.state[name].attempts

    def running(self, name: str) -> bool:
        """Whether the job's current attempt has started and is still running."""
        with self.lock:
            job = self.state.get(name)
            return bool(job and job.attempts and job.attempts[-1].process.poll() is None)

    def _start(self, name: str, job: Job) -> None:
        number = len(job.attempts) + 1
        pod = f"{name}-{number}-{uuid.uuid4().hex[:5]}"
        argv = shlex.split(job.manifest["spec"]["entrypoint"])
        argv[0] = str(Path(sys.executable).parent / argv[0])
        log = self.log_dir / f"{pod}.log"
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, env={**os.environ,
                                                  "FAKE_RAYJOB_ATTEMPT": str(number),
                                                  "PYTHONUNBUFFERED": "1"},
                                       stdout=out, stderr=subprocess.STDOUT)
        created = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        job.attempts.append(Attempt(pod, str(uuid.uuid4()), log, process, created))

    def _create(self, manifest: dict) -> None:
        name = manifest["metadata"]["name"]
        job = Job(manifest)
        self.jobs[name], self.state[name], self.history[name] = manifest, job, []
        spec = manifest["spec"]
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            job.state = "ValidationFailed"
            job.final = {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed",
                         "message": "one of RayClusterTemplate or clusterSelector must be set"}
            return
        job.state = "Running"
        self._start(name, job)

    def status(self, name: str) -> dict:
        with self.lock:
            job = self.state[name]
            status = self._status(name, job)
            status.setdefault("failed", job.failed)
            status.setdefault("succeeded", 1 if status.get("jobStatus") == "SUCCEEDED" else 0)
            self.history[name].append(status)
            return status

    def _status(self, name: str, job: Job) -> dict:
        if job.final is not None:
            return dict(job.final)
        if job.state == "Retrying":  # KubeRay deletes the attempt's resources and starts over
            job.attempts[-1].deleted = True
            job.state = "Running"
            self._start(name, job)
            return {"jobDeploymentStatus": "Initializing"}
        attempt = job.attempts[-1]
        code = attempt.process.poll()
        if code is None:
            return {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running",
                    "rayClusterName": f"{name}-raycluster", "jobId": attempt.pod}
        if code == 0:
            job.final = {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}
            return dict(job.final)
        job.failed += 1
        failure = {"jobStatus": "FAILED", "reason": "AppFailed",
                   "message": f"entrypoint exited with {code}"}
        if job.failed < job.backoff_limit + 1:
            job.state = "Retrying"
            return {**failure, "jobDeploymentStatus": "Retrying"}
        job.final = {**failure, "jobDeploymentStatus": "Failed", "failed": job.failed}
        return dict(job.final)

    def _delete(self, name: str) -> None:
        with self.lock:
            job = self.state[name]
            job.deleted = True
            self.deleted.append(name)
            for attempt in job.attempts:
                attempt.deleted = True
                if attempt.process.poll() is None:
                    attempt.process.terminate()

    def _pods(self, namespace: str, selector: str) -> list[dict]:
        wanted = dict(part.split("=", 1) for part in selector.split(",") if "=" in part)
        pods = []
        with self.lock:
            for name, job in self.state.items():
                if job.deleted or job.manifest["metadata"]["namespace"] != namespace:
                    continue
                labels = {JOB_NAME_LABEL: name, "job-name": name}
                if any(labels.get(k) != v for k, v in wanted.items()):
                    continue
                for attempt in job.attempts:
                    if attempt.deleted:
                        continue
                    code = attempt.process.poll()
                    phase = "Running" if code is None else ("Succeeded" if code == 0
                                                            else "Failed")
                    pods.append({"metadata": {"name": attempt.pod, "namespace": namespace,
                                              "uid": attempt.uid, "labels": labels,
                                              "creationTimestamp": attempt.created},
                                 "status": {"phase": phase}})
        return pods

    def _attempt(self, namespace: str, pod: str) -> Attempt | None:
        with self.lock:
            for job in self.state.values():
                if job.manifest["metadata"]["namespace"] != namespace:
                    continue
                for attempt in job.attempts:
                    if attempt.pod == pod and not attempt.deleted:
                        return attempt
        return None

    # ------------------------------------------------------------------ HTTP
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

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") != "Bearer fake-token":
                    self._send(401, {"kind": "Status", "code": 401})
                    return False
                return True

            def do_POST(self):  # noqa: N802
                match = ROUTE.match(self.path.split("?")[0])
                if not match:
                    return self._send(404, {"kind": "Status", "code": 404})
                job = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorized():
                    return None
                name = job["metadata"]["name"]
                with fake.lock:
                    if name in fake.state and not fake.state[name].deleted:
                        return self._send(409, {"kind": "Status", "code": 409,
                                                "reason": "AlreadyExists"})
                    fake._create(job)
                return self._send(201, job)

            def do_DELETE(self):  # noqa: N802
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                match = ROUTE.match(self.path.split("?")[0])
                if not self._authorized():
                    return None
                if not match or match.group(2) not in fake.state or \
                        fake.state[match.group(2)].deleted:
                    return self._send(404, {"kind": "Status", "code": 404})
                fake._delete(match.group(2))
                return self._send(200, {"kind": "Status", "status": "Success"})

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if not self._authorized():
                    return None
                if match := PODS.match(url.path):
                    selector = query.get("labelSelector", [""])[0]
                    return self._send(200, {"kind": "PodList", "apiVersion": "v1",
                                            "metadata": {},
                                            "items": fake._pods(match.group(1), selector)})
                if match := POD_LOG.match(url.path):
                    attempt = fake._attempt(match.group(1), match.group(2))
                    if attempt is None:
                        return self._send(404, {"kind": "Status", "code": 404})
                    return self._log(attempt, query.get("follow", ["false"])[0].lower() == "true")
                match = ROUTE.match(url.path)
                with fake.lock:
                    if fake.unavailable > 0:
                        fake.unavailable -= 1
                        return self._send(503, {"kind": "Status", "code": 503})
                if not match or match.group(2) not in fake.state or \
                        fake.state[match.group(2)].deleted:
                    return self._send(404, {"kind": "Status", "code": 404})
                name = match.group(2)
                return self._send(200, {**fake.jobs[name], "status": fake.status(name)})

            def _log(self, attempt: Attempt, follow: bool) -> None:
                """The pod's log; with follow, streamed until its container ends (HTTP/1.0:
                the body ends when the connection closes)."""
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                with open(attempt.log, "rb") as log:
                    while True:
                        ended = attempt.process.poll() is not None
                        data = log.read()
                        if data:
                            self.wfile.write(data)
                            self.wfile.flush()
                        elif ended or not follow:
                            return
                        else:
                            time.sleep(0.05)

        return Handler
