"""The training patches cut by TensorFlow ops, which run on every core outside the GIL.

`PatchPlanner.plan` turns a batch's windows into a few NumPy numbers per patch: which file, the
JPEG reduction and the crop to decode, the bilinear sample box in decoded pixels, the patch rows
and columns inside the image, the label's sample grid and the object's compressed RLE.
`render_group` then decodes one image once, only as far down and at as small a size as its windows
need (`tf.io.decode_and_crop_jpeg` with a DCT reduction), and cuts each window of the group from it
with a `tf.image.crop_and_resize` over its samples inside the image, padded grey. The patches are
`PatchSampler.crop_image` and `crop_label` computed another way: the same reduction (Pillow's
`draft` rule), bilinear samples at the same points, grey outside the same pixels, labels
nearest-sampled at the same points of the same pycocotools RLE.
"""

from __future__ import annotations

import threading

import numpy as np
import tensorflow as tf

from sharpmask_tf.data.coco import DatasetError
from sharpmask_tf.data.sampler import PatchSampler, Window
from sharpmask_tf.images import GREY

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


def jpeg_reduction(width: np.ndarray, height: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The reduction Pillow's `draft` picks to give a (width, height) image at least
    ceil(size * scale) pixels per axis: the largest of 8, 4, 2, 1 that does; elementwise."""
    factor = np.minimum(width // np.ceil(width * scale), height // np.ceil(height * scale))
    return np.select([factor >= r for r in JPEG_REDUCTIONS[:-1]], JPEG_REDUCTIONS[:-1], 1)


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
        self.paths = [sampler.dataset.image_path(index) for index in range(len(sampler.image_ids))]
        self._probed: dict[int, tuple[bool, str | None]] = {}
        self._lock = threading.Lock()

    def usable(self, image_index: int) -> bool:
        """Whether an image can be decoded, by `image_problem` (probed once per image); each draw
        of an undecodable one goes to `PatchSampler.undecodable`, which raises in error mode."""
        with self._lock:
            probed = self._probed.get(image_index)
        if probed is None:
            probed = image_problem(self.paths[image_index])
            with self._lock:
                self._probed[image_index] = probed
        if probed[1] is not None:
            self.sampler.undecodable(
                DatasetError(f"Cannot decode image ({probed[1]}). Received: path={self.paths[image_index]!r}")
            )
            return False
        return True

    def plan(self, windows: list[Window], patches_per_image: int, with_labels: bool) -> dict[str, np.ndarray]:
        """The rendering plan of a batch's windows, in groups of `patches_per_image` consecutive
        windows of one image (as `PatchSampler.draw_windows` returns them).

        Returns:
            Arrays with a leading group axis G and, for per-patch entries, a patch axis K:
            `image` (G,) int32 index into `paths`; `decoder` (G,) int32 position in
            JPEG_REDUCTIONS, or len(JPEG_REDUCTIONS) for a file that is not a JPEG; `crop` (G, 4)
            int32 (y, x, height, width) in decoded pixels; `height` (G,) int64 image height;
            `boxes` (G, K, 4) float32 `tf.image.crop_and_resize` boxes (y1, x1, y2, x2) of the
            bilinear samples inside the image, in the crop padded by one pixel a side;
            `inside` (G, K, 4) int32 patch rows and columns [r0, r1) x [c0, c1) inside the image;
            `label_rows` and `label_cols` (G, K, L) int64 image rows and columns of the label's
            samples, -1 outside the image (or every one, for a patch without a mask label);
            `rle` (G, K) bytes compressed RLE counts of the positive's mask ("" without a label).
        """
        k, groups = patches_per_image, len(windows) // patches_per_image
        cx = np.array([w.center_x for w in windows])
        cy = np.array([w.center_y for w in windows])
        scale = np.array([w.scale for w in windows])
        flip = np.array([w.flip for w in windows])
        index = np.array([self.sampler.dataset.image_index(w.image_id) for w in windows[::k]], np.int64)
        plan = self._image_plan(index, cx, cy, scale, flip, k)
        labelled = np.array([with_labels and w.annotation_id is not None for w in windows])
        rows, cols = self._label_grids(index, cx, cy, scale, flip, labelled, k)
        split, label = self.sampler.dataset, self.sampler.label_size
        rles = np.array(
            [
                split.annotation_rle(split.annotation_row(w.annotation_id))["counts"] if has else b""
                for w, has in zip(windows, labelled)
            ],
            object,
        )
        plan["label_rows"] = rows.reshape(groups, k, label)
        plan["label_cols"] = cols.reshape(groups, k, label)
        plan["rle"] = rles.reshape(groups, k)
        return plan

    def _image_plan(
        self, index: np.ndarray, cx: np.ndarray, cy: np.ndarray, scale: np.ndarray, flip: np.ndarray, k: int
    ) -> dict[str, np.ndarray]:
        """`plan`'s `image`, `decoder`, `crop`, `height`, `boxes` and `inside` of groups of k
        windows (centres, scales and flips per window, image indices per group)."""
        s, size, groups = self.sampler, self.sampler.input_size, len(index)
        is_jpeg = np.array([self._probed.get(int(i), (False, None))[0] for i in index])
        width, height = s.dataset.sizes[index].T
        w_each, h_each = np.repeat(width, k), np.repeat(height, k)
        # Pillow's draft rule per window (jpeg_reduction); a group decodes at its finest.
        each = jpeg_reduction(w_each, h_each, scale)
        reduction = np.where(is_jpeg, each.reshape(groups, k).min(1), 1)
        decoded_w, decoded_h = -(-width // reduction), -(-height // reduction)
        rx, ry = np.repeat(decoded_w / width, k), np.repeat(decoded_h / height, k)
        # Bilinear sample positions of every patch, in decoded pixel indices (centres at k).
        u0 = ((cx - size / 2 / scale) + 0.5 / scale) * rx - 0.5
        v0 = ((cy - size / 2 / scale) + 0.5 / scale) * ry - 0.5
        du, dv = rx / scale, ry / scale
        x_lo, x_hi = _span(u0, u0 + du * (size - 1), decoded_w, k)
        y_lo, y_hi = _span(v0, v0 + dv * (size - 1), decoded_h, k)
        c0, c1 = _inside(s.sample_grids(cx, scale, size, 1.0, 0.0), w_each)
        r0, r1 = _inside(s.sample_grids(cy, scale, size, 1.0, 0.0), h_each)
        a, b = u0 - np.repeat(x_lo, k), v0 - np.repeat(y_lo, k)
        a, du = np.where(flip, a + du * (size - 1), a), np.where(flip, -du, du)
        c0, c1 = np.where(flip, size - c1, c0), np.where(flip, size - c0, c1)
        # crop_and_resize's corner-aligned boxes of the first and last samples inside the image,
        # in the crop padded by one pixel a side.
        w1, h1 = np.repeat(x_hi - x_lo + 1, k), np.repeat(y_hi - y_lo + 1, k)
        boxes = np.stack(
            [
                (b + 1 + dv * r0) / h1,
                (a + 1 + du * c0) / w1,
                (b + 1 + dv * np.maximum(r1 - 1, r0)) / h1,
                (a + 1 + du * np.maximum(c1 - 1, c0)) / w1,
            ],
            1,
        )
        return {
            "image": index.astype(np.int32),
            "decoder": np.where(is_jpeg, [JPEG_REDUCTIONS.index(r) for r in reduction], _NOT_JPEG).astype(np.int32),
            "crop": np.stack([y_lo, x_lo, y_hi - y_lo, x_hi - x_lo], 1).astype(np.int32),
            "height": height.astype(np.int64),
            "boxes": boxes.astype(np.float32).reshape(groups, k, 4),
            "inside": np.stack([r0, r1, c0, c1], 1).astype(np.int32).reshape(groups, k, 4),
        }

    def _label_grids(
        self,
        index: np.ndarray,
        cx: np.ndarray,
        cy: np.ndarray,
        scale: np.ndarray,
        flip: np.ndarray,
        labelled: np.ndarray,
        k: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(n, L) int64 image rows and columns of each window's label samples, -1 outside the
        image or for a window without a label; columns in flipped order for flipped windows."""
        s = self.sampler
        width, height = s.dataset.sizes[index].T
        w_each, h_each = np.repeat(width, k), np.repeat(height, k)
        step = s.patch_size / s.label_size
        rows = np.floor(s.sample_grids(cy, scale, s.label_size, step, s.context)).astype(np.int64)
        cols = np.floor(s.sample_grids(cx, scale, s.label_size, step, s.context)).astype(np.int64)
        rows[(rows < 0) | (rows >= h_each[:, None]) | ~labelled[:, None]] = -1
        cols[(cols < 0) | (cols >= w_each[:, None]) | ~labelled[:, None]] = -1
        return rows, np.where(flip[:, None], cols[:, ::-1], cols)


def _span(lo: np.ndarray, hi: np.ndarray, extent: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group of k windows, the pixel range [a, b) that bilinear samples between positions lo
    and hi read, with a margin, clipped to [0, extent) and never empty (a patch wholly outside
    reads one pixel, then turns grey)."""
    a = np.clip(np.floor(lo.reshape(-1, k).min(1)).astype(np.int64) - _CROP_MARGIN, 0, extent - 1)
    b = np.floor(hi.reshape(-1, k).max(1)).astype(np.int64) + 2 + _CROP_MARGIN
    return a, np.minimum(np.maximum(b, a + 1), extent)


def _inside(coordinates: np.ndarray, extent: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of increasing continuous coordinates, the index range [a, b) that lies in
    [0, extent); (0, 0) for none."""
    inside = (coordinates >= 0) & (coordinates < extent[:, None])
    any_inside = inside.any(1)
    first = np.where(any_inside, inside.argmax(1), 0)
    stop = np.where(any_inside, coordinates.shape[1] - inside[:, ::-1].argmax(1), 0)
    return first, stop


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


def decode_region(contents: tf.Tensor, decoder: tf.Tensor, crop: tf.Tensor | None = None) -> tf.Tensor:
    """The RGB pixels of one encoded image as a plan decodes them.

    Args:
        contents: the file's bytes, a tf.string scalar.
        decoder: an int32 scalar: i < len(JPEG_REDUCTIONS) decodes a JPEG at the DCT reduction
            JPEG_REDUCTIONS[i], `_NOT_JPEG` any other format at full size.
        crop: (4,) int32 (y, x, height, width) of the window to decode, in the reduced image's
            pixels; None for the whole image.

    Returns:
        (h, w, 3) uint8.
    """

    def jpeg(reduction: int):
        if crop is None:
            return lambda: tf.io.decode_jpeg(contents, channels=3, ratio=reduction, dct_method="INTEGER_ACCURATE")
        return lambda: tf.io.decode_and_crop_jpeg(
            contents, crop, channels=3, ratio=reduction, dct_method="INTEGER_ACCURATE"
        )

    def other():
        image = tf.io.decode_image(contents, channels=3, expand_animations=False)
        return image if crop is None else image[crop[0] : crop[0] + crop[2], crop[1] : crop[1] + crop[3]]

    return tf.cast(tf.switch_case(decoder, [jpeg(r) for r in JPEG_REDUCTIONS] + [other]), tf.uint8)


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
    decoded = decode_region(contents, group["decoder"], group["crop"])
    # One replicated pixel on every side: samples within half a pixel of the image's edge (inside
    # it) read the edge pixel, as Pillow's do.
    decoded = tf.concat([decoded[:1], decoded, decoded[-1:]], 0)
    decoded = tf.concat([decoded[:, :1], decoded, decoded[:, -1:]], 1)[None]
    images = []
    for k in range(group["boxes"].shape[0]):
        r0, r1, c0, c1 = tf.unstack(group["inside"][k])
        inside = tf.image.crop_and_resize(
            decoded, group["boxes"][k : k + 1], [0], tf.maximum([r1 - r0, c1 - c0], 1), method="bilinear"
        )[0, : r1 - r0, : c1 - c0]
        padding = [[r0, input_size - r1], [c0, input_size - c1], [0, 0]]
        images.append(tf.pad(inside * (1 / 255), padding, constant_values=GREY))
    images = tf.ensure_shape(tf.stack(images), (len(images), input_size, input_size, 3))
    rows, cols = group["label_rows"], group["label_cols"]

    def labels() -> tf.Tensor:
        pixels = cols[:, None, :] * group["height"] + rows[:, :, None]
        masks = []
        for k in range(rows.shape[0]):
            bounds = rle_bounds(group["rle"][k])
            ends = tf.searchsorted(bounds[None], tf.reshape(pixels[k], (1, -1)), side="right", out_type=tf.int64)
            masks.append(tf.reshape(ends % 2 == 1, (label_size, label_size)))
        valid = (rows >= 0)[:, :, None] & (cols >= 0)[:, None, :]
        return tf.where(valid & tf.stack(masks), 1.0, -1.0)

    masks = tf.cond(tf.reduce_any(rows >= 0), labels, lambda: tf.fill([rows.shape[0], label_size, label_size], -1.0))
    return {"images": images, "masks": masks}
