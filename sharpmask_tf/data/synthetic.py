"""A procedural COCO-format instances dataset: the default for the demo and the tests.

Each image is a textured background with 1..10 textured objects of five shape families (smooth
blobs, convex polygons, concave stars, thin bars, thin concave arcs) whose longest sides span
COCO's small, medium and large ranges. Objects are painted in order, so later ones occlude earlier
ones; every annotation is the visible part only (area = visible pixel count). An object entirely
visible and inside the image is annotated by its polygon; any other by compressed RLE. Masks are
rasterised by pycocotools, so the painted pixels are exactly what the annotation decodes to.

    python -m sharpmask_tf.data.synthetic --out data/synthetic --train 400 --val 50 --seed 0
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sharpmask_tf.config import DataConfig

logger = logging.getLogger(__name__)

DEFAULT_NUM_TRAIN = 400
DEFAULT_NUM_VAL = 50
DEFAULT_SEED = 0
SHAPES = ("blob", "polygon", "star", "bar", "arc")
MIN_VISIBLE_AREA = 16  # objects occluded down to fewer pixels are not annotated
_SPLIT_TAGS = {"train": 0, "val": 1}


def _upsample(grid: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of a (gh, gw) grid to (height, width)."""

    def weights(n_out: int, n_in: int) -> np.ndarray:
        pos = np.linspace(0, n_in - 1, n_out)
        lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
        frac = pos - lo
        w = np.zeros((n_out, n_in), np.float32)
        w[np.arange(n_out), lo] = 1 - frac
        w[np.arange(n_out), lo + 1] = frac
        return w

    return weights(height, grid.shape[0]) @ grid @ weights(width, grid.shape[1]).T


def _noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """Two octaves of value noise, (height, width, 1) in about [0, 1]."""
    total = np.zeros((height, width, 1), np.float32)
    for octave, amplitude in ((1, 0.65), (3, 0.35)):
        gh = max(2, int(height / cell * octave) + 2)
        gw = max(2, int(width / cell * octave) + 2)
        total += amplitude * _upsample(rng.random((gh, gw), dtype=np.float32), height, width)[..., None]
    return total


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A random procedural texture, (height, width, 3) float32 in [0, 1]."""
    a, b = rng.random(3, dtype=np.float32), rng.random(3, dtype=np.float32)
    kind = rng.integers(4)
    if kind == 0:
        t = _noise(rng, height, width, cell=rng.uniform(8, 60))
    else:
        y, x = np.mgrid[0:height, 0:width].astype(np.float32)
        theta = rng.uniform(0, np.pi)
        period = rng.uniform(4, 30)
        u = x * np.cos(theta) + y * np.sin(theta)
        if kind == 1:
            t = 0.5 + 0.5 * np.sin(2 * np.pi * u / period + rng.uniform(0, 2 * np.pi))
        elif kind == 2:
            v = -x * np.sin(theta) + y * np.cos(theta)
            t = ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
        else:
            t = (u - u.min()) / max(float(np.ptp(u)), 1.0)
        t = t[..., None]
    pixels = a + (b - a) * t
    return np.clip(pixels + rng.normal(0, 0.03, (height, width, 1)).astype(np.float32), 0, 1)


def _outline(rng: np.random.Generator, shape: str) -> np.ndarray:
    """A closed outline of unit size (longest side about 1) centred on the origin, (n, 2)."""
    if shape == "blob":
        t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
        r = np.ones_like(t)
        for k in range(2, 6):
            r += rng.uniform(0, 0.25 / k) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
        points = np.stack([r * np.cos(t), r * np.sin(t) * rng.uniform(0.5, 1.0)], 1)
    elif shape == "polygon":
        t = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 9)))
        r = rng.uniform(0.7, 1.0, len(t))
        points = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "star":
        n = int(rng.integers(4, 9))
        t = np.linspace(0, 2 * np.pi, 2 * n, endpoint=False)
        r = np.where(np.arange(2 * n) % 2 == 0, 1.0, rng.uniform(0.3, 0.6))
        points = np.stack([r * np.cos(t), r * np.sin(t)], 1)
    elif shape == "bar":
        half_width = rng.uniform(0.04, 0.12)
        points = np.array([[-1, -half_width], [1, -half_width], [1, half_width], [-1, half_width]])
    else:  # arc: a thick, open ring sector, concave and thin
        span = rng.uniform(np.pi, 1.7 * np.pi)
        t = np.linspace(0, span, 40)
        inner = 1 - rng.uniform(0.15, 0.4)
        points = np.concatenate(
            [np.stack([np.cos(t), np.sin(t)], 1), np.stack([inner * np.cos(t[::-1]), inner * np.sin(t[::-1])], 1)]
        )
    theta = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    points = points @ rotation.T
    points -= (points.max(0) + points.min(0)) / 2
    return points / np.ptp(points, axis=0).max()


def _render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """One image, (H, W, 3) uint8, and its annotations without ids."""
    width = int(rng.integers(320, 641))
    height = int(rng.integers(240, 481))
    image = _texture(rng, height, width)
    objects = []
    for _ in range(int(rng.integers(1, 11))):
        shape_index = int(rng.integers(len(SHAPES)))
        # Log-uniform longest sides: about a third each below 32^2 area, in between, above 96^2.
        side = float(np.exp(rng.uniform(np.log(10), np.log(0.9 * min(width, height)))))
        # Mostly inside the image; some objects are still cut by its border.
        margin = np.minimum(0.3 * side, [width / 2, height / 2])
        center = rng.uniform(margin, [width - margin[0], height - margin[1]])
        points = _outline(rng, SHAPES[shape_index]) * side + center
        polygon = points.reshape(-1).tolist()
        mask = mask_utils.decode(mask_utils.frPyObjects([polygon], height, width))[..., 0].astype(bool)
        if not mask.any():
            continue
        inside = bool(np.all((points >= 0) & (points <= [width, height])))
        objects.append((shape_index, polygon, mask, inside))
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        box = mask[y0:y1, x0:x1, None]
        fill = _texture(rng, y1 - y0, x1 - x0)
        shade = np.linspace(rng.uniform(0.75, 1.0), rng.uniform(0.9, 1.1), x1 - x0, dtype=np.float32)[None, :, None]
        image[y0:y1, x0:x1] = np.where(box, np.clip(fill * shade, 0, 1), image[y0:y1, x0:x1])
    annotations = []
    covered = np.zeros((height, width), bool)
    for shape_index, polygon, mask, inside in reversed(objects):
        visible = mask & ~covered
        covered |= mask
        area = int(visible.sum())
        if area < MIN_VISIBLE_AREA:
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        if inside and area == int(mask.sum()):
            segmentation: Any = [polygon]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "category_id": shape_index + 1,
                "segmentation": segmentation,
                "area": float(area),
                "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                "iscrowd": 0,
            }
        )
    noisy = image + rng.normal(0, 0.015, image.shape).astype(np.float32)
    return (np.clip(noisy, 0, 1) * 255 + 0.5).astype(np.uint8), annotations[::-1]


def generate_split(out_dir: str, split: str, num_images: int, seed: int) -> str:
    """Writes one split: JPEGs in `<out_dir>/<split>/` and `<out_dir>/annotations/instances_<split>.json`.

    Image i depends only on (seed, split, i). The JSON is written last and atomically, so its
    presence means the split is complete.

    Returns:
        The annotation file's path.

    Raises:
        ValueError: for an unknown split or a negative image count.
    """
    if split not in _SPLIT_TAGS:
        raise ValueError(f"split must be one of {sorted(_SPLIT_TAGS)}. Received: split={split!r}")
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0. Received: num_images={num_images!r}")
    image_dir = os.path.join(out_dir, split)
    os.makedirs(image_dir, exist_ok=True)
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    images, annotations = [], []
    for index in range(num_images):
        rng = np.random.default_rng([seed, _SPLIT_TAGS[split], index])
        pixels, anns = _render_image(rng)
        file_name = f"{index:06d}.jpg"
        Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=92)
        image_id = index + 1
        images.append({"id": image_id, "file_name": file_name, "height": pixels.shape[0], "width": pixels.shape[1]})
        for ann in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **ann})
    dataset = {
        "info": {"description": f"sharpmask_tf synthetic shapes, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(SHAPES)],
    }
    path = os.path.join(out_dir, "annotations", f"instances_{split}.json")
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(dataset, f)
    os.replace(temporary, path)
    return path


def generate_dataset(out_dir: str, num_train: int, num_val: int, seed: int = DEFAULT_SEED) -> dict[str, str]:
    """Writes the train and val splits under `out_dir` (see `generate_split`).

    Returns:
        The annotation file of each split, by split name.
    """
    return {
        "train": generate_split(out_dir, "train", num_train, seed),
        "val": generate_split(out_dir, "val", num_val, seed),
    }


def ensure_dataset(
    data: DataConfig, num_train: int = DEFAULT_NUM_TRAIN, num_val: int = DEFAULT_NUM_VAL, seed: int = DEFAULT_SEED
) -> None:
    """Generates the synthetic dataset where the data config expects it, unless it is there.

    Generates only when the config's four paths follow the synthetic layout
    (`<root>/annotations/instances_{train,val}.json`, `<root>/{train,val}`); a missing dataset at
    any other layout is an error, never overwritten.

    Raises:
        FileNotFoundError: if a dataset outside the synthetic layout is missing.
    """
    paths = (data.train_annotations, data.train_images, data.val_annotations, data.val_images)
    if os.path.isfile(data.train_annotations) and os.path.isfile(data.val_annotations):
        return
    root = os.path.dirname(os.path.dirname(data.train_annotations))
    layout = (
        os.path.join(root, "annotations", "instances_train.json"),
        os.path.join(root, "train"),
        os.path.join(root, "annotations", "instances_val.json"),
        os.path.join(root, "val"),
    )
    if tuple(os.path.normpath(p) for p in paths) != tuple(os.path.normpath(p) for p in layout):
        missing = [p for p in (data.train_annotations, data.val_annotations) if not os.path.isfile(p)]
        raise FileNotFoundError(f"Dataset annotation files not found. Received: missing={missing!r}")
    start = time.perf_counter()
    generate_dataset(root or ".", num_train, num_val, seed)
    logger.info("Generated the synthetic dataset in %s in %.1f s", root, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/synthetic", help="output folder")
    parser.add_argument("--train", type=int, default=DEFAULT_NUM_TRAIN, help="number of train images")
    parser.add_argument("--val", type=int, default=DEFAULT_NUM_VAL, help="number of val images")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="generator seed")
    args = parser.parse_args()
    start = time.perf_counter()
    paths = generate_dataset(args.out, args.train, args.val, args.seed)
    print(f"Wrote {args.train} train and {args.val} val images in {time.perf_counter() - start:.1f} s: {paths}")


if __name__ == "__main__":
    main()
