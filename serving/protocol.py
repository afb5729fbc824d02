"""What the export, the server and the client agree on: names, file layout and limits.

A version directory in TF Serving's layout, as `serving.export` writes it and `serving.versions`
reads it:

    <base_path>/<model_name>/<version>/saved_model.pb
                                      /variables/...
                                      /assets.extra/sharpmask_export.json
                                      /assets.extra/tf_serving_warmup_requests
"""

from __future__ import annotations

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

# TF Serving's default signature key: a request naming no signature gets this one. The export's
# encoded-bytes signature is it.
DEFAULT_SIGNATURE = "serving_default"
SIGNATURE_BYTES = DEFAULT_SIGNATURE
SIGNATURE_PIXELS = "serving_images"
# The one input of both exported signatures, and their outputs.
INPUT_KEY = "images"
OUTPUT_KEYS = ("boxes", "scores", "masks", "window_boxes", "num_proposals")

# Versions are int64 in TF Serving's protos (ModelSpec, ModelVersionStatus).
MAX_VERSION = 2**63 - 1

# The MetaGraph tag TF Serving loads.
SERVE_TAG = "serve"
SAVED_MODEL_FILE = "saved_model.pb"
# Files beside the SavedModel that TF Serving leaves alone, except the warm-up file.
ASSETS_EXTRA = "assets.extra"
# The export's record of its config and pipeline numbers, under assets.extra (ours).
METADATA_FILE = "sharpmask_export.json"
# TF Serving's SavedModel warm-up file, under assets.extra, and the records it replays at most.
WARMUP_FILE = "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000

# Large enough for a batch of full-resolution images in and dense masks out; gRPC's default
# receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Request limits (ours: tensorflow_model_server has none), checked before anything runs. Defaults
# of the server's --max-batch-size and --max-image-pixels.
DEFAULT_MAX_BATCH_SIZE = 32  # elements of a request's first dimension, i.e. images
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096  # height x width of one image, decoded or sent as pixels

# TensorFlow's error codes are gRPC's, number for number.
GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}


def version_number(name: str) -> int | None:
    """The version a directory name stands for, or None for a name that is not one.

    A version directory is named by ASCII decimal digits only (`str.isdigit` also accepts `²`)
    and fits TF Serving's int64 versions; leading zeros are allowed, as TF Serving's parse does.
    """
    if not name or not name.isascii() or not name.isdigit():
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def define_messages(file_text: str) -> dict[str, type]:
    """Message classes for a `.proto` file given as a FileDescriptorProto text proto.

    For the config messages of tensorflow_model_server that tensorflow-serving-api does not ship
    (MonitoringConfig, BatchingParameters): declared with TF Serving's names and field numbers, so
    their text files parse with `text_format` exactly as the server parses them. The file may
    import `google/protobuf/wrappers.proto`. Each call builds a pool of its own.

    Returns:
        Full message name (e.g. "tensorflow.serving.MonitoringConfig") -> class.
    """
    file_proto = text_format.Parse(file_text, descriptor_pb2.FileDescriptorProto())
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file_proto)
    return message_factory.GetMessageClassesForFiles([file_proto.name], pool)
