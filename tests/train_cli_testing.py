"""training/train.py as a real process, for the tests that run it: its path, its environment, a
run with a timeout, its arguments for a dataset and for config overrides, and free ports for a
cluster of worker processes."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from sharpmask_tf.data import generate_dataset

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "train.py")


def train_env(**extra: str) -> dict[str, str]:
    """This process's environment without TF_CONFIG (a single worker), quiet and unbuffered."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


def run_train(args: list[str], cwd, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """train.py with `args`, its output captured; a run past `timeout` seconds raises."""
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=train_env(**env), capture_output=True, text=True, timeout=timeout
    )


def set_args(*overrides: str) -> list[str]:
    """`--set` arguments for config overrides."""
    return [arg for override in overrides for arg in ("--set", override)]


def dataset_args(root: str, num_train: int, num_val: int, seed: int) -> list[str]:
    """`--train-data` and `--val-data` of a synthetic dataset generated under `root`."""
    paths = generate_dataset(root, num_train=num_train, num_val=num_val, seed=seed)
    return ["--train-data", f"{paths['train']}:{root}/train", "--val-data", f"{paths['val']}:{root}/val"]


def free_ports(n):
    """n distinct ports free now (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports
