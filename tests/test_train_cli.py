"""training/train.py as real processes: argument errors, signals at each point and resume, broken
checkpoints, two workers."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from train_cli_testing import SCRIPT, dataset_args, free_ports, run_train, set_args, train_env

from sharpmask_tf.config import get_config


@pytest.fixture(scope="module")
def data_args(tmp_path_factory):
    return dataset_args(str(tmp_path_factory.mktemp("synthetic")), num_train=24, num_val=8, seed=3)


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
    result = run_train(args + ["--model-dir", str(tmp_path / "m")], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()


def test_model_dir_of_incompatible_config_exits_2_before_work(tmp_path, data_args):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(get_config("small", ["model.refine_k=32"]).to_json())
    result = run_train(data_args + ["--preset", "small", "--model-dir", str(model_dir)], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "refine_k" in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(model_dir)) == ["config.json"]


def test_without_preset_a_malformed_config_json_of_the_model_dir_exits_2_naming_it(tmp_path, data_args):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"model": {"refine_k": "many"}}')
    result = run_train(data_args + ["--model-dir", str(model_dir)], cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "config.json is not a valid sharpmask_tf configuration" in result.stderr
    assert "Traceback" not in result.stderr
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
        *set_args(
            "training.stage1_steps=1000",
            "training.checkpoint_every=4",
            "training.log_every=1",
            "training.lr_decay_epochs=[1,90]",
            "training.epoch_steps=10",
            "training.batch_size=4",
            "training.validate_every=100000",
            "training.val_patches=8",
        ),
    ]
    cmd = [sys.executable, SCRIPT, *args]
    first = subprocess.Popen(
        cmd, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    _wait(lambda: _latest_step(stage_dir) >= 16, first, 180)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    killed_at = _latest_step(stage_dir)
    assert killed_at >= 16 and killed_at % 4 == 0

    second = subprocess.Popen(
        cmd, cwd=tmp_path, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
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


# Runs train.py with one function made a barrier: its BLOCK_CALL-th call creates BLOCK_READY and
# waits for BLOCK_GO, so the test delivers its signal at exactly that point of the run.
DRIVER = """
import importlib, os, pathlib, runpy, sys, time

module, _, attribute = os.environ["BLOCK_AT"].partition(":")
owner_path, _, name = attribute.rpartition(".")
owner = importlib.import_module(module)
for part in filter(None, owner_path.split(".")):
    owner = getattr(owner, part)
original = getattr(owner, name)
ready, go = pathlib.Path(os.environ["BLOCK_READY"]), pathlib.Path(os.environ["BLOCK_GO"])
calls = []


def barrier(*args, **kwargs):
    calls.append(None)
    if len(calls) == int(os.environ["BLOCK_CALL"]):
        ready.touch()
        while not go.exists():
            time.sleep(0.05)
    return original(*args, **kwargs)


setattr(owner, name, barrier)
sys.argv = [os.environ["TRAIN_SCRIPT"], *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


SIGNAL_ARGS = [
    "--no-progress",
    *set_args(
        "training.stage1_steps=4",
        "training.stage2_steps=1",
        "training.batch_size=4",
        "training.val_patches=8",
        "training.log_every=1",
        "training.validate_every=100000",
    ),
]


def _run_blocked_and_signal(tmp_path, args, block_at, call, signum, timeout=240):
    """Runs train.py until the `call`-th call of `block_at`, delivers `signum` there, lets the run
    go on and returns (exit code, stdout, stderr)."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    ready, go = tmp_path / "ready", tmp_path / "go"
    env = train_env(
        BLOCK_AT=block_at, BLOCK_CALL=str(call), BLOCK_READY=str(ready), BLOCK_GO=str(go), TRAIN_SCRIPT=SCRIPT
    )
    with open(tmp_path / "out", "w+") as out, open(tmp_path / "err", "w+") as err:
        proc = subprocess.Popen([sys.executable, str(driver), *args], cwd=tmp_path, env=env, stdout=out, stderr=err)
        try:
            end = time.time() + timeout
            while not ready.exists():
                if proc.poll() is not None or time.time() > end:
                    err.seek(0)
                    raise AssertionError(f"never reached {block_at} (exit {proc.poll()}): {err.read()[-3000:]}")
                time.sleep(0.1)
            proc.send_signal(signum)
            go.touch()
            proc.wait(timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read()


@pytest.mark.slow
@pytest.mark.parametrize(
    "block_at, call, signum, step, written, absent",
    [
        # In the step loop (step 2's summaries): step 3 runs, is saved, and the run stops.
        ("sharpmask_tf.trainer:write_train_summaries", 2, signal.SIGINT, 3, [], ["deepmask.keras"]),
        # During stage 1's last validation: no stage-1 export, no stage 2.
        ("sharpmask_tf.task:StageTask.validation_step", 1, signal.SIGTERM, 4, [], ["deepmask.keras", "sharpmask"]),
        # Between the stages (stage 1's export): stage 2 never starts.
        ("keras:Model.save", 1, signal.SIGINT, 4, ["deepmask.keras"], ["sharpmask"]),
    ],
    ids=["step-loop", "validation", "between-stages"],
)
def test_a_signal_at_any_point_saves_stops_with_128_plus_signal_and_resumes(
    tmp_path, data_args, block_at, call, signum, step, written, absent
):
    model_dir = tmp_path / "m"
    args = data_args + ["--model-dir", str(model_dir), *SIGNAL_ARGS]
    code, out, err = _run_blocked_and_signal(tmp_path, args, block_at, call, signum)
    assert code == 128 + signum, err[-3000:]
    assert f"{signal.Signals(signum).name} received: stage deepmask saved at step {step};" in err
    assert "Traceback" not in err
    assert _latest_step(model_dir / "deepmask") == step
    assert all((model_dir / name).exists() for name in written)
    assert not any((model_dir / name).exists() for name in absent)

    again = run_train(args, cwd=tmp_path, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"deepmask: resumed from {model_dir / 'deepmask' / f'ckpt-{step}'} at step {step}" in again.stdout
    assert _latest_step(model_dir / "sharpmask") == 1 and (model_dir / "sharpmask.keras").exists()
    # One step of stage 2 in this process: no second step to take an input-wait share over.
    assert re.search(r"^  sharpmask: step 1, .*IoU>\.7 [0-9.]+$", again.stdout, re.M), again.stdout


@pytest.mark.slow
def test_a_broken_latest_checkpoint_resumes_from_the_one_before(tmp_path, data_args):
    model_dir = tmp_path / "m"
    stage_dir = model_dir / "deepmask"
    args = data_args + ["--model-dir", str(model_dir), "--stage", "deepmask", *SIGNAL_ARGS]
    args += ["--set", "training.checkpoint_every=1"]
    first = run_train(args + ["--set", "training.stage1_steps=3"], cwd=tmp_path, timeout=240)
    assert first.returncode == 0, first.stderr[-3000:]
    data = stage_dir / "ckpt-3.data-00000-of-00001"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)

    again = run_train(args, cwd=tmp_path, timeout=240)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"deepmask: skipped checkpoint {stage_dir / 'ckpt-3'}: its files do not read (IndexError" in again.stdout
    assert f"deepmask: resumed from {stage_dir / 'ckpt-2'} at step 2" in again.stdout
    assert "training.stage1_steps: 3 -> 4" in again.stdout and "config_history.json" in again.stdout
    assert _latest_step(stage_dir) == 4
    assert re.search(r"^  deepmask: step 4, .*, [0-9.]+% of step time waiting for input$", again.stdout, re.M)
    assert sorted(os.listdir(stage_dir / "skipped")) == ["ckpt-3.data-00000-of-00001", "ckpt-3.index"]

    # When no checkpoint restores, nothing is trained over them: exit 1 naming each, files untouched.
    for name in os.listdir(stage_dir):
        if name.startswith("ckpt-") and ".data-" in name:
            (stage_dir / name).write_bytes(b"")
    before = sorted(os.listdir(stage_dir))
    broken = run_train(args, cwd=tmp_path, timeout=120)
    assert broken.returncode == 1, broken.stderr[-3000:]
    assert "None of the checkpoints" in broken.stderr and "ckpt-4" in broken.stderr
    assert "Traceback" not in broken.stderr
    assert sorted(os.listdir(stage_dir)) == before


@pytest.mark.slow
def test_two_workers_end_with_identical_weights(tmp_path, data_args):
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    model_dir = tmp_path / "m"
    args = data_args + [
        "--model-dir",
        str(model_dir),
        "--strategy",
        "auto",
        "--no-progress",
        *set_args(
            "training.stage1_steps=3",
            "training.stage2_steps=2",
            "training.batch_size=4",
            "training.val_patches=8",
            "training.log_every=1",
        ),
    ]
    procs = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *args],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=train_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})),
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
