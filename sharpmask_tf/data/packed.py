"""A validated split packed into NumPy arrays, for sampling, and its on-disk cache.

A `CocoDataset` keeps the JSON's records as Python objects: a COCO-train-sized split takes
gigabytes and most of a minute to read and validate. Sampling needs only, per image, its id, file
and size, and per annotation its id, image, box, crowd flag, mask area and one compressed RLE:
`PackedSplit` holds exactly those, in arrays (a few hundred MB at COCO scale), and `load_packed`
keeps them in a cache file that a later process reads in seconds. The cache is keyed by the
annotation file's path, size and modification time, the image folder's, and the validation mode,
and it is used only if every image it lists still has the size and modification time it had.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import tempfile
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from sharpmask_tf.data.coco import CocoDataset

logger = logging.getLogger(__name__)

CACHE_VERSION = 1
_ARRAYS = ("image_ids", "file_names", "sizes", "ann_ids", "ann_images", "boxes", "crowd", "areas", "rle_ends", "rles")


def cache_dir() -> str:
    """Where packed splits are cached: $SHARPMASK_TF_CACHE, else $XDG_CACHE_HOME/sharpmask_tf, else
    ~/.cache/sharpmask_tf."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sharpmask_tf")
    return os.environ.get("SHARPMASK_TF_CACHE", default)


class PackedSplit:
    """The images and annotations of a validated split, as arrays; annotations sorted by image.

    Build one with `from_dataset` or `load_packed`. Images are addressed by index (position in
    `image_ids`), annotations by row.

    Attributes:
        annotation_file: the instances JSON.
        image_dir: the image folder.
        skipped: `collections.Counter` of the records validation dropped, by reason.
        image_ids: (I,) int64 COCO image ids.
        file_names: (I,) str.
        sizes: (I, 2) int64 (width, height).
        ann_ids: (A,) int64 COCO annotation ids.
        ann_images: (A,) int64 image index of each annotation, non-decreasing.
        boxes: (A, 4) float64 COCO boxes (x, y, width, height).
        crowd: (A,) bool.
        areas: (A,) int64 pixel areas of the decoded masks.
    """

    def __init__(self, annotation_file: str, image_dir: str, skipped: collections.Counter, **arrays: np.ndarray):
        self.annotation_file = annotation_file
        self.image_dir = image_dir
        self.skipped = skipped
        for name in _ARRAYS:
            setattr(self, name, arrays[name])
        self.image_starts = np.searchsorted(self.ann_images, np.arange(len(self.image_ids) + 1))
        self._order = np.argsort(self.ann_ids, kind="stable")
        self._index = {int(image_id): i for i, image_id in enumerate(self.image_ids)}

    @classmethod
    def from_dataset(cls, dataset: CocoDataset) -> PackedSplit:
        """Packs a validated `CocoDataset`."""
        images = dataset.coco.dataset["images"]
        index = {image["id"]: i for i, image in enumerate(images)}
        anns = sorted(dataset.coco.dataset["annotations"], key=lambda a: index[a["image_id"]])
        rles = [dataset.annotation_rle(a)["counts"] for a in anns]
        return cls(
            dataset.annotation_file,
            dataset.image_dir,
            collections.Counter(dataset.skipped),
            image_ids=np.array([image["id"] for image in images], np.int64),
            file_names=np.array([image["file_name"] for image in images], str),
            sizes=np.array([(image["width"], image["height"]) for image in images], np.int64).reshape(-1, 2),
            ann_ids=np.array([a["id"] for a in anns], np.int64),
            ann_images=np.array([index[a["image_id"]] for a in anns], np.int64),
            boxes=np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4),
            crowd=np.array([bool(a["iscrowd"]) for a in anns], bool),
            areas=np.array([dataset.mask_area[a["id"]] for a in anns], np.int64),
            rle_ends=np.cumsum([len(r) for r in rles], dtype=np.int64),
            rles=np.frombuffer(b"".join(rles), np.uint8),
        )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_index(self, image_id: int) -> int:
        """The index of an image id."""
        return self._index[int(image_id)]

    def image_path(self, index: int) -> str:
        """Path of an image's file."""
        return os.path.join(self.image_dir, str(self.file_names[index]))

    def annotation_rows(self, index: int) -> range:
        """The rows of an image's annotations, crowd regions included."""
        return range(int(self.image_starts[index]), int(self.image_starts[index + 1]))

    def annotation_row(self, annotation_id: int) -> int:
        """The row of an annotation id."""
        position = int(np.searchsorted(self.ann_ids, annotation_id, sorter=self._order))
        return int(self._order[position])

    def annotation_rle(self, row: int) -> dict[str, Any]:
        """The annotation's segmentation as a pycocotools compressed RLE dict."""
        start = int(self.rle_ends[row - 1]) if row else 0
        width, height = self.sizes[self.ann_images[row]]
        return {"size": [int(height), int(width)], "counts": self.rles[start : self.rle_ends[row]].tobytes()}

    def annotation_mask(self, row: int) -> np.ndarray:
        """The annotation's binary mask, (height, width) uint8 in {0, 1}, as pycocotools decodes it."""
        return mask_utils.decode(self.annotation_rle(row))

    def save(self, path: str) -> None:
        """Writes the arrays to an .npz file, atomically."""
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        skipped = np.array(sorted(self.skipped.items()), str).reshape(-1, 2)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, skipped=skipped, **{name: getattr(self, name) for name in _ARRAYS})
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str, annotation_file: str, image_dir: str) -> PackedSplit:
        """Reads a file written by `save`."""
        with np.load(path) as f:
            arrays = {name: f[name] for name in _ARRAYS}
            skipped = collections.Counter({str(reason): int(n) for reason, n in f["skipped"]})
        return cls(annotation_file, image_dir, skipped, **arrays)

    def files_digest(self) -> str:
        """A digest of the (size, modification time) of every image file; "missing" if one is gone."""
        digest = hashlib.sha1()
        for name in self.file_names:
            try:
                stat = os.stat(os.path.join(self.image_dir, str(name)))
            except OSError:
                return "missing"
            digest.update(b"%d %d;" % (stat.st_size, stat.st_mtime_ns))
        return digest.hexdigest()


def _stat(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return "absent"
    return f"{stat.st_size} {stat.st_mtime_ns}"


def load_packed(annotation_file: str, image_dir: str, on_bad_annotation: str) -> PackedSplit:
    """The packed split of an annotation file and image folder, from the cache when it is current,
    else validated by `CocoDataset` (whose errors it raises) and cached.

    Raises:
        DatasetError: for a missing or malformed dataset.
    """
    key = "\n".join(
        (
            str(CACHE_VERSION),
            os.path.abspath(annotation_file),
            _stat(annotation_file),
            os.path.abspath(image_dir),
            _stat(image_dir),
            on_bad_annotation,
        )
    )
    path = os.path.join(cache_dir(), hashlib.sha1(key.encode()).hexdigest() + ".npz")
    digest_path = path[: -len(".npz")] + ".files"
    if os.path.isfile(path) and os.path.isfile(digest_path):
        try:
            packed = PackedSplit.load(path, annotation_file, image_dir)
            with open(digest_path) as f:
                current = f.read() == packed.files_digest()
        except (OSError, ValueError, KeyError) as e:
            logger.warning("Ignoring an unreadable split cache %s (%s)", path, e)
        else:
            if current:
                if packed.skipped:
                    logger.warning(
                        "%s: skipped %d bad records: %s (cached validation)",
                        annotation_file,
                        sum(packed.skipped.values()),
                        dict(packed.skipped),
                    )
                return packed
    packed = PackedSplit.from_dataset(CocoDataset(annotation_file, image_dir, on_bad_annotation=on_bad_annotation))
    try:
        packed.save(path)
        with open(digest_path, "w") as f:
            f.write(packed.files_digest())
    except OSError as e:
        logger.warning("Cannot write the split cache %s (%s); the split will be validated again", path, e)
    return packed
