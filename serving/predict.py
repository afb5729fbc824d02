"""Predict as TF Serving answers it: a request checked against the signature's SignatureDef and
against the server's RequestLimits, the signature called, the response built; a bad request or a
failed run raises RequestError with the status code tensorflow_model_server answers it with.

The limits are checked before anything is decoded or run: the first dimension of every input
(the batch), the pixels of each image of the `images` input (read from the shape of a pixel
tensor, or from the header of an encoded image), and the values a TensorProto provides against
the elements its shape declares (TensorFlow would repeat a lone value to fill any shape).

About 400 lines: the request checks and the Predict call they guard stay together, so every
status code tensorflow_model_server answers with is decided in one file.
"""

from __future__ import annotations

import dataclasses
import math
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.framework import tensor_pb2
from tensorflow.core.protobuf import meta_graph_pb2
from tensorflow_serving.apis import predict_pb2

from serving.protocol import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_SIGNATURE,
    GRPC_CODES,
    INPUT_KEY,
)

if TYPE_CHECKING:
    from serving.versions import LoadedVersion


class RequestError(Exception):
    """A request that fails with the gRPC status code TF Serving would answer with."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclasses.dataclass(frozen=True)
class RequestLimits:
    """What one Predict request may ask of the server; a request over a limit is refused before
    anything is decoded or run.

    Attributes:
        max_batch_size: the largest first dimension of any input, i.e. images per request
            (over it: INVALID_ARGUMENT, as TF Serving's batching answers a task over its
            max_batch_size).
        max_image_pixels: the most pixels, height x width, one image of the `images` input may
            have; every frame counts for an animated GIF, as giflib reads all of them (over it:
            RESOURCE_EXHAUSTED).
    """

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_image_pixels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer. Received: {name}={value!r}")


class ImageHeader(NamedTuple):
    """What an encoded image's header says it decodes to."""

    format: str
    height: int
    width: int
    frames: int = 1

    @property
    def pixels(self) -> int:
        """Pixels the decoder allocates: height x width for every frame."""
        return self.height * self.width * self.frames


def _jpeg_size(data: bytes) -> tuple[int, int, int]:
    try:
        height, width, _ = tf.io.extract_jpeg_shape(data).numpy().tolist()
    except tf.errors.InvalidArgumentError as e:
        raise ValueError(e.message) from e
    return height, width, 1


def _png_size(data: bytes) -> tuple[int, int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise ValueError("no IHDR chunk")
    width, height = struct.unpack(">II", data[16:24])
    return height, width, 1


def _skip_gif_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos]:
        pos += data[pos] + 1
    return pos + 1


def _gif_size(data: bytes) -> tuple[int, int, int]:
    # giflib reads every frame into a raster of the frame's own size before TensorFlow takes the
    # first, so each frame counts at the size of the largest of the screen and the frames.
    if len(data) < 13:
        raise ValueError("no logical screen descriptor")
    width, height = struct.unpack("<HH", data[6:10])
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    frames, largest = 0, (height, width)
    while pos < len(data) and data[pos] != 0x3B:
        if data[pos] == 0x21:
            pos = _skip_gif_sub_blocks(data, pos + 2)
        elif data[pos] == 0x2C and pos + 10 <= len(data):
            frame_width, frame_height = struct.unpack("<HH", data[pos + 5 : pos + 9])
            largest = max(largest, (frame_height, frame_width), key=lambda size: size[0] * size[1])
            frames += 1
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
            pos = _skip_gif_sub_blocks(data, pos + 1)
        else:
            break  # giflib refuses what it cannot read, so nothing past here is decoded
    return *largest, max(frames, 1)


def _bmp_size(data: bytes) -> tuple[int, int, int]:
    if len(data) < 26:
        raise ValueError("no info header")
    width, height = struct.unpack("<ii", data[18:26])
    return abs(height), abs(width), 1


def _webp_size(data: bytes) -> tuple[int, int, int]:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        width = 1 + int.from_bytes(data[24:27], "little")
        height = 1 + int.from_bytes(data[27:30], "little")
    elif chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = (v & 0x3FFF for v in struct.unpack("<HH", data[26:30]))
    elif chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        width, height = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    else:
        raise ValueError("no VP8, VP8L or VP8X header")
    # TensorFlow 2.21's WebP decoder corrupts the heap on an animation (even for its first frame
    # only), which kills the server: refused before it is decoded.
    animated, pos = chunk == b"VP8X" and bool(data[20] & 0x02), 12
    while pos + 8 <= len(data) and not animated:
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        animated = data[pos : pos + 4] in (b"ANIM", b"ANMF")
        pos += 8 + size + (size & 1)
    if animated:
        raise ValueError("an animated WebP, which this server refuses (TensorFlow's decoder corrupts memory on it)")
    return height, width, 1


# The formats TensorFlow's image decoders decode, told by their first bytes as they tell them.
_IMAGE_FORMATS = (
    ("JPEG", lambda data: data.startswith(b"\xff\xd8\xff"), _jpeg_size),
    ("PNG", lambda data: data.startswith(b"\x89PNG\r\n\x1a\n"), _png_size),
    ("GIF", lambda data: data.startswith(b"GIF"), _gif_size),
    ("BMP", lambda data: data.startswith(b"BM"), _bmp_size),
    ("WebP", lambda data: data.startswith(b"RIFF") and data[8:12] == b"WEBP", _webp_size),
)


def read_image_header(data: bytes) -> ImageHeader | None:
    """Reads the size an encoded image decodes to from its header, without decoding it.

    JPEG is read by libjpeg (`tf.io.extract_jpeg_shape`), PNG from its IHDR chunk, GIF from its
    screen and every frame descriptor, BMP from its info header, WebP from its VP8/VP8L/VP8X
    header (an animated WebP is refused).

    Returns:
        The header, or None for data in none of these formats: every TensorFlow image decoder
        tells the format by the same first bytes and refuses such data without decoding it.

    Raises:
        ValueError: for a header too short or malformed to read, or an animated WebP.
    """
    for name, matches, size in _IMAGE_FORMATS:
        if matches(data):
            try:
                return ImageHeader(name, *size(data))
            except ValueError as e:
                raise ValueError(f"Invalid {name} data: {e}. Received: {len(data)} bytes") from e
    return None


# The TensorProto fields that hold values one by one (complex ones as real, imaginary pairs).
_VALUE_FIELDS = (
    "half_val",
    "float_val",
    "double_val",
    "int_val",
    "string_val",
    "scomplex_val",
    "int64_val",
    "bool_val",
    "dcomplex_val",
    "uint32_val",
    "uint64_val",
)


def _check_tensor_proto(key: str, proto: tensor_pb2.TensorProto, dtype: tf.DType) -> tuple[int, ...]:
    """The shape a TensorProto declares, once checked to be a shape whose every element the
    proto provides: TensorFlow repeats a lone value to fill any shape, which would turn a
    hundred bytes into a batch of a hundred images.

    Raises:
        RequestError: INVALID_ARGUMENT for an unknown rank, a negative dimension, or values
            that do not number the declared elements.
    """
    dims = tuple(d.size for d in proto.tensor_shape.dim)
    if proto.tensor_shape.unknown_rank or any(d < 0 for d in dims):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor parsing error: {key}: the shape must be fully defined. Received: shape={dims}",
        )
    declared = math.prod(dims)
    if proto.tensor_content and not dtype.size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor parsing error: {key}: tensor_content cannot hold {dtype.name} values; use string_val",
        )
    if proto.tensor_content:
        provided = len(proto.tensor_content) / dtype.size
        what = f"{len(proto.tensor_content)} bytes of tensor_content"
    else:
        provided = sum(len(getattr(proto, name)) for name in _VALUE_FIELDS) / (2 if dtype.is_complex else 1)
        what = f"{provided:g} values"
    if provided != declared:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"tensor parsing error: {key}: shape {dims} declares {declared} elements of {dtype.name}; "
            f"a request must provide every one. Received: {what}",
        )
    return dims


def check_input_shape(key: str, dims: Sequence[int], dtype: tf.DType, limits: RequestLimits) -> None:
    """Refuses an input whose shape is over the limits, before its values are read: its first
    dimension (the batch), and for a pixel tensor `images` input, (B, H, W, C), height x width.

    Raises:
        RequestError: INVALID_ARGUMENT for a batch over `limits.max_batch_size`,
            RESOURCE_EXHAUSTED for images over `limits.max_image_pixels`.
    """
    dims = tuple(dims)
    if dims and dims[0] > limits.max_batch_size:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"Input {key!r} holds a batch of {dims[0]}, over this server's maximum of {limits.max_batch_size} "
            f"(--max-batch-size). Received: shape={dims}",
        )
    if key == INPUT_KEY and dtype != tf.string and len(dims) == 4 and dims[1] * dims[2] > limits.max_image_pixels:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"Images of input {key!r} are {dims[2]}x{dims[1]} = {dims[1] * dims[2]} pixels, over this server's "
            f"maximum of {limits.max_image_pixels} (--max-image-pixels). Received: shape={dims}",
        )


def check_encoded_images(key: str, images: np.ndarray, limits: RequestLimits) -> None:
    """Refuses encoded images whose header is unreadable or says they decode to more pixels
    than `limits.max_image_pixels`, before any of them is decoded. Data in no image format is
    left to the signature (its decoder refuses it).

    Raises:
        RequestError: INVALID_ARGUMENT for a malformed header or an animated WebP,
            RESOURCE_EXHAUSTED for an image over the pixel limit.
    """
    for index, data in enumerate(images.reshape(-1)):
        try:
            header = read_image_header(bytes(data))
        except ValueError as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{key}[{index}]: {e}") from e
        if header is not None and header.pixels > limits.max_image_pixels:
            frames = f" x {header.frames} frames" if header.frames > 1 else ""
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{key}[{index}] is a {header.format} of {header.width}x{header.height}{frames} = {header.pixels} "
                f"pixels, over this server's maximum of {limits.max_image_pixels} (--max-image-pixels)",
            )


def _check_aliases(kind: str, aliases: Iterable[str], known: Iterable[str]) -> None:
    """Refuses the first of `aliases` that is not a `kind` ("input" or "output") of the signature,
    in TF Serving's words.

    Raises:
        RequestError: INVALID_ARGUMENT naming the alias and the ones the signature has.
    """
    known = sorted(known)
    for alias in aliases:
        if alias not in known:
            # TF Serving ends the input message's first sentence with a period, the output's without.
            stop = "." if kind == "input" else ""
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{kind} tensor alias not found in signature: {alias}{stop} "
                f"{kind.capitalize()}s expected to be in the set {{{','.join(known)}}}.",
            )


def _input_tensors(
    signature_name: str, signature: meta_graph_pb2.SignatureDef, inputs, limits: RequestLimits
) -> dict[str, tf.Tensor]:
    """Checks a request's inputs against a SignatureDef and the limits, and converts them to tensors."""
    expected = sorted(signature.inputs)
    _check_aliases("input", inputs, expected)
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
        dims = _check_tensor_proto(key, proto, want)
        shape = tf.TensorShape(info.tensor_shape)
        if not shape.is_compatible_with(dims):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Input {key!r} of signature {signature_name!r} must have shape {shape}. Received: shape={dims}",
            )
        check_input_shape(key, dims, want, limits)
        try:
            value = tf.make_ndarray(proto)
        except (ValueError, TypeError) as e:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"tensor parsing error: {key}: {e}") from e
        tensors[key] = tf.constant(value, dtype=want)
    return tensors


def _checked_inputs(
    loaded: LoadedVersion, request: predict_pb2.PredictRequest, limits: RequestLimits
) -> tuple[str, Any, dict[str, tf.Tensor]]:
    """(signature name, SignatureDef, input tensors) of a request that passed every check."""
    signature_name = request.model_spec.signature_name or DEFAULT_SIGNATURE
    if signature_name not in loaded.signatures:
        raise RequestError(grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.')
    signature = loaded.signature_defs[signature_name]
    inputs = _input_tensors(signature_name, signature, request.inputs, limits)
    # Where decoding would fail: after the request's structure is checked, before any decoding.
    if INPUT_KEY in inputs and inputs[INPUT_KEY].dtype == tf.string:
        check_encoded_images(INPUT_KEY, inputs[INPUT_KEY].numpy(), limits)
    return signature_name, signature, inputs


def check_request(loaded: LoadedVersion, request: predict_pb2.PredictRequest, limits: RequestLimits) -> None:
    """Checks a PredictRequest as `run_predict` does (signature, inputs, limits, image headers)
    without running it: the batcher holds each request to the limits before merging it.

    Raises:
        RequestError: with TF Serving's status code for what is wrong.
    """
    _checked_inputs(loaded, request, limits)


def run_predict(
    loaded: LoadedVersion, request: predict_pb2.PredictRequest, limits: RequestLimits | None = None
) -> predict_pb2.PredictResponse:
    """Answers a PredictRequest with one loaded version, as TF Serving's Predict does.

    Args:
        loaded: the version that answers.
        request: the request.
        limits: what the request may ask for; the defaults when None.

    Raises:
        RequestError: with the status code TF Serving answers a bad request or a failed run with.
    """
    signature_name, signature, inputs = _checked_inputs(loaded, request, limits or RequestLimits())
    aliases = list(request.output_filter) or sorted(signature.outputs)
    _check_aliases("output", aliases, signature.outputs)
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
