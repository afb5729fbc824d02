"""Server-side batching as tensorflow_model_server's `--enable_batching` does it.

Concurrent Predict requests to the same signature of the same model version are queued, merged
along dimension 0 into one PredictRequest, run as one call of the SavedModel and the outputs split
back, so each caller gets exactly its own rows. A batch is run once it holds `max_batch_size` rows,
once its first request has waited `batch_timeout_micros`, or once a newer batch has opened behind
it; `num_batch_threads` threads run batches. A request that would open a batch past
`max_enqueued_batches` is answered UNAVAILABLE, as TF Serving answers it. The parameters are TF
Serving's BatchingParameters text proto (`--batching_parameters_file`), e.g.
`serving/batching_parameters.txt`:

    max_batch_size { value: 8 }
    batch_timeout_micros { value: 5000 }
    max_enqueued_batches { value: 100 }
    num_batch_threads { value: 4 }

A merged batch that fails, or whose outputs do not have the batch as their first dimension, is run
again request by request, so one caller's bad image answers that caller only.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import grpc
import numpy as np
import tensorflow as tf
from google.protobuf import text_format
from tensorflow_serving.apis import predict_pb2

from serving.predict import RequestError, run_predict
from serving.protocol import DEFAULT_SIGNATURE, define_messages
from serving.versions import LoadedVersion

logger = logging.getLogger(__name__)

# TF Serving's BatchingParameters (tensorflow_serving/servables/tensorflow/session_bundle_config.proto),
# which tensorflow-serving-api does not ship; the fields this server reads or refuses.
_MESSAGES = define_messages(
    """
    name: "tensorflow_serving/servables/tensorflow/session_bundle_config.proto"
    package: "tensorflow.serving"
    dependency: "google/protobuf/wrappers.proto"
    syntax: "proto3"
    message_type {
      name: "BatchingParameters"
      field { name: "max_batch_size" number: 1 label: LABEL_OPTIONAL type: TYPE_MESSAGE
              type_name: ".google.protobuf.Int64Value" }
      field { name: "batch_timeout_micros" number: 2 label: LABEL_OPTIONAL type: TYPE_MESSAGE
              type_name: ".google.protobuf.Int64Value" }
      field { name: "num_batch_threads" number: 3 label: LABEL_OPTIONAL type: TYPE_MESSAGE
              type_name: ".google.protobuf.Int64Value" }
      field { name: "max_enqueued_batches" number: 4 label: LABEL_OPTIONAL type: TYPE_MESSAGE
              type_name: ".google.protobuf.Int64Value" }
      field { name: "allowed_batch_sizes" number: 5 label: LABEL_REPEATED type: TYPE_INT64 }
      field { name: "pad_variable_length_inputs" number: 6 label: LABEL_OPTIONAL type: TYPE_BOOL }
      field { name: "thread_pool_name" number: 8 label: LABEL_OPTIONAL type: TYPE_MESSAGE
              type_name: ".google.protobuf.StringValue" }
    }
    """
)
BatchingParameters = _MESSAGES["tensorflow.serving.BatchingParameters"]

QUEUE_FULL = "The batch scheduling queue to which this task was submitted is full"


@dataclasses.dataclass(frozen=True)
class BatchOptions:
    """The batch scheduler's numbers, from BatchingParameters (`from_proto`)."""

    max_batch_size: int = 1000  # rows in one merged batch (TF Serving's default)
    batch_timeout_micros: int = 0  # longest a request waits for others (TF Serving's default)
    num_batch_threads: int = os.cpu_count() or 1  # threads running batches
    max_enqueued_batches: int = sys.maxsize  # batches queued per signature; past it, UNAVAILABLE

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value < (0 if field.name == "batch_timeout_micros" else 1):
                raise ValueError(f"{field.name} must be positive. Received: {field.name}={value}")

    @classmethod
    def from_proto(cls, parameters: BatchingParameters) -> BatchOptions:
        """The options a BatchingParameters sets; unset fields keep their defaults.

        Raises:
            ValueError: for padding (`allowed_batch_sizes`, `pad_variable_length_inputs`), which
                this server does not do, or a value out of range.
        """
        if parameters.allowed_batch_sizes or parameters.pad_variable_length_inputs:
            raise ValueError(
                "allowed_batch_sizes and pad_variable_length_inputs (padding batches) are not supported. "
                f"Received: {text_format.MessageToString(parameters, as_one_line=True)}"
            )
        names = [field.name for field in dataclasses.fields(cls)]
        return cls(**{name: getattr(parameters, name).value for name in names if parameters.HasField(name)})


def parse_batching_parameters(path: str | os.PathLike) -> BatchOptions:
    """Reads a BatchingParameters text proto (`--batching_parameters_file`).

    Raises:
        google.protobuf.text_format.ParseError: for a file that is not BatchingParameters.
        ValueError: see `BatchOptions.from_proto`.
    """
    with open(path) as f:
        return BatchOptions.from_proto(text_format.Parse(f.read(), BatchingParameters()))


@dataclasses.dataclass
class _Task:
    loaded: LoadedVersion
    request: predict_pb2.PredictRequest
    rows: int
    future: Future = dataclasses.field(default_factory=Future)


@dataclasses.dataclass
class _Batch:
    created: float
    tasks: list[_Task] = dataclasses.field(default_factory=list)
    rows: int = 0


def _rows(request: predict_pb2.PredictRequest) -> int | None:
    """The batch size every input of a request shares, or None if they do not share one."""
    sizes = {proto.tensor_shape.dim[0].size if proto.tensor_shape.dim else None for proto in request.inputs.values()}
    return sizes.pop() if len(sizes) == 1 else None


def _batch_key(loaded: LoadedVersion, request: predict_pb2.PredictRequest) -> tuple:
    """Requests with equal keys can be concatenated into one: same version, signature, outputs,
    and inputs of the same dtypes and the same shapes past dimension 0."""
    inputs = tuple(
        (key, proto.dtype, tuple(d.size for d in proto.tensor_shape.dim[1:]))
        for key, proto in sorted(request.inputs.items())
    )
    signature = request.model_spec.signature_name or DEFAULT_SIGNATURE
    return id(loaded), request.model_spec.name, signature, tuple(request.output_filter), inputs


class Batcher:
    """Merges concurrent Predict requests into batches and runs them on its own threads.

    Args:
        options: the scheduler's numbers.
        run: answers one PredictRequest with one loaded version (`serving.predict.run_predict`).
        on_batch: called with (model name, rows) for each merged batch run (the metrics).
    """

    def __init__(
        self,
        options: BatchOptions,
        run: Callable[[LoadedVersion, predict_pb2.PredictRequest], predict_pb2.PredictResponse] = run_predict,
        on_batch: Callable[[str, int], None] | None = None,
    ):
        self.options = options
        self._run = run
        self._on_batch = on_batch
        self._cond = threading.Condition()
        self._queues: dict[tuple, collections.deque[_Batch]] = {}
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"serving-batch-{i}", daemon=True)
            for i in range(options.num_batch_threads)
        ]
        for thread in self._threads:
            thread.start()

    def predict(self, loaded: LoadedVersion, request: predict_pb2.PredictRequest) -> predict_pb2.PredictResponse:
        """Answers one request as part of a batch; blocks until its batch has run.

        Raises:
            RequestError: UNAVAILABLE when the queue is full or the batcher stopped,
                INVALID_ARGUMENT for a request of more rows than max_batch_size, or the error
                the request gets from `run`.
        """
        rows = _rows(request)
        if not rows:
            # Nothing to merge along dimension 0 (scalars, ragged or empty batches): run alone.
            return self._run(loaded, request)
        if rows > self.options.max_batch_size:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"Task size {rows} is larger than maximum input batch size {self.options.max_batch_size}",
            )
        task = _Task(loaded, request, rows)
        key = _batch_key(loaded, request)
        with self._cond:
            if self._closed:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "The batch scheduler is stopping")
            queue = self._queues.setdefault(key, collections.deque())
            if not queue or queue[-1].rows + rows > self.options.max_batch_size:
                if len(queue) >= self.options.max_enqueued_batches:
                    raise RequestError(grpc.StatusCode.UNAVAILABLE, QUEUE_FULL)
                queue.append(_Batch(created=time.monotonic()))
            queue[-1].tasks.append(task)
            queue[-1].rows += rows
            self._cond.notify()
        return task.future.result()

    def _take(self) -> tuple[_Batch | None, float | None]:
        """The first batch that is due, or None and how long until one is (None: no batch)."""
        now = time.monotonic()
        timeout = self.options.batch_timeout_micros / 1e6
        wait = None
        for key, queue in self._queues.items():
            front = queue[0]
            due = front.created + timeout
            if len(queue) > 1 or front.rows >= self.options.max_batch_size or now >= due or self._closed:
                queue.popleft()
                if not queue:
                    del self._queues[key]
                return front, None
            wait = due - now if wait is None else min(wait, due - now)
        return None, wait

    def _work(self) -> None:
        while True:
            with self._cond:
                batch, wait = self._take()
                while batch is None:
                    if self._closed:
                        return
                    self._cond.wait(wait)
                    batch, wait = self._take()
            self._run_batch(batch)

    def _run_batch(self, batch: _Batch) -> None:
        tasks = batch.tasks
        if len(tasks) > 1:
            try:
                responses = self._run_merged(tasks)
            except Exception as e:  # noqa: BLE001 -- every caller gets its own answer below
                logger.info("A merged batch of %d requests failed (%s); running them one by one", len(tasks), e)
                responses = None
            if responses is not None:
                for task, response in zip(tasks, responses):
                    task.future.set_result(response)
                return
        for task in tasks:
            try:
                task.future.set_result(self._run(task.loaded, task.request))
            except Exception as e:  # noqa: BLE001 -- handed to the caller's thread
                task.future.set_exception(e)

    def _run_merged(self, tasks: list[_Task]) -> list[predict_pb2.PredictResponse] | None:
        """One call for all tasks, split back per task; None if the outputs cannot be split."""
        first = tasks[0].request
        merged = predict_pb2.PredictRequest()
        merged.model_spec.CopyFrom(first.model_spec)
        merged.output_filter.extend(first.output_filter)
        for key in first.inputs:
            arrays = [tf.make_ndarray(task.request.inputs[key]) for task in tasks]
            merged.inputs[key].CopyFrom(tf.make_tensor_proto(np.concatenate(arrays), dtype=first.inputs[key].dtype))
        response = self._run(tasks[0].loaded, merged)
        total = sum(task.rows for task in tasks)
        outputs = {alias: tf.make_ndarray(proto) for alias, proto in response.outputs.items()}
        if any(array.ndim == 0 or array.shape[0] != total for array in outputs.values()):
            logger.info("Outputs of a merged batch do not have its %d rows first; running its requests alone", total)
            return None
        if self._on_batch is not None:
            self._on_batch(first.model_spec.name, total)
        responses, start = [], 0
        for task in tasks:
            split = predict_pb2.PredictResponse()
            split.model_spec.CopyFrom(response.model_spec)
            split.model_spec.name = task.request.model_spec.name
            for alias, array in outputs.items():
                split.outputs[alias].CopyFrom(tf.make_tensor_proto(array[start : start + task.rows]))
            responses.append(split)
            start += task.rows
        return responses

    def stop(self) -> None:
        """Runs the batches already queued, then stops the threads; later requests are UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
