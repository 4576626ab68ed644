"""The Open Inference Protocol (V2) through a real MLServer with its MLflow runtime: the same
answers as `mlflow models serve`, the same refusals (HTTP 400 with the reason), and the model
name and version served in every response of both protocols."""

import asyncio
import base64
import socket
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import requests
from conftest import tiny_overrides
from mlflow.tracking import MlflowClient

from dermml.data.images import encode_png, load_image, to_base64
from dermml.data.manifest import read_manifest
from dermml.orchestration import tracking
from dermml.registry.gate import register
from dermml.serving.client import PredictionError, predict_http
from dermml.serving.server import serve_model, stop_server
from dermml.training.run import resolve_config, train

pytestmark = pytest.mark.integration
NAME = "dermml-segmentation"


@pytest.fixture(scope="module")
def servers(demo_data, tmp_path_factory):
    """A tiny registered segmentation model (version 1, alias champion; minimum 4 px) behind
    MLServer (v2) and `mlflow models serve`, both started from `models:/...@champion`."""
    home = tmp_path_factory.mktemp("serving-v2-home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(home))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        outcome = train("segmentation", resolve_config("segmentation", None,
                                                       tiny_overrides(demo_data, 1)),
                        progress=False)
        version = register(outcome.model_uri, "segmentation")
        uri = tracking.configure()
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, "champion",
                                                                        version)
        with ThreadPoolExecutor(2) as pool:  # the two start-ups overlap
            started = {protocol: pool.submit(serve_model, f"models:/{NAME}@champion",
                                             log_file=str(home / f"{protocol}.log"),
                                             protocol=protocol)
                       for protocol in ("v2", "mlflow")}
            processes, urls = {}, {}
            try:
                for protocol, future in started.items():
                    processes[protocol], urls[protocol] = future.result()
            except BaseException:
                for process in processes.values():
                    stop_server(process)
                raise
    try:
        yield {"urls": urls, "home": home, "version": version, "run_model": outcome.model_uri}
    finally:
        for process in processes.values():
            stop_server(process)


def sample_images(demo_data, n: int = 3) -> list[np.ndarray]:
    manifest = read_manifest(demo_data)
    rows = manifest.split("test").iloc[:n]
    return [load_image(manifest.resolve(uri)) for uri in rows["image_uri"]]


def v2_post(url: str, inputs: list[dict], parameters: dict | None = None,
            path: str = f"/v2/models/{NAME}/infer") -> requests.Response:
    body: dict = {"inputs": inputs}
    if parameters is not None:
        body["parameters"] = parameters
    return requests.post(f"{url}{path}", json=body, timeout=60)


def image_input(*images: str) -> list[dict]:
    return [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
             "data": list(images)}]


def png64(image: np.ndarray) -> str:
    return to_base64(encode_png(image))


def test_v2_answers_what_the_mlflow_protocol_answers(servers, demo_data):
    images = sample_images(demo_data)
    for params in (None, {"threshold": 0.2}):
        v2 = predict_http(servers["urls"]["v2"], images, params, protocol="v2")
        mlflow = predict_http(servers["urls"]["mlflow"], images, params, protocol="mlflow")
        pd.testing.assert_frame_equal(v2, mlflow, check_dtype=False)
        assert list(v2.columns) == ["mask", "lesion_fraction", "height", "width",
                                    "model_name", "model_version"]
        assert len(v2) == len(images) and set(v2["model_name"]) == {NAME}
    strict = predict_http(servers["urls"]["v2"], images[:1], {"threshold": 1.0}, protocol="v2")
    assert strict.loc[0, "lesion_fraction"] <= v2.loc[0, "lesion_fraction"]


def test_responses_name_the_version_served_even_after_the_alias_moves(servers, demo_data):
    urls, version = servers["urls"], servers["version"]
    image = png64(sample_images(demo_data, 1)[0])
    with pytest.MonkeyPatch.context() as patch:  # version 2 becomes the champion meanwhile
        patch.setenv("DERMML_HOME", str(servers["home"]))
        newer = register(servers["run_model"], "segmentation")
        uri = tracking.configure()
        MlflowClient(uri, registry_uri=uri).set_registered_model_alias(NAME, "champion", newer)
    assert newer != version
    v2 = v2_post(urls["v2"], image_input(image))
    assert v2.status_code == 200, v2.text
    body = v2.json()
    assert (body["model_name"], body["model_version"]) == (NAME, version)
    assert [o["name"] for o in body["outputs"]] == ["mask", "lesion_fraction", "height", "width"]
    by_version = v2_post(urls["v2"], image_input(image),
                         path=f"/v2/models/{NAME}/versions/{version}/infer")
    assert by_version.status_code == 200 and by_version.json()["outputs"] == body["outputs"]
    mlflow = requests.post(f"{urls['mlflow']}/invocations", timeout=60, json={
        "dataframe_split": {"columns": ["image"], "data": [[image]]}})
    assert mlflow.status_code == 200, mlflow.text
    row = mlflow.json()["predictions"][0]
    assert (row["model_name"], row["model_version"]) == (NAME, version)


@pytest.mark.parametrize(("inputs", "parameters", "reason"), [
    (image_input("not base64 at all!"), None, "image row 0: not valid base64"),
    (image_input(base64.b64encode(b"hello").decode()), None, "not a decodable image"),
    (image_input(png64(np.zeros((2, 2, 3), np.uint8))), None,
     "2x2 px is smaller than this model's minimum of 4x4 px"),
    (image_input(png64(np.zeros((8, 8, 3), np.uint8))), {"threshold": 7},
     "threshold: Input should be less than or equal to 1"),
    (image_input(png64(np.zeros((8, 8, 3), np.uint8))), {"treshold": 0.5},
     "unknown params ['treshold']; this model takes ['threshold']"),
    ([{"name": "picture", "datatype": "BYTES", "shape": [1], "data": ["x"]}], None,
     "Model is missing inputs ['image']"),
    ([{"name": "image", "datatype": "FP64", "shape": [1], "data": ["x"]}], None,
     "cannot decode the inputs: could not convert string to float"),
])
def test_refused_v2_request_is_http_400_with_its_reason(servers, inputs, parameters, reason):
    response = v2_post(servers["urls"]["v2"], inputs, parameters)
    assert response.status_code == 400, response.text
    assert reason in response.json()["error"], response.text


def test_the_client_raises_the_reason_on_both_protocols(servers):
    for protocol, url in servers["urls"].items():
        with pytest.raises(PredictionError, match="smaller than this model's minimum") as err:
            predict_http(url, [np.zeros((2, 2, 3), np.uint8)], protocol=protocol)
        assert err.value.status == 400


def test_mlservers_own_mlflow_runtime_serves_the_pyfunc(servers, demo_data):
    """In process: the stock `mlserver_mlflow.MLflowRuntime` (what KServe's MLServer runtime
    runs) encodes DermML's answers; only its refusals differ: they leave it as MlflowException
    (HTTP 500 in that server), which DermML's runtime maps to HTTP 400."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlserver.errors import InferenceError
    from mlserver.settings import ModelParameters, ModelSettings
    from mlserver.types import InferenceRequest
    from mlserver_mlflow import MLflowRuntime

    from dermml.serving.mlserver_runtime import DermmlMLflowRuntime

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DERMML_HOME", str(servers["home"]))
        tracking.configure()
        path = mlflow.artifacts.download_artifacts(f"models:/{NAME}/{servers['version']}")
    image = sample_images(demo_data, 1)[0]
    good = InferenceRequest(inputs=image_input(png64(image)))
    small = InferenceRequest(inputs=image_input(png64(np.zeros((2, 2, 3), np.uint8))))

    async def run(runtime_class):
        runtime = runtime_class(ModelSettings(name=NAME, implementation=runtime_class,
                                              parameters=ModelParameters(uri=path)))
        await runtime.load()
        answer = await runtime.predict(good)
        try:
            await runtime.predict(small)
        except Exception as exc:  # noqa: BLE001 - the class is what is checked
            return answer, exc
        raise AssertionError("a 2x2 image was answered")

    stock, stock_error = asyncio.run(run(MLflowRuntime))
    ours, our_error = asyncio.run(run(DermmlMLflowRuntime))
    assert stock.model_dump()["outputs"] == ours.model_dump()["outputs"]
    assert [o.name for o in stock.outputs] == ["mask", "lesion_fraction", "height", "width"]
    assert isinstance(stock_error, MlflowException) and not isinstance(stock_error,
                                                                        InferenceError)
    assert isinstance(our_error, InferenceError) and our_error.status_code == 400
    assert "smaller than this model's minimum" in str(our_error)


@pytest.mark.slow
def test_mlserver_whose_grpc_port_was_taken_starts_again_on_others(servers, monkeypatch,
                                                                    tmp_path):
    """MLServer does not exit when a port is taken (its other servers keep running): the
    bind failure in its log ends the wait, and it starts again on fresh ports."""
    from dermml.serving import server as server_module

    monkeypatch.setenv("DERMML_HOME", str(servers["home"]))
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    real_free_ports = server_module.free_ports
    calls = []

    def ports(count, host="127.0.0.1", avoid=()):  # gRPC gets the taken port the first time
        calls.append(count)
        fresh = real_free_ports(count, host, avoid + (taken,))
        return [taken, *fresh[1:]] if len(calls) == 1 else fresh

    monkeypatch.setattr(server_module, "free_ports", ports)
    log = tmp_path / "serve.log"
    try:
        process, url = serve_model(f"models:/{NAME}/1", log_file=str(log), protocol="v2")
    finally:
        squatter.close()
    try:
        assert len(calls) == 2 and f"127.0.0.1:{taken}" in log.read_text()
        assert "address already in use" in log.read_text().lower()
        assert requests.get(f"{url}/v2/models/{NAME}/ready", timeout=5).status_code == 200
    finally:
        stop_server(process)
