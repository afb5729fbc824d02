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

# One worker of the cluster. Barrier 1: worker 1 writes its marker file only after a pause, then
# enters; each reports whether the marker existed when its barrier returned. Barrier 2: worker 1
# leaves the cluster instead, and worker 0 waits for it 4 s.
WORKER = """
import pathlib, sys, time
import tensorflow as tf
from sharpmask_tf.distribute import num_workers, wait_for_workers
strategy = tf.distribute.MultiWorkerMirroredStrategy()
index, marker = int(sys.argv[1]), pathlib.Path(sys.argv[2])
warn = lambda m: print(m, flush=True)
print("workers", num_workers(strategy), flush=True)
if index == 1:
    time.sleep(3)
    marker.write_text("late")
ok = wait_for_workers(strategy, timeout_s=60, warn=warn)
print("barrier 1", ok, "marker", marker.exists(), flush=True)
if index == 0:
    print("barrier 2", wait_for_workers(strategy, timeout_s=4, warn=warn), flush=True)
"""


def test_one_worker_passes_the_barrier_at_once():
    warnings = []
    strategy = tf.distribute.get_strategy()
    assert num_workers(strategy) == 1
    assert wait_for_workers(strategy, timeout_s=0.001, warn=warnings.append)
    assert warnings == []


@pytest.mark.slow
def test_workers_leave_the_barrier_together_and_a_missing_one_is_warned_about(tmp_path):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(i), str(tmp_path / "marker")],
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
    (first, _), (second, _) = outputs
    assert "workers 2" in first and "workers 2" in second
    # Worker 1 wrote the marker 3 s after start, just before its barrier: worker 0 waited for it.
    assert "barrier 1 True marker True" in first, first
    assert "barrier 1 True marker True" in second, second
    # Worker 1 had left: worker 0 gave up after 4 s, with a warning, instead of hanging.
    assert "barrier 2 False" in first, first
    assert "did not all reach the end of the run within 4 s" in first, first
