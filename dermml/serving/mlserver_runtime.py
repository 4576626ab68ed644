"""MLServer's MLflow runtime, with DermML's refusals answered as HTTP 400 on the V2 protocol
and the pyfunc run off the event loop.

``mlserver_mlflow.MLflowRuntime`` serves the pyfunc unchanged: the V2 inputs become the
DataFrame of the signature's columns (``PandasCodec``), the request's ``parameters`` (all but
MLServer's own ``content_type``/``headers``) become the pyfunc's ``params``, and the returned
rows become one output per column. Two things differ from ``mlflow models serve``, and this
subclass changes only those:

- Refusals: its ``/invocations`` handler turns an ``MlflowException`` into HTTP 400 with the
  message; its V2 ``predict`` does not, so a refused request there is HTTP 500
  (``{"error": "mlflow.exceptions.MlflowException: <reason>"}``). Here the exceptions whose
  HTTP status is 4xx (the pyfunc's ``INVALID_PARAMETER_VALUE``, MLflow's schema checks) become
  MLServer's ``InferenceError``: HTTP 400, the reason in ``error``; so do inputs its codecs
  cannot decode (stock: HTTP 500 ``builtins.ValueError: ...``).
- Where the model runs: its ``predict`` is a coroutine that calls the pyfunc directly, so each
  inference worker runs one request at a time on its event-loop (main) thread. On a busy CPU
  torch's OpenMP team on that thread stalls (benchmarks/README.md: 5-10x slower than the same
  call from another thread with the default thread count). ``mlflow models serve`` runs
  ``predict`` in a thread (``asyncio.to_thread``); so does this runtime.
"""

from __future__ import annotations

import asyncio

from mlflow.exceptions import MlflowException
from mlserver.errors import InferenceError
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver_mlflow import MLflowRuntime
from mlserver_mlflow.codecs import TensorDictCodec


class DermmlMLflowRuntime(MLflowRuntime):
    """``mlserver_mlflow.MLflowRuntime`` whose refused V2 requests are HTTP 400 and whose
    pyfunc runs in a worker thread, as under ``mlflow models serve``."""

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        try:
            return await asyncio.to_thread(self._predict, payload)
        except MlflowException as exc:
            if 400 <= exc.get_http_status_code() < 500:
                raise InferenceError(exc.message) from None
            raise

    def _predict(self, payload: InferenceRequest) -> InferenceResponse:
        """``MLflowRuntime.predict``'s body (mlserver-mlflow 1.7.1), run in a thread; an input
        its codecs cannot decode (e.g. ``FP64`` data that are strings) is a bad request, not
        a 500."""
        try:
            decoded = self.decode_request(payload)
        except (ValueError, TypeError) as exc:
            raise InferenceError(f"cannot decode the inputs: {exc}") from None
        params = None
        if payload.parameters and payload.parameters.model_extra:
            params = payload.parameters.model_extra
        output = self._model.predict(decoded, params=params)
        return self.encode_response(output, default_codec=TensorDictCodec)
