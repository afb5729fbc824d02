"""training/train.py as real processes: argument errors, SIGKILL/SIGTERM and resume, two workers."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.config import get_config
from sharpmask_tf.data import generate_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "training", "train.py")


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    paths = generate_dataset(root, num_train=24, num_val=8, seed=3)
    return ["--train-data", f"{paths['train']}:{root}/train", "--val-data", f"{paths['val']}:{root}/val"]


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(args, cwd, timeout=120, **env):
    return subprocess.run(
        [sys.executable, SCRIPT, *args], cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--preset", "nope"], "invalid choice: 'nope'"),
        (["--train-data", "missing.json:imgs", "--val-data", "missing.json:imgs"], "not found"),
        (["--train-data", "no-colon"], "ANNOTATIONS.json:IMAGE_DIR"),
        (["--set", "training.batch_size=0"], "batch_size"),
        (["--preset", "deepmask_resnet50", "--stage", "sharpmask"], "model.refinement=false"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_error(tmp_path, args, message):
    result = _run(args + ["--model-dir", str(tmp_path / "m")], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_model_dir_of_incompatible_config_exits_2_before_work(tmp_path, data_args):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(get_config("small", ["model.refine_k=32"]).to_json())
    result = _run(data_args + ["--model-dir", str(model_dir)], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "refine_k" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(model_dir)) == ["config.json"]


def _latest_step(stage_dir):
    latest = tf.train.latest_checkpoint(str(stage_dir))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


def _wait(predicate, proc, timeout):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    raise AssertionError("timed out")


def _scalars(log_dir, tag):
    out = {}
    for name in sorted(os.listdir(log_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for v in event.summary.value:
                if v.tag == tag:
                    out.setdefault(event.step, []).append(float(tf.make_ndarray(v.tensor)))
    return out


@pytest.mark.slow
def test_sigkill_resumes_from_last_checkpoint_and_sigterm_loses_nothing(tmp_path, data_args):
    model_dir = tmp_path / "m"
    stage_dir = model_dir / "deepmask"
    args = data_args + [
        "--model-dir",
        str(model_dir),
        "--stage",
        "deepmask",
        "--no-progress",
        "--set",
        "training.stage1_steps=1000",
        "--set",
        "training.checkpoint_every=4",
        "--set",
        "training.log_every=1",
        "--set",
        "training.lr_decay_epochs=[1,90]",
        "--set",
        "training.epoch_steps=10",
        "--set",
        "training.batch_size=4",
        "--set",
        "training.validate_every=100000",
        "--set",
        "training.val_patches=8",
    ]
    cmd = [sys.executable, SCRIPT, *args]
    first = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _latest_step(stage_dir) >= 16, first, 180)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed_at = _latest_step(stage_dir)
    assert killed_at >= 16 and killed_at % 4 == 0

    second = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: _latest_step(stage_dir) > killed_at, second, 180)
    second.send_signal(signal.SIGTERM)
    out, err = second.communicate(timeout=60)
    assert second.returncode == 128 + signal.SIGTERM, err
    assert "resumed from" in out and f"at step {killed_at}" in out
    stopped_at = int(err.split("saved at step ")[1].split(";")[0])
    assert _latest_step(stage_dir) == stopped_at > killed_at

    # Nothing between the checkpoint and the kill survives; the resumed run starts right after the
    # checkpoint, at the decayed learning rate (the optimizer's step was restored with its slots).
    steps = _scalars(model_dir / "logs" / "deepmask" / "train", "learning_rate")
    config = get_config(
        "small", ["training.stage1_steps=1000", "training.epoch_steps=10", "training.lr_decay_epochs=[1,90]"]
    )
    assert min(s for s in steps if s > killed_at) == killed_at + 1
    assert steps[killed_at + 1][-1] == pytest.approx(config.training.lr_decay_rates[0])
    reader = tf.train.load_checkpoint(str(stage_dir))
    names = {n for n, _ in tf.train.list_variables(str(stage_dir))}
    assert int(reader.get_tensor("step/.ATTRIBUTES/VARIABLE_VALUE")) == stopped_at
    assert int(reader.get_tensor("optimizer/_iterations/.ATTRIBUTES/VARIABLE_VALUE")) == stopped_at
    slots = [n for n in names if n.startswith("optimizer/_variables/")]
    assert slots and any(np.abs(reader.get_tensor(n)).max() > 0 for n in slots)


def _free_ports(n):
    """n distinct ports free now (all sockets are held open until every port is chosen)."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path, data_args):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in _free_ports(2)]}
    model_dir = tmp_path / "m"
    args = data_args + [
        "--model-dir",
        str(model_dir),
        "--strategy",
        "auto",
        "--no-progress",
        "--set",
        "training.stage1_steps=3",
        "--set",
        "training.stage2_steps=2",
        "--set",
        "training.batch_size=4",
        "--set",
        "training.val_patches=8",
        "--set",
        "training.log_every=1",
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    if any(p.returncode for p in procs):
        print("\n".join(err[-3000:] for _, err in outputs))
    for i, (p, (_, err)) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"worker {i}: {err[-3000:]}"
    assert "on 2 replica(s)" in outputs[0][0]
    chief = model_dir / "sharpmask"
    worker = model_dir / "workers" / "1" / "sharpmask"
    assert _latest_step(chief) == _latest_step(worker) == 2
    a, b = tf.train.load_checkpoint(str(chief)), tf.train.load_checkpoint(str(worker))
    names = [n for n, _ in tf.train.list_variables(str(chief)) if n.startswith("model/")]
    assert len(names) > 50
    for n in names:
        np.testing.assert_array_equal(a.get_tensor(n), b.get_tensor(n), err_msg=n)
    assert (model_dir / "sharpmask.keras").exists() and not (model_dir / "workers" / "1" / "sharpmask.keras").exists()
