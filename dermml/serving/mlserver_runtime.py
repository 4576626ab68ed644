"""MLServer's MLflow runtime, with DermML's refusals answered as HTTP 400 on the V2 protocol.

``mlserver_mlflow.MLflowRuntime`` serves the pyfunc unchanged: the V2 inputs become the
DataFrame of the signature's columns (``PandasCodec``), the request's ``parameters`` (all but
MLServer's own ``content_type``/``headers``) become the pyfunc's ``params``, and the returned
rows become one output per column. Its ``/invocations`` handler turns an ``MlflowException`` into
HTTP 400 with the message; its V2 ``predict`` does not, so a refused request there is HTTP 500
(``{"error": "mlflow.exceptions.MlflowException: <reason>"}``). This subclass only maps the
exceptions whose HTTP status is 4xx (the pyfunc's ``INVALID_PARAMETER_VALUE``, MLflow's schema
checks) to MLServer's ``InferenceError`` (HTTP 400, the reason in ``error``); everything else,
results included, is MLServer's.
"""

from __future__ import annotations

from mlflow.exceptions import MlflowException
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_mlflow import MLflowRuntime


class DermmlMLflowRuntime(MLflowRuntime):
    """``mlserver_mlflow.MLflowRuntime`` whose refused V2 requests are HTTP 400."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            return await super().predict(payload)
        except MlflowException as exc:
            if 400 <= exc.get_http_status_code() < 500:
                raise InferenceError(exc.message) from None
            raise
