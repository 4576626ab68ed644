"""The MLflow pyfunc model of every task: base64 images in, the task's predictions out.

Request: a table with a string column ``image`` holding base64-encoded PNG/JPEG/BMP bytes.
Response: the task's columns (segmentation: ``mask`` as base64 PNG, ``lesion_fraction``, ...).
Post-processing settings (``threshold``) are params with the trained config as defaults, so
evaluation and serving run the very same code.
"""

from __future__ import annotations

import io
import os
import tempfile
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

from dermml.data.images import ImageReadError, decode_image, encode_png, from_base64, to_base64
from dermml.tasks import get_task
from dermml.tasks.base import TaskConfig

IMAGE_COLUMN = "image"
BUNDLE_ARTIFACT = "model_bundle"


def _bad_request(message: str) -> MlflowException:
    # INVALID_PARAMETER_VALUE makes the scoring server answer HTTP 400 instead of 500.
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


class DermmlModel(mlflow.pyfunc.PythonModel):
    """Loads a task's network from the bundle artifact and predicts through the task."""

    def load_context(self, context) -> None:
        # Tensors, strings, numbers, lists and dicts only: loading runs no pickled code.
        bundle = torch.load(context.artifacts[BUNDLE_ARTIFACT], map_location="cpu",
                            weights_only=True)
        self.task = get_task(bundle["task"])
        self.cfg = self.task.config_cls.model_validate(bundle["config"])
        self.model = self.task.build_to_load(self.cfg)
        self.task.load_serving_state(self.model, bundle["state_dict"])
        self.model.to(serving_device()).eval()

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None):
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
        cfg = self.cfg
        if params:
            unknown = sorted(set(params) - set(type(cfg.serving).model_fields))
            if unknown:
                raise _bad_request(f"unknown params {unknown}; this model takes "
                                   f"{sorted(type(cfg.serving).model_fields)}")
            try:
                serving = type(cfg.serving).model_validate(self.task.merge_serving(
                    cfg, {k: v for k, v in params.items() if v is not None}))
                cfg = cfg.model_copy(update={"serving": serving})
                self.task.check_serving(cfg)
            except ValueError as exc:
                raise _bad_request(f"invalid params: {exc}") from None
        return self.task.predict(self.model, images, cfg)


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
    outputs = Schema([ColSpec(t, name) for name, t in task.response_schema()])
    params = serving_params(cfg)
    return ModelSignature(inputs=Schema([ColSpec("string", IMAGE_COLUMN)]), outputs=outputs,
                          params=params)


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
                   example_image: np.ndarray, name: str = "model") -> str:
    """Log the model of the active run with signature and input example; returns its URI."""
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
            input_example=request_frame([example_image]),
            pip_requirements=[f"dermml=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri
