"""TF Serving's REST API over the standard library's HTTP server, beside the gRPC one.

The URLs, JSON bodies and status codes of tensorflow_model_server's `--rest_api_port`:

    POST /v1/models/{name}[/versions/{v} | /labels/{l}]:predict
         {"signature_name": ..., "instances": [...]}   -> {"predictions": [...]}  (row format)
         {"signature_name": ..., "inputs": ...}        -> {"outputs": ...}        (columnar format)
    GET  /v1/models/{name}[/versions/{v} | /labels/{l}]           GetModelStatus as JSON
    GET  /v1/models/{name}[/versions/{v} | /labels/{l}]/metadata  GetModelMetadata as JSON

Binary strings travel as `{"b64": "..."}`, so `{"instances": [{"b64": "<jpeg>"}]}` runs
`serving_default`; string outputs whose alias ends in `_bytes` come back the same way. A failure
answers `{"error": "..."}` with the HTTP status TF Serving gives its gRPC code (`HTTP_STATUS`).
Requests become the gRPC request protos and run through the same `ServingApi` as gRPC ones, so
every check of `serving.predict` applies to both.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2

from serving.metrics import RequestObserver, requested_version
from serving.predict import RequestError
from serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_SIGNATURE

if TYPE_CHECKING:
    from serving.api import ServingApi

logger = logging.getLogger(__name__)

# The HTTP status tensorflow_model_server answers each gRPC code with (its http_server's mapping).
HTTP_STATUS = {
    grpc.StatusCode.OK: HTTPStatus.OK,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request", as TF Serving uses it
    grpc.StatusCode.UNKNOWN: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.INVALID_ARGUMENT: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.DEADLINE_EXCEEDED: HTTPStatus.GATEWAY_TIMEOUT,
    grpc.StatusCode.NOT_FOUND: HTTPStatus.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS: HTTPStatus.CONFLICT,
    grpc.StatusCode.PERMISSION_DENIED: HTTPStatus.FORBIDDEN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: HTTPStatus.TOO_MANY_REQUESTS,
    grpc.StatusCode.FAILED_PRECONDITION: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.ABORTED: HTTPStatus.CONFLICT,
    grpc.StatusCode.OUT_OF_RANGE: HTTPStatus.BAD_REQUEST,
    grpc.StatusCode.UNIMPLEMENTED: HTTPStatus.NOT_IMPLEMENTED,
    grpc.StatusCode.INTERNAL: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAVAILABLE: HTTPStatus.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DATA_LOSS: HTTPStatus.INTERNAL_SERVER_ERROR,
    grpc.StatusCode.UNAUTHENTICATED: HTTPStatus.UNAUTHORIZED,
}

_MODEL_URL = re.compile(
    r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+)|/labels/(?P<label>[^/:]+))?"
    r"(?P<tail>/metadata|:predict|:classify|:regress)?"
)


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _model_spec(match: re.Match) -> model_pb2.ModelSpec:
    spec = model_pb2.ModelSpec(name=unquote(match["name"]))
    if match["version"] is not None:
        spec.version.value = int(match["version"])
    elif match["label"] is not None:
        spec.version_label = unquote(match["label"])
    return spec


def _decode_strings(value: Any) -> Any:
    """`{"b64": ...}` objects to bytes and JSON strings to UTF-8 bytes, through nested lists."""
    if isinstance(value, list):
        return [_decode_strings(v) for v in value]
    if isinstance(value, dict):
        if set(value) != {"b64"} or not isinstance(value["b64"], str):
            raise _invalid(f'A binary value must be an object {{"b64": "<base64 string>"}}. Received: {value!r:.200}')
        try:
            return base64.b64decode(value["b64"], validate=True)
        except (binascii.Error, ValueError) as e:
            raise _invalid(f"Unable to base64 decode: {e}. Received: {value['b64']!r:.200}") from e
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def json_to_tensor(value: Any, dtype: tf.DType, name: str):
    """One input's JSON value as a TensorProto of the signature's dtype.

    Raises:
        RequestError: INVALID_ARGUMENT for bad base64, ragged lists or values of the wrong type.
    """
    if dtype == tf.string:
        array = np.asarray(_decode_strings(value), dtype=object)
        if any(not isinstance(v, bytes) for v in array.reshape(-1)):
            raise _invalid(f"Input {name!r} must hold strings or b64 objects. Received: {value!r:.200}")
    else:
        try:
            array = np.asarray(value, dtype=dtype.as_numpy_dtype)
        except (ValueError, TypeError) as e:
            raise _invalid(f"Input {name!r} is not a {dtype.name} tensor: {e}. Received: {value!r:.200}") from e
    return tf.make_tensor_proto(array, dtype=dtype)


def _inputs_from_json(body: Any, signature: meta_graph_pb2.SignatureDef) -> tuple[dict[str, Any], bool]:
    """A predict body's inputs as name -> JSON value, and whether it used the row format."""
    if not isinstance(body, dict):
        raise _invalid(f"The request body must be a JSON object. Received: {type(body).__name__}")
    if ("instances" in body) == ("inputs" in body):
        if "instances" in body:
            raise _invalid("Not formatted correctly expecting only one of 'inputs' or 'instances' keys exclusively")
        raise _invalid(f"Missing 'inputs' or 'instances' key. Received keys: {sorted(body)}")
    names = sorted(signature.inputs)
    only = names[0] if len(names) == 1 else None
    if "inputs" in body:
        value = body["inputs"]
        named = isinstance(value, dict) and not (only is not None and set(value) == {"b64"})
        if not named and only is None:
            raise _invalid(
                f"Signature takes inputs {names}: 'inputs' must be an object of them. Received: {value!r:.200}"
            )
        return (value if named else {only: value}), False
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise _invalid(f"'instances' must be a non-empty list. Received: {instances!r:.200}")
    named = [isinstance(row, dict) and not (only is not None and set(row) == {"b64"}) for row in instances]
    if any(named) and not all(named):
        raise _invalid("Every instance must be an object of named inputs, or none may be")
    if not named[0]:
        if only is None:
            raise _invalid(f"Signature takes inputs {names}: each instance must be an object of them")
        return {only: instances}, True
    keys = set(instances[0])
    for index, row in enumerate(instances):
        if set(row) != keys:
            raise _invalid(
                f"Every instance must have the same keys. Instance 0 has {sorted(keys)}, instance {index}: {sorted(row)}"
            )
    return {key: [row[key] for row in instances] for key in keys}, True


def _tensor_to_json(proto, alias: str) -> Any:
    array = tf.make_ndarray(proto)
    if array.dtype == object:
        if alias.endswith("_bytes"):
            encode = np.vectorize(lambda b: {"b64": base64.b64encode(b).decode("ascii")}, otypes=[object])
        else:
            encode = np.vectorize(lambda b: b.decode("utf-8", errors="replace"), otypes=[object])
        return encode(array).tolist() if array.size else array.tolist()
    return array.tolist()


def predict_json(api: ServingApi, spec: model_pb2.ModelSpec, body: Any) -> dict:
    """Answers a REST predict body (row or columnar format) through `api.predict`.

    Raises:
        RequestError: INVALID_ARGUMENT for a body that is not TF Serving's format, or the
            error the gRPC Predict answers the request with.
    """
    if isinstance(body, dict) and "signature_name" in body and not isinstance(body["signature_name"], str):
        raise _invalid(f"'signature_name' must be a string. Received: {body['signature_name']!r:.200}")
    request = predict_pb2.PredictRequest()
    request.model_spec.CopyFrom(spec)
    request.model_spec.signature_name = body.get("signature_name", "") if isinstance(body, dict) else ""
    metadata = api.get_model_metadata(get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=spec, metadata_field=["signature_def"]
    ))  # fmt: skip
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    metadata.metadata["signature_def"].Unpack(signature_map)
    # An unknown signature gets no inputs here; Predict then answers it as TF Serving does.
    signature = signature_map.signature_def.get(request.model_spec.signature_name or DEFAULT_SIGNATURE)
    inputs, rows = _inputs_from_json(body, signature) if signature is not None else ({}, True)
    for key, value in inputs.items():
        if key in signature.inputs:
            request.inputs[key].CopyFrom(json_to_tensor(value, tf.dtypes.as_dtype(signature.inputs[key].dtype), key))
        else:
            # A proto of the right key and no dtype: Predict names the unknown alias.
            request.inputs[key].CopyFrom(tf.make_tensor_proto(0))
    response = api.predict(request)
    outputs = {alias: _tensor_to_json(proto, alias) for alias, proto in response.outputs.items()}
    if not rows:
        return {"outputs": outputs[next(iter(outputs))] if len(outputs) == 1 else outputs}
    sizes = {alias: len(value) if isinstance(value, list) else None for alias, value in outputs.items()}
    if len(set(sizes.values())) != 1 or None in sizes.values():
        raise _invalid(
            f"Output tensors must all have the batch as their first dimension for the row format; "
            f"use the columnar format ('inputs'). Received first dimensions: {sizes}"
        )
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    count = next(iter(sizes.values()))
    return {"predictions": [{alias: value[i] for alias, value in outputs.items()} for i in range(count)]}


def _message_json(message) -> dict:
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def metadata_json(api: ServingApi, spec: model_pb2.ModelSpec) -> dict:
    """GetModelMetadata as TF Serving's REST API shows it: the SignatureDef map unpacked."""
    response = api.get_model_metadata(
        get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=["signature_def"])
    )
    signature_map = get_model_metadata_pb2.SignatureDefMap()
    response.metadata["signature_def"].Unpack(signature_map)
    return {
        "model_spec": _message_json(response.model_spec),
        "metadata": {"signature_def": _message_json(signature_map)},
    }


def status_json(api: ServingApi, spec: model_pb2.ModelSpec) -> dict:
    """GetModelStatus as JSON, as TF Serving's REST API shows it."""
    return _message_json(api.get_model_status(get_model_status_pb2.GetModelStatusRequest(model_spec=spec)))


class RestServer:
    """TF Serving's REST API on its own port, answering through a `ServingApi`.

    Args:
        api: what answers the requests (the gRPC server's, so both see the same models).
        host: the interface to bind.
        port: the port to bind; 0 picks a free one (see `port` after `start`).
        max_body_bytes: the largest request body read; a longer one is answered
            RESOURCE_EXHAUSTED (HTTP 429), as gRPC answers a message over its limit.
        observe: called with (model, requested version, API, code, seconds) after each model
            request (`ServingMetrics.observer`).
        extra_routes: GET path -> () -> (content type, body) for other pages (the metrics).
    """

    def __init__(
        self,
        api: ServingApi,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_body_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        observe: RequestObserver | None = None,
        extra_routes: Mapping[str, Callable[[], tuple[str, bytes]]] | None = None,
    ):
        self.api = api
        self.host = host
        self.port = port
        self.max_body_bytes = max_body_bytes
        self.observe = observe
        self.extra_routes = dict(extra_routes or {})
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> int:
        """Binds and starts answering on a background thread; returns the bound port."""
        handler = type("Handler", (_Handler,), {"rest": self})
        # socketserver's default backlog of 5 resets connections from a burst of concurrent clients.
        attributes = {"address_family": _family(self.host), "request_queue_size": 128}
        server_class = type("Server", (ThreadingHTTPServer,), attributes)
        self._httpd = server_class((self.host, self.port), handler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="serving-rest", daemon=True)
        self._thread.start()
        logger.info("REST API on %s:%d", self.host, self.port)
        return self.port

    def stop(self) -> None:
        """Stops accepting connections and closes the socket."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()

    def answer(self, method: str, path: str, body: bytes | None) -> tuple[int, dict]:
        """One model request: (HTTP status, JSON object), errors as TF Serving's `{"error": ...}`."""
        match = _MODEL_URL.fullmatch(path)
        tail = match["tail"] if match else None
        if match is None or (method == "GET") != (tail in (None, "/metadata")):
            return HTTP_STATUS[grpc.StatusCode.NOT_FOUND], {"error": f"Malformed request: {method} {path}"}
        spec = _model_spec(match)
        api_name = {None: "GetModelStatus", "/metadata": "GetModelMetadata"}.get(tail) or tail[1:]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            if tail is None:
                result = status_json(self.api, spec)
            elif tail == "/metadata":
                result = metadata_json(self.api, spec)
            elif tail == ":predict":
                try:
                    parsed = json.loads(body)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise _invalid(f"JSON Parse error: {e}") from e
                result = predict_json(self.api, spec, parsed)
            else:
                raise RequestError(grpc.StatusCode.UNIMPLEMENTED, f"{tail[1:]} is not served here; use :predict")
        except RequestError as e:
            code, result = e.code, {"error": e.message}
        except Exception as e:
            logger.exception("REST %s %s failed", method, path)
            code, result = grpc.StatusCode.INTERNAL, {"error": f"{type(e).__name__}: {e}"}
        if self.observe is not None:
            self.observe(spec.name, requested_version(spec), api_name, code, time.perf_counter() - started)
        return HTTP_STATUS.get(code, HTTPStatus.INTERNAL_SERVER_ERROR), result


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class _Handler(BaseHTTPRequestHandler):
    rest: RestServer
    protocol_version = "HTTP/1.1"
    # Headers and body are written separately; without TCP_NODELAY, Nagle's algorithm and the
    # client's delayed ACK hold the body back on a kept-alive connection.
    disable_nagle_algorithm = True

    def log_message(self, format, *args):  # noqa: A002 -- BaseHTTPRequestHandler's signature
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(self, status: int, content_type: str, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _send_json(self, status: int, result: dict) -> None:
        self._send(status, "application/json", json.dumps(result).encode("utf-8"))

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in self.rest.extra_routes:
            self._send(HTTPStatus.OK, *self.rest.extra_routes[path]())
            return
        self._send_json(*self.rest.answer("GET", path, None))

    def do_POST(self):
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            error = f"A request body needs a Content-Length header. Received: {length!r}"
            self._send_json(HTTP_STATUS[grpc.StatusCode.INVALID_ARGUMENT], {"error": error})
            return
        if int(length) > self.rest.max_body_bytes:
            # The body is not read, so the connection cannot be reused.
            self.close_connection = True
            error = f"Request body of {length} bytes is larger than the limit of {self.rest.max_body_bytes} bytes"
            self._send_json(HTTP_STATUS[grpc.StatusCode.RESOURCE_EXHAUSTED], {"error": error})
            return
        body = self.rfile.read(int(length))
        self._send_json(*self.rest.answer("POST", self.path.split("?", 1)[0], body))
