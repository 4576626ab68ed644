"""The serving contract against a real `mlflow models serve`: every refused input is HTTP 400
with its reason, request by request; evaluation goes through the same checks."""

import base64

import numpy as np
import pytest
import requests
from conftest import tiny_overrides
from mlflow.exceptions import MlflowException

from dermml.data.images import encode_png, load_image, to_base64
from dermml.data.manifest import read_manifest
from dermml.serving.server import predict_http, serve_model, stop_server
from dermml.training.run import resolve_config, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(demo_data, tmp_path_factory):
    """A tiny segmentation model (depth 2: minimum 4 px) behind `mlflow models serve`."""
    home = tmp_path_factory.mktemp("serving-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        cfg = resolve_config("segmentation", None, tiny_overrides(demo_data, 2))
        outcome = train("segmentation", cfg, progress=False)
        server, url = serve_model(outcome.model_uri, log_file=str(home / "serve.log"))
    try:
        yield url, home, outcome
    finally:
        stop_server(server)


def sample_image(demo_data) -> np.ndarray:
    manifest = read_manifest(demo_data)
    return load_image(manifest.resolve(manifest.split("test").iloc[0]["image_uri"]))


def post(url: str, image: np.ndarray, params: dict | None = None) -> requests.Response:
    body: dict = {"dataframe_split": {"columns": ["image"],
                                      "data": [[to_base64(encode_png(image))]]}}
    if params is not None:
        body["params"] = params
    return requests.post(f"{url}/invocations", json=body, timeout=60)


def blank(side: int) -> np.ndarray:
    return np.full((side, side, 3), 128, np.uint8)


@pytest.mark.parametrize(("image_side", "params", "reason"), [
    (1, None, "1x1 px is smaller than this model's minimum of 4x4 px"),
    (2, None, "2x2 px is smaller than this model's minimum of 4x4 px"),
    (None, {"threshold": 7}, "threshold: Input should be less than or equal to 1"),
    (None, {"threshold": 1.5}, "threshold: Input should be less than or equal to 1"),
    (None, {"threshold": -1}, "threshold: Input should be greater than or equal to 0"),
    (None, {"treshold": 0.5}, "unknown params ['treshold']; this model takes ['threshold']"),
    (None, {"threshold": 0.5, "sampler": "ddim"}, "unknown params ['sampler']"),
])
def test_refused_request_is_http_400_with_its_reason(served, demo_data, image_side, params,
                                                    reason):
    url, _, _ = served
    image = blank(image_side) if image_side else sample_image(demo_data)
    response = post(url, image, params)
    assert response.status_code == 400, response.text
    assert reason in response.json()["message"], response.text


def test_garbage_is_http_400_with_its_reason(served):
    url, _, _ = served
    for data, reason in (("not base64 at all!", "not valid base64"),
                         (base64.b64encode(b"hello").decode(), "not a decodable image")):
        response = requests.post(f"{url}/invocations", timeout=60, json={
            "dataframe_split": {"columns": ["image"], "data": [[data]]}})
        assert response.status_code == 400 and reason in response.text, response.text
    wrong_column = requests.post(f"{url}/invocations", timeout=60, json={
        "dataframe_split": {"columns": ["picture"], "data": [["x"]]}})
    assert wrong_column.status_code == 400


def test_servable_requests_are_answered(served, demo_data):
    """The bounds themselves are servable: thresholds 0 and 1, an image at the minimum size."""
    url, _, _ = served
    image = sample_image(demo_data)
    everything = predict_http(url, [image], params={"threshold": 0.0})
    nothing = predict_http(url, [image], params={"threshold": 1.0})
    assert everything.loc[0, "lesion_fraction"] >= nothing.loc[0, "lesion_fraction"]
    smallest = predict_http(url, [blank(4)])
    assert (smallest.loc[0, "height"], smallest.loc[0, "width"]) == (4, 4)


def test_evaluation_goes_through_the_same_checks(served, demo_data, monkeypatch):
    from dermml.orchestration.tracking import load_python_model

    _, home, outcome = served
    monkeypatch.setenv("DERMML_HOME", str(home))
    model = load_python_model(outcome.model_uri)
    image = sample_image(demo_data)
    for images, params, reason in (([image], {"threshold": 7}, "less than or equal to 1"),
                                   ([image], {"treshold": 0.5}, "unknown params"),
                                   ([image, blank(2)], None, "row 1: 2x2 px is smaller")):
        with pytest.raises(MlflowException, match=reason) as err:
            model.predict_images(images, params)
        assert err.value.get_http_status_code() == 400


def test_a_server_whose_port_was_taken_starts_again_on_another(served, monkeypatch, tmp_path):
    import socket

    from dermml.serving import server as server_module

    _, home, outcome = served
    monkeypatch.setenv("DERMML_HOME", str(home))  # the store the model was logged to
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_pick = server_module.pick_port
    calls = []

    def pick(preferred=None, host="127.0.0.1"):  # the race: free when checked, taken when bound
        calls.append(preferred)
        return taken if len(calls) == 1 else real_pick(None, host)

    monkeypatch.setattr(server_module, "pick_port", pick)
    try:
        process, url = serve_model(outcome.model_uri, log_file=str(tmp_path / "serve.log"))
    finally:
        squatter.close()
    try:
        assert len(calls) == 2 and not url.endswith(f":{taken}")
        assert requests.get(f"{url}/ping", timeout=5).status_code == 200
    finally:
        stop_server(process)


def test_a_server_that_cannot_start_says_why_with_its_log(tmp_path):
    from dermml.serving.server import ServerFailed

    with pytest.raises(ServerFailed) as failure:
        serve_model(str(tmp_path / "no-such-model"), log_file=str(tmp_path / "serve.log"))
    assert "serve.log" in str(failure.value) and "no-such-model" in str(failure.value)
