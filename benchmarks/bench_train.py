"""Training throughput (patches/s) of both stages next to this machine's float32 matmul rate.

    python -m benchmarks.bench_train [--steps 4] [--jit] [--presets small ...] [--stages deepmask ...]
                                     [--batch 32] [--set KEY=VALUE ...]

Times the distributed train step of `sharpmask_tf.trainer` (forward, backward, SGD update) on
in-memory batches, so the data pipeline (benchmarked by the data module) is not in the number.
Stage 2 runs the frozen trunk forward only; its backward pass covers the refinement alone.
Trunks start from scratch (`model.trunk_weights=null`, nothing downloaded), so stage 1's BatchNorm
normalises with batch statistics, a little more work than the frozen BatchNorm of ImageNet trunks.
`--set` overrides come last, so `--set model.trunk_weights=FILE` times the frozen BatchNorm of a
trunk that starts from a weights file.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402  (after the log level, which TensorFlow reads at import)

from benchmarks.common import matmul_gflops  # noqa: E402
from sharpmask_tf.config import get_config  # noqa: E402
from sharpmask_tf.trainer import Trainer  # noqa: E402


def _constant_dataset(
    config, split="train", stage=1, batch_size=None, input_context=None, seed=None, repeat=True, first_step=0
):
    size = config.model.input_size
    label = config.data.label_size if stage == 1 else config.model.patch_size
    b = config.training.batch_size
    batch = {
        "images": tf.random.uniform((b, size, size, 3), seed=1),
        "masks": tf.sign(tf.random.uniform((b, label, label), -1, 1, seed=2)),
        "scores": tf.ones((b, 1)),
        "mask_weight": tf.ones((b,)),
        "score_weight": tf.zeros((b,)),
    }
    return tf.data.Dataset.from_tensors(batch).repeat()


PRESETS = ("small", "sharpmask_resnet50")
STAGES = ("deepmask", "sharpmask")


def step_rate(preset: str, stage: str, batch: int, steps: int, jit: bool, overrides=()) -> float:
    """Patches/s of `steps` train steps after two warm-up steps; `overrides` (`--set` strings)
    are applied after the benchmark's own."""
    # No ImageNet download: the trunk starts from scratch, its BatchNorm in batch-statistics mode.
    own = [f"training.batch_size={batch}", f"training.jit={str(jit).lower()}", "model.trunk_weights=null"]
    config = get_config(preset, [*own, *overrides])
    with tempfile.TemporaryDirectory() as model_dir:
        trainer = Trainer(
            config,
            model_dir,
            tf.distribute.get_strategy(),
            make_dataset=_constant_dataset,
            make_validation_patches=lambda *a: None,
            progress=False,
        )
        task = trainer.build_task(stage)
        train_step = trainer.distributed_train_step(task, trainer.stage_checkpoints(task).step)
        iterator = trainer.train_iterator(task, seed=0)
        stop = tf.constant(0.0)
        for _ in range(2):
            train_step(next(iterator), stop)[0].numpy()
        start = time.perf_counter()
        for _ in range(steps):
            sums, _ = train_step(next(iterator), stop)
        sums.numpy()
        return batch * steps / (time.perf_counter() - start)


def measure(steps: int, jit: bool, presets=PRESETS, stages=STAGES, batch=32, overrides=()) -> list[tuple]:
    """(preset, stage, batch, jit, patches/s) of each stage of each preset (the small one for 10x
    the steps), without and, if `jit`, with XLA."""
    rows = []
    for compiled in (False, True) if jit else (False,):
        for preset in presets:
            n = 10 * steps if preset == "small" else steps
            for stage in stages:
                rate = step_rate(preset, stage, batch, n, compiled, overrides)
                rows.append((preset, stage, batch, "on" if compiled else "off", rate))
                print(f"  {preset} {stage} jit={compiled}: {rate:.1f} patches/s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[tuple], gflops: float) -> None:
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default (on)")
    print(f"\nfloat32 matmul (2048^2): {gflops:.1f} GFLOP/s; {os.cpu_count()} CPUs; oneDNN: {onednn}\n")
    print(f"| {'preset':<20} | {'stage':<9} | batch | jit | patches/s |")
    print(f"|{'-' * 22}|{'-' * 11}|-------|-----|-----------|")
    for preset, stage, batch, jit, rate in rows:
        print(f"| {preset:<20} | {stage:<9} | {batch:>5} | {jit:<3} | {rate:>9.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per ResNet-50 measurement")
    parser.add_argument("--jit", action="store_true", help="also time XLA-compiled steps")
    parser.add_argument("--presets", nargs="+", default=PRESETS, metavar="PRESET")
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES)
    parser.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, after its own")
    args = parser.parse_args()
    for preset in args.presets:  # a bad preset or override fails here, before any timing
        try:
            get_config(preset, args.set)
        except ValueError as error:
            parser.error(str(error))
    gflops = matmul_gflops()
    print_table(measure(args.steps, args.jit, args.presets, args.stages, args.batch, args.set), gflops)


if __name__ == "__main__":
    main()
