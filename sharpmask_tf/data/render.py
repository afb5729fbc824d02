"""The training patches cut by TensorFlow ops, which run on every core outside the GIL.

`PatchPlanner.plan` turns the sampler's windows into a few NumPy numbers per patch: which file, the
JPEG reduction and the crop to decode, the affine map from patch pixels to decoded pixels, the
patch rows and columns inside the image, the label's sample grid and the object's compressed RLE.
`render_group` then decodes one image once, only as far down and at as small a size as its windows
need (`tf.io.decode_and_crop_jpeg` with a DCT reduction), and cuts every window of the group from
it. The patches are `PatchSampler.crop_image` and `crop_label` computed another way: the same
reduction (Pillow's `draft` rule), bilinear samples at the same points, grey outside the same
pixels, labels nearest-sampled at the same points of the same pycocotools RLE.
"""

from __future__ import annotations

import math
import threading
from typing import Any

import numpy as np
import tensorflow as tf

from sharpmask_tf.data.coco import DatasetError
from sharpmask_tf.data.sampler import GREY, PatchSampler, Window

# DCT scalings libjpeg decodes at, in Pillow's order of preference.
JPEG_REDUCTIONS = (8, 4, 2, 1)
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
# A JPEG's end-of-image marker lies within this many bytes of its end (after it, at most padding
# or a vendor's trailer); a file truncated in its scan data has none there.
_JPEG_TAIL = 4096
_NOT_JPEG = len(JPEG_REDUCTIONS)  # the decode branch for other formats
# Decoded pixels beyond those sampled on each side: libjpeg's chroma upsampling at a crop's edge
# sees no neighbours, so the crop ends one 16-pixel block past the samples.
_CROP_MARGIN = 16


def jpeg_reduction(width: int, height: int, scale: float) -> int:
    """The reduction Pillow's `draft` picks to give a (width, height) image at least
    ceil(size * scale) pixels per axis: the largest of 8, 4, 2, 1 that does."""
    factor = min(width // math.ceil(width * scale), height // math.ceil(height * scale))
    return next((r for r in JPEG_REDUCTIONS if factor >= r), 1)


def image_problem(path: str) -> tuple[bool, str | None]:
    """Whether a file is a JPEG, and why it cannot be decoded (None if it can, as far as its
    first and last bytes tell: a JPEG must end with its end-of-image marker)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_JPEG_START))
            size = f.seek(0, 2)
            f.seek(max(0, size - _JPEG_TAIL))
            tail = f.read()
    except OSError as e:
        return False, f"unreadable ({e})"
    if head != _JPEG_START:
        return False, None
    if _JPEG_END not in tail:
        return True, "truncated JPEG: no end-of-image marker"
    return True, None


class PatchPlanner:
    """Plans the TensorFlow rendering of a sampler's windows (see the module docstring).

    Args:
        sampler: the sampler whose windows are planned; its dataset gives files, sizes and RLEs.
    """

    def __init__(self, sampler: PatchSampler) -> None:
        self.sampler = sampler
        dataset = sampler.dataset
        self.paths = [dataset.image_path(image_id) for image_id in sampler.image_ids]
        self._formats: dict[int, bool] = {}
        self._lock = threading.Lock()

    def usable(self, image_index: int) -> bool:
        """Whether an image can be decoded, by `image_problem`, once per image; an undecodable one
        goes to `PatchSampler.undecodable` (which raises in error mode)."""
        with self._lock:
            known = image_index in self._formats
        if known:
            return True
        is_jpeg, problem = image_problem(self.paths[image_index])
        if problem is not None:
            self.sampler.undecodable(
                DatasetError(f"Cannot decode image ({problem}). Received: path={self.paths[image_index]!r}")
            )
            return False
        with self._lock:
            self._formats[image_index] = is_jpeg
        return True

    def plan(self, windows: list[Window], patches_per_image: int, with_labels: bool) -> dict[str, np.ndarray]:
        """The rendering plan of a batch's windows, in groups of `patches_per_image` consecutive
        windows of one image (as `PatchSampler.draw_windows` returns them).

        Returns:
            Arrays with a leading group axis G and, for per-patch entries, a patch axis K:
            `image` (G,) int32 index into `paths`; `decoder` (G,) int32 position in
            JPEG_REDUCTIONS, or len(JPEG_REDUCTIONS) for a file that is not a JPEG; `crop` (G, 4)
            int32 (y, x, height, width) in decoded pixels; `height` (G,) int64 image height;
            `transform` (G, K, 8) float32 projective maps from patch pixels to crop pixels;
            `inside` (G, K, 4) int32 patch rows and columns [r0, r1) x [c0, c1) inside the image;
            `label_rows` and `label_cols` (G, K, L) int64 image rows and columns of the label's
            samples, -1 outside the image (or every one, for a patch without a mask label);
            `rle` (G, K) bytes compressed RLE counts of the positive's mask ("" without a label).
        """
        s = self.sampler
        size, label = s.input_size, s.label_size
        groups = [windows[i : i + patches_per_image] for i in range(0, len(windows), patches_per_image)]
        plan: dict[str, list[Any]] = {
            k: [] for k in ("image", "decoder", "crop", "height", "transform", "inside", "rows", "cols", "rle")
        }
        for group in groups:
            index = s.image_index[group[0].image_id]
            info = s.dataset.image_info(group[0].image_id)
            width, height = info["width"], info["height"]
            is_jpeg = self._formats.get(index, False)
            reduction = min(jpeg_reduction(width, height, w.scale) for w in group) if is_jpeg else 1
            decoded_w, decoded_h = -(-width // reduction), -(-height // reduction)
            rx, ry = decoded_w / width, decoded_h / height
            # Bilinear sample positions of every patch, in decoded pixel indices (centres at k).
            u0 = np.array([((w.center_x - size / 2 / w.scale) + 0.5 / w.scale) * rx - 0.5 for w in group])
            v0 = np.array([((w.center_y - size / 2 / w.scale) + 0.5 / w.scale) * ry - 0.5 for w in group])
            du = np.array([rx / w.scale for w in group])
            dv = np.array([ry / w.scale for w in group])
            x_lo, x_hi = _span(u0, u0 + du * (size - 1), decoded_w)
            y_lo, y_hi = _span(v0, v0 + dv * (size - 1), decoded_h)
            plan["image"].append(index)
            plan["decoder"].append(JPEG_REDUCTIONS.index(reduction) if is_jpeg else _NOT_JPEG)
            plan["crop"].append((y_lo, x_lo, y_hi - y_lo, x_hi - x_lo))
            plan["height"].append(height)
            transforms, inside, rows, cols, rles = [], [], [], [], []
            for w, a, b, ea, eb in zip(group, u0 - x_lo, v0 - y_lo, du, dv):
                xs, ys = s._sample_grid(w, size, 1.0, 0.0)
                c0, c1 = _inside(xs, width)
                r0, r1 = _inside(ys, height)
                if w.flip:
                    a, ea = a + ea * (size - 1), -ea
                    c0, c1 = size - c1, size - c0
                transforms.append((ea, 0.0, a, 0.0, eb, b, 0.0, 0.0))
                inside.append((r0, r1, c0, c1))
                if with_labels and w.annotation_id is not None:
                    lx, ly = s._sample_grid(w, label, s.patch_size / label, s.context)
                    ix, iy = np.floor(lx).astype(np.int64), np.floor(ly).astype(np.int64)
                    ix[(ix < 0) | (ix >= width)] = -1
                    iy[(iy < 0) | (iy >= height)] = -1
                    rows.append(iy)
                    cols.append(ix[::-1] if w.flip else ix)
                    rles.append(s.dataset.annotation_rle(s.dataset.coco.anns[w.annotation_id])["counts"])
                else:
                    rows.append(np.full(label, -1, np.int64))
                    cols.append(np.full(label, -1, np.int64))
                    rles.append(b"")
            plan["transform"].append(transforms)
            plan["inside"].append(inside)
            plan["rows"].append(rows)
            plan["cols"].append(cols)
            plan["rle"].append(rles)
        return {
            "image": np.array(plan["image"], np.int32),
            "decoder": np.array(plan["decoder"], np.int32),
            "crop": np.array(plan["crop"], np.int32),
            "height": np.array(plan["height"], np.int64),
            "transform": np.array(plan["transform"], np.float32),
            "inside": np.array(plan["inside"], np.int32),
            "label_rows": np.array(plan["rows"], np.int64),
            "label_cols": np.array(plan["cols"], np.int64),
            "rle": np.array(plan["rle"], object),
        }


def _span(lo: np.ndarray, hi: np.ndarray, extent: int) -> tuple[int, int]:
    """The pixel range [a, b) that bilinear samples between positions lo and hi read, with a
    margin, clipped to [0, extent) and never empty (a patch wholly outside reads one pixel, then
    turns grey)."""
    a = min(max(int(math.floor(lo.min())) - _CROP_MARGIN, 0), extent - 1)
    b = min(max(int(math.floor(hi.max())) + 2 + _CROP_MARGIN, a + 1), extent)
    return a, b


def _inside(coordinates: np.ndarray, extent: int) -> tuple[int, int]:
    """The index range [a, b) of increasing continuous coordinates that lie in [0, extent)."""
    inside = np.flatnonzero((coordinates >= 0) & (coordinates < extent))
    return (int(inside[0]), int(inside[-1]) + 1) if inside.size else (0, 0)


def rle_bounds(counts: tf.Tensor) -> tf.Tensor:
    """Cumulative run ends of a compressed RLE string (pycocotools' rleFrString, as TF ops).

    Args:
        counts: scalar tf.string, the RLE's counts as validation accepted them.

    Returns:
        (n,) int64: the column-major pixel index where each run ends; runs alternate zeros and ones,
        starting with zeros, so pixel p is in the mask when an odd number of bounds are <= p.
    """
    chars = tf.cast(tf.io.decode_raw(counts, tf.uint8), tf.int64) - 48
    index = tf.range(tf.size(chars, out_type=tf.int64))
    last = tf.equal(tf.bitwise.bitwise_and(chars, 0x20), 0)  # the 5-bit group that ends a value
    value_of = tf.cumsum(tf.cast(last, tf.int64), exclusive=True)
    first = tf.concat([[True], last[:-1]], 0)[: tf.size(chars)]
    position = index - tf.gather(tf.boolean_mask(index, first), value_of)
    digits = tf.bitwise.left_shift(tf.bitwise.bitwise_and(chars, 0x1F), 5 * position)
    negative = last & tf.not_equal(tf.bitwise.bitwise_and(chars, 0x10), 0)
    sign = tf.where(negative, -tf.bitwise.left_shift(tf.ones_like(chars), 5 * (position + 1)), 0)
    values = tf.math.segment_sum(digits + sign, value_of)
    # From the fourth on, a value is the difference to the run two before: runs of each parity
    # (the first excepted) are cumulative sums of that parity's values.
    i = tf.range(tf.size(values, out_type=tf.int64))
    odd = tf.cumsum(tf.where(i % 2 == 1, values, 0))
    even = tf.cumsum(tf.where((i % 2 == 0) & (i > 0), values, 0))
    runs = tf.where(i % 2 == 1, odd, tf.where(i == 0, values, even))
    return tf.cumsum(runs)


def render_group(
    group: dict[str, tf.Tensor], paths: tf.Tensor, input_size: int, label_size: int
) -> dict[str, tf.Tensor]:
    """The patches and labels of one planned group (one element of `PatchPlanner.plan`'s groups).

    Args:
        group: one group of a plan: `image`, `decoder`, `crop`, `height` scalars or (4,), and the
            per-patch entries with a leading K axis.
        paths: (N,) tf.string, `PatchPlanner.paths`.
        input_size: the patch side S.
        label_size: the label side L.

    Returns:
        `images` (K, S, S, 3) float32 RGB in [0, 1], grey outside the image; `masks` (K, L, L)
        float32 in {+1, -1}.
    """
    contents = tf.io.read_file(tf.gather(paths, group["image"]))
    crop = group["crop"]

    def jpeg(reduction: int):
        return lambda: tf.io.decode_and_crop_jpeg(
            contents, crop, channels=3, ratio=reduction, dct_method="INTEGER_ACCURATE"
        )

    def other():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        return image[crop[0] : crop[0] + crop[2], crop[1] : crop[1] + crop[3]]

    decoded = tf.switch_case(group["decoder"], [jpeg(r) for r in JPEG_REDUCTIONS] + [other])
    decoded = tf.cast(decoded, tf.uint8)[None]
    images, masks = [], []
    for k in range(group["transform"].shape[0]):
        patch = tf.raw_ops.ImageProjectiveTransformV3(
            images=decoded,
            transforms=group["transform"][k : k + 1],
            output_shape=tf.constant([input_size, input_size]),
            fill_value=0.0,
            interpolation="BILINEAR",
            fill_mode="NEAREST",
        )[0]
        r0, r1, c0, c1 = tf.unstack(group["inside"][k])
        steps = tf.range(input_size)
        inside = ((steps >= r0) & (steps < r1))[:, None, None] & ((steps >= c0) & (steps < c1))[None, :, None]
        images.append(tf.where(inside, tf.cast(patch, tf.float32) / 255.0, GREY))
        rows, cols = group["label_rows"][k], group["label_cols"][k]
        pixels = cols[None, :] * group["height"] + rows[:, None]
        bounds = rle_bounds(group["rle"][k])
        ends = tf.searchsorted(bounds[None], tf.reshape(pixels, (1, -1)), side="right", out_type=tf.int64)
        in_mask = tf.reshape(ends % 2 == 1, (label_size, label_size))
        valid = (rows >= 0)[:, None] & (cols >= 0)[None, :]
        masks.append(tf.where(valid & in_mask, 1.0, -1.0))
    return {"images": tf.stack(images), "masks": tf.stack(masks)}
