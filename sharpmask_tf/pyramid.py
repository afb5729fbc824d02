"""The image pyramid's geometry: scaled and padded sizes, window positions and boxes, ranking.

Every pyramid scale s (times the `max_side` cap) turns an H x W image into round(H*s) x round(W*s)
pixels, padded by patch_size/2 px of grey on the top and left and by patch_size/2 plus up to 15 px
on the bottom and right, so its sides are multiples of the trunk stride (16). Score-map position
(row, col) of a scale is the window whose top-left corner is (16*row, 16*col) in the padded
image. Coordinates are image pixels, x to the right, y down, pixel (i, j) covering
[j, j+1) x [i, i+1); boxes are (x0, y0, x1, y1) with exclusive x1, y1.
"""

from __future__ import annotations

import tensorflow as tf

from sharpmask_tf.config import TRUNK_STRIDE
from sharpmask_tf.images import GREY


def scaled_size(size, scale):
    """Side of an image side `size` after scaling by `scale`: round(size*scale), at least 1.

    Args:
        size: () or (L,) int, a side in pixels.
        scale: () or (L,) float.

    Returns:
        int32 tensor of the same shape.
    """
    scaled = tf.round(tf.cast(size, tf.float32) * tf.cast(scale, tf.float32))
    return tf.maximum(tf.cast(scaled, tf.int32), 1)


def padded_size(scaled, patch_size: int):
    """Side of a scaled image padded by patch_size/2 px before and at least patch_size/2 after,
    rounded up to a multiple of the trunk stride (16).

    Args:
        scaled: () or (L,) int, the scaled image side.
        patch_size: the window side the masks cover.

    Returns:
        int32 tensor of the same shape.
    """
    s = TRUNK_STRIDE
    return (tf.cast(scaled, tf.int32) + patch_size + s - 1) // s * s


def score_map_size(padded, patch_size: int):
    """Number of window positions along a padded side: padded/16 - patch_size/16 + 1.

    The object vector is an fs x fs valid convolution (fs = patch_size/16) over conv4 features,
    which have padded/16 cells.
    """
    return tf.cast(padded, tf.int32) // TRUNK_STRIDE - patch_size // TRUNK_STRIDE + 1


def level_positions(index, level_offsets, level_widths):
    """Maps indices into the concatenated, row-major score maps of all scales to (scale, row, col).

    Indices are 0-based: the 2016 release recovered row and column from a 1-based index and
    landed one row and one column off; this is the function the tests pin down.

    Args:
        index: (N,) int, flat indices into the concatenation.
        level_offsets: (L,) int, increasing, the first flat index of each scale's map (0 first).
        level_widths: (L,) int, the width (columns) of each scale's score map.

    Returns:
        (level, row, col), each (N,) int32.
    """
    index = tf.cast(index, tf.int32)
    offsets = tf.cast(level_offsets, tf.int32)
    level = tf.searchsorted(offsets, index, side="right") - 1
    local = index - tf.gather(offsets, level)
    width = tf.gather(tf.cast(level_widths, tf.int32), level)
    return level, local // width, local % width


def window_boxes(rows, cols, scale_y, scale_x, patch_size: int):
    """Image-pixel boxes of the windows at score-map positions (row, col).

    The window of position (row, col) starts at (16*row, 16*col) in the padded scaled image,
    i.e. at 16*row - patch_size/2 in the scaled image, and is patch_size px wide; dividing by the
    scale gives image pixels. Boxes may extend beyond the image.

    Args:
        rows: (N,) int, score-map rows.
        cols: (N,) int, score-map columns.
        scale_y: (N,) float, scaled height / image height of each window's scale.
        scale_x: (N,) float, scaled width / image width.
        patch_size: the window side in the scaled image.

    Returns:
        (N, 4) float32 boxes (x0, y0, x1, y1) in image pixels.
    """
    half = patch_size / 2
    y0 = tf.cast(rows, tf.float32) * TRUNK_STRIDE - half
    x0 = tf.cast(cols, tf.float32) * TRUNK_STRIDE - half
    sy = tf.cast(scale_y, tf.float32)
    sx = tf.cast(scale_x, tf.float32)
    return tf.stack([x0 / sx, y0 / sy, (x0 + patch_size) / sx, (y0 + patch_size) / sy], axis=-1)


def window_pixels(boxes, height, width):
    """The image pixels whose centres lie inside each window, as a clipped pixel range.

    Pixel (i, j) is inside window (x0, y0, x1, y1) when x0 <= j + 0.5 < x1 and y0 <= i + 0.5 < y1.

    Args:
        boxes: (N, 4) float, (x0, y0, x1, y1) windows in image pixels.
        height: () int, image height.
        width: () int, image width.

    Returns:
        (N, 4) int32 (row0, col0, row1, col1), rows row0..row1-1 and columns col0..col1-1, clipped
        to the image; row1 <= row0 or col1 <= col0 for a window that covers no pixel.
    """
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)

    def first(edge, size):  # the first index k with k + 0.5 >= edge
        return tf.clip_by_value(tf.cast(tf.math.ceil(edge - 0.5), tf.int32), 0, tf.cast(size, tf.int32))

    return tf.stack([first(y0, height), first(x0, width), first(y1, height), first(x1, width)], axis=-1)


def scale_and_pad(rgb, scale, patch_size: int):
    """One pyramid level: an image scaled by `scale` and padded with grey as the windows need.

    Args:
        rgb: (H, W, 3) float32 in [0, 1].
        scale: () float, the pyramid scale times the `max_side` cap.
        patch_size: the window side.

    Returns:
        The padded image (Hp, Wp, 3) and its scaled size (hs, ws), () int32 each.
    """
    p = patch_size
    hs, ws = scaled_size(tf.shape(rgb)[0], scale), scaled_size(tf.shape(rgb)[1], scale)
    # Antialiasing only matters when shrinking, and costs 10x plain bilinear when enlarging.
    size = tf.stack([hs, ws])
    scaled = tf.cond(
        scale < 1,
        lambda: tf.image.resize(rgb, size, method="bilinear", antialias=True),
        lambda: tf.image.resize(rgb, size, method="bilinear"),
    )
    hp, wp = padded_size(hs, p), padded_size(ws, p)
    padding = [[p // 2, hp - hs - p // 2], [p // 2, wp - ws - p // 2], [0, 0]]
    return tf.pad(scaled, padding, constant_values=GREY), (hs, ws)


def top_positions(scores, level_sizes, top_n: int):
    """The `top_n` best window positions of all scales together.

    Args:
        scores: (P,) float, the row-major score maps of all scales, concatenated.
        level_sizes: (L, 2) int, (rows, cols) of each scale's score map.
        top_n: how many to keep (fewer if there are fewer positions).

    Returns:
        (scores, index, level, row, col), each (k,) with k = min(top_n, P), best first; `index`
        is the flat index into `scores`.
    """
    counts = level_sizes[:, 0] * level_sizes[:, 1]
    offsets = tf.concat([[0], tf.cumsum(counts)[:-1]], axis=0)
    k = tf.minimum(top_n, tf.shape(scores)[0])
    top_scores, index = tf.math.top_k(scores, k=k)
    level, rows, cols = level_positions(index, offsets, level_sizes[:, 1])
    return top_scores, index, level, rows, cols


def gather_windows(flat_map, top_left, widths, size: int):
    """Square windows out of row-major flattened feature maps.

    Args:
        flat_map: (P, C), the concatenated flattened maps of all scales.
        top_left: (N,) int, flat index of each window's top-left cell.
        widths: (N,) int, the width of each window's map.
        size: the window side in cells.

    Returns:
        (N, size, size, C).
    """
    r = tf.range(size)
    grid = r[:, None] * widths[:, None, None] + r[None, None, :]  # (N, size, size)
    return tf.gather(flat_map, top_left[:, None, None] + grid)
