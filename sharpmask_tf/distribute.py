"""tf.distribute strategy resolution and this process's role in a cluster (TF_CONFIG)."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable

import tensorflow as tf
from tensorflow.python.eager import context

STRATEGIES = ("auto", "default", "mirrored", "multiworker")

# Seconds the workers wait for each other at the end of a run before giving up with a warning.
EXIT_BARRIER_TIMEOUT_S = 300.0
# Every barrier of a process gets a fresh id; the workers pass the same barriers in the same order.
_barrier_ids = itertools.count()


def resolve_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Picks a tf.distribute strategy. Call it before any other TensorFlow work in the process
    (MultiWorkerMirroredStrategy needs that).

    Args:
        name: "auto" (MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
            MirroredStrategy over all local GPUs when there are any, else the default strategy),
            "default", "mirrored" (all local GPUs, or the CPU) or "multiworker" (from TF_CONFIG).

    Returns:
        The strategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "auto":
        workers = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
        if len(workers) > 1:
            name = "multiworker"
        elif tf.config.list_physical_devices("GPU"):
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _cluster_resolver(strategy: tf.distribute.Strategy):
    """The strategy's cluster resolver when this process is a task of a cluster, else None."""
    resolver = getattr(strategy, "cluster_resolver", None)
    return resolver if resolver is not None and resolver.task_type else None


def cluster_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is_chief, worker index) of this process under a strategy: the chief writes the model
    directory; the others write their checkpoints under `workers/<index>/`."""
    resolver = _cluster_resolver(strategy)
    if resolver is None:
        return True, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief), task_id


def num_workers(strategy: tf.distribute.Strategy) -> int:
    """How many worker processes (chief included) the strategy's cluster has; 1 without one."""
    resolver = _cluster_resolver(strategy)
    if resolver is None:
        return 1
    spec = resolver.cluster_spec().as_dict()
    return sum(len(spec.get(job, ())) for job in ("chief", "worker"))


def wait_for_workers(
    strategy: tf.distribute.Strategy,
    timeout_s: float = EXIT_BARRIER_TIMEOUT_S,
    warn: Callable[[str], None] = print,
) -> bool:
    """Blocks until every worker of a multi-worker strategy reaches this call (a barrier of the
    coordination service, no collective); returns at once with one worker.

    A collective ends on one worker before its peers have fetched that worker's part: a worker
    that exits right after the last all-reduce can leave a peer's copy of it waiting on a gone
    process until the peer's coordination service declares it dead (missed heartbeats). Workers
    call this before they exit, after their last collective.

    Returns:
        False (after `warn`) if the barrier failed or timed out, else True.
    """
    if num_workers(strategy) < 2:
        return True
    barrier = f"sharpmask_tf_exit_{next(_barrier_ids)}"
    try:
        context.context().wait_at_barrier(barrier, int(timeout_s * 1000))
    except tf.errors.OpError as e:
        warn(f"warning: the workers did not all reach the end of the run within {timeout_s:g} s ({barrier}): {e}")
        return False
    return True
