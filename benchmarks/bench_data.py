"""Training-patch throughput: the NumPy sampler alone and the full tf.data pipeline.

    python -m benchmarks.bench_data                 # synthetic default dataset, generated if absent
    python -m benchmarks.bench_data --seconds 5 --set data.train_annotations=... data.train_images=...

For the `small` preset (96 px patches, batch 16) and the ResNet-50 presets' geometry (192 px
patches, batch 32), in stage 1 (mask and score batches mixed by data.score_frequency) and stage 2
(mask batches with patch_size labels), prints a Markdown table of patches per second: the sampler
called in one Python thread, and `make_dataset` (parallel batches, prefetch) read to exhaustion of
the time budget. Compare with the training step rate of the same preset.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from sharpmask_tf.config import get_config
from sharpmask_tf.data import PatchSampler, ensure_dataset, load_split, make_dataset

GEOMETRIES = (("small", "small"), ("ResNet-50", "sharpmask_resnet50"))


def sampler_rate(sampler: PatchSampler, batch_size: int, score_frequency: float, seconds: float) -> float:
    """Patches per second of `sample_batch` in this thread."""
    rng = np.random.default_rng(0)
    sampler.sample_batch(rng, "mask", batch_size)
    patches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        kind = "score" if rng.random() < score_frequency else "mask"
        sampler.sample_batch(rng, kind, batch_size)
        patches += batch_size
    return patches / (time.perf_counter() - start)


def pipeline_rate(dataset, batch_size: int, seconds: float) -> float:
    """Patches per second read from a tf.data dataset, after two warm-up batches."""
    iterator = iter(dataset)
    for _ in range(2):
        next(iterator)
    patches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        patches += batch_size
    return patches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=6.0, help="time budget per measurement")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, section.field=value")
    args = parser.parse_args()
    print(f"CPU cores: {os.cpu_count()}")
    rows = []
    for name, preset in GEOMETRIES:
        config = get_config(preset, args.set)
        ensure_dataset(config.data)
        batch = config.training.batch_size
        for stage in (1, 2):
            sampler = PatchSampler.from_config(load_split(config, "train"), config, stage)
            frequency = config.data.score_frequency if stage == 1 else 0.0
            alone = sampler_rate(sampler, batch, frequency, args.seconds)
            piped = pipeline_rate(make_dataset(config, stage=stage), batch, args.seconds)
            rows.append((name, config.model.input_size, sampler.label_size, batch, stage, alone, piped))
    print(
        "| geometry | patch px | label px | batch | stage | sampler, 1 thread (patches/s) | tf.data pipeline (patches/s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, size, label, batch, stage, alone, piped in rows:
        print(f"| {name} | {size} | {label} | {batch} | {stage} | {alone:.0f} | {piped:.0f} |")


if __name__ == "__main__":
    main()
