"""A client for TensorFlow Serving's gRPC API (tensorflow_model_server or serving.server).

    client = ServingClient("localhost:8500", "sharpmask")
    outputs = client.predict_images([open("street.jpg", "rb").read()])  # {"boxes": ndarray, ...}

The CLI writes the outputs (or the model's metadata or status) as JSON:

    python -m serving.client predict --server localhost:8500 --model-name sharpmask street.jpg --output out.json
    python -m serving.client metadata --server localhost:8500 --model-name sharpmask
    python -m serving.client status --server localhost:8500 --model-name sharpmask
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import json_format
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from serving.protocol import DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_SIGNATURE, GRPC_CODES, INPUT_KEY


class ServingError(RuntimeError):
    """A failed call, with the server's gRPC status code (UNAVAILABLE once retries are spent)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class ModelMetadata(NamedTuple):
    """GetModelMetadata's answer: the version that answered and its SignatureDefs by name."""

    name: str
    version: int
    signature_defs: dict[str, meta_graph_pb2.SignatureDef]


class VersionStatus(NamedTuple):
    """One entry of GetModelStatus: state is AVAILABLE, END, ... (ModelVersionStatus.State names)."""

    version: int
    state: str
    error_code: str
    error_message: str


class ServingClient:
    """Calls one model on a TensorFlow Serving gRPC endpoint, retrying while it is UNAVAILABLE.

    Args:
        target: `host:port` of the server.
        model_name: the served model's name.
        signature_name: the signature `predict` calls unless told otherwise.
        version: a specific version to call; None lets the server pick its newest.
        version_label: a version label (e.g. "stable") instead of a version.
        timeout: seconds each attempt may take.
        max_attempts: attempts per call while the server answers UNAVAILABLE (not started yet,
            restarting, overloaded); other errors are raised at once.
        initial_backoff: seconds before the second attempt; doubled every attempt after it.
        max_backoff: cap on the wait between attempts.
        max_message_bytes: max send and receive message size, for large images and masks.
    """

    def __init__(
        self,
        target: str,
        model_name: str,
        *,
        signature_name: str = DEFAULT_SIGNATURE,
        version: int | None = None,
        version_label: str | None = None,
        timeout: float = 30.0,
        max_attempts: int = 5,
        initial_backoff: float = 0.2,
        max_backoff: float = 5.0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        if version is not None and version_label is not None:
            raise ValueError(
                f"Pass a version or a version_label, not both. Received: version={version}, "
                f"version_label={version_label!r}"
            )
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be positive. Received: max_attempts={max_attempts}")
        if timeout <= 0 or initial_backoff <= 0 or max_backoff < initial_backoff:
            raise ValueError(
                "timeout and initial_backoff must be positive and max_backoff >= initial_backoff. "
                f"Received: timeout={timeout}, initial_backoff={initial_backoff}, max_backoff={max_backoff}"
            )
        self.target = target
        self.model_name = model_name
        self.signature_name = signature_name
        self.version = version
        self.version_label = version_label
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        backoff_ms = int(initial_backoff * 1000)
        self._channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.max_receive_message_length", max_message_bytes),
                # Reconnect on our schedule: gRPC's own backoff starts at 1 s and grows to 120 s,
                # which would keep answering UNAVAILABLE after the server is back.
                ("grpc.initial_reconnect_backoff_ms", backoff_ms),
                ("grpc.min_reconnect_backoff_ms", backoff_ms),
                ("grpc.max_reconnect_backoff_ms", int(max_backoff * 1000)),
            ],
        )
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)

    def _model_spec(self, signature_name: str = "") -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name, signature_name=signature_name)
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label is not None:
            spec.version_label = self.version_label
        return spec

    def _call(self, method: Callable, request: Any, what: str) -> Any:
        start = time.monotonic()
        for attempt in range(1, self.max_attempts + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as e:
                code, details = e.code(), e.details()
            if code != grpc.StatusCode.UNAVAILABLE:
                raise ServingError(code, f"{what} on {self.target} failed with {code.name}: {details}")
            if attempt < self.max_attempts:
                time.sleep(min(self.max_backoff, self.initial_backoff * 2 ** (attempt - 1)))
        raise ServingError(
            grpc.StatusCode.UNAVAILABLE,
            f"{what}: the server at {self.target} was UNAVAILABLE for {self.max_attempts} attempts over "
            f"{time.monotonic() - start:.1f}s; is it running? Last error: {details}",
        )

    def predict(
        self,
        inputs: Mapping[str, Any],
        signature_name: str | None = None,
        output_filter: Sequence[str] = (),
    ) -> dict[str, np.ndarray]:
        """Calls Predict with `inputs` (name -> array-like, converted by tf.make_tensor_proto).

        Args:
            inputs: the signature's inputs by name.
            signature_name: the signature to call; the client's default when None.
            output_filter: the outputs to return; every output when empty.

        Returns:
            The outputs by name, as numpy arrays.

        Raises:
            ServingError: with the server's status code, or UNAVAILABLE once retries are spent.
        """
        signature = signature_name or self.signature_name
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(signature), output_filter=output_filter)
        for name, value in inputs.items():
            request.inputs[name].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self._prediction.Predict, request, f"Predict({self.model_name}, {signature})")
        return {name: tf.make_ndarray(proto) for name, proto in response.outputs.items()}

    def predict_images(
        self, images: Sequence[bytes], input_name: str = INPUT_KEY, signature_name: str | None = None
    ) -> dict[str, np.ndarray]:
        """Calls Predict with encoded JPEG/PNG file bytes as a 1-D string tensor (see `predict`)."""
        return self.predict({input_name: np.array(list(images), dtype=object)}, signature_name)

    def get_model_metadata(self) -> ModelMetadata:
        """Calls GetModelMetadata for the signature_def field, as TF Serving packs it.

        Raises:
            ServingError: with the server's status code, or UNAVAILABLE once retries are spent.
        """
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(), metadata_field=["signature_def"]
        )
        response = self._call(self._prediction.GetModelMetadata, request, f"GetModelMetadata({self.model_name})")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        if not response.metadata["signature_def"].Unpack(signature_map):
            raise ServingError(
                grpc.StatusCode.INTERNAL,
                "GetModelMetadata answered without a SignatureDefMap. "
                f"Received: type_url={response.metadata['signature_def'].type_url!r}",
            )
        spec = response.model_spec
        return ModelMetadata(spec.name, spec.version.value, dict(signature_map.signature_def))

    def get_model_status(self) -> list[VersionStatus]:
        """Calls GetModelStatus for the client's version (or every version when none is set).

        Raises:
            ServingError: with the server's status code, or UNAVAILABLE once retries are spent.
        """
        spec = model_pb2.ModelSpec(name=self.model_name)
        if self.version is not None:
            spec.version.value = self.version
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
        response = self._call(self._models.GetModelStatus, request, f"GetModelStatus({self.model_name})")
        state_name = get_model_status_pb2.ModelVersionStatus.State.Name
        return [
            VersionStatus(s.version, state_name(s.state), _code_name(s.status.error_code), s.status.error_message)
            for s in response.model_version_status
        ]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ServingClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _code_name(number: int) -> str:
    """A status's error code by its gRPC name, or the number itself if gRPC has no such code."""
    code = GRPC_CODES.get(number)
    return str(number) if code is None else code.name


def to_json(value: np.ndarray) -> Any:
    """An array as nested lists; byte strings as {"b64": ...} like TF Serving's REST API."""
    if value.dtype == object:
        return np.vectorize(lambda b: {"b64": base64.b64encode(b).decode("ascii")}, otypes=[object])(value).tolist()
    return value.tolist()


def _command_result(client: ServingClient, args: argparse.Namespace) -> Any:
    """Runs the CLI's command and returns what it writes as JSON."""
    if args.command == "predict":
        images = []
        for path in args.images:
            with open(path, "rb") as f:
                images.append(f.read())
        outputs = client.predict_images(images, args.input_name)
        return {name: to_json(value) for name, value in sorted(outputs.items())}
    if args.command == "metadata":
        metadata = client.get_model_metadata()
        return {
            "model_spec": {"name": metadata.name, "version": metadata.version},
            "signature_def": {
                name: json_format.MessageToDict(signature) for name, signature in metadata.signature_defs.items()
            },
        }
    return {"model_version_status": [status._asdict() for status in client.get_model_status()]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TensorFlow Serving gRPC client; writes JSON.")
    parser.add_argument("command", choices=["predict", "metadata", "status"])
    parser.add_argument("images", nargs="*", help="JPEG/PNG files (predict)")
    parser.add_argument("--server", default="localhost:8500", help="host:port")
    parser.add_argument("--model-name", default="sharpmask")
    parser.add_argument("--signature-name", default=DEFAULT_SIGNATURE)
    parser.add_argument("--input-name", default=INPUT_KEY, help="the signature input the images go to")
    version = parser.add_mutually_exclusive_group()
    version.add_argument("--version", type=int)
    version.add_argument("--version-label")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per attempt")
    parser.add_argument("--max-attempts", type=int, default=5, help="attempts while the server is UNAVAILABLE")
    parser.add_argument("--output", default="-", help="JSON file to write; - for stdout")
    # Intermixed: the images may follow the options (`predict --server ... photo.jpg --output ...`);
    # plain parsing gives a `*` positional its empty match before the first option.
    args = parser.parse_intermixed_args(argv)
    if args.command == "predict" and not args.images:
        parser.error("predict needs at least one image file")

    client = ServingClient(
        args.server,
        args.model_name,
        signature_name=args.signature_name,
        version=args.version,
        version_label=args.version_label,
        timeout=args.timeout,
        max_attempts=args.max_attempts,
    )
    try:
        result = _command_result(client, args)
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        client.close()
    text = json.dumps(result, indent=1)
    if args.output == "-":
        print(text)
    else:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
