"""The paper's training-patch sampler (SPEC.md section 3), in NumPy and Pillow.

`PatchSampler.draw_windows` draws a batch's windows without reading an image (the training pipeline
cuts them with TensorFlow ops, `render.py`); `crop_image`, `crop_label` and `sample_batch` cut them
with Pillow and NumPy, the reference those ops are tested against.

A sample is a window: a centre in image pixels and a scale (patch pixels per image pixel). The
network sees `input_size = patch_size + 2 * context` pixels around that centre; the label covers
the central `patch_size` window. Geometry uses continuous pixel coordinates: pixel k spans [k, k+1).

- Mask samples are positives: an object's canonical window (its bounding box's longest side scaled
  to `object_fraction * patch_size`, centred on the box) jittered by 2^U(-scale_jitter,
  scale_jitter) in scale and U(-shift_jitter, shift_jitter) patch pixels on each axis.
- Score samples are positives drawn the same way, or negatives: windows at a random position and a
  random scale from the inference pyramid's range, kept only if for every object in the image
  (crowd and tiny ones included) the object's centre is at least `negative_shift` patch pixels
  from the window's centre on some axis, measured at the window's own scale, or the window's scale
  is at least `negative_scale` octaves from the object's canonical scale. (The reference compared
  positions at one scale only.)

About 450 lines, one class: the drawing rules and the Pillow/NumPy cutting that defines the
patches they give (the reference that `render.py` is tested against) are one definition, read
together.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from sharpmask_tf.config import Config
from sharpmask_tf.data.coco import CocoDataset, DatasetError
from sharpmask_tf.data.packed import PackedSplit
from sharpmask_tf.images import GREY, to_8bit

logger = logging.getLogger(__name__)

# Redraws allowed for one sample when images fail to decode or no negative is found, so a broken
# dataset ends in an error instead of an endless loop.
MAX_ATTEMPTS = 100
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclass(frozen=True)
class Window:
    """Where one sample was cut from.

    Attributes:
        image_id: the COCO image id.
        center_x: window centre, image pixels (continuous coordinates).
        center_y: window centre, image pixels.
        scale: patch pixels per image pixel.
        flip: whether the patch and label were flipped horizontally.
        annotation_id: the positive's object, or None for a negative.
    """

    image_id: Any
    center_x: float
    center_y: float
    scale: float
    flip: bool
    annotation_id: Any | None


class PatchSampler:
    """Draws mask and score samples from a `CocoDataset`.

    Sampling is a pure function of the `numpy.random.Generator` passed in, so the same generator
    state gives the same patches in any thread.

    Args:
        dataset: the validated dataset, packed here unless it is already (kept as `dataset`).
        patch_size: side of the window the label covers, in patch pixels.
        context: extra patch pixels on every side of the window.
        label_size: side of the label.
        object_fraction: canonical object longest side over `patch_size`.
        scale_jitter: log2 half-range of the positives' scale jitter.
        shift_jitter: half-range of the positives' centre jitter per axis, patch pixels.
        negative_shift: negatives' minimum centre distance from every object, patch pixels.
        negative_scale: negatives' minimum log2 scale distance from every object's canonical scale.
        negative_log2_scales: (min, max) log2 range of the negatives' scales (patch px per image px).
        flip_probability: probability of a horizontal flip.
        min_area: objects whose mask area is below this (px^2) are not positives.
        min_side: objects whose box has a side below this (px) are not positives.
        on_bad_annotation: `"error"` raises on an undecodable image; `"skip"` counts it and redraws.

    Raises:
        DatasetError: if the dataset has no images or no object to sample.
    """

    def __init__(
        self,
        dataset: CocoDataset | PackedSplit,
        *,
        patch_size: int,
        context: int,
        label_size: int,
        object_fraction: float,
        scale_jitter: float,
        shift_jitter: float,
        negative_shift: float,
        negative_scale: float,
        negative_log2_scales: tuple[float, float],
        flip_probability: float,
        min_area: float,
        min_side: float,
        on_bad_annotation: str = "skip",
    ) -> None:
        self.patch_size = patch_size
        self.context = context
        self.input_size = patch_size + 2 * context
        self.label_size = label_size
        self.canonical_size = object_fraction * patch_size
        self.scale_jitter = scale_jitter
        self.shift_jitter = shift_jitter
        self.negative_shift = negative_shift
        self.negative_scale = negative_scale
        self.negative_log2_scales = negative_log2_scales
        self.flip_probability = flip_probability
        self.on_bad_annotation = on_bad_annotation
        self.skipped: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

        packed = dataset if isinstance(dataset, PackedSplit) else PackedSplit.from_dataset(dataset)
        self.dataset = packed
        self.image_ids = packed.image_ids.tolist()
        if not self.image_ids:
            raise DatasetError(f"No usable images. Received: annotation_file={dataset.annotation_file!r}")
        self._sizes = packed.sizes.astype(np.float64)
        boxes = packed.boxes
        # Every object, for the negatives' check: centre x, centre y, longest side; views per image.
        objects = np.stack([boxes[:, 0] + boxes[:, 2] / 2, boxes[:, 1] + boxes[:, 3] / 2, boxes[:, 2:].max(1)], 1)
        starts = packed.image_starts
        self._objects = [objects[start:stop] for start, stop in zip(starts[:-1], starts[1:])]
        # Rows of the sampleable annotations, image by image: those of image i are
        # positives[positive_starts[i]:positive_starts[i + 1]].
        sampleable = ~packed.crowd & (packed.areas >= min_area) & (boxes[:, 2:].min(1) >= min_side)
        self.positives = np.flatnonzero(sampleable)
        self._positive_starts = np.searchsorted(packed.ann_images[self.positives], np.arange(len(self.image_ids) + 1))
        if not self.positives.size:
            raise DatasetError(
                "No object to sample: every annotation is a crowd region, or smaller than "
                f"min_area={min_area} px^2 or min_side={min_side} px. "
                f"Received: annotation_file={dataset.annotation_file!r}"
            )

    @classmethod
    def from_config(cls, dataset: CocoDataset | PackedSplit, config: Config, stage: int) -> PatchSampler:
        """The sampler for a config and training stage (label side `data.label_size` in stage 1,
        `model.patch_size` in stage 2).

        Raises:
            ValueError: for a stage other than 1 or 2.
        """
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2. Received: stage={stage!r}")
        d, m = config.data, config.model
        return cls(
            dataset,
            patch_size=m.patch_size,
            context=m.context,
            label_size=d.label_size if stage == 1 else m.patch_size,
            object_fraction=d.object_fraction,
            scale_jitter=d.scale_jitter,
            shift_jitter=d.shift_jitter,
            negative_shift=d.negative_shift,
            negative_scale=d.negative_scale,
            negative_log2_scales=(config.inference.scale_min, config.inference.scale_max),
            flip_probability=d.flip_probability,
            min_area=d.min_area,
            min_side=d.min_side,
            on_bad_annotation=d.on_bad_annotation,
        )

    def canonical_scale(self, longest_side: np.ndarray | float) -> np.ndarray | float:
        """Patch pixels per image pixel that bring an object's longest side to the canonical size."""
        return self.canonical_size / longest_side

    def is_negative(self, image_index: int, center_x: float, center_y: float, scale: float) -> bool:
        """Whether a window is far enough, in position or scale, from every object of its image."""
        objects = self._objects[image_index]
        offset = np.maximum(np.abs(objects[:, 0] - center_x), np.abs(objects[:, 1] - center_y)) * scale
        octaves = np.abs(np.log2(scale / self.canonical_scale(objects[:, 2])))
        return not np.any((offset < self.negative_shift) & (octaves < self.negative_scale))

    def _positive_rows(self, rng: np.random.Generator, image_indices: np.ndarray | None, n: int) -> np.ndarray:
        """n sampleable annotation rows, uniformly over all, or one within each given image."""
        if image_indices is None:
            return self.positives[rng.integers(len(self.positives), size=n)]
        start, stop = self._positive_starts[image_indices], self._positive_starts[np.asarray(image_indices) + 1]
        return self.positives[start + rng.integers(stop - start)]

    def _positive_windows(self, rng: np.random.Generator, rows: np.ndarray) -> list[Window]:
        """Jittered positive windows of these annotation rows, one each."""
        x, y, w, h = self.dataset.boxes[rows].T
        n = len(rows)
        scale = self.canonical_scale(np.maximum(w, h)) * 2.0 ** rng.uniform(-self.scale_jitter, self.scale_jitter, n)
        dx, dy = rng.uniform(-self.shift_jitter, self.shift_jitter, size=(2, n))
        flip = rng.random(n) < self.flip_probability
        images = self.dataset.ann_images[rows]
        return [
            Window(self.image_ids[i], cx, cy, sc, f, a)
            for i, cx, cy, sc, f, a in zip(
                images.tolist(),
                (x + w / 2 + dx / scale).tolist(),
                (y + h / 2 + dy / scale).tolist(),
                scale.tolist(),
                flip.tolist(),
                self.dataset.ann_ids[rows].tolist(),
            )
        ]

    def _positive_window(self, rng: np.random.Generator, image_index: int | None = None) -> Window:
        images = None if image_index is None else np.array([image_index])
        return self._positive_windows(rng, self._positive_rows(rng, images, 1))[0]

    def _negative_window(self, rng: np.random.Generator, image_index: int | None = None) -> Window:
        lo, hi = self.negative_log2_scales
        for _ in range(MAX_ATTEMPTS):
            index = int(rng.integers(len(self.image_ids))) if image_index is None else image_index
            width, height = self._sizes[index]
            scale = 2.0 ** rng.uniform(lo, hi)
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            if self.is_negative(index, cx, cy, scale):
                return Window(self.image_ids[index], cx, cy, scale, bool(rng.random() < self.flip_probability), None)
        # Every object's centre lies inside its image, so a window centred this far left of the
        # image is a negative by definition; reached only in images crowded at every scale.
        with self._lock:
            self.skipped["negative fell back to an off-image window"] += 1
        return Window(self.image_ids[index], -self.negative_shift / scale - 1.0, cy, scale, False, None)

    def draw_window(self, rng: np.random.Generator, positive: bool, image_index: int | None = None) -> Window:
        """One window, drawn by the rules of the module docstring; no image is read.

        Args:
            rng: the generator all randomness comes from.
            positive: a positive (an object uniformly among the sampleable ones) or a negative.
            image_index: None for the rules as stated; else the window's image, by position in
                `image_ids`: a positive is then an object drawn uniformly among that image's
                sampleable ones (the image must have one), a negative is placed in that image.
        """
        return self._positive_window(rng, image_index) if positive else self._negative_window(rng, image_index)

    def draw_windows(
        self,
        rng: np.random.Generator,
        kind: str,
        batch_size: int,
        patches_per_image: int = 1,
        usable: Callable[[int], bool] | None = None,
    ) -> list[Window]:
        """The windows of one batch of a single kind, in groups of `patches_per_image` from one image.

        Mask batches are positives; in score batches each group is positives or negatives with
        probability 0.5. A group's first window follows the rules as stated. The others are of its
        sign and in its image: positives an object drawn uniformly among the image's sampleable
        ones (the first picks an image in proportion to its sampleable objects, so every window is
        still uniform over all objects), negatives the same rejection within that image. Each
        window on its own is distributed as with one window per image; only the windows of a group
        are dependent, and a score batch's count of positives varies by whole groups.

        Args:
            rng: the generator all randomness comes from.
            kind: `"mask"` or `"score"`.
            batch_size: number of windows, a multiple of `patches_per_image`.
            patches_per_image: windows per group.
            usable: called with a group's image index (position in `image_ids`); False redraws
                the group's first window (for images that cannot be decoded).

        Returns:
            batch_size windows, group by group.

        Raises:
            ValueError: for an unknown kind or a batch size that is not a multiple of
                patches_per_image.
            DatasetError: after MAX_ATTEMPTS unusable images in a row.
        """
        if kind not in ("mask", "score"):
            raise ValueError(f"kind must be 'mask' or 'score'. Received: kind={kind!r}")
        if patches_per_image < 1 or batch_size % patches_per_image:
            raise ValueError(
                "batch_size must be a positive multiple of patches_per_image. "
                f"Received: batch_size={batch_size!r}, patches_per_image={patches_per_image!r}"
            )
        groups = batch_size // patches_per_image
        signs = np.ones(groups, bool) if kind == "mask" else rng.random(groups) < 0.5
        firsts = self._first_windows(rng, signs, usable)
        if patches_per_image == 1:
            return firsts
        images = np.array([self.dataset.image_index(w.image_id) for w in firsts])
        rest = patches_per_image - 1
        positive_images = np.repeat(images[signs], rest)
        drawn = iter(self._positive_windows(rng, self._positive_rows(rng, positive_images, len(positive_images))))
        windows: list[Window] = []
        for first, positive, index in zip(firsts, signs.tolist(), images.tolist()):
            windows.append(first)
            windows.extend(next(drawn) if positive else self._negative_window(rng, index) for _ in range(rest))
        return windows

    def _first_windows(
        self, rng: np.random.Generator, signs: np.ndarray, usable: Callable[[int], bool] | None
    ) -> list[Window]:
        """One window per sign (True a positive) by the rules as stated, each in a usable image."""
        # Positives drawn together, negatives one by one (by rejection).
        drawn = iter(self._positive_windows(rng, self._positive_rows(rng, None, int(signs.sum()))))
        firsts = [next(drawn) if positive else self._negative_window(rng) for positive in signs.tolist()]
        for g, positive in enumerate(signs.tolist()):
            for _ in range(MAX_ATTEMPTS):
                if usable is None or usable(self.dataset.image_index(firsts[g].image_id)):
                    break
                firsts[g] = self.draw_window(rng, positive)
            else:
                raise self._undecodable_run()
        return firsts

    def sample_grids(
        self, centers: np.ndarray, scales: np.ndarray, size: int, step: float, offset: float
    ) -> np.ndarray:
        """Continuous image coordinates, along one axis, of the centres of `size` samples placed
        `offset` patch pixels from the input patch's edge with `step` patch pixels between them,
        for windows of these centres and scales: (n, size) for (n,) centres and scales."""
        start = (offset + (np.arange(size) + 0.5) * step - self.input_size / 2) / np.asarray(scales)[..., None]
        return np.asarray(centers)[..., None] + start

    def _sample_grid(self, window: Window, size: int, step: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
        """The (x, y) coordinates of `sample_grids` for one window."""
        return tuple(self.sample_grids(c, window.scale, size, step, offset) for c in (window.center_x, window.center_y))

    def crop_image(self, window: Window) -> np.ndarray:
        """The window's input patch, (input_size, input_size, 3) float32 RGB in [0, 1], grey (0.5)
        outside the image, not flipped.

        Raises:
            DatasetError: if the image cannot be decoded.
        """
        index = self.dataset.image_index(window.image_id)
        path = self.dataset.image_path(index)
        width, height = self.dataset.sizes[index].tolist()
        s = window.scale
        size = self.input_size
        x0 = window.center_x - size / 2 / s
        y0 = window.center_y - size / 2 / s
        try:
            with Image.open(path) as image:
                # JPEG decoding at 1/2..1/8 resolution when the patch needs no more: faster, and
                # the DCT's scaling low-passes the image before the bilinear resampling.
                image.draft("RGB", (math.ceil(width * s), math.ceil(height * s)))
                rx, ry = image.size[0] / width, image.size[1] / height
                patch = (
                    to_8bit(image)
                    .convert("RGB")
                    .transform(
                        (size, size), Image.AFFINE, (rx / s, 0, x0 * rx, 0, ry / s, y0 * ry), resample=Image.BILINEAR
                    )
                )
        except _DECODE_ERRORS as e:
            raise DatasetError(f"Cannot decode image ({e}). Received: path={path!r}") from e
        pixels = np.asarray(patch, np.float32) / np.float32(255)
        xs, ys = self._sample_grid(window, size, 1.0, 0.0)
        inside = ((ys >= 0) & (ys < height))[:, None] & ((xs >= 0) & (xs < width))[None, :]
        return np.where(inside[..., None], pixels, np.float32(GREY))

    def crop_label(self, window: Window, label_size: int | None = None) -> np.ndarray:
        """The positive's mask over the window's central patch_size region, nearest-sampled to
        (label_size, label_size) float32 in {+1, -1}, not flipped."""
        label_size = label_size or self.label_size
        mask = self.dataset.annotation_mask(self.dataset.annotation_row(window.annotation_id))
        height, width = mask.shape
        xs, ys = self._sample_grid(window, label_size, self.patch_size / label_size, self.context)
        ix, iy = np.floor(xs).astype(np.int64), np.floor(ys).astype(np.int64)
        vx, vy = (ix >= 0) & (ix < width), (iy >= 0) & (iy < height)
        inside = mask[np.clip(iy, 0, height - 1)[:, None], np.clip(ix, 0, width - 1)[None, :]].astype(bool)
        inside &= vy[:, None] & vx[None, :]
        return np.where(inside, np.float32(1), np.float32(-1))

    def undecodable(self, error: DatasetError) -> None:
        """Handles an image that cannot be decoded, following `on_bad_annotation`: re-raises the
        error, or counts it in `skipped` (logging the first) so that the caller redraws."""
        if self.on_bad_annotation == "error":
            raise error
        with self._lock:
            first = self.skipped["undecodable image"] == 0
            self.skipped["undecodable image"] += 1
        if first:
            logger.warning("Skipping an undecodable image (counted in skipped): %s", error)

    def _undecodable_run(self) -> DatasetError:
        return DatasetError(
            f"{MAX_ATTEMPTS} draws in a row hit undecodable images. Received: image_dir={self.dataset.image_dir!r}"
        )

    def _render(
        self, rng: np.random.Generator, positive: bool, with_label: bool
    ) -> tuple[Window, np.ndarray, np.ndarray]:
        for _ in range(MAX_ATTEMPTS):
            window = self.draw_window(rng, positive)
            try:
                image = self.crop_image(window)
            except DatasetError as e:
                self.undecodable(e)
                continue
            if with_label:
                label = self.crop_label(window)
            else:
                label = np.full((self.label_size, self.label_size), -1.0, np.float32)
            if window.flip:
                image, label = image[:, ::-1], label[:, ::-1]
            return window, image, label
        raise self._undecodable_run()

    def sample_batch(
        self, rng: np.random.Generator, kind: str, batch_size: int
    ) -> tuple[dict[str, np.ndarray], list[Window]]:
        """Draws one batch of a single kind.

        Args:
            rng: the generator all randomness comes from.
            kind: `"mask"` (positives with their mask labels) or `"score"` (positives and negatives
                with probability 0.5 each; mask labels all -1).
            batch_size: number of samples.

        Returns:
            A dict with `images` (B, S, S, 3) float32 in [0, 1], `masks` (B, L, L) float32 in
            {+1, -1}, `scores` (B, 1) float32 in {+1, -1}, `mask_weight` (B,) and `score_weight`
            (B,) float32; and the B windows the samples were cut from.

        Raises:
            ValueError: for an unknown kind.
        """
        if kind not in ("mask", "score"):
            raise ValueError(f"kind must be 'mask' or 'score'. Received: kind={kind!r}")
        windows, images, labels, scores = [], [], [], []
        for _ in range(batch_size):
            positive = kind == "mask" or bool(rng.random() < 0.5)
            window, image, label = self._render(rng, positive, with_label=kind == "mask")
            windows.append(window)
            images.append(image)
            labels.append(label)
            scores.append(1.0 if positive else -1.0)
        is_mask = np.float32(kind == "mask")
        batch = {
            "images": np.stack(images).astype(np.float32, copy=False),
            "masks": np.stack(labels).astype(np.float32, copy=False),
            "scores": np.array(scores, np.float32).reshape(batch_size, 1),
            "mask_weight": np.full((batch_size,), is_mask, np.float32),
            "score_weight": np.full((batch_size,), 1 - is_mask, np.float32),
        }
        return batch, windows
