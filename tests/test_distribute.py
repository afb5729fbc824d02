"""sharpmask_tf.distribute's worker count and exit barrier: on the default strategy, and on two
real worker processes of a MultiWorkerMirroredStrategy over loopback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tensorflow as tf
from train_cli_testing import free_ports, train_env

from sharpmask_tf.distribute import num_workers, wait_for_workers

# One worker of the cluster: worker 1 writes its marker file only after a pause, then both enter
# the barrier; worker 0 reports whether the marker existed when its barrier returned.
WORKER = """
import pathlib, sys, time
import tensorflow as tf
from sharpmask_tf.distribute import num_workers, wait_for_workers
strategy = tf.distribute.MultiWorkerMirroredStrategy()
index, marker, timeout_s = int(sys.argv[1]), pathlib.Path(sys.argv[2]), float(sys.argv[3])
print("workers", num_workers(strategy), flush=True)
if index == 1:
    time.sleep(3)
    if timeout_s > 0:
        marker.write_text("late")
    else:
        sys.exit(0)
ok = wait_for_workers(strategy, timeout_s=abs(timeout_s) or 4, warn=lambda m: print(m, flush=True))
print("passed", ok, "marker", marker.exists(), flush=True)
"""


def test_one_worker_passes_the_barrier_at_once():
    warnings = []
    strategy = tf.distribute.get_strategy()
    assert num_workers(strategy) == 1
    assert wait_for_workers(strategy, timeout_s=0.001, warn=warnings.append)
    assert warnings == []


def _cluster(tmp_path, timeout_s: float) -> list[str]:
    """Both workers' stdout, after both ended (each within 120 s)."""
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(tmp_path / "marker"), str(timeout_s)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=train_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
        )
        for i in range(2)
    ]
    try:
        outputs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {i}: {err[-3000:]}"
    return [out for out, _ in outputs]


@pytest.mark.slow
def test_a_worker_leaves_the_barrier_only_after_its_peer_entered_it(tmp_path):
    first, second = _cluster(tmp_path, timeout_s=60)
    assert "workers 2" in first and "workers 2" in second
    # Worker 1 wrote the marker 3 s after start, just before its barrier: worker 0 waited for it.
    assert "passed True marker True" in first, first
    assert "passed True marker True" in second, second


@pytest.mark.slow
def test_a_barrier_whose_peer_never_comes_warns_and_returns_false(tmp_path):
    # Worker 1 leaves without entering the barrier; worker 0 gives up after 4 s with a warning.
    first, _ = _cluster(tmp_path, timeout_s=-4)
    assert "passed False" in first, first
    assert "did not all reach the end of the run within 4 s" in first, first
