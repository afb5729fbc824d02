"""Training-patch throughput at COCO scale: today's NumPy pipeline and the TensorFlow one, per core.

    python -m benchmarks.bench_data                       # generates data/coco_scale if absent
    python -m benchmarks.bench_data --seconds 10 --cores 1 2 --patches-per-image 1 4

The split has COCO train2017's counts (118,287 640x480 images, 829,875 polygon annotations, 80
categories) but only `--photos` distinct JPEG files, which the image records reference in turn:
each is a synthetic photograph (a 1/f^1.2 amplitude spectrum with sensor grain, about COCO's
mean JPEG size), and polygons are star-shaped with 8..40 vertices and longest sides log-uniform
over 6..640 px. Objects are not painted into the images: only decoding and cutting cost matter here.

Prints the split's load time and memory (the `CocoDataset` validation, then the sampler's index,
then a second `make_dataset` over the same files), the float32 matmul rate as a reference for
this machine's speed, and a Markdown table of patches per second at the ResNet-50 geometry (192 px
patches, batch 32) in stage 1 and 2, the process confined to 1, 2, ... cores (every thread's CPU
affinity and tf.data's thread pool): today's pipeline (`PatchSampler.sample_batch` in
`tf.numpy_function`, as `make_dataset` was) beside `make_dataset`, measured in turn.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from benchmarks.common import matmul_gflops
from sharpmask_tf.config import get_config
from sharpmask_tf.data import PatchSampler, load_split, make_dataset
from sharpmask_tf.data.pipeline import BATCH_KEYS

COCO_TRAIN_IMAGES = 118_287
COCO_TRAIN_ANNOTATIONS = 829_875
COCO_CATEGORIES = 80
PHOTO_HEIGHT, PHOTO_WIDTH = 480, 640
JPEG_QUALITY = 90
CORES = sorted(os.sched_getaffinity(0))  # the CPUs this process may use, before any confinement


def photograph(rng: np.random.Generator, height: int = PHOTO_HEIGHT, width: int = PHOTO_WIDTH) -> np.ndarray:
    """A (height, width, 3) uint8 image with a photograph's 1/f^1.2 amplitude spectrum, correlated
    channels and sensor grain; at JPEG quality 90 about 155 KB at 640x480, near COCO's mean."""
    falloff = np.hypot(np.fft.rfftfreq(width)[None, :], np.fft.fftfreq(height)[:, None])
    falloff[0, 0] = 1.0
    shared = rng.standard_normal((height, width))
    channels = []
    for _ in range(3):
        noise = 0.7 * shared + 0.3 * rng.standard_normal((height, width))
        channels.append(np.fft.irfft2(np.fft.rfft2(noise) / falloff**1.2, s=(height, width)))
    pixels = np.stack(channels, -1)
    pixels = (pixels - pixels.mean()) / pixels.std() * 50 + 120 + 4 * rng.standard_normal((height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def polygons(rng: np.random.Generator, count: int, height: int, width: int) -> tuple[list, np.ndarray]:
    """`count` star-shaped polygons inside a (height, width) image, longest sides log-uniform over
    6..640 px, 8..40 vertices; returns the flat [x0, y0, x1, ...] lists and (count, 4) boxes."""
    flat: list = [None] * count
    boxes = np.zeros((count, 4))
    vertices = rng.integers(8, 41, count)
    for n in np.unique(vertices):
        which = np.flatnonzero(vertices == n)
        m = which.size
        side = np.exp(rng.uniform(np.log(6), np.log(640), m))[:, None]
        aspect = np.exp(rng.uniform(-0.7, 0.7, m))[:, None]
        centre_x, centre_y = rng.uniform(0, width, (m, 1)), rng.uniform(0, height, (m, 1))
        angles = np.sort(rng.uniform(0, 2 * np.pi, (m, n)), axis=1)
        radii = rng.uniform(0.6, 1.0, (m, n))
        xs = np.clip(centre_x + side / 2 * np.minimum(1, aspect) * radii * np.cos(angles), 0, width)
        ys = np.clip(centre_y + side / 2 * np.minimum(1, 1 / aspect) * radii * np.sin(angles), 0, height)
        # At least one pixel a side after clipping to the image.
        xs[:, 0], ys[:, 0] = np.minimum(xs[:, 0], width - 1.5), np.minimum(ys[:, 0], height - 1.5)
        xs[:, 1], ys[:, 1] = np.maximum(xs[:, 1], xs[:, 0] + 1.5), np.maximum(ys[:, 1], ys[:, 0] + 1.5)
        xs, ys = np.round(xs, 2), np.round(ys, 2)
        x0, y0 = xs.min(1), ys.min(1)
        boxes[which] = np.stack([x0, y0, xs.max(1) - x0, ys.max(1) - y0], 1)
        for i, row in zip(which, np.stack([xs, ys], 2).reshape(m, -1).tolist()):
            flat[i] = row
    return flat, np.round(boxes, 2)


def generate_coco_scale(out_dir: str, num_photos: int, seed: int = 0) -> tuple[str, str]:
    """Writes the COCO-scale split of the module docstring into out_dir, unless it is there.

    Returns:
        (annotation file, image folder).
    """
    path, image_dir = os.path.join(out_dir, f"instances_{num_photos}.json"), os.path.join(out_dir, "images")
    if os.path.isfile(path):
        return path, image_dir
    rng = np.random.default_rng(seed)
    os.makedirs(image_dir, exist_ok=True)
    for k in range(num_photos):
        Image.fromarray(photograph(rng)).save(os.path.join(image_dir, f"{k:06d}.jpg"), quality=JPEG_QUALITY)
    owners = np.sort(rng.integers(0, COCO_TRAIN_IMAGES, COCO_TRAIN_ANNOTATIONS)) + 1
    flat, boxes = polygons(rng, COCO_TRAIN_ANNOTATIONS, PHOTO_HEIGHT, PHOTO_WIDTH)
    images = [
        {"id": i, "file_name": f"{(i - 1) % num_photos:06d}.jpg", "height": PHOTO_HEIGHT, "width": PHOTO_WIDTH}
        for i in range(1, COCO_TRAIN_IMAGES + 1)
    ]
    annotations = [
        {
            "id": a + 1,
            "image_id": int(owner),
            "category_id": 1 + a % COCO_CATEGORIES,
            "segmentation": [polygon],
            "area": float(box[2] * box[3] / 2),
            "bbox": box.tolist(),
            "iscrowd": 0,
        }
        for a, (owner, polygon, box) in enumerate(zip(owners, flat, boxes))
    ]
    categories = [{"id": c, "name": f"category{c}", "supercategory": "thing"} for c in range(1, COCO_CATEGORIES + 1)]
    with open(path + ".tmp", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(path + ".tmp", path)
    return path, image_dir


def memory_mb() -> tuple[float, float]:
    """This process's resident memory now and at its peak, MB."""
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def confine_to_cores(cores: int) -> tf.data.Options:
    """Pins every thread of this process (and so the threads they start) to the first `cores` CPUs
    it may use; returns tf.data options for a thread pool of that size."""
    chosen = set(CORES[:cores])
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), chosen)
        except OSError:
            pass  # a thread that ended meanwhile
    options = tf.data.Options()
    options.threading.private_threadpool_size = cores
    options.threading.max_intra_op_parallelism = 1
    return options


def numpy_pipeline(sampler: PatchSampler, batch_size: int, score_frequency: float) -> tf.data.Dataset:
    """Today's `make_dataset`: `PatchSampler.sample_batch` (Pillow and NumPy) per batch in
    `tf.numpy_function`, batches in parallel, prefetched."""

    def draw(index: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng([0, int(index)])
        kind = "score" if rng.random() < score_frequency else "mask"
        arrays, _ = sampler.sample_batch(rng, kind, batch_size)
        return [arrays[k] for k in BATCH_KEYS]

    def to_batch(index: tf.Tensor) -> list[tf.Tensor]:
        return tf.numpy_function(draw, [index], [tf.float32] * len(BATCH_KEYS), stateful=False)

    return tf.data.Dataset.counter().map(to_batch, tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def pipeline_rate(dataset: tf.data.Dataset, batch_size: int, seconds: float) -> float:
    """Patches per second read from a tf.data dataset, after four warm-up batches."""
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    patches, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(iterator)
        patches += batch_size
    return patches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/coco_scale", help="where the COCO-scale split is (generated if absent)")
    parser.add_argument("--photos", type=int, default=200, help="distinct JPEG files the split references")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per measurement")
    parser.add_argument("--cores", type=int, nargs="*", default=None, help="core counts (default 1, 2, all)")
    parser.add_argument("--patches-per-image", type=int, nargs="*", default=[1, 4], help="make_dataset variants")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, section.field=value")
    args = parser.parse_args()

    start = time.perf_counter()
    annotations, images = generate_coco_scale(args.out, args.photos)
    print(f"split: {annotations} ({time.perf_counter() - start:.0f} s to generate or find)")
    overrides = [f"data.train_annotations={annotations}", f"data.train_images={images}", *args.set]
    config = get_config("sharpmask_resnet50", overrides)
    batch = config.training.batch_size
    before, _ = memory_mb()
    start = time.perf_counter()
    dataset = load_split(config, "train")
    loaded = time.perf_counter() - start
    after, peak = memory_mb()
    print(
        f"CocoDataset: {len(dataset)} images, {len(dataset.coco.anns)} annotations loaded and validated in "
        f"{loaded:.1f} s; resident memory +{after - before:.0f} MB (peak {peak:.0f} MB)"
    )
    for label in ("first", "second"):
        start = time.perf_counter()
        make_dataset(config, stage=1)
        now, peak = memory_mb()
        print(
            f"make_dataset, {label} call: {time.perf_counter() - start:.1f} s; resident memory "
            f"{now - before:+.0f} MB over the process before loading (peak {peak:.0f} MB)"
        )
    print(f"CPU cores: {len(CORES)}; float32 matmul: {matmul_gflops():.0f} GFLOP/s (all cores)")

    cores = args.cores or sorted({1, 2, len(CORES)} & set(range(1, len(CORES) + 1)))
    rows = []
    for n in cores:
        options = confine_to_cores(n)
        for stage in (1, 2):
            sampler = PatchSampler.from_config(dataset, config, stage)
            frequency = config.data.score_frequency if stage == 1 else 0.0
            today = pipeline_rate(numpy_pipeline(sampler, batch, frequency).with_options(options), batch, args.seconds)
            for k in args.patches_per_image:
                piped = make_dataset(config, stage=stage, patches_per_image=k).with_options(options)
                rows.append((n, stage, k, today, pipeline_rate(piped, batch, args.seconds)))
                print(rows[-1], flush=True)
    confine_to_cores(len(CORES))
    print(
        "| cores | stage | today's pipeline (patches/s) | patches per image | make_dataset (patches/s) | per core | x today |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, stage, k, today, piped in rows:
        print(f"| {n} | {stage} | {today:.0f} | {k} | {piped:.0f} | {piped / n:.0f} | {piped / today:.1f} |")


if __name__ == "__main__":
    main()
