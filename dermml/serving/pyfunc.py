"""The MLflow pyfunc model of every task: base64 images in, the task's predictions out.

Request: a table with a string column ``image`` holding base64-encoded PNG/JPEG/BMP bytes.
Response: the task's columns (segmentation: ``mask`` as base64 PNG, ``lesion_fraction``, ...).
Post-processing settings (``threshold``) are params with the trained config as defaults, so
evaluation and serving run the very same code.
"""

from __future__ import annotations

import functools
import io
import logging
import os
import tempfile
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from pydantic import ValidationError

from dermml.config import stored_config, validation_problems
from dermml.data.images import ImageReadError, decode_image, encode_png, from_base64, to_base64
from dermml.tasks import get_task
from dermml.tasks.base import TaskConfig

IMAGE_COLUMN = "image"
IMAGE_REQUEST = [(IMAGE_COLUMN, "string")]
"""The request of image tasks; a task with other ``request_columns`` decodes its own rows."""
BUNDLE_ARTIFACT = "model_bundle"

MODEL_NAME_ENV = "DERMML_MODEL_NAME"
MODEL_VERSION_ENV = "DERMML_MODEL_VERSION"
"""The registered name and version of the model a server serves, set by the process that
started it (``dermml.serving.server``) after resolving the alias through the registry; a model
loaded with them set answers every row with ``model_name`` and ``model_version``."""
IDENTITY_COLUMNS = ("model_name", "model_version")


def served_identity() -> tuple[str, str] | None:
    """(name, version) from ``$DERMML_MODEL_NAME``/``$DERMML_MODEL_VERSION``, else None."""
    name, version = os.environ.get(MODEL_NAME_ENV), os.environ.get(MODEL_VERSION_ENV)
    return (name, version) if name and version else None


def _bad_request(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer HTTP 400 instead of 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# The names of the params a request sent, and the filtered dict MLflow made of them.
_REQUESTED_PARAMS: ContextVar[tuple[dict, frozenset[str]] | None] = ContextVar(
    "dermml_requested_params", default=None)


def _record_requested_params() -> None:
    """Let ``DermmlModel.predict`` see the params a request named before MLflow drops some.

    ``PyFuncModel.predict`` (which ``mlflow models serve`` calls) passes the request's params
    through ``mlflow.models.utils._enforce_params_schema``: names that the signature lacks are
    dropped with only a warning in the server log, and every missing one gets its default, so
    the model never sees a misspelt param. The wrapper installed here (once per process, in
    ``mlflow.pyfunc``'s namespace, where ``PyFuncModel`` looks it up) records the names sent
    next to the dict it returns; ``predict`` refuses the unknown ones when handed that dict.
    It changes no result: other models in the process behave as before.
    """
    import mlflow.pyfunc as pyfunc_module

    enforce = getattr(pyfunc_module, "_enforce_params_schema", None)
    if enforce is None:  # another MLflow: serve anyway; tests/serving/test_serving.py tells
        logging.getLogger(__name__).warning(
            "mlflow.pyfunc._enforce_params_schema not found (mlflow %s): params the signature "
            "lacks are ignored, not refused", mlflow.__version__)
        return
    if getattr(enforce, "dermml_records_names", False):
        return

    @functools.wraps(enforce)
    def enforce_and_record(params, schema):
        enforced = enforce(params, schema)
        if isinstance(params, dict) and isinstance(enforced, dict):
            _REQUESTED_PARAMS.set((enforced, frozenset(str(k) for k in params)))
        return enforced

    enforce_and_record.dermml_records_names = True
    pyfunc_module._enforce_params_schema = enforce_and_record


def _requested_names(params: dict[str, Any] | None) -> set[str]:
    """The param names the request sent, when ``params`` is what MLflow made of them;
    otherwise (a direct call) the names of ``params`` itself."""
    recorded = _REQUESTED_PARAMS.get()
    _REQUESTED_PARAMS.set(None)
    if recorded is not None and params is not None and recorded[0] is params:
        return set(recorded[1])
    return set(params or {})


class DermmlModel(mlflow.pyfunc.PythonModel):
    """Loads a task's network from the bundle artifact and predicts through the task."""

    def load_context(self, context) -> None:
        # Tensors, strings, numbers, lists and dicts only: loading runs no pickled code.
        bundle = torch.load(context.artifacts[BUNDLE_ARTIFACT], map_location="cpu",
                            weights_only=True)
        self.task = get_task(bundle["task"])
        self.cfg = stored_config(self.task.config_cls, bundle["config"])
        self.model = self.task.build_to_load(self.cfg)
        self.task.load_serving_state(self.model, bundle["state_dict"])
        self.model.to(serving_device()).eval()
        self.identity = served_identity()
        _record_requested_params()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
        return self._response(self._predict_rows(model_input, params))

    def _response(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The response rows as every server can encode them: the served identity appended
        (when known), text as plain ``object`` columns. pandas 3 infers its ``str`` dtype for
        text, which MLServer 1.7's codecs cannot map to a V2 datatype (``KeyError: 'O'``);
        ``mlflow models serve`` writes both alike."""
        identity = getattr(self, "identity", None)
        if identity is not None:
            frame = frame.assign(**dict(zip(IDENTITY_COLUMNS, identity, strict=True)))
        return frame.astype({c: object for c in frame.columns
                             if pd.api.types.is_string_dtype(frame[c].dtype)})

    def _predict_rows(self, model_input: pd.DataFrame, params: dict[str, Any] | None):
        self._check_param_names(_requested_names(params))
        if self.task.request_columns != IMAGE_REQUEST:  # e.g. the GAN: class, seed -> image
            if not isinstance(model_input, pd.DataFrame):
                raise _bad_request("input must be a table with columns "
                                   f"{[c for c, _ in self.task.request_columns]}")
            try:
                inputs = self.task.decode_request(model_input, self.cfg)
            except ValueError as exc:
                raise _bad_request(str(exc)) from None
            return self.task.encode_predictions(self.predict_images(inputs, params))
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input:
            raise _bad_request(f"input must have a column {IMAGE_COLUMN!r} of base64 images")
        images = []
        for i, value in enumerate(model_input[IMAGE_COLUMN]):
            try:
                images.append(decode_image(from_base64(str(value), f"row {i}"), f"row {i}"))
            except ImageReadError as exc:
                raise _bad_request(f"{IMAGE_COLUMN} {exc}") from None
        return self.task.encode_predictions(self.predict_images(images, params))

    def predict_images(self, images: list[np.ndarray], params: dict[str, Any] | None = None):
        """The task's post-processed predictions; evaluation calls this, serving too."""
        cfg = self._with_params(params)
        if self.task.request_columns == IMAGE_REQUEST:
            self._check_image_sizes(images, cfg)
        return self.task.predict(self.model, images, cfg)

    def evaluate_set(self, images: list[np.ndarray], params: dict[str, Any] | None = None
                     ) -> dict[str, float]:
        """Set-level metrics of a task that is not scored per sample (the GAN), with the
        request params applied as in ``predict_images``."""
        cfg = self._with_params(params)
        return self.task.evaluate_set(self.model, images, cfg, serving_device())

    def _with_params(self, params: dict[str, Any] | None) -> TaskConfig:
        cfg = self.cfg
        if params:
            self._check_param_names(set(params))
            try:
                serving = type(cfg.serving).model_validate(self.task.merge_serving(
                    cfg, {k: v for k, v in params.items() if v is not None}))
            except ValidationError as exc:
                raise _bad_request(f"invalid params: {'; '.join(validation_problems(exc))}; "
                                   "see the params of the model's signature") from None
            cfg = cfg.model_copy(update={"serving": serving})
            try:
                self.task.check_serving(cfg)
            except ValueError as exc:
                raise _bad_request(f"invalid params: {exc}") from None
        return cfg

    def _check_param_names(self, names: set[str]) -> None:
        known = type(self.cfg.serving).model_fields
        unknown = sorted(names - set(known))
        if unknown:
            raise _bad_request(f"unknown params {unknown}; this model takes {sorted(known)} "
                               "(its signature's params, with their defaults)")

    def _check_image_sizes(self, images: list[np.ndarray], cfg: TaskConfig) -> None:
        smallest = self.task.min_image_size(cfg)
        for i, image in enumerate(images):
            height, width = image.shape[:2]
            if min(height, width) < smallest:
                raise _bad_request(
                    f"{IMAGE_COLUMN} row {i}: {width}x{height} px is smaller than this model's "
                    f"minimum of {smallest}x{smallest} px (its downsampling factor); send the "
                    f"image at its original resolution (the model sees images at "
                    f"{cfg.data.image_size} px)")


PARAM_TYPES = {float: "double", int: "long", str: "string", bool: "boolean"}


def serving_params(cfg: TaskConfig) -> ParamSchema:
    """Request params: every field of the task's serving config, its trained value as default."""
    specs = []
    for name, field in type(cfg.serving).model_fields.items():
        kind = PARAM_TYPES.get(field.annotation)
        if kind is None:  # e.g. Literal[...] choices travel as strings
            kind = "string"
        specs.append(ParamSpec(name, kind, getattr(cfg.serving, name)))
    return ParamSchema(specs)


def signature_for(task_name: str, cfg: TaskConfig) -> ModelSignature:
    task = get_task(task_name)
    outputs = Schema([ColSpec(t, name) for name, t in task.response_schema_for(cfg)])
    params = serving_params(cfg)
    inputs = Schema([ColSpec(kind, name, required=(name, kind) != ("truncation", "double"))
                     for name, kind in task.request_columns])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def request_frame(images: list[np.ndarray]) -> pd.DataFrame:
    """The serving request for RGB uint8 images."""
    return pd.DataFrame({IMAGE_COLUMN: [to_base64(encode_png(img)) for img in images]})


def serving_device() -> torch.device:
    """Where a loaded model runs: ``$DERMML_DEVICE`` (e.g. ``cpu``, ``cuda:1``), else the GPU
    when there is one (model servers and the evaluate/promote stages on the GPU pool)."""
    name = os.environ.get("DERMML_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"DERMML_DEVICE={name!r} is not a torch device ({exc})") from None


def log_task_model(task_name: str, cfg: TaskConfig, state_dict: dict,
                   example: np.ndarray | pd.DataFrame, name: str = "model") -> str:
    """Log the model of the active run with signature and input example (an image, or the
    request rows of a task with other ``request_columns``); returns its URI."""
    from dermml import __version__

    with tempfile.TemporaryDirectory() as folder:
        bundle = Path(folder, "model.pt")
        buf = io.BytesIO()
        torch.save({"task": task_name, "config": cfg.model_dump(mode="json"),
                    "state_dict": get_task(task_name).serving_state(state_dict)}, buf)
        bundle.write_bytes(buf.getvalue())
        info = mlflow.pyfunc.log_model(
            name=name, python_model=str(Path(__file__).with_name("model_code.py")),
            artifacts={BUNDLE_ARTIFACT: str(bundle)},
            signature=signature_for(task_name, cfg),
            input_example=example if isinstance(example, pd.DataFrame)
            else request_frame([example]),
            pip_requirements=[f"dermml=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri
