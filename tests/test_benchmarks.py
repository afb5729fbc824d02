"""The benchmark scripts still run: each is a user-facing command whose table the README quotes, and
nothing else exercises them (their numbers are never checked here: timing is not a test)."""

import json
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


def _summary(sharp_ar100, iou, scores):
    recall = lambda ar100: {"segm": {"AR@100": ar100, "AR@1000": ar100 + 0.1}}  # noqa: E731
    return {
        "average_recall": {"SharpMask": recall(sharp_ar100), "DeepMask": recall(sharp_ar100 / 2)},
        "per_patch_mean_iou": {"SharpMask": iou, "DeepMask": iou / 2},
        "per_patch_iou_over_70": {"SharpMask": 0.5, "DeepMask": 0.25},
        "served": {"images": [{"scores": scores}]},
        "seconds": {"total": 300.0},
    }


def test_bench_quality_prints_the_goal_table_of_finished_runs(tmp_path):
    paths = []
    for i, (ar, iou) in enumerate(((0.40, 0.60), (0.30, 0.64))):
        paths.append(tmp_path / f"s{i}.json")
        paths[-1].write_text(json.dumps(_summary(ar, iou, [1.0, 0.9, 0.5] + [0.2] * 7)))
    result = _bench("bench_quality", "--summary", *map(str, paths), timeout=120)
    assert result.returncode == 0, result.stderr
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in result.stdout.splitlines()[2:]
    }
    # run 1, run 2, mean, spread, spread / mean, goal
    assert rows["SharpMask segm AR@100"] == ["40", "30", "35", "10", "29%", ">= 30"]
    assert rows["SharpMask per-patch mean IoU"][:4] == ["0.6", "0.64", "0.62", "0.04"]
    assert rows["served top-10 score range"][:2] == ["0.8", "0.8"]


def test_bench_quality_passes_seeds_then_overrides_to_each_demo():
    from benchmarks.bench_quality import demo_command

    command = demo_command("out", 2, ["training.stage2_steps=5000"])
    assert command[1:5] == ["-m", "sharpmask_tf.demo", "--out", "out"]
    assert command[5:] == ["--set", "training.seed=2", "--set", "data.seed=2", "--set", "training.stage2_steps=5000"]
    assert demo_command("out")[5:] == []


def test_bench_quality_rejects_a_bad_override_before_any_run(tmp_path):
    result = _bench("bench_quality", "--root", str(tmp_path / "root"), "--set", "training.stage2_steps=-1", timeout=120)
    assert result.returncode == 2
    assert "training.stage2_steps must be non-negative" in result.stderr.splitlines()[-1]
    assert not (tmp_path / "root").exists()


def test_bench_quality_refuses_overrides_with_finished_runs(tmp_path):
    result = _bench("bench_quality", "--summary", str(tmp_path / "s.json"), "--set", "training.seed=1", timeout=120)
    assert result.returncode == 2
    assert "--summary runs nothing" in result.stderr.splitlines()[-1]
