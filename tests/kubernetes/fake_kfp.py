"""A local fake of the KFP v2beta1 REST API: just enough for kfp.Client's real calls.

No KFP API server can run here (it needs Kubernetes and Argo), so tests point the real
``kfp.Client`` at this server and assert on what it received.
"""

from __future__ import annotations

import email.parser
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import yaml

API = "/apis/v2beta1"


class FakeKFP:
    def __init__(self):
        self.experiments: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self.versions: list[dict] = []
        self.runs: list[dict] = []
        self.recurring_runs: list[dict] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeKFP:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length", 0)))

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path == f"{API}/healthz":
                    return self._send(200, {"multi_user": False})
                if url.path == f"{API}/experiments":
                    name = _filter_name(query)
                    found = [e for e in fake.experiments.values() if e["display_name"] == name]
                    return self._send(200, {"experiments": found, "total_size": len(found)})
                if url.path == f"{API}/pipelines":
                    name = _filter_name(query)
                    found = [p for p in fake.pipelines.values() if p["display_name"] == name]
                    return self._send(200, {"pipelines": found, "total_size": len(found)})
                return self._send(404, {"error": f"no route {url.path}"})

            def do_POST(self):  # noqa: N802
                url = urlparse(self.path)
                query = parse_qs(url.query)
                body = self._body()
                if url.path == f"{API}/experiments":
                    exp = json.loads(body)
                    exp["experiment_id"] = str(uuid.uuid4())
                    fake.experiments[exp["experiment_id"]] = exp
                    return self._send(200, exp)
                if url.path in (f"{API}/pipelines/upload", f"{API}/pipelines/upload_version"):
                    docs = list(yaml.safe_load_all(
                        _multipart_file(self.headers["Content-Type"], body)))
                    spec = docs[0]
                    name = (query.get("name") or query.get("display_name") or ["?"])[0]
                    if url.path.endswith("/upload"):
                        pipeline = {"pipeline_id": str(uuid.uuid4()), "display_name": name}
                        fake.pipelines[pipeline["pipeline_id"]] = pipeline
                        return self._send(200, pipeline)
                    version = {"pipeline_version_id": str(uuid.uuid4()), "display_name": name,
                               "pipeline_id": query["pipelineid"][0], "spec": spec}
                    fake.versions.append(version)
                    return self._send(200, {k: v for k, v in version.items() if k != "spec"})
                if url.path == f"{API}/runs":
                    run = json.loads(body)
                    run["run_id"] = str(uuid.uuid4())
                    fake.runs.append(run)
                    return self._send(200, run)
                if url.path == f"{API}/recurringruns":
                    job = json.loads(body)
                    job["recurring_run_id"] = str(uuid.uuid4())
                    fake.recurring_runs.append(job)
                    return self._send(200, job)
                return self._send(404, {"error": f"no route {url.path}"})

        return Handler


def _filter_name(query: dict) -> str | None:
    if "filter" not in query:
        return None
    predicates = json.loads(query["filter"][0]).get("predicates", [])
    for predicate in predicates:
        if predicate.get("key") in ("display_name", "name"):
            return predicate.get("string_value") or predicate.get("stringValue")
    return None


def _multipart_file(content_type: str, body: bytes) -> bytes:
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    for part in message.walk():
        if part.get_filename():
            return part.get_payload(decode=True)
    raise ValueError("upload without a file part")
