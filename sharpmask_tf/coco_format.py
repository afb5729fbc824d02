"""COCO's formats where proposals meet them: results entries, their image ids, ground truth.

- Writing: `coco_results` turns one image's proposals into COCO results entries; the inference
  CLI keys them by `image_ids_by_name` and writes the image map beside them (`image_map_path`).
- Reading for evaluation: `ground_truth` validates annotations as the training loader does
  (`sharpmask_tf.data.coco.CocoDataset`), `class_agnostic` indexes them in one category, and
  `checked_results` restricts results to what pycocotools can evaluate safely.
"""

from __future__ import annotations

import collections
import copy
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sharpmask_tf.data.coco import CocoDataset, indexed_coco, segmentation_problem, segmentation_to_rle

# The single category of class-agnostic evaluation.
AGNOSTIC_CATEGORY = {"id": 1, "name": "object"}


def coco_results(proposals: dict[str, np.ndarray], image_id: int) -> list[dict[str, Any]]:
    """COCO results entries (class-agnostic, `AGNOSTIC_CATEGORY`) for one image's proposals.

    A proposal whose binarised mask is empty (on a tiny image, or where no pixel of its window
    reaches `mask_threshold`) covers nothing and has no box; it is left out, so the results hold
    only masks of at least one pixel, in their ranked order.

    Args:
        proposals: the numpy dict of `ProposalGenerator.propose` (needs "masks").
        image_id: the COCO image id.

    Returns:
        A list of {"image_id", "category_id", "segmentation" (RLE, counts as str), "bbox"
        ([x, y, w, h] of the tight box), "score"} dicts, best first.
    """
    masks = np.asarray(proposals["masks"]).astype(bool, copy=False)
    columns = masks.any(axis=1)  # (N, W): the columns each mask occupies
    keep = np.flatnonzero(columns.any(axis=1))
    if keep.size == 0:
        return []
    rles = [_rle(masks[i], columns[i]) for i in keep]
    results = []
    for rle, box, score in zip(rles, np.asarray(proposals["boxes"])[keep], np.asarray(proposals["scores"])[keep]):
        x0, y0, x1, y1 = (float(v) for v in box)
        results.append(
            {
                "image_id": int(image_id),
                "category_id": AGNOSTIC_CATEGORY["id"],
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return results


def _rle(mask: np.ndarray, columns: np.ndarray) -> dict[str, Any]:
    """pycocotools' compressed RLE of one non-empty (H, W) bool mask whose occupied columns are
    `columns` (W,), the same bytes as `pycocotools.mask.encode` of the whole mask.

    COCO's runs go down the columns, so all left of the first occupied column and right of the
    last is one run of zeros each; only the columns in between are copied in column order (a
    whole-image transpose of 1000 proposals cost about as much as proposing them).
    """
    height, width = mask.shape
    occupied = np.flatnonzero(columns)
    x0, x1 = int(occupied[0]), int(occupied[-1]) + 1
    strip = mask[:, x0:x1].T.ravel()
    edges = np.flatnonzero(strip[1:] != strip[:-1]) + 1
    counts = np.diff(np.concatenate(([0], edges, [strip.size]))).tolist()
    if strip[0]:
        counts.insert(0, 0)  # COCO's counts start with a run of zeros, here an empty one
    counts[0] += x0 * height
    after = (width - x1) * height
    if after and strip[-1]:
        counts.append(after)
    elif after:
        counts[-1] += after
    return mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)


def image_map_path(results_path: str | os.PathLike) -> Path:
    """Where the CLI writes the image map of a results JSON: `<stem>.images.json` beside it."""
    path = Path(results_path)
    return path.with_name(f"{path.stem}.images.json")


def image_ids_by_name(annotations: str | os.PathLike) -> dict[str, int]:
    """Image ids of a COCO annotations JSON by file name (the name only, not its folders).

    Raises:
        ValueError: naming the file when it is not JSON with an "images" list of {"id",
            "file_name"} records, or when two records share a file name.
    """
    try:
        images = json.loads(Path(annotations).read_text())["images"]
        pairs = [(Path(im["file_name"]).name, int(im["id"])) for im in images]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{annotations} is not a COCO annotations file with an 'images' list: {err!r}") from err
    ids = dict(pairs)
    if len(ids) != len(pairs):
        shared = sorted(name for name, n in collections.Counter(n for n, _ in pairs).items() if n > 1)
        raise ValueError(
            f"{annotations}: image file names must be unique to match images by name. Received: {shared[:5]}"
        )
    return ids


def ground_truth(
    annotations: str | os.PathLike | dict | Any,
    images_dir: str | os.PathLike | None = None,
    on_bad_annotation: str = "skip",
) -> CocoDataset:
    """Ground truth validated as the training loader validates it (`CocoDataset`).

    Args:
        annotations: a COCO annotations JSON path, its parsed dict, a pycocotools COCO object
            (its dataset is validated) or a `CocoDataset` (returned as is).
        images_dir: the split's image folder: each image's header is checked (exists, decodes,
            within Pillow's decompression-bomb limit, the size the JSON claims). None checks the
            records only (for evaluating a results file).
        on_bad_annotation: "skip" drops and counts bad records (`CocoDataset.skipped`), "error"
            raises at the first.

    Raises:
        DatasetError: for a file that is not a COCO instances file, or the first bad record
            with `on_bad_annotation="error"`.
    """
    from pycocotools.coco import COCO

    if isinstance(annotations, CocoDataset):
        return annotations
    if isinstance(annotations, COCO):
        annotations = annotations.dataset
    return CocoDataset(
        annotations,
        images_dir if images_dir is not None else ".",
        on_bad_annotation=on_bad_annotation,
        check_image_files=images_dir is not None,
    )


def class_agnostic(dataset: CocoDataset, image_ids: Iterable[int] | None = None):
    """A pycocotools COCO index of validated ground truth with every object in one category.

    Annotations without an `area` get their mask's (what COCO's area is for segmentations).

    Args:
        dataset: validated ground truth.
        image_ids: the images to keep (all if None).
    """
    keep = set(dataset.image_ids if image_ids is None else image_ids)
    images = [image for image in dataset.coco.dataset["images"] if image["id"] in keep]
    anns = [
        {**a, "category_id": AGNOSTIC_CATEGORY["id"], "area": a.get("area", dataset.mask_area[a["id"]])}
        for a in dataset.coco.dataset["annotations"]
        if a["image_id"] in keep
    ]
    return indexed_coco({"images": images, "annotations": anns, "categories": [AGNOSTIC_CATEGORY]})


def load_coco(annotations: str | os.PathLike | dict | Any, on_bad_annotation: str = "skip"):
    """The class-agnostic pycocotools COCO index (`class_agnostic`) of validated ground truth
    (`ground_truth` of a path, dict, COCO object or CocoDataset)."""
    return class_agnostic(ground_truth(annotations, on_bad_annotation=on_bad_annotation))


def checked_results(results: list[dict], iou_type: str, gt) -> list[dict]:
    """COCO results on `gt`'s images, checked and restricted to the field `iou_type` evaluates
    (loadRes would otherwise take a detection's area from its box when both are present), in
    category 1, masks as compressed RLE.

    Raises:
        ValueError: naming the first result that lacks the field or that pycocotools could not
            evaluate safely (an RLE not of its image's size, counts overrunning it, a box that is
            not four numbers).
    """
    key = "segmentation" if iou_type == "segm" else "bbox"
    out = []
    for r in results:
        if not isinstance(r, dict) or key not in r or "image_id" not in r or "score" not in r:
            raise ValueError(
                f"{iou_type} evaluation needs image_id, score and {key!r} in every result. Received: {r!r}"[:300]
            )
        image = gt.imgs.get(r["image_id"]) if isinstance(r["image_id"], int) else None
        if image is None:
            continue
        value = r[key]
        if iou_type == "segm":
            h, w = image["height"], image["width"]
            problem = "not an RLE dict" if not isinstance(value, dict) else segmentation_problem(value, h, w)
            if problem is None:
                value = segmentation_to_rle(value, h, w)
        else:
            ok = isinstance(value, (list, tuple)) and len(value) == 4
            problem = None if ok and all(_finite(v) for v in value) else "bbox is not four finite numbers"
        if problem is None and not _finite(r["score"]):
            problem = "score is not a finite number"
        if problem:
            raise ValueError(f"Result on image {r['image_id']} cannot be evaluated: {problem}. Received: {r!r}"[:300])
        out.append(
            {
                "image_id": r["image_id"],
                "category_id": AGNOSTIC_CATEGORY["id"],
                "score": r["score"],
                key: copy.deepcopy(value),
            }
        )
    return out


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and bool(np.isfinite(value))
    )
