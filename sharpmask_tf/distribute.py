"""tf.distribute strategy resolution and this process's role in a cluster (TF_CONFIG)."""

from __future__ import annotations

import json
import os

import tensorflow as tf

STRATEGIES = ("auto", "default", "mirrored", "multiworker")


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


def cluster_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is_chief, worker index) of this process under a strategy: the chief writes the model
    directory; the others write their checkpoints under `workers/<index>/`."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief), task_id
