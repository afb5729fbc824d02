"""Training-patch throughput at COCO scale: today's NumPy pipeline and the TensorFlow one, per core.

    python -m benchmarks.bench_data                       # generates data/coco_scale if absent
    python -m benchmarks.bench_data --seconds 10 --cores 1 2 --patches-per-image 1 4
    python -m benchmarks.bench_data --fraction 0.1 --cache data/coco_cache   # a tenth, cache kept
    python -m benchmarks.bench_data --spread    # also 4 patches per image with data.spread_patches
    python -m benchmarks.bench_data --decode --cores 1 --patches-per-image 1   # what JPEG decoding alone costs

The split has COCO train2017's counts (118,287 640x480 images, 829,875 polygon annotations, 80
categories; `--fraction` scales the image and annotation counts) but only `--photos` distinct JPEG
files, which the image records reference in turn:
each is a synthetic photograph (a 1/f^1.2 amplitude spectrum with sensor grain, about COCO's
mean JPEG size), and polygons are star-shaped with 8..40 vertices and longest sides log-uniform
over 6..640 px. Objects are not painted into the images: only decoding and cutting cost matter here.

Prints the split's load time and memory, each in a fresh process (validating and caching the
split, then from the cache on 1, 2, ... cores, then a second `make_dataset` over the same files),
the float32 matmul rate as a reference for
this machine's speed, and a Markdown table of patches per second (wall clock, and per CPU-second
of the process, which other processes' load on a shared machine changes less) at the ResNet-50
geometry (192 px patches, batch 32) in stage 1 and 2, the process confined to 1, 2, ... cores
(every thread's CPU affinity and tf.data's thread pool): today's pipeline
(`PatchSampler.sample_batch` in `tf.numpy_function`, as `make_dataset` was; it reads labels from
the same packed RLEs) beside `make_dataset`, measured in turn, in `--rounds` interleaved rounds
(median and range). With `--decode`, a second table: what JPEG decoding alone costs per patch
on one core (`decode_costs`), beside the whole patch, which bounds what any pipeline that decodes
one image per patch can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from benchmarks.common import matmul_gflops
from sharpmask_tf.config import get_config
from sharpmask_tf.data import PatchSampler, load_packed_split, make_dataset
from sharpmask_tf.data.pipeline import BATCH_KEYS, draw_plan, patch_planner
from sharpmask_tf.data.render import JPEG_REDUCTIONS, decode_region

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


def generate_coco_scale(out_dir: str, num_photos: int, seed: int = 0, fraction: float = 1.0) -> tuple[str, str]:
    """Writes the COCO-scale split of the module docstring into out_dir, unless it is there;
    `fraction` < 1 scales the image and annotation counts (the same photographs, the same
    annotations per image), for a quicker run on a busy machine.

    Returns:
        (annotation file, image folder).
    """
    suffix = "" if fraction == 1 else f"_{fraction:g}"
    path, image_dir = os.path.join(out_dir, f"instances_{num_photos}{suffix}.json"), os.path.join(out_dir, "images")
    if os.path.isfile(path):
        return path, image_dir
    os.makedirs(image_dir, exist_ok=True)
    for k in range(num_photos):  # photographs shared by every fraction's split
        name = os.path.join(image_dir, f"{k:06d}.jpg")
        if not os.path.isfile(name):
            Image.fromarray(photograph(np.random.default_rng([seed, k]))).save(name, quality=JPEG_QUALITY)
    rng = np.random.default_rng([seed, num_photos])
    num_images, num_annotations = round(COCO_TRAIN_IMAGES * fraction), round(COCO_TRAIN_ANNOTATIONS * fraction)
    owners = np.sort(rng.integers(0, num_images, num_annotations)) + 1
    flat, boxes = polygons(rng, num_annotations, PHOTO_HEIGHT, PHOTO_WIDTH)
    images = [
        {"id": i, "file_name": f"{(i - 1) % num_photos:06d}.jpg", "height": PHOTO_HEIGHT, "width": PHOTO_WIDTH}
        for i in range(1, num_images + 1)
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


def pipeline_rate(dataset: tf.data.Dataset, batch_size: int, seconds: float) -> tuple[float, float]:
    """Patches per second read from a tf.data dataset after four warm-up batches, and patches per
    CPU-second of this process (every thread): the rate per core that contention with other
    processes does not change as much."""
    iterator = iter(dataset)
    for _ in range(4):
        next(iterator)
    patches, start, cpu = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        next(iterator)
        patches += batch_size
    return patches / (time.perf_counter() - start), patches / (time.process_time() - cpu)


def load_report(config, cores: int) -> str:
    """In this (fresh) process, confined to `cores`: the time and memory `make_dataset` takes to
    load the split (from the cache when current, else validating and caching it) and index it,
    and what a second `make_dataset` over the same files adds."""
    confine_to_cores(cores)
    before, _ = memory_mb()
    start = time.perf_counter()
    packed = load_packed_split(config, "train")
    loaded = time.perf_counter() - start
    make_dataset(config, stage=1)
    first = time.perf_counter() - start
    after, peak = memory_mb()
    start = time.perf_counter()
    make_dataset(config, stage=1)
    second = time.perf_counter() - start
    return (
        f"{len(packed)} images, {len(packed.ann_ids)} annotations: split loaded in {loaded:.1f} s, "
        f"first make_dataset {first:.1f} s, resident memory +{after - before:.0f} MB (peak of the process "
        f"{peak:.0f} MB); second make_dataset {second:.2f} s"
    )


def run_child(args: list[str], env: dict[str, str], timeout: float) -> str:
    """The last line a child benchmark process prints."""
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_data", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if result.returncode:
        raise RuntimeError(f"Child benchmark failed. Received: stderr={result.stderr[-2000:]!r}")
    return result.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/coco_scale", help="where the COCO-scale split is (generated if absent)")
    parser.add_argument("--photos", type=int, default=200, help="distinct JPEG files the split references")
    parser.add_argument("--fraction", type=float, default=1.0, help="of COCO train's image and annotation counts")
    parser.add_argument("--seconds", type=float, default=8.0, help="time budget per measurement")
    parser.add_argument("--cores", type=int, nargs="*", default=None, help="core counts (default 1, 2, all)")
    parser.add_argument("--patches-per-image", type=int, nargs="*", default=[1, 4], help="make_dataset variants")
    parser.add_argument("--spread", action="store_true", help="also time each of them over 1 with data.spread_patches")
    parser.add_argument("--decode", action="store_true", help="also time JPEG decoding alone, on one core")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (median and range)")
    parser.add_argument("--cache", help="split cache folder to keep and reuse (default: a fresh one, validating again)")
    parser.add_argument("--load-only", type=int, default=0, help="(internal) print load_report on this many cores")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, section.field=value")
    args = parser.parse_args()

    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1]. Received: --fraction={args.fraction}")
    annotations, images = generate_coco_scale(args.out, args.photos, fraction=args.fraction)
    overrides = [f"data.train_annotations={annotations}", f"data.train_images={images}", *args.set]
    config = get_config("sharpmask_resnet50", overrides)
    if args.load_only:
        print(load_report(config, args.load_only))
        return
    print(f"split: {annotations}")
    cores = args.cores or sorted({1, 2, len(CORES)})
    with tempfile.TemporaryDirectory() as fresh:
        cache = args.cache or fresh
        os.makedirs(cache, exist_ok=True)
        env = {**os.environ, "SHARPMASK_TF_CACHE": cache, "PYTHONPATH": os.getcwd()}
        child = ["--out", args.out, "--photos", str(args.photos), "--fraction", str(args.fraction), "--set", *overrides]
        first = "first load, cache kept from before" if os.listdir(cache) else "validated and cached"
        report = run_child([*child, "--load-only", str(max(cores))], env, 3600)
        print(f"{first}, {max(cores)} cores: {report}")
        for n in cores:
            print(f"from the cache, {n} cores: {run_child([*child, '--load-only', str(n)], env, 3600)}", flush=True)
        os.environ["SHARPMASK_TF_CACHE"] = cache
        packed = load_packed_split(config, "train")
        print(f"CPU cores: {len(CORES)}; float32 matmul: {matmul_gflops():.0f} GFLOP/s (all cores)", flush=True)
        variants = [str(k) for k in args.patches_per_image]
        variants += [f"{k} spread" for k in args.patches_per_image if k > 1 and args.spread]
        rates = measure(config, packed, cores, variants, args.seconds, args.rounds)
        decoding = decode_costs(config, packed, args.seconds, args.rounds) if args.decode else None
        confine_to_cores(len(CORES))
    print(table(rates, args.rounds))
    if decoding:
        print(decode_table(decoding, rates))


def measure(config, packed, cores: list[int], variants: list[str], seconds: float, rounds: int) -> dict:
    """Patches/s and patches per CPU-second of today's pipeline (key k=0) and `make_dataset` with
    k patches per image ("k", or "k spread" with data.spread_patches), by (cores, stage, k): one
    (wall, CPU) pair per round, the rounds interleaved so that a change of the machine's load
    spreads over every configuration."""
    spread = config.override(["data.spread_patches=true"])
    batch = config.training.batch_size
    rates: dict = {}
    for round_ in range(rounds):
        for n in cores:
            options = confine_to_cores(n)
            for stage in (1, 2):
                sampler = PatchSampler.from_config(packed, config, stage)
                frequency = config.data.score_frequency if stage == 1 else 0.0
                pipelines = {0: numpy_pipeline(sampler, batch, frequency)}
                for v in variants:
                    chosen = spread if v.endswith("spread") else config
                    pipelines[v] = make_dataset(chosen, stage=stage, patches_per_image=int(v.split()[0]))
                for k, dataset in pipelines.items():
                    rate = pipeline_rate(dataset.with_options(options), batch, seconds)
                    rates.setdefault((n, stage, k), []).append(rate)
                    print(f"round {round_ + 1}: cores {n}, stage {stage}, k {k}: {rate}", flush=True)
    return rates


# What decode_costs times per patch, beside make_dataset's whole patch: the decode as planned, the
# same crops' rows at 1/8 (libjpeg then runs little more than its entropy decoding, which a crop
# cannot skip for the rows above it), and whole images at 1/1 and 1/8.
DECODES = ("as planned", "planned crops at 1/8", "whole image at 1/1", "whole image at 1/8")


def decode_costs(config, packed, seconds: float, rounds: int, patches: int = 512) -> dict:
    """Milliseconds per patch of JPEG decoding alone on one core, by (stage, DECODES entry): the
    crops and DCT reductions `make_dataset` plans for `patches` mask samples at one patch per image,
    their files read into memory first, decoded one at a time in a tf.data map (`rounds` rounds
    of `seconds`, the median)."""
    options = confine_to_cores(1)
    costs: dict = {}
    for stage in (1, 2):
        planner = patch_planner(packed, config.data, config.model, config.inference, stage)
        plan = draw_plan(planner, np.random.default_rng([0, stage]), "mask", patches, 1)
        jpeg = plan["decoder"] < len(JPEG_REDUCTIONS)
        contents = [_read(planner.paths[i]) for i in plan["image"][jpeg]]
        ratio = np.array(JPEG_REDUCTIONS)[plan["decoder"][jpeg]]
        crop = plan["crop"][jpeg]
        # The same image rows and columns at 1/8: y and x rounded down, the far edges up.
        shrink = (8 // ratio)[:, None]
        near, far = crop[:, :2] // shrink, -(-(crop[:, :2] + crop[:, 2:]) // shrink)
        eighth = np.concatenate([near, far - near], 1)
        work = {
            DECODES[0]: (ratio, crop),
            DECODES[1]: (np.full_like(ratio, 8), eighth),
            DECODES[2]: (np.ones_like(ratio), None),
            DECODES[3]: (np.full_like(ratio, 8), None),
        }
        for name, (ratios, crops) in work.items():
            times = []
            for _ in range(rounds):
                times.append(
                    1e3 / pipeline_rate(_decoder(contents, ratios, crops).with_options(options), 1, seconds)[0]
                )
            costs[(stage, name)] = times
            print(f"stage {stage}, decoding {name}: {np.median(times):.2f} ms per patch", flush=True)
    return costs


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _decoder(contents: list[bytes], ratios: np.ndarray, crops: np.ndarray | None) -> tf.data.Dataset:
    """An endless stream decoding each file in turn at its ratio (and crop, where given) with the
    pipeline's own `decode_region`, yielding only the decoded shape."""
    branches = {r: i for i, r in enumerate(JPEG_REDUCTIONS)}
    index = np.array([branches[int(r)] for r in ratios], np.int32)
    whole = crops is None
    crops = np.zeros((len(contents), 4), np.int32) if whole else crops.astype(np.int32)

    def decode(data: tf.Tensor, branch: tf.Tensor, crop: tf.Tensor) -> tf.Tensor:
        return tf.shape(decode_region(data, branch, None if whole else crop))

    files = tf.data.Dataset.from_tensor_slices((tf.constant(contents), index, crops))
    return files.repeat().map(decode, num_parallel_calls=1)


def decode_table(costs: dict, rates: dict) -> str:
    """The Markdown table of `decode_costs`: per-patch milliseconds beside make_dataset's whole
    patch on one core at one patch per image, and the patches/s per core each would allow alone."""
    lines = [
        "| stage | make_dataset, 1 core, 1 per image: ms per patch | " + " | ".join(DECODES) + " |",
        "|---|---|" + "---|" * len(DECODES),
    ]
    for stage in (1, 2):
        whole = rates.get((1, stage, "1"))
        cells = [f"{1e3 / np.median([r[0] for r in whole]):.2f}" if whole else "-"]
        for name in DECODES:
            ms = float(np.median(costs[(stage, name)]))
            cells.append(f"{ms:.2f} ({1e3 / ms:.0f}/s)")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def table(rates: dict, rounds: int) -> str:
    """The Markdown table of `measure`'s rates: medians over rounds, ranges in parentheses."""

    def cell(values: list[float]) -> str:
        return f"{np.median(values):.0f} ({min(values):.0f}-{max(values):.0f})" if rounds > 1 else f"{values[0]:.0f}"

    lines = [
        "| cores | stage | patches per image | today's pipeline: patches/s | per CPU-s "
        "| make_dataset: patches/s | per CPU-s | x today (per CPU-s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, stage, k), measured in rates.items():
        if k == 0:
            continue
        today = rates[(n, stage, 0)]
        ratios = [piped[1] / old[1] for piped, old in zip(measured, today)]
        lines.append(
            f"| {n} | {stage} | {k} | {cell([r[0] for r in today])} | {cell([r[1] for r in today])} "
            f"| {cell([r[0] for r in measured])} | {cell([r[1] for r in measured])} "
            f"| {np.median(ratios):.1f} ({min(ratios):.1f}-{max(ratios):.1f}) |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
