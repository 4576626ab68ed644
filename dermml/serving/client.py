"""Send the same request to a DermML model server over either protocol.

- ``mlflow`` (``mlflow models serve``): ``POST URL/invocations`` with
  ``{"dataframe_split": {"columns": [...], "data": [...]}, "params": {...}}``; the answer is
  ``{"predictions": [row, ...]}``, each row with ``model_name``/``model_version`` when the
  server knows them.
- ``v2`` (MLServer, the Open Inference Protocol): ``POST URL/v2/models/NAME/infer`` with one
  input per request column, e.g. ``{"name": "image", "datatype": "BYTES", "shape": [N],
  "data": [base64, ...]}``, and the params as the request's ``parameters``; the answer has one
  output per response column and the served ``model_name``/``model_version``.

Both return the same table: the task's response columns, then ``model_name`` and
``model_version`` (on mlflow only when the server was started with a registered model's
identity; a V2 server always names its model, ``model`` without a version for a run's or a
path's model). A refused request raises ``PredictionError`` with the HTTP status and the
server's reason (``message`` on mlflow, ``error`` on v2).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import requests

from dermml.serving.pyfunc import IDENTITY_COLUMNS, request_frame

PROTOCOLS = ("mlflow", "v2")


class PredictionError(RuntimeError):
    """The server did not answer 200: ``status`` and ``reason`` as it said them."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"model server answered {status}: {reason[:500]}")
        self.status = status
        self.reason = reason


def v2_datatype(column: pd.Series) -> str:
    """The V2 datatype of a request column: numbers and booleans as such, anything else
    (text: base64 images, class names) as ``BYTES``."""
    kind = column.dtype.kind
    if kind == "b":
        return "BOOL"
    if kind in "iu":
        return "INT64"
    if kind == "f":
        return "FP64"
    return "BYTES"


def mlflow_request(frame: pd.DataFrame, params: dict[str, Any] | None = None) -> dict:
    body: dict = {"dataframe_split": frame.to_dict(orient="split")}
    body["dataframe_split"].pop("index", None)
    if params:
        body["params"] = params
    return body


def v2_request(frame: pd.DataFrame, params: dict[str, Any] | None = None) -> dict:
    """One input per column, shape ``[rows]``; ``params`` as the request's ``parameters``
    (MLServer keeps its own ``content_type`` and ``headers`` and passes the rest on)."""
    body: dict = {"inputs": [{"name": str(name), "datatype": v2_datatype(frame[name]),
                              "shape": [len(frame)], "data": frame[name].tolist()}
                             for name in frame.columns]}
    if params:
        body["parameters"] = dict(params)
    return body


def v2_response_frame(body: dict) -> pd.DataFrame:
    """A V2 response as the rows ``mlflow`` would answer: one column per output, then the
    served ``model_name`` and ``model_version``."""
    columns: dict[str, list] = {}
    for output in body.get("outputs", []):
        data = output["data"]
        if (output.get("parameters") or {}).get("content_type") == "pd_json":
            data = [json.loads(value) for value in data]
        columns[output["name"]] = list(data)
    frame = pd.DataFrame(columns)
    for column, key in zip(IDENTITY_COLUMNS, ("model_name", "model_version"), strict=True):
        frame[column] = body.get(key)
    return frame


def v2_model_path(url: str, model: str | None = None, timeout: float = 30) -> tuple[str, str]:
    """``(server URL, /v2/models/NAME)``: ``model`` if given, the model in ``url`` if it is a
    model's URL, else the one model the server's repository index lists as ready."""
    if model:
        return url.rstrip("/"), f"/v2/models/{model}"
    if "/v2/models/" in url:
        base, _, rest = url.partition("/v2/models/")
        return base, f"/v2/models/{rest.rstrip('/')}"
    response = requests.post(f"{url}/v2/repository/index", json={}, timeout=timeout)
    if response.status_code != 200:
        raise PredictionError(response.status_code, response.text)
    ready = [m["name"] for m in response.json() if m.get("state") == "READY"]
    if len(ready) != 1:
        raise ValueError(f"{url} serves {len(ready)} ready models {ready}; name one (model=)")
    return url.rstrip("/"), f"/v2/models/{ready[0]}"


def _reason(response: requests.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text
    if isinstance(body, dict):
        for key in ("message", "error", "detail"):
            if key in body:
                return body[key] if isinstance(body[key], str) else json.dumps(body[key])
    return response.text


def predict_frame(url: str, frame: pd.DataFrame, params: dict[str, Any] | None = None,
                  protocol: str = "mlflow", model: str | None = None, timeout: float = 120,
                  session: requests.Session | None = None) -> pd.DataFrame:
    """POST the request rows ``frame`` (the model's request columns) to the server at
    ``url`` over ``protocol``; return the response rows."""
    post = (session or requests).post
    if protocol == "mlflow":
        response = post(f"{url}/invocations", json=mlflow_request(frame, params),
                        timeout=timeout)
    elif protocol == "v2":
        base, path = v2_model_path(url, model)
        response = post(f"{base}{path}/infer", json=v2_request(frame, params), timeout=timeout)
    else:
        raise ValueError(f"unknown protocol {protocol!r}; use one of {list(PROTOCOLS)}")
    if response.status_code != 200:
        raise PredictionError(response.status_code, _reason(response))
    if protocol == "v2":
        return v2_response_frame(response.json())
    return pd.DataFrame(response.json()["predictions"])


def predict_http(url: str, images: list[np.ndarray], params: dict[str, Any] | None = None,
                 timeout: float = 120, protocol: str = "mlflow",
                 model: str | None = None) -> pd.DataFrame:
    """POST RGB uint8 images (base64 PNG in the ``image`` column) over ``protocol``; return
    the response rows."""
    return predict_frame(url, request_frame(images), params, protocol, model, timeout)
