"""Predict as TF Serving answers it: a request checked against the signature's SignatureDef,
the signature called, the response built; a bad request or a failed run raises RequestError with
the status code tensorflow_model_server answers it with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from serving.protocol import DEFAULT_SIGNATURE, GRPC_CODES

if TYPE_CHECKING:
    from serving.versions import LoadedVersion


class RequestError(Exception):
    """A request that fails with the gRPC status code TF Serving would answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _input_tensors(signature_name: str, signature: meta_graph_pb2.SignatureDef, inputs) -> dict[str, tf.Tensor]:
    """Checks a request's inputs against a SignatureDef and converts them to tensors."""
    expected = sorted(signature.inputs)
    for key in inputs:
        if key not in signature.inputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input tensor alias not found in signature: {key}. "
                f"Inputs expected to be in the set {{{','.join(expected)}}}.",
            )
    missing = [key for key in expected if key not in inputs]
    if missing:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Signature {signature_name!r} requires inputs {{{','.join(expected)}}}. "
            f"Missing: {{{','.join(missing)}}}; received: {{{','.join(sorted(inputs))}}}.",
        )
    tensors = {}
    for key, proto in inputs.items():
        info = signature.inputs[key]
        want = tf.dtypes.as_dtype(info.dtype)
        if proto.dtype != info.dtype:
            got = tf.dtypes.as_dtype(proto.dtype).name if proto.dtype else "DT_INVALID"
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} of signature {signature_name!r} must have dtype {want.name}. Received: dtype={got}",
            )
        try:
            value = tf.make_ndarray(proto)
        except (ValueError, TypeError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {key}: {e}") from e
        shape = tf.TensorShape(info.tensor_shape)
        if not shape.is_compatible_with(value.shape):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} of signature {signature_name!r} must have shape {shape}. "
                f"Received: shape={tuple(value.shape)}",
            )
        tensors[key] = tf.constant(value, dtype=want)
    return tensors


def run_predict(loaded: LoadedVersion, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
    """Answers a PredictRequest with one loaded version, as TF Serving's Predict does.

    Raises:
        RequestError: with the status code TF Serving answers a bad request or a failed run with.
    """
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature_name not in loaded.signatures:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
    signature = loaded.signature_defs[signature_name]
    inputs = _input_tensors(signature_name, signature, request.inputs)
    aliases = list(request.output_filter) or sorted(signature.outputs)
    for alias in aliases:
        if alias not in signature.outputs:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"output tensor alias not found in signature: {alias} "
                f"Outputs expected to be in the set {{{','.join(sorted(signature.outputs))}}}.",
            )
    if len(set(aliases)) != len(aliases):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, f"duplicate output tensor alias. Received: output_filter={aliases}"
        )
    try:
        outputs = loaded.signatures[signature_name](**inputs)
    except tf.errors.OpError as e:
        raise RequestError(GRPC_CODES.get(e.error_code, grpc.StatusCode.UNKNOWN), e.message) from e
    response = predict_pb2.PredictResponse()
    response.model_spec.name = request.model_spec.name
    response.model_spec.version.value = loaded.version
    response.model_spec.signature_name = signature_name
    for alias in aliases:
        response.outputs[alias].CopyFrom(tf.make_tensor_proto(outputs[alias].numpy()))
    return response
