"""Reading and validating COCO-format instance datasets.

`CocoDataset` loads an instances JSON and an image folder, checks every image and annotation, and
either raises a `DatasetError` naming the first problem (`on_bad_annotation="error"`) or drops the
offending item, counting and logging it (`"skip"`). Validation is what keeps sampling and evaluation
from hanging or crashing later: pycocotools decodes a run-length encoding whose counts overrun the
image by writing past its buffer (and `COCOeval` spins on it), rasterises a polygon with far-off
points into a buffer the size of its perimeter (a segmentation fault at 1e9), and treats a
four-number polygon as a box. Every field is type-checked before it is used, so a record such as
`iscrowd: "no"` is a counted bad record, not a crash.

About 410 lines: the format's checks, each a small function, beside the one class that applies
them; split, a reader would need both files open for every rule.
"""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import math
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sharpmask_tf.config import ON_BAD_ANNOTATION
from sharpmask_tf.images import DECODE_ERRORS, to_8bit

logger = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset file or record that cannot be used."""


def indexed_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools COCO object over a parsed annotations dict, indexed without its console output."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _decode_rle_string(counts: str) -> list[int] | None:
    """Decodes COCO's compressed RLE string (pycocotools' rleFrString) to run lengths.

    Returns None for a string that is not a well-formed encoding.
    """
    runs: list[int] = []
    p = 0
    n = len(counts)
    while p < n:
        x = 0
        k = 0
        more = True
        while more:
            if p >= n:
                return None
            c = ord(counts[p]) - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def segmentation_to_rle(segmentation: Any, height: int, width: int) -> dict[str, Any]:
    """Turns a validated COCO segmentation (polygons, uncompressed or compressed RLE) into one
    compressed RLE.

    Args:
        segmentation: the annotation's `segmentation` field, already checked by
            `segmentation_problem`.
        height: image height in pixels.
        width: image width in pixels.

    Returns:
        A pycocotools compressed RLE dict with `size` and `counts`.
    """
    if isinstance(segmentation, list):
        return mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    if isinstance(segmentation["counts"], list):
        return mask_utils.frPyObjects(segmentation, height, width)
    counts = segmentation["counts"]
    return {"size": list(segmentation["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _all_numbers(values: list[Any]) -> bool:
    """`_is_number` of every value; for lists of plain ints and floats (what JSON gives) by one
    NumPy check instead of one call per value, the load's hot spot at COCO scale."""
    if set(map(type, values)) <= {int, float}:
        try:
            return bool(np.isfinite(np.array(values, np.float64)).all())
        except OverflowError:  # an int beyond float64's range, as math.isfinite raises for it
            pass
    return all(_is_number(v) for v in values)


def segmentation_problem(segmentation: Any, height: int, width: int) -> str | None:
    """Returns why a segmentation cannot be decoded safely, or None if it can.

    Polygon points may lie up to one image side outside the image (far beyond, pycocotools'
    rasteriser allocates by the perimeter and crashes); an RLE must have the image's size and
    counts summing to it.

    Args:
        segmentation: a COCO `segmentation` field.
        height: image height in pixels.
        width: image width in pixels.
    """
    if isinstance(segmentation, list):
        if not segmentation:
            return "empty polygon list"
        for polygon in segmentation:
            if not isinstance(polygon, list) or len(polygon) < 6 or len(polygon) % 2:
                return "polygon with fewer than 3 points or an odd number of coordinates"
            if not _all_numbers(polygon):
                return "polygon with a non-finite or non-numeric coordinate"
            xs, ys = polygon[0::2], polygon[1::2]
            if min(xs) < -width or max(xs) > 2 * width or min(ys) < -height or max(ys) > 2 * height:
                return f"polygon point more than the image's size outside it (x {min(xs)}..{max(xs)}, y {min(ys)}..{max(ys)})"
        return None
    if not isinstance(segmentation, dict) or "counts" not in segmentation or "size" not in segmentation:
        return "segmentation is neither a polygon list nor an RLE dict"
    size = segmentation["size"]
    if not isinstance(size, (list, tuple)) or len(size) != 2 or not all(_is_int(v) for v in size):
        return f"RLE size is not [height, width] ({size!r})"
    if list(size) != [height, width]:
        return f"RLE size differs from the image size ({segmentation['size']} != {[height, width]})"
    counts = segmentation["counts"]
    if isinstance(counts, list):
        runs = counts
        if not all(_is_int(r) and r >= 0 for r in runs):
            return "uncompressed RLE with a negative or non-integer count"
    elif isinstance(counts, (str, bytes)):
        runs = _decode_rle_string(counts.decode() if isinstance(counts, bytes) else counts)
        if runs is None or any(r < 0 for r in runs):
            return "malformed compressed RLE string"
    else:
        return "RLE counts are neither a list nor a string"
    if sum(runs) != height * width:
        return f"RLE counts do not sum to height*width ({sum(runs)} != {height * width})"
    return None


def _bbox_problem(bbox: Any, height: int, width: int) -> str | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return "bbox is not four numbers"
    if not all(_is_number(v) for v in bbox):
        return "bbox has a non-finite or non-numeric value"
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "bbox has a non-positive width or height"
    # One pixel of slack: COCO boxes of polygons may end on the image's last pixel boundary.
    if x < -1 or y < -1 or x + w > width + 1 or y + h > height + 1:
        return "bbox lies outside the image"
    return None


class CocoDataset:
    """A validated COCO-format instances dataset: annotations JSON plus an image folder.

    Args:
        annotation_file: path of the instances JSON, or its parsed content as a dict.
        image_dir: folder holding the images named by each image's `file_name`; a `file_name`
            that is absolute or climbs out with `..` is a bad image record.
        image_ids: optional subset of image ids to keep; ids absent from the JSON raise.
        on_bad_annotation: `"error"` raises `DatasetError` at the first bad record; `"skip"` drops
            it, counts it in `skipped` and logs a summary.
        check_image_files: open every image's header to check it exists, is a readable image
            within Pillow's decompression-bomb limit and has the size the JSON claims.

    Raises:
        DatasetError: for a JSON that is not a COCO instances file (always), or for the first bad
            image or annotation when `on_bad_annotation="error"`.

    Attributes:
        coco: a pycocotools `COCO` index over the images and annotations that passed validation.
        skipped: `collections.Counter` of dropped records by reason.
        mask_area: pixel area of every valid annotation's decoded mask, by annotation id.
    """

    def __init__(
        self,
        annotation_file: str | os.PathLike | dict[str, Any],
        image_dir: str | os.PathLike,
        image_ids: Iterable[int] | None = None,
        on_bad_annotation: str = "skip",
        check_image_files: bool = True,
    ) -> None:
        if on_bad_annotation not in ON_BAD_ANNOTATION:
            raise ValueError(
                f"on_bad_annotation must be one of {ON_BAD_ANNOTATION}. Received: on_bad_annotation={on_bad_annotation!r}"
            )
        from_dict = isinstance(annotation_file, dict)
        self.annotation_file = "<annotations dict>" if from_dict else os.fspath(annotation_file)
        self.image_dir = os.fspath(image_dir)
        self.on_bad_annotation = on_bad_annotation
        self.skipped: collections.Counter = collections.Counter()
        self.mask_area: dict[Any, int] = {}
        # Compressed RLE counts by annotation id, made once by validation (polygons are
        # rasterised once, not again for every use).
        self._rle_counts: dict[Any, bytes] = {}
        self._lock = threading.Lock()
        raw = self._checked_layout(dict(annotation_file) if from_dict else self._read_json(self.annotation_file))
        images = self._valid_images(raw["images"], image_ids, check_image_files)
        declared = {record["id"] for record in raw["images"] if _is_int(record["id"])}
        annotations = self._valid_annotations(raw["annotations"], images, declared)
        dataset = {
            "info": raw.get("info", {}),
            "images": list(images.values()),
            "annotations": annotations,
            "categories": raw.get("categories", []),
        }
        self.coco = indexed_coco(dataset)
        if self.skipped:
            logger.warning(
                "%s: skipped %d bad records: %s", annotation_file, sum(self.skipped.values()), dict(self.skipped)
            )

    @staticmethod
    def _read_json(path: str) -> dict[str, Any]:
        if not os.path.isfile(path):
            raise DatasetError(f"Annotation file not found. Received: annotation_file={path!r}")
        try:
            with open(path) as f:
                raw = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"Annotation file is not valid JSON ({e}). Received: annotation_file={path!r}") from e
        if not isinstance(raw, dict):
            raise DatasetError(f"Annotation file has no 'images' list. Received: annotation_file={path!r}")
        return raw

    def _checked_layout(self, raw: dict[str, Any]) -> dict[str, Any]:
        """The parsed file with its top-level lists checked (always raising)."""
        path = self.annotation_file
        if not isinstance(raw.get("images"), list):
            raise DatasetError(f"Annotation file has no 'images' list. Received: annotation_file={path!r}")
        if not isinstance(raw.get("annotations", []), list):
            raise DatasetError(f"Annotation file's 'annotations' is not a list. Received: annotation_file={path!r}")
        categories = raw.get("categories", [])
        if not isinstance(categories, list) or not all(
            isinstance(c, dict) and _is_int(c.get("id")) for c in categories
        ):
            raise DatasetError(
                f"Annotation file's 'categories' is not a list of records with integer ids. Received: annotation_file={path!r}"
            )
        raw.setdefault("annotations", [])
        return raw

    def _bad(self, reason: str, record: str) -> None:
        """Raises or counts one bad record, following `on_bad_annotation`."""
        if self.on_bad_annotation == "error":
            raise DatasetError(f"{self.annotation_file}: {reason}. Received: {record}")
        logger.debug("%s: skipping %s: %s", self.annotation_file, record, reason)
        with self._lock:
            # Details follow the kind of problem in parentheses; count by kind.
            self.skipped[reason.split(" (")[0]] += 1

    def _valid_images(
        self, records: list[Any], image_ids: Iterable[int] | None, check_files: bool
    ) -> dict[int, dict[str, Any]]:
        by_id: dict[int, dict[str, Any]] = {}
        for record in records:
            if not isinstance(record, dict) or not all(k in record for k in ("id", "file_name", "height", "width")):
                raise DatasetError(
                    f"Image record lacks id, file_name, height or width. Received: image={record!r}"[:300]
                )
            if not _is_int(record["id"]):
                self._bad("image id is not an integer", f"image id={record['id']!r}"[:200])
                continue
            if record["id"] in by_id:
                raise DatasetError(f"Duplicate image id. Received: id={record['id']!r}")
            by_id[record["id"]] = record
        if image_ids is not None:
            wanted = list(image_ids)
            unknown = [i for i in wanted if i not in by_id]
            if unknown:
                raise DatasetError(f"Image ids not in {self.annotation_file}. Received: image_ids={unknown[:10]!r}")
            by_id = {i: by_id[i] for i in wanted}
        valid = {}
        for image_id, record in by_id.items():
            problem = self._image_problem(record, check_files)
            if problem:
                self._bad(problem, f"image id={image_id!r} file_name={record['file_name']!r}")
            else:
                valid[image_id] = record
        return valid

    def _image_problem(self, record: dict[str, Any], check_file: bool) -> str | None:
        h, w = record["height"], record["width"]
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            return "image with a non-positive or non-integer size"
        name = record["file_name"]
        if not isinstance(name, str) or not name:
            return "image file_name is not a non-empty string"
        # Relative to image_dir and inside it: an absolute name or one with a ".." part would
        # make the dataset read files elsewhere.
        if os.path.isabs(name) or os.path.splitdrive(name)[0] or ".." in name.replace("\\", "/").split("/"):
            return f"image file_name outside the image folder ({name!r})"
        if not check_file:
            return None
        path = os.path.join(self.image_dir, name)
        if not os.path.isfile(path):
            return "image file not found"
        try:
            with Image.open(path) as image:
                size = image.size
        except Image.DecompressionBombError as e:
            return f"image over Pillow's decompression-bomb limit ({e})"
        except DECODE_ERRORS as e:
            return f"image file unreadable ({e})"
        if size != (w, h):
            return f"image file size differs from the JSON (file {size} != JSON {(w, h)})"
        return None

    def _valid_annotations(
        self, records: list[Any], images: dict[int, dict[str, Any]], declared: set[Any]
    ) -> list[dict[str, Any]]:
        valid = []
        seen: set[Any] = set()
        for record in records:
            if not isinstance(record, dict) or "id" not in record or "image_id" not in record:
                self._bad("annotation without id or image_id", repr(record)[:200])
                continue
            name = f"annotation id={record['id']!r} image_id={record['image_id']!r}"[:200]
            if not (_is_int(record["id"]) and _is_int(record["image_id"])):
                self._bad("annotation id or image_id is not an integer", name)
                continue
            if record["id"] in seen:
                self._bad("duplicate annotation id", name)
                continue
            seen.add(record["id"])
            image = images.get(record["image_id"])
            if image is None:
                # An image dropped by validation or left out by image_ids takes its annotations
                # with it; only ids the JSON never declared are an annotation error.
                if record["image_id"] not in declared:
                    self._bad("annotation on an unknown image", name)
                continue
            h, w = image["height"], image["width"]
            problem = None
            if "segmentation" not in record:
                problem = "annotation without segmentation"
            elif record.get("iscrowd", 0) not in (0, 1):
                problem = f"iscrowd is not 0 or 1 ({record['iscrowd']!r})"
            elif not _is_int(record.get("category_id")):
                problem = f"category_id is not an integer ({record.get('category_id')!r})"
            elif "area" in record and not (_is_number(record["area"]) and record["area"] >= 0):
                problem = f"area is not a non-negative number ({record['area']!r})"
            else:
                problem = segmentation_problem(record["segmentation"], h, w) or _bbox_problem(record.get("bbox"), h, w)
            if problem is None:
                rle = segmentation_to_rle(record["segmentation"], h, w)
                area = int(mask_utils.area(rle))
                if area == 0:
                    problem = "empty segmentation (zero area)"
            if problem:
                self._bad(problem, name)
                continue
            self.mask_area[record["id"]] = area
            self._rle_counts[record["id"]] = rle["counts"]
            valid.append({**record, "iscrowd": int(record.get("iscrowd", 0))})
        return valid

    @property
    def image_ids(self) -> list[int]:
        """Ids of the images that passed validation, in file order."""
        return [image["id"] for image in self.coco.dataset["images"]]

    def image_info(self, image_id: int) -> dict[str, Any]:
        """The image's JSON record (`id`, `file_name`, `height`, `width`, ...)."""
        return self.coco.imgs[image_id]

    def image_path(self, image_id: int) -> str:
        """Path of the image's file."""
        return os.path.join(self.image_dir, self.coco.imgs[image_id]["file_name"])

    def annotations(self, image_id: int, include_crowd: bool = True) -> list[dict[str, Any]]:
        """The image's valid annotations, crowd regions included unless `include_crowd=False`."""
        anns = self.coco.imgToAnns.get(image_id, [])
        return [a for a in anns if include_crowd or not a["iscrowd"]]

    def annotation_rle(self, annotation: dict[str, Any]) -> dict[str, Any]:
        """The annotation's segmentation as one compressed RLE."""
        image = self.coco.imgs[annotation["image_id"]]
        return {"size": [image["height"], image["width"]], "counts": self._rle_counts[annotation["id"]]}

    def annotation_mask(self, annotation: dict[str, Any]) -> np.ndarray:
        """The annotation's binary mask, (height, width) uint8 in {0, 1}, as pycocotools decodes it."""
        return mask_utils.decode(self.annotation_rle(annotation))

    def load_image(self, image_id: int) -> np.ndarray:
        """The decoded image, (height, width, 3) float32 RGB in [0, 1].

        Raises:
            DatasetError: if the file cannot be decoded.
        """
        path = self.image_path(image_id)
        try:
            with Image.open(path) as image:
                return np.asarray(to_8bit(image).convert("RGB"), dtype=np.float32) / 255.0
        except DECODE_ERRORS as e:
            raise DatasetError(f"Cannot decode image ({e}). Received: path={path!r}") from e

    def __len__(self) -> int:
        return len(self.coco.dataset["images"])
