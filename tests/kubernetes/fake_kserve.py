"""A local fake of the Kubernetes API for InferenceServices, with KServe v0.20's part played in
Knative mode, and a Prometheus HTTP API serving each revision's request metrics.

No cluster runs here; the real ``kubernetes`` client talks to this server through a kubeconfig.
KServe's part follows its controller (pkg/controller/v1beta1/inferenceservice: the ksvc
reconciler's traffic targets and the status propagation of rolled-out revisions):

- a change of the predictor other than ``canaryTrafficPercent`` creates a Knative revision
  ``<name>-predictor-0000N``; it gets ready after ``ready_after`` reads, or never when its
  ``storageUri`` is in ``failing`` (the model does not load: ``PredictorConfigurationReady``
  False, ``RevisionFailed``);
- traffic: with ``canaryTrafficPercent`` and a rolled-out revision, that share goes to the
  latest ready revision (tag ``latest``) and the rest to ``latestRolledoutRevision`` (tag
  ``prev``); without it, 100% to the latest ready revision; a revision that took 100% becomes
  ``latestRolledoutRevision`` (the former one ``previousRolledoutRevision``);
- PATCH is a JSON merge patch; one carrying ``metadata.resourceVersion`` is refused (409) when
  the object changed meanwhile; LIST honours ``labelSelector`` (``key=value``, comma-joined).

Prometheus (``GET /api/v1/query``): a query naming ``revision_name="R"`` is answered from
``metrics[storageUri of R]`` (``requests``, ``errors``, ``p95_ms``): 5xx queries get
``errors``, ``histogram_quantile`` queries ``p95_ms``, others ``requests``; an unknown revision
gets an empty result. Every query is kept in ``queries`` and every traffic split KServe
reported in ``traffic_history`` for the tests.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROUTE = re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices"
                   r"(?:/([^/]+))?$")
REVISION = re.compile(r'revision_name="([^"]+)"')


@dataclass
class Revision:
    name: str
    storage_uri: str
    config: str
    ready_at: int | None  # the read at which it gets ready; None: never


def merge_patch(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


class FakeKServe:
    def __init__(self, ready_after: int = 1):
        self.objects: dict[tuple[str, str], dict] = {}
        self.revisions: dict[tuple[str, str], list[Revision]] = {}
        self.rolled: dict[tuple[str, str], dict] = {}
        self.failing: set[str] = set()
        self.metrics: dict[str, dict[str, float]] = {}
        self.patches: list[tuple[str, dict]] = []
        self.queries: list[str] = []
        self.traffic_history: list[tuple[str, list[dict]]] = []
        self.ready_after = ready_after
        self.reads = 0
        self.version = 0
        self.lock = threading.RLock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeKServe:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def kubeconfig(self, path: Path) -> Path:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}]}))
        return path

    # ------------------------------------------------------------------ objects
    def create(self, obj: dict) -> dict:
        """What ``helm install`` does: the InferenceService exists, KServe rolls it out."""
        with self.lock:
            obj = copy.deepcopy(obj)
            key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
            obj["metadata"]["generation"] = 1
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self.objects[key], self.revisions[key], self.rolled[key] = obj, [], {}
            self._reconcile(key)
            return self.get(*key)

    def get(self, namespace: str, name: str) -> dict:
        with self.lock:
            self.reads += 1
            key = (namespace, name)
            self._reconcile(key)
            self._reconcile(key)  # KServe converges: traffic follows the status it wrote
            return copy.deepcopy(self.objects[key])

    def revision_uri(self, revision: str) -> str | None:
        for revisions in self.revisions.values():
            for rev in revisions:
                if rev.name == revision:
                    return rev.storage_uri
        return None

    def served(self, namespace: str, name: str) -> dict[str, int]:
        """storageUri -> percent of the traffic, as KServe reports it now."""
        obj = self.get(namespace, name)
        split: dict[str, int] = {}
        for target in obj["status"]["components"]["predictor"].get("traffic", []):
            uri = self.revision_uri(target["revisionName"])
            split[uri] = split.get(uri, 0) + target["percent"]
        return {uri: percent for uri, percent in split.items() if percent}

    def _patch(self, key: tuple[str, str], patch: dict) -> tuple[int, dict]:
        with self.lock:
            obj = self.objects[key]
            wanted = (patch.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != obj["metadata"]["resourceVersion"]:
                return 409, {"kind": "Status", "code": 409, "reason": "Conflict"}
            self.patches.append((key[1], copy.deepcopy(patch)))
            patch = copy.deepcopy(patch)
            patch.get("metadata", {}).pop("resourceVersion", None)
            before = json.dumps(obj["spec"], sort_keys=True)
            updated = merge_patch(obj, patch)
            if json.dumps(updated["spec"], sort_keys=True) != before:
                updated["metadata"]["generation"] += 1
            self.version += 1
            updated["metadata"]["resourceVersion"] = str(self.version)
            self.objects[key] = updated
            return 200, self.get(*key)

    # ------------------------------------------------------------------ KServe's part
    def _reconcile(self, key: tuple[str, str]) -> None:
        obj, revisions, rolled = self.objects[key], self.revisions[key], self.rolled[key]
        predictor = obj["spec"]["predictor"]
        config = json.dumps({k: v for k, v in predictor.items() if k != "canaryTrafficPercent"},
                            sort_keys=True)
        if not revisions or revisions[-1].config != config:
            uri = predictor["model"]["storageUri"]
            ready_at = None if uri in self.failing else self.reads + self.ready_after
            revisions.append(Revision(f"{key[1]}-predictor-{len(revisions) + 1:05d}", uri,
                                      config, ready_at))
        created = revisions[-1]
        ready = [r for r in revisions if r.ready_at is not None and r.ready_at <= self.reads]
        latest_ready = ready[-1].name if ready else None
        # ksvc reconciler: the traffic targets
        canary, last_rolled = predictor.get("canaryTrafficPercent"), rolled.get("latest")
        tag_routing = (obj["metadata"].get("annotations") or {}).get(
            "serving.kserve.io/enable-tag-routing") == "true"
        targets = []
        if canary is not None and last_rolled:
            targets.append({"latestRevision": True, "percent": canary})
            if canary < 100:
                targets.append({"revisionName": last_rolled, "latestRevision": False,
                                "percent": 100 - canary, "tag": "prev"})
        else:
            targets.append({"latestRevision": True, "percent": 100})
        if tag_routing:
            targets[0]["tag"] = "latest"
        traffic = []
        for target in targets:
            name = target.get("revisionName") or latest_ready
            if name:
                traffic.append({**target, "revisionName": name})
        # status propagation: which revision is rolled out
        per_revision: dict[str, int] = {}
        for target in traffic:
            per_revision[target["revisionName"]] = (per_revision.get(target["revisionName"], 0)
                                                    + target["percent"])
        for target in traffic:
            if target["revisionName"] == latest_ready and target["latestRevision"]:
                if rolled.get("latest") != latest_ready:
                    if target["percent"] == 100:
                        rolled["previous"], rolled["latest"] = rolled.get("latest"), latest_ready
                elif latest_ready == created.name and target["percent"] < 100 and \
                        per_revision.get(target["revisionName"]) == 100 and rolled.get("previous"):
                    rolled["latest"] = rolled["previous"]
        failed = created.ready_at is None
        component = {"latestCreatedRevision": created.name, "traffic": traffic}
        if latest_ready:
            component["latestReadyRevision"] = latest_ready
        if rolled.get("latest"):
            component["latestRolledoutRevision"] = rolled["latest"]
        if rolled.get("previous"):
            component["previousRolledoutRevision"] = rolled["previous"]
        ready_now = bool(latest_ready) and not failed
        conditions = [
            {"type": "PredictorConfigurationReady",
             "status": "False" if failed else ("True" if latest_ready == created.name
                                               else "Unknown"),
             **({"reason": "RevisionFailed",
                 "message": f"Revision \"{created.name}\" failed: model did not load"}
                if failed else {})},
            {"type": "Ready", "status": "True" if ready_now else "False"}]
        name, namespace = key[1], key[0]
        obj["status"] = {
            "observedGeneration": obj["metadata"]["generation"],
            "url": f"http://{name}.{namespace}.example.com",
            "components": {"predictor": component}, "conditions": conditions,
            "deploymentMode": "Knative"}
        if not self.traffic_history or self.traffic_history[-1] != (name, traffic):
            self.traffic_history.append((name, copy.deepcopy(traffic)))

    # ------------------------------------------------------------------ Prometheus
    def query(self, query: str) -> list[dict]:
        self.queries.append(query)
        match = REVISION.search(query)
        uri = self.revision_uri(match.group(1)) if match else None
        values = self.metrics.get(uri) if uri else None
        if values is None:
            return []
        if "5xx" in query:
            value = values.get("errors", 0.0)
        elif query.startswith("histogram_quantile"):
            value = values.get("p95_ms", float("nan"))
        else:
            value = values.get("requests", 0.0)
        return [{"metric": {}, "value": [time.time(), str(value)]}]

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

            def do_GET(self):  # noqa: N802
                url = urlparse(self.path)
                query = parse_qs(url.query)
                if url.path == "/api/v1/query":  # Prometheus: no token
                    return self._send(200, {"status": "success", "data": {
                        "resultType": "vector", "result": fake.query(query["query"][0])}})
                if not self._authorized():
                    return None
                match = ROUTE.match(url.path)
                if not match:
                    return self._send(404, {"kind": "Status", "code": 404})
                namespace, name = match.groups()
                if name is None:
                    wanted = dict(part.split("=", 1) for part in
                                  query.get("labelSelector", [""])[0].split(",") if "=" in part)
                    items = [fake.get(*key) for key in sorted(fake.objects) if key[0] == namespace]
                    items = [i for i in items if all(
                        i["metadata"].get("labels", {}).get(k) == v for k, v in wanted.items())]
                    return self._send(200, {"apiVersion": "serving.kserve.io/v1beta1",
                                            "kind": "InferenceServiceList", "metadata": {},
                                            "items": items})
                if (namespace, name) not in fake.objects:
                    return self._send(404, {"kind": "Status", "code": 404})
                return self._send(200, fake.get(namespace, name))

            def do_PATCH(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if not self._authorized():
                    return None
                match = ROUTE.match(urlparse(self.path).path)
                if not match or (match.group(1), match.group(2)) not in fake.objects:
                    return self._send(404, {"kind": "Status", "code": 404})
                if self.headers.get("Content-Type") != "application/merge-patch+json":
                    return self._send(415, {"kind": "Status", "code": 415})
                return self._send(*fake._patch((match.group(1), match.group(2)), body))

        return Handler
