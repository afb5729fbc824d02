"""TF Serving's API on request protos (`ServingApi`), shared by the gRPC servicers here and the
REST API (`serving.rest`): Predict, GetModelMetadata, GetModelStatus and
HandleReloadConfigRequest, answered as tensorflow_model_server answers them, with its status codes.
"""

from __future__ import annotations

import functools
import logging
import time

import grpc
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.batching import Batcher
from serving.metrics import RequestObserver, requested_version
from serving.model_config import ModelRegistry
from serving.predict import RequestError, RequestLimits, check_request, run_predict

logger = logging.getLogger(__name__)


def _serving_rpc(method):
    """Turns a RequestError (or an unexpected exception) into the call's gRPC status, and
    reports each call to the servicer's `observe` (see `ServingMetrics.observer`)."""

    @functools.wraps(method)
    def wrapper(self, request, context):
        started = time.perf_counter()
        code, message, response = grpc.StatusCode.OK, "", None
        try:
            response = method(self, request)
        except RequestError as e:
            code, message = e.code, e.message
        except Exception as e:
            logger.exception("%s failed", method.__name__)
            code, message = grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}"
        # A ReloadConfigRequest names no model.
        spec = getattr(request, "model_spec", model_pb2.ModelSpec())
        self._observe(spec.name, requested_version(spec), method.__name__, code, time.perf_counter() - started)
        if response is None:
            context.abort(code, message)
        return response

    return wrapper


class ServingApi:
    """Predict, GetModelMetadata, GetModelStatus and HandleReloadConfigRequest on request protos,
    as TF Serving answers them; the gRPC servicers and the REST API (`serving.rest`) call these.

    Args:
        models: the served models.
        batcher: merges concurrent Predict requests into batches; None runs each alone.
        limits: what one Predict request may ask for (`serving.predict.RequestLimits`); each
            request is held to them before it joins a batch.
    """

    def __init__(self, models: ModelRegistry, batcher: Batcher | None = None, limits: RequestLimits | None = None):
        self._models = models
        self._batcher = batcher
        self._limits = limits or RequestLimits()

    def predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Runs a PredictRequest on the version its ModelSpec names, in a batch if batching."""
        loaded = self._models.resolve(request.model_spec)
        if self._batcher is not None:
            check_request(loaded, request, self._limits)
            return self._batcher.predict(loaded, request)
        return run_predict(loaded, request, self._limits)

    def get_model_metadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The SignatureDef map of the version a GetModelMetadataRequest names."""
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        if not request.metadata_field:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "GetModelMetadataRequest must specify at least one metadata_field"
            )
        for field in request.metadata_field:
            if field != "signature_def":
                raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"Metadata field {field} is not supported")
        loaded = self._models.resolve(request.model_spec)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = request.model_spec.name
        response.model_spec.version.value = loaded.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for name, signature in loaded.signature_defs.items():
            signature_map.signature_def[name].CopyFrom(signature)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def get_model_status(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        """The state of every version of a model, or of the one version its ModelSpec names."""
        if not request.HasField("model_spec"):
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "Missing ModelSpec")
        name = request.model_spec.name
        states = self._models.version_states(name)
        if request.model_spec.HasField("version") or request.model_spec.HasField("version_label"):
            spec = request.model_spec
            version = spec.version.value if spec.HasField("version") else self._models.resolve(spec).version
            if version not in states:
                raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find version {version} of model {name}")
            states = {version: states[version]}
        elif not states:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Could not find any versions of model {name}")
        response = get_model_status_pb2.GetModelStatusResponse()
        for version in sorted(states):
            state, code, message = states[version]
            status = response.model_version_status.add(version=version, state=state)
            status.status.error_code = code.value[0]
            status.status.error_message = message
        return response

    def reload_config(
        self, request: model_management_pb2.ReloadConfigRequest
    ) -> model_management_pb2.ReloadConfigResponse:
        """Serves the request's ModelServerConfig instead of the current one (`ModelRegistry.reload`)."""
        self._models.reload(request.config)
        return model_management_pb2.ReloadConfigResponse()


class _Servicer:
    """What both servicers hold: the ServingApi that answers and the observer each call reports to."""

    def __init__(self, api: ServingApi, observe: RequestObserver):
        self._api = api
        self._observe = observe


class PredictionServicer(_Servicer, prediction_service_pb2_grpc.PredictionServiceServicer):
    """Predict and GetModelMetadata; Classify, Regress and MultiInference stay UNIMPLEMENTED."""

    @_serving_rpc
    def Predict(self, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        return self._api.predict(request)

    @_serving_rpc
    def GetModelMetadata(
        self, request: get_model_metadata_pb2.GetModelMetadataRequest
    ) -> get_model_metadata_pb2.GetModelMetadataResponse:
        return self._api.get_model_metadata(request)


class ModelStatusServicer(_Servicer, model_service_pb2_grpc.ModelServiceServicer):
    """GetModelStatus and HandleReloadConfigRequest."""

    @_serving_rpc
    def GetModelStatus(
        self, request: get_model_status_pb2.GetModelStatusRequest
    ) -> get_model_status_pb2.GetModelStatusResponse:
        return self._api.get_model_status(request)

    @_serving_rpc
    def HandleReloadConfigRequest(
        self, request: model_management_pb2.ReloadConfigRequest
    ) -> model_management_pb2.ReloadConfigResponse:
        return self._api.reload_config(request)
