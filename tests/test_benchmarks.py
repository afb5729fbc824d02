"""The benchmark scripts still run: each is a user-facing command whose table the README quotes, and
nothing else exercises them (their numbers are never checked here: timing is not a test)."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(module, *args, timeout=300):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": ROOT}
    return subprocess.run(
        [sys.executable, "-m", f"benchmarks.{module}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_bench_train_prints_a_row_per_stage_and_applies_overrides():
    done = _bench(
        "bench_train", "--presets", "small", "--steps", "1", "--batch", "2",
        "--set", "training.optimizer=sgd",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    rows = re.findall(r"^\| small\s+\| (\w+)\s+\|\s+2 \| off \|\s+([0-9.]+) \|$", done.stdout, re.M)
    assert [stage for stage, _ in rows] == ["deepmask", "sharpmask"], done.stdout
    assert all(float(rate) > 0 for _, rate in rows)


def test_bench_train_rejects_a_bad_override():
    done = _bench("bench_train", "--presets", "small", "--steps", "1", "--set", "training.optimizer=rmsprop")

    assert done.returncode == 2, done.stderr[-3000:]
    assert "optimizer" in done.stderr.splitlines()[-1]


def test_bench_data_prints_the_rates_and_what_decoding_alone_costs(tmp_path):
    done = _bench(
        "bench_data", "--out", str(tmp_path / "split"), "--cache", str(tmp_path / "cache"),
        "--photos", "3", "--fraction", "0.0005", "--seconds", "0.2", "--rounds", "1",
        "--cores", "1", "--patches-per-image", "1", "--decode",
    )  # fmt: skip

    assert done.returncode == 0, done.stderr[-3000:]
    rates = re.findall(r"^\| 1 \| ([12]) \| 1 \| ([0-9]+) \| [0-9]+ \| ([0-9]+) \|", done.stdout, re.M)
    assert [stage for stage, _, _ in rates] == ["1", "2"], done.stdout
    decoding = re.findall(r"^\| ([12]) \| ([0-9.]+) \|((?: [0-9.]+ \([0-9]+/s\) \|){4})$", done.stdout, re.M)
    assert [stage for stage, _, _ in decoding] == ["1", "2"], done.stdout
    for _, whole_patch, cells in decoding:
        assert float(whole_patch) > 0
        assert all(float(ms) > 0 for ms in re.findall(r"([0-9.]+) \(", cells))
