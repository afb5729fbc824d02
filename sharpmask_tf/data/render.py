"""The training patches: decoded by TensorFlow ops, then cut and labelled in NumPy and OpenCV.

`PatchPlanner.plan` turns a batch's windows into a few NumPy numbers per patch: which file, the
JPEG reduction and the crop to decode, the affine map from patch pixels to decoded pixels, the
patch rows and columns inside the image, the label's sample grid and the object's compressed RLE.
`render` then reads and decodes each group's image once (one group: the windows cut from one
image), only as far down and at as small a size as its windows need (`tf.io.decode_and_crop_jpeg`
with a DCT reduction), on every core outside the GIL; per batch, `cut_patches` samples every
window bilinearly from its decoded crop with `cv2.warpAffine` (which releases the GIL) and paints
grey outside the image, and `label_patches` reads each label's samples off its RLE's run bounds.
Both cost a fraction of what TensorFlow's `crop_and_resize` and a per-pixel `searchsorted` did
(README, Benchmarks). The patches are
`PatchSampler.crop_image` and `crop_label` computed another way: the same reduction (Pillow's
`draft` rule), bilinear samples at the same points, grey outside the same pixels, labels
nearest-sampled at the same points of the same pycocotools RLE.
"""

from __future__ import annotations

import threading

import cv2
import numpy as np
import tensorflow as tf

from sharpmask_tf.data.coco import DatasetError
from sharpmask_tf.data.sampler import PatchSampler, Window
from sharpmask_tf.images import GREY

# OpenCV 4's warpAffine rounds sample positions to 1/32 pixel (up to 7 of 255 off a bilinear sample
# of a photograph); OpenCV 5's float32 samples are exact.
if int(cv2.__version__.split(".")[0]) < 5:
    raise ImportError(
        f"sharpmask_tf's training patches need OpenCV 5 or newer. Received: cv2.__version__={cv2.__version__!r}"
    )

# DCT scalings libjpeg decodes at, in Pillow's order of preference.
JPEG_REDUCTIONS = (8, 4, 2, 1)
_JPEG_START = b"\xff\xd8\xff"
_JPEG_END = b"\xff\xd9"
# A JPEG's end-of-image marker lies within this many bytes of its end (after it, at most padding
# or a vendor's trailer); a file truncated in its scan data has none there.
_JPEG_TAIL = 4096
_NOT_JPEG = len(JPEG_REDUCTIONS)  # the decode branch for other formats
_SIGNS = np.array([-1.0, 1.0], np.float32)  # a label's value by its sample's parity
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
            `affine` (G, K, 4) float32 (y0, dy, x0, dx): patch pixel (i, j) samples the crop at
            row y0 + dy * i and column x0 + dx * j (pixel centres at integers; dx < 0 for a
            flipped window); `inside` (G, K, 4) int32 patch rows and columns [r0, r1) x [c0, c1)
            inside the image;
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
        """`plan`'s `image`, `decoder`, `crop`, `height`, `affine` and `inside` of groups of k
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
        # Sample positions in the crop, patch column 0 first (the last one for a flipped window).
        a, b = u0 - np.repeat(x_lo, k), v0 - np.repeat(y_lo, k)
        a, du = np.where(flip, a + du * (size - 1), a), np.where(flip, -du, du)
        c0, c1 = np.where(flip, size - c1, c0), np.where(flip, size - c0, c1)
        return {
            "image": index.astype(np.int32),
            "decoder": np.where(is_jpeg, [JPEG_REDUCTIONS.index(r) for r in reduction], _NOT_JPEG).astype(np.int32),
            "crop": np.stack([y_lo, x_lo, y_hi - y_lo, x_hi - x_lo], 1).astype(np.int32),
            "height": height.astype(np.int64),
            "affine": np.stack([b, dv, a, du], 1).astype(np.float32).reshape(groups, k, 4),
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


def rle_bounds(counts: bytes) -> np.ndarray:
    """Cumulative run ends of a compressed RLE string (pycocotools' rleFrString, vectorised).

    Args:
        counts: the RLE's counts as validation accepted them.

    Returns:
        (n,) int64: the column-major pixel index where each run ends; runs alternate zeros and ones,
        starting with zeros, so pixel p is in the mask when an odd number of bounds are <= p.
    """
    chars = np.frombuffer(counts, np.uint8).astype(np.int64) - 48
    if not chars.size:
        return np.zeros(0, np.int64)
    last = (chars & 0x20) == 0  # the 5-bit group that ends a value
    starts = np.flatnonzero(np.concatenate([[True], last[:-1]]))
    value_of = np.cumsum(last) - last
    position = np.arange(chars.size) - starts[value_of]
    digits = (chars & 0x1F) << (5 * position)
    negative = last & ((chars & 0x10) != 0)
    digits -= np.where(negative, 1 << (5 * (position + 1)), 0)
    values = np.add.reduceat(digits, starts)
    # From the fourth on, a value is the difference to the run two before: runs of each parity
    # (the first excepted) are cumulative sums of that parity's values.
    i = np.arange(values.size)
    odd = np.cumsum(np.where(i % 2 == 1, values, 0))
    even = np.cumsum(np.where((i % 2 == 0) & (i > 0), values, 0))
    runs = np.where(i % 2 == 1, odd, np.where(i == 0, values, even))
    return np.cumsum(runs)


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


def label_patches(rows: np.ndarray, cols: np.ndarray, heights: np.ndarray, rles: np.ndarray) -> np.ndarray:
    """The labels of a batch of groups: +1 where a label's sample lies in its positive's RLE, -1
    elsewhere, outside the image and for windows without a label.

    Args:
        rows: (G, K, L) `PatchPlanner.plan`'s `label_rows`: image rows of the samples, -1 outside.
        cols: (G, K, L) its `label_cols`, in flipped order for flipped windows.
        heights: (G,) image heights.
        rles: (G, K) compressed RLE counts, b"" for a window without a label.

    Returns:
        (G * K, L, L) float32 in {+1, -1}.
    """
    groups, k, size = rows.shape
    out = np.full((groups * k, size, size), -1.0, np.float32)
    for g in range(groups):
        for j in range(k):
            in_rows, in_cols = rows[g, j] >= 0, cols[g, j] >= 0  # each one run of the grid
            r, c = rows[g, j][in_rows], cols[g, j][in_cols]
            if not (r.size and c.size):
                continue
            i0, j0 = int(np.argmax(in_rows)), int(np.argmax(in_cols))
            flipped = c[0] > c[-1]
            if flipped:
                c = c[::-1]
            # Column by column, as the RLE runs: pixel indices in increasing order (the search
            # then starts each key where the last one ended).
            pixels = c[:, None] * heights[g] + r[None, :]
            ends = np.searchsorted(rle_bounds(rles[g, j]), pixels.reshape(-1), side="right")
            inside = _SIGNS[(ends & 1).reshape(c.size, r.size).T]
            out[g * k + j, i0 : i0 + r.size, j0 : j0 + c.size] = inside[:, ::-1] if flipped else inside
    return out


def cut_patches(
    pixels: np.ndarray, starts: np.ndarray, shapes: np.ndarray, affine: np.ndarray, inside: np.ndarray, input_size: int
) -> np.ndarray:
    """The patches of a batch of groups, each sampled bilinearly from its group's decoded crop.

    Args:
        pixels: the groups' decoded crops, uint8 RGB, flattened and concatenated.
        starts: (G + 1,) offsets of each crop in `pixels`.
        shapes: (G, 2) (height, width) of each crop.
        affine: (G, K, 4) `PatchPlanner.plan`'s sample positions of each window in its crop.
        inside: (G, K, 4) its patch rows and columns inside the image.
        input_size: the patch side S.

    Returns:
        (G * K, S, S, 3) float32 RGB in [0, 1]: the samples of the crop with its edge pixels
        repeated beyond it (a sample within half a pixel of the image's edge reads the edge pixel,
        as Pillow's do), grey outside the image's rows and columns.
    """
    groups, k = affine.shape[:2]
    out = np.empty((groups * k, input_size, input_size, 3), np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    for g in range(groups):
        crop = pixels[starts[g] : starts[g + 1]].reshape(shapes[g, 0], shapes[g, 1], 3)
        # In [0, 1] before sampling: float32 samples are exact bilinear ones (uint8 ones round).
        crop = np.multiply(crop, np.float32(1 / 255), dtype=np.float32)
        for j in range(k):
            y0, dy, x0, dx = affine[g, j].tolist()
            patch = out[g * k + j]
            sampled = cv2.warpAffine(
                crop,
                np.array([[dx, 0.0, x0], [0.0, dy, y0]]),
                (input_size, input_size),
                dst=patch,
                flags=flags,
                borderMode=cv2.BORDER_REPLICATE,
            )
            if sampled is not patch:  # OpenCV wrote elsewhere
                patch[...] = sampled
            r0, r1, c0, c1 = inside[g, j].tolist()
            patch[:r0] = patch[r1:] = GREY
            patch[:, :c0] = patch[:, c1:] = GREY
    return out


def render(
    groups: tf.data.Dataset,
    paths: tf.Tensor,
    input_size: int,
    label_size: int,
    groups_per_batch: int,
    parallel: int,
    keep: tuple[str, ...] = (),
) -> tf.data.Dataset:
    """Planned groups (elements of `PatchPlanner.plan`'s group axis) to batches of their patches.

    Args:
        groups: a dataset of planned groups: `image`, `decoder`, `crop`, `height` scalars or (4,),
            the per-patch entries with a leading K axis.
        paths: (N,) tf.string, `PatchPlanner.paths`.
        input_size: the patch side S.
        label_size: the label side L.
        groups_per_batch: groups per batch G (a batch holds G * K patches); a last partial batch
            is dropped.
        parallel: groups decoded, and batches cut, at a time (or tf.data.AUTOTUNE).
        keep: per-patch entries of the groups passed through, batched like the patches.

    Returns:
        A dataset of dicts: `images` (G * K, S, S, 3) float32 RGB in [0, 1], grey outside the
        image; `masks` (G * K, L, L) float32 in {+1, -1}; and the `keep` entries.
    """

    def decode(group: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        contents = tf.io.read_file(tf.gather(paths, group["image"]))
        crop = decode_region(contents, group["decoder"], group["crop"])
        planned = ("affine", "inside", "label_rows", "label_cols", "height", "rle", *keep)
        return {"pixels": tf.reshape(crop, [-1]), "shape": tf.shape(crop)[:2], **{key: group[key] for key in planned}}

    def patches(pixels, starts, shapes, affine, inside, rows, cols, heights, rles):
        return cut_patches(pixels, starts, shapes, affine, inside, input_size), label_patches(rows, cols, heights, rles)

    def cut(batch: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        pixels, n = batch["pixels"], groups_per_batch * batch["affine"].shape[1]
        planned = [batch[key] for key in ("shape", "affine", "inside", "label_rows", "label_cols", "height", "rle")]
        images, masks = tf.numpy_function(
            patches, [pixels.flat_values, pixels.row_splits, *planned], [tf.float32, tf.float32], stateful=False
        )
        flat = {key: tf.reshape(batch[key], (-1, *batch[key].shape[2:])) for key in keep}
        return {
            "images": tf.ensure_shape(images, (n, input_size, input_size, 3)),
            "masks": tf.ensure_shape(masks, (n, label_size, label_size)),
            **flat,
        }

    decoded = groups.map(decode, num_parallel_calls=parallel, deterministic=True)
    batches = decoded.ragged_batch(groups_per_batch, drop_remainder=True)
    return batches.map(cut, num_parallel_calls=parallel, deterministic=True)
