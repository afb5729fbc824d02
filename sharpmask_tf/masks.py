"""Mask post-processing as pure functions: paste, resize, tight boxes, mask IoU and NMS.

Coordinates are image pixels, x to the right, y down, pixel (i, j) covering [j, j+1) x [i, i+1);
boxes are (x0, y0, x1, y1) with exclusive x1, y1.
"""

from __future__ import annotations

import tensorflow as tf

from sharpmask_tf.pyramid import window_pixels

# Proposals pasted onto the image grid concurrently.
PASTE_PARALLEL = 8
# Mask side from which pasting blends two rows instead of a matmul along y.
PASTE_BLEND_FROM = 98
# Side of the grid on which the optional mask NMS measures mask IoU.
NMS_GRID = 128


def paste_masks(probabilities, boxes, height, width, threshold: float):
    """Resamples mask probabilities over their windows onto the image grid and binarises them.

    Pixel (i, j) takes the bilinear interpolation of its window's mask at its centre
    (j + 0.5, i + 0.5), clamped to the mask's edge inside the window and 0 outside it.

    Args:
        probabilities: (N, M, M) float, mask probabilities; mask pixel k covers
            [x0 + k*w/M, x0 + (k+1)*w/M) of its box.
        boxes: (N, 4) float, (x0, y0, x1, y1) windows in image pixels.
        height: () int, image height.
        width: () int, image width.
        threshold: probability at or above which a pixel is in the mask.

    Returns:
        (N, height, width) bool masks.
    """
    return paste_masks_and_boxes(probabilities, boxes, height, width, threshold)[0]


def paste_masks_and_boxes(probabilities, boxes, height, width, threshold: float):
    """`paste_masks`, plus the tight box of every pasted mask (as `mask_boxes` gives it).

    Each mask is resampled over its window's pixels only (`window_pixels`), then placed on an
    all-false canvas, one proposal at a time: the work is the windows' area inside the image,
    not N full images.

    Returns:
        (N, height, width) bool masks and (N, 4) float32 boxes.
    """
    if tf.executing_eagerly():  # the per-proposal loop runs in parallel only in a graph
        return _paste_graph(
            tf.convert_to_tensor(probabilities, tf.float32),
            tf.convert_to_tensor(boxes, tf.float32),
            tf.convert_to_tensor(height, tf.int32),
            tf.convert_to_tensor(width, tf.int32),
            tf.convert_to_tensor(threshold, tf.float32),
        )
    probabilities = tf.convert_to_tensor(probabilities, tf.float32)
    boxes = tf.convert_to_tensor(boxes, tf.float32)
    height = tf.cast(height, tf.int32)
    width = tf.cast(width, tf.int32)
    windows, layout, thresholds = _paste_layout(boxes, height, width, threshold)
    blend = probabilities.shape[1] is None or probabilities.shape[1] >= PASTE_BLEND_FROM

    def paste_one(args):
        return _paste_one(probabilities[args[0]], *args[1:], height, width, blend)

    masks, tight = tf.map_fn(
        paste_one,
        (tf.range(tf.shape(probabilities)[0]), windows, layout, thresholds),
        fn_output_signature=(tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([4], tf.float32)),
        parallel_iterations=PASTE_PARALLEL,
    )
    return tf.ensure_shape(masks, [probabilities.shape[0], None, None]), tight


_paste_graph = tf.function(paste_masks_and_boxes, reduce_retracing=True)


def _paste_layout(boxes, height, width, threshold):
    """Where each proposal pastes: its windows (N, 4) with positive sides, its pixel ranges
    (N, 4) int32 (row, col, rows, cols) and its thresholds (N,)."""
    pixels = window_pixels(boxes, height, width)
    r0, c0, r1, c1 = tf.unstack(pixels, axis=-1)
    # Degenerate windows (padding rows) and windows outside the image paste nothing; they still
    # resample one pixel so every step has the same program.
    empty = (r1 <= r0) | (c1 <= c0) | (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
    r0 = tf.where(empty, 0, r0)
    c0 = tf.where(empty, 0, c0)
    rows = tf.where(empty, 1, r1 - r0)
    cols = tf.where(empty, 1, c1 - c0)
    x0, y0, x1, y1 = tf.unstack(boxes, axis=-1)
    x1 = tf.where(x1 > x0, x1, x0 + 1.0)
    y1 = tf.where(y1 > y0, y1, y0 + 1.0)
    # An empty window keeps nothing: its threshold is above any probability.
    thresholds = tf.where(empty, 2.0, tf.cast(threshold, tf.float32))
    return tf.stack([x0, y0, x1, y1], axis=-1), tf.stack([r0, c0, rows, cols], axis=-1), thresholds


def _mask_coordinates(first, count, start, end, m):
    """Mask-pixel coordinates (0 = centre of the first mask pixel) of `count` pixel centres from
    pixel `first` on, clamped to the edge pixels' centres (bilinear on the edge-padded mask,
    without padding it)."""
    pixels = tf.cast(first + tf.range(count), tf.float32) + 0.5
    return tf.clip_by_value((pixels - start) / (end - start) * m - 0.5, 0.0, m - 1.0)


def _paste_one(mask, window, layout, keep_above, height, width, blend: bool):
    """One proposal of `paste_masks_and_boxes`: its (height, width) bool mask and (4,) box."""
    x0, y0, x1, y1 = tf.unstack(window)
    row, col, h, w = tf.unstack(layout)
    m = tf.cast(tf.shape(mask)[0], tf.float32)
    # Bilinear resampling along x as a matmul with the tent weights of each pixel,
    # (M, M) @ (M, w), then along y: another matmul for small masks, a blend of the two
    # neighbouring rows for large ones (cheaper than M multiply-adds per pixel).
    across = tf.matmul(mask, _tent_weights(_mask_coordinates(col, w, x0, x1, m), m), transpose_b=True)
    ys = _mask_coordinates(row, h, y0, y1, m)
    values = _blend_rows(across, ys, m - 2.0) if blend else tf.matmul(_tent_weights(ys, m), across)
    keep = values >= keep_above
    canvas = tf.pad(keep, [[row, height - row - h], [col, width - col - w]])
    # The box from the rows' and columns' maxima (float reductions, cheaper than on booleans).
    kept_rows = tf.reduce_max(values, axis=1) >= keep_above
    kept_cols = tf.reduce_max(values, axis=0) >= keep_above
    box = _extent_boxes(kept_rows[None], kept_cols[None])[0]
    return canvas, box + tf.cast(tf.stack([col, row, col, row]), tf.float32) * tf.cast(
        tf.reduce_any(kept_rows), tf.float32
    )


def _tent_weights(coordinates, size):
    """Bilinear weights (n, size) of `coordinates` (n,) in [0, size - 1] on `size` pixels: the
    tent max(0, 1 - |coordinate - k|)."""
    grid = tf.range(tf.cast(size, tf.float32))
    return tf.nn.relu(1.0 - tf.abs(coordinates[:, None] - grid[None]))


def _blend_rows(values, coordinates, last):
    """Linear interpolation between rows of `values` (R, C) at fractional row `coordinates` (n,),
    each within [0, last + 1] with last = R - 2 (as a float): (n, C). Row k plus t times the step
    to row k + 1: two gathers, a multiply and an add."""
    top = tf.clip_by_value(tf.floor(coordinates), 0.0, last)
    t = (coordinates - top)[:, None]
    top = tf.cast(top, tf.int32)
    steps = values[1:] - values[:-1]
    return tf.gather(values, top) + tf.gather(steps, top) * t


def resize_masks(masks, size: int):
    """Resizes square masks as `tf.image.resize(bilinear, antialias=True)` does, by two matmuls.

    The antialiased resize is separable and linear: along each axis it multiplies by a fixed
    (size, M) matrix, which is the resize of the identity. Two small matmuls per mask cost far
    less than the generic resampling kernel.

    Args:
        masks: (N, M, M) float with a static M.
        size: the output side.

    Returns:
        (N, size, size) float32.
    """
    masks = tf.convert_to_tensor(masks, tf.float32)
    m = masks.shape[1]
    weights = tf.image.resize(tf.eye(m)[..., None], [size, m], method="bilinear", antialias=True)[..., 0]
    return tf.matmul(tf.matmul(weights[None], masks), weights[None], transpose_b=True)


def mask_boxes(masks):
    """Tight boxes of binary masks.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, 4) float32 (x0, y0, x1, y1) with exclusive x1, y1 (so x1 - x0 is the width COCO's
        `toBbox` reports); (0, 0, 0, 0) for an empty mask.
    """
    return _extent_boxes(tf.reduce_any(masks, axis=2), tf.reduce_any(masks, axis=1))


def _extent_boxes(rows, cols):
    """`mask_boxes` from (N, H) rows and (N, W) columns holding any mask pixel."""

    def extent(any_along):
        n = tf.shape(any_along)[1]
        first = tf.argmax(tf.cast(any_along, tf.int32), axis=1, output_type=tf.int32)
        last = n - tf.argmax(tf.cast(any_along[:, ::-1], tf.int32), axis=1, output_type=tf.int32)
        return first, last

    y0, y1 = extent(rows)
    x0, x1 = extent(cols)
    boxes = tf.cast(tf.stack([x0, y0, x1, y1], axis=-1), tf.float32)
    return tf.where(tf.reduce_any(rows, axis=1)[:, None], boxes, tf.zeros_like(boxes))


def mask_iou_matrix(masks):
    """Pairwise IoU of binary masks.

    Args:
        masks: (N, H, W) bool.

    Returns:
        (N, N) float32; 0 where both masks are empty.
    """
    flat = tf.cast(tf.reshape(masks, [tf.shape(masks)[0], -1]), tf.float32)
    inter = tf.matmul(flat, flat, transpose_b=True)
    area = tf.reduce_sum(flat, axis=1)
    union = area[:, None] + area[None, :] - inter
    return tf.math.divide_no_nan(inter, union)


def greedy_nms(iou, threshold: float):
    """Greedy non-maximum suppression over items sorted by decreasing score.

    Args:
        iou: (N, N) float, pairwise overlaps of items in score order.
        threshold: an item is dropped if its IoU with a kept, higher-scored item exceeds this.

    Returns:
        (N,) bool, the items kept.
    """
    n = tf.shape(iou)[0]
    suppresses = iou > threshold

    def body(i, keep):
        dropped = tf.reduce_any(keep[:i] & suppresses[:i, i])
        return i + 1, tf.tensor_scatter_nd_update(keep, [[i]], [tf.logical_not(dropped)])

    _, keep = tf.while_loop(lambda i, _: i < n, body, (0, tf.ones([n], tf.bool)))
    return keep


def nms_grid_view(masks):
    """Masks subsampled to at most NMS_GRID px per side, for the IoU of mask NMS."""
    h, w = tf.shape(masks)[1], tf.shape(masks)[2]
    step = tf.maximum(1, (tf.maximum(h, w) + NMS_GRID - 1) // NMS_GRID)
    return masks[:, ::step, ::step]


def mask_nms(masks, threshold: float, count):
    """Greedy mask NMS over proposals in score order, measured on `nms_grid_view` masks.

    Args:
        masks: (N, H, W) bool, best first; rows from `count` on are padding.
        threshold: `greedy_nms`'s IoU threshold.
        count: () int, the number of valid rows.

    Returns:
        (order, kept): (N,) int64, the kept rows in score order then all others, and () int32,
        how many were kept.
    """
    keep = greedy_nms(mask_iou_matrix(nms_grid_view(masks)), threshold)
    keep = keep & (tf.range(tf.shape(masks)[0]) < count)
    order = tf.concat([tf.where(keep)[:, 0], tf.where(~keep)[:, 0]], axis=0)
    return order, tf.reduce_sum(tf.cast(keep, tf.int32))


def crop_boxes(crops, windows, height, width, threshold):
    """Approximate tight boxes from the mask crops (used when full masks are not pasted): the
    extent of crop pixels at or above the threshold, mapped through the window, clipped."""
    c = tf.cast(tf.shape(crops)[1], tf.float32)
    local = mask_boxes(crops >= threshold) / c  # fractions of the window
    x0, y0, x1, y1 = tf.unstack(windows, axis=-1)
    fx = tf.stack([local[:, 0], local[:, 2]], axis=-1) * (x1 - x0)[:, None] + x0[:, None]
    fy = tf.stack([local[:, 1], local[:, 3]], axis=-1) * (y1 - y0)[:, None] + y0[:, None]
    w = tf.cast(width, tf.float32)
    h = tf.cast(height, tf.float32)
    boxes = tf.stack(
        [
            tf.clip_by_value(tf.floor(fx[:, 0]), 0, w),
            tf.clip_by_value(tf.floor(fy[:, 0]), 0, h),
            tf.clip_by_value(tf.math.ceil(fx[:, 1]), 0, w),
            tf.clip_by_value(tf.math.ceil(fy[:, 1]), 0, h),
        ],
        axis=-1,
    )
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return tf.where(nonempty[:, None], boxes, 0.0)
