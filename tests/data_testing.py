"""Hand-made COCO datasets for the data tests, written into a test's tmp_path."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from sharpmask_tf.config import get_config

HEIGHT, WIDTH = 120, 160
BACKGROUND = (200, 40, 40)
# Three 32 x 32-box objects, one per segmentation format, at integer boxes: with a canonical size of
# 32 px and no jitter, their windows sample the image one pixel per patch pixel.
L_POLYGON = [40, 30, 72, 30, 72, 46, 56, 46, 56, 62, 40, 62]


def disc_mask(cx: int, cy: int, radius: int) -> np.ndarray:
    """A (HEIGHT, WIDTH) uint8 disc whose box is exactly 2*radius pixels wide."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return (((x + 0.5 - cx) ** 2 + (y + 0.5 - cy) ** 2) < radius**2).astype(np.uint8)


def ring_mask() -> np.ndarray:
    """A square ring (a hole in the middle) in the box x 100..132, y 60..92."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    mask[60:92, 100:132] = 1
    mask[70:82, 110:122] = 0
    return mask


def uncompressed_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO's uncompressed RLE (column-major run lengths starting with zeros)."""
    flat = mask.reshape(-1, order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0] + runs
    return {"size": list(mask.shape), "counts": runs}


def compressed_rle(mask: np.ndarray) -> dict[str, Any]:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": list(mask.shape), "counts": rle["counts"].decode("ascii")}


def write_image(path: str, height: int = HEIGHT, width: int = WIDTH, objects: tuple = ()) -> None:
    """A JPEG of the background colour with each (mask, rgb) object painted in."""
    pixels = np.empty((height, width, 3), np.uint8)
    pixels[:] = BACKGROUND
    for mask, rgb in objects:
        pixels[mask.astype(bool)] = rgb
    Image.fromarray(pixels).save(path, quality=95)


def annotation(ann_id: int, image_id: int, segmentation: Any, bbox: Any, iscrowd: int = 0) -> dict[str, Any]:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": 1 + ann_id % 3,
        "segmentation": segmentation,
        "bbox": bbox,
        "area": 0.0,
        "iscrowd": iscrowd,
    }


def write_json(path: str, images: list[dict[str, Any]], annotations: list[dict[str, Any]]) -> None:
    categories = [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def image_record(image_id: int, file_name: str, height: int = HEIGHT, width: int = WIDTH) -> dict[str, Any]:
    return {"id": image_id, "file_name": file_name, "height": height, "width": width}


def exact_dataset(root: str) -> tuple[str, str]:
    """One image with a polygon L, an uncompressed-RLE disc and a compressed-RLE ring.

    Returns:
        (annotation file, image folder).
    """
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    polygon = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([L_POLYGON], HEIGHT, WIDTH)))
    disc = disc_mask(120, 24, 16)
    ring = ring_mask()
    write_image(
        os.path.join(image_dir, "a.jpg"),
        objects=((polygon, (20, 200, 20)), (disc, (20, 20, 200)), (ring, (240, 240, 0))),
    )
    anns = [
        annotation(1, 1, [L_POLYGON], [40, 30, 32, 32]),
        annotation(2, 1, uncompressed_rle(disc), [104, 8, 32, 32]),
        annotation(3, 1, compressed_rle(ring), [100, 60, 32, 32]),
    ]
    path = os.path.join(root, "instances.json")
    write_json(path, [image_record(1, "a.jpg")], anns)
    return path, image_dir


def config_for(annotation_file: str, image_dir: str, *overrides: str):
    """The small preset on a hand-made dataset (both splits), canonical object size 32 px, with
    the paper's alternation of score and mask batches from the first step."""
    return get_config(
        "small",
        [
            "data.mask_only_steps=0",
            f"data.train_annotations={annotation_file}",
            f"data.train_images={image_dir}",
            f"data.val_annotations={annotation_file}",
            f"data.val_images={image_dir}",
            "data.object_fraction=0.5",
            *overrides,
        ],
    )


def malformed_dataset(root):
    """Eight images, each carrying one kind of problem, and one good image with one good object."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    disc = disc_mask(60, 60, 20)
    good = compressed_rle(disc)
    box = [40, 40, 40, 40]
    for name in (
        "good.jpg",
        "empty_polygon.jpg",
        "crowd.jpg",
        "zero_area.jpg",
        "bad_rle.jpg",
        "bad_box.jpg",
        "bbox_polygon.jpg",
    ):
        write_image(os.path.join(image_dir, name), objects=((disc, (0, 0, 255)),))
    write_image(os.path.join(image_dir, "truncated.jpg"), objects=((disc, (0, 0, 255)),))
    with open(os.path.join(image_dir, "truncated.jpg"), "rb") as f:
        data = f.read()
    with open(os.path.join(image_dir, "truncated.jpg"), "wb") as f:
        f.write(data[: len(data) // 3])
    with open(os.path.join(image_dir, "garbage.jpg"), "wb") as f:
        f.write(b"this is not a JPEG")
    overrun = uncompressed_rle(disc)
    overrun["counts"][-1] += 1000  # would make pycocotools write past its buffer
    images = [
        image_record(1, "good.jpg"),
        image_record(2, "missing.jpg"),
        image_record(3, "empty_polygon.jpg"),
        image_record(4, "crowd.jpg"),
        image_record(5, "zero_area.jpg"),
        image_record(6, "garbage.jpg"),
        image_record(7, "truncated.jpg"),
        image_record(8, "bad_rle.jpg"),
        image_record(9, "bad_box.jpg"),
        image_record(10, "bbox_polygon.jpg"),
    ]
    anns = [
        annotation(1, 1, good, box),
        annotation(2, 2, good, box),  # its image file is missing: goes with the image
        annotation(3, 3, [], box),
        annotation(4, 4, uncompressed_rle(disc), box, iscrowd=1),
        annotation(5, 5, compressed_rle(np.zeros((HEIGHT, WIDTH), np.uint8)), box),
        annotation(6, 99, good, box),  # no such image
        annotation(7, 7, good, box),  # the truncated JPEG's header reads fine: caught when decoded
        annotation(8, 8, overrun, box),
        annotation(9, 9, good, [40, 40, 0, 40]),
        annotation(10, 10, [[40, 40, 80, 80]], box),  # four numbers: pycocotools would read a box
    ]
    path = os.path.join(root, "instances.json")
    write_json(path, images, anns)
    return path, image_dir


def crowded_dataset(root, num_images=6, seed=0):
    """Images with 4..8 overlapping discs of many sizes, plus a crowd region and a tiny object."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    images, anns = [], []
    for i in range(1, num_images + 1):
        height, width = 120, 160
        objects = []
        for _ in range(int(rng.integers(4, 9))):
            cx, cy, r = int(rng.integers(10, 150)), int(rng.integers(10, 110)), int(rng.integers(4, 40))
            mask = disc_mask(cx, cy, r)
            ys, xs = np.nonzero(mask)
            bbox = [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]
            anns.append(annotation(len(anns) + 1, i, compressed_rle(mask), bbox, iscrowd=int(len(anns) % 7 == 0)))
            objects.append((mask, tuple(int(c) for c in rng.integers(0, 255, 3))))
        write_image(os.path.join(image_dir, f"{i}.jpg"), height, width, tuple(objects))
        images.append(image_record(i, f"{i}.jpg", height, width))
    path = os.path.join(root, "instances.json")
    write_json(path, images, anns)
    return path, image_dir


def photograph_dataset(root, num_images=2, seed=0):
    """640x480 JPEGs of smooth noise with objects whose longest sides span 60..440 px, so that
    windows decode at every JPEG reduction; polygon and compressed-RLE annotations."""
    rng = np.random.default_rng(seed)
    height, width = 480, 640
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir)
    images, anns = [], []
    y, x = np.mgrid[0:height, 0:width]
    for i in range(1, num_images + 1):
        pixels = np.stack([np.sin(x / rng.uniform(5, 40) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(5, 40))] * 3, -1)
        pixels = (pixels * 60 + 120 + rng.normal(0, 10, (height, width, 3))).clip(0, 255).astype(np.uint8)
        for side in (60, 150, 260, 440):
            w, h = side, int(side * rng.uniform(0.5, 1.0))
            x0, y0 = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
            mask = np.zeros((height, width), np.uint8)
            mask[y0 : y0 + h, x0 : x0 + w] = 1
            pixels[mask.astype(bool)] = rng.integers(0, 255, 3)
            if side % 20:
                segmentation = compressed_rle(mask)
            else:
                segmentation = [[x0, y0, x0 + w, y0, x0 + w, y0 + h, x0, y0 + h]]
            anns.append(annotation(len(anns) + 1, i, segmentation, [x0, y0, w, h]))
        Image.fromarray(pixels).save(os.path.join(image_dir, f"{i}.jpg"), quality=90)
        images.append(image_record(i, f"{i}.jpg", height, width))
    path = os.path.join(root, "instances.json")
    write_json(path, images, anns)
    return path, image_dir


def truncated_image_dataset(root) -> tuple[str, str]:
    """Two images of one disc each, good.jpg (id 1) and cut.jpg (id 2) cut to a third of its
    bytes; returns (annotation file, image folder)."""
    image_dir = os.path.join(root, "images")
    os.makedirs(image_dir, exist_ok=True)
    mask = disc_mask(50, 50, 20)
    for name in ("good.jpg", "cut.jpg"):
        write_image(os.path.join(image_dir, name), objects=((mask, (0, 0, 255)),))
    cut = os.path.join(image_dir, "cut.jpg")
    with open(cut, "rb") as f:
        data = f.read()
    with open(cut, "wb") as f:
        f.write(data[: len(data) // 3])
    path = os.path.join(root, "instances.json")
    anns = [annotation(i, i, compressed_rle(mask), [30, 30, 40, 40]) for i in (1, 2)]
    write_json(path, [image_record(1, "good.jpg"), image_record(2, "cut.jpg")], anns)
    return path, image_dir
