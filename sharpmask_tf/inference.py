"""Full-image object proposals from a trained DeepMask or SharpMask (SPEC.md section 4).

The pipeline, for an image of any size:

1. The image is turned into RGB in [0, 1] (grayscale is replicated, alpha is composited onto
   mid grey) and every pyramid scale s is applied to it together with the `max_side` cap c: the
   scaled image has round(H*c*s) x round(W*c*s) pixels.
2. Each scaled image is padded by patch_size/2 px of grey (0.5) on the top and left, and by
   patch_size/2 plus up to 15 px on the bottom and right so its sides are multiples of 16.
3. The trunk runs over the whole padded image; head C runs as convolutions: the 1x1 reduction,
   the fs x fs linear layer as an fs x fs valid convolution (fs = patch_size/16), the score branch
   as 1x1 convolutions. Score-map position (row, col) of a scale is the window whose top-left
   corner is (16*row, 16*col) in the padded image (see `window_boxes`).
4. All positions of all scales are ranked by score together; the top N are kept.
5. Their masks are computed in one batch: DeepMask's coarse head, or SharpMask's vertical path
   over windows cut out of skip features computed once per scale.
6. Each mask (a probability map over its window of patch_size/s image px) is resampled
   bilinearly onto the image pixels inside its window and binarised at `mask_threshold`.

Coordinates are image pixels of the input image, x to the right, y down, pixel (i, j) covering
[j, j+1) x [i, i+1); boxes are (x0, y0, x1, y1) with exclusive x1, y1.

`ProposalGenerator.propose_tensors` is graph-mode TensorFlow on a dynamic image size with
fixed-size outputs, so a SavedModel signature can wrap it whole; `ProposalGenerator.propose` is
the numpy API.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from sharpmask_tf.config import COMPUTE_DTYPES, TRUNK_STRIDE, Config, InferenceConfig
from sharpmask_tf.deepmask import HEAD_OBJECT, HEAD_REDUCE, MASK_LOGITS, SCORE_HIDDEN, SCORE_LOGITS
from sharpmask_tf.fast_refine import fast_refine
from sharpmask_tf.layers import MirrorPad2D
from sharpmask_tf.sharpmask import REFINE_TAPS, model_geometry

# Area outside the picture, in [0, 1] RGB (SPEC.md section 2).
GREY = 0.5
# Trunk stride of each refinement module's skip features, skip1 (coarsest) first.
SKIP_STRIDES = (16, 8, 4, 2)
# Proposals pasted onto the image grid concurrently.
PASTE_PARALLEL = 8
# Mask side from which pasting blends two rows instead of a matmul along y.
PASTE_BLEND_FROM = 98
# Side of the grid on which the optional mask NMS measures mask IoU.
NMS_GRID = 128
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# ---------------------------------------------------------------------------------------------
# Pure geometry: index arithmetic and window placement.
# ---------------------------------------------------------------------------------------------


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
    m = tf.cast(tf.shape(probabilities)[1], tf.float32)
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

    def mask_coordinates(first, count, start, end):
        # Mask-pixel coordinates (0 = centre of the first mask pixel) of `count` pixel centres
        # from pixel `first` on, clamped to the edge pixels' centres (bilinear on the edge-padded
        # mask, without padding it).
        pixels = tf.cast(first + tf.range(count), tf.float32) + 0.5
        return tf.clip_by_value((pixels - start) / (end - start) * m - 0.5, 0.0, m - 1.0)

    # An empty window keeps nothing: its threshold is above any probability.
    thresholds = tf.where(empty, 2.0, tf.cast(threshold, tf.float32))
    layout = tf.stack([r0, c0, rows, cols], axis=-1)

    def paste_one(args):
        index, (x0_, y0_, x1_, y1_), (row, col, h, w), keep_above = (
            args[0],
            tf.unstack(args[1]),
            tf.unstack(args[2]),
            args[3],
        )
        mask = probabilities[index]  # a view: slicing the first axis copies nothing
        # Bilinear resampling along x as a matmul with the tent weights of each pixel,
        # (M, M) @ (M, w), then along y: another matmul for small masks, a blend of the two
        # neighbouring rows for large ones (cheaper than M multiply-adds per pixel).
        across = tf.matmul(mask, _tent_weights(mask_coordinates(col, w, x0_, x1_), m), transpose_b=True)
        ys = mask_coordinates(row, h, y0_, y1_)
        if probabilities.shape[1] is not None and probabilities.shape[1] < PASTE_BLEND_FROM:
            values = tf.matmul(_tent_weights(ys, m), across)
        else:
            values = _blend_rows(across, ys, m - 2.0)
        keep = values >= keep_above
        canvas = tf.pad(keep, [[row, height - row - h], [col, width - col - w]])
        # The box from the rows' and columns' maxima (float reductions, cheaper than on booleans).
        kept_rows = tf.reduce_max(values, axis=1) >= keep_above
        kept_cols = tf.reduce_max(values, axis=0) >= keep_above
        box = _extent_boxes(kept_rows[None], kept_cols[None])[0]
        return canvas, box + tf.cast(tf.stack([col, row, col, row]), tf.float32) * tf.cast(
            tf.reduce_any(kept_rows), tf.float32
        )

    masks, tight = tf.map_fn(
        paste_one,
        (tf.range(tf.shape(probabilities)[0]), tf.stack([x0, y0, x1, y1], axis=-1), layout, thresholds),
        fn_output_signature=(tf.TensorSpec([None, None], tf.bool), tf.TensorSpec([4], tf.float32)),
        parallel_iterations=PASTE_PARALLEL,
    )
    return tf.ensure_shape(masks, [probabilities.shape[0], None, None]), tight


_paste_graph = tf.function(paste_masks_and_boxes, reduce_retracing=True)


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


def to_rgb(image):
    """An image tensor as float32 RGB in [0, 1].

    Args:
        image: (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4); uint8 (0..255) or float
            (taken as [0, 1]). Gray is replicated to RGB; alpha composites onto mid grey.

    Returns:
        (H, W, 3) float32.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    else:
        image = tf.cast(image, tf.float32)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = tf.shape(image)[-1]
    color = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: image[..., -1:], lambda: tf.ones_like(image[..., :1]))
    return color * alpha + GREY * (1.0 - alpha)


# ---------------------------------------------------------------------------------------------
# The generator.
# ---------------------------------------------------------------------------------------------


def fold_batch_norm(trunk: keras.Model, dtype: str | None = None) -> keras.Model:
    """An inference copy of a trunk whose frozen BatchNorms and mirror pads are folded into the
    convolutions.

    - Every `<name>_bn` layer that follows the convolution `<name>_conv` becomes an identity and
      the convolution absorbs its affine transform: kernel * g and (bias - mean) * g + beta, with
      g = gamma / sqrt(variance + epsilon).
    - Every 1-pixel `MirrorPad2D` feeding only a 3x3 stride-1 valid convolution with fewer
      output than input channels (the skip nets') becomes an identity, and the convolution a
      `_MirrorBorderConv2D`, which needs no padded copy of its input. (Where channels do not
      shrink, as in the trunk, fixing the output's border costs about what the copy does.)
    - Every convolution adds its bias with `tf.nn.bias_add`, so the graph optimiser fuses
      convolution, bias and ReLU.

    Outputs equal the trunk's up to float rounding; the copy skips the elementwise passes of
    BatchNorm, of separate bias additions and of padding.

    Args:
        trunk: a model from `sharpmask_tf.backbone.resnet_trunk` (or any functional model of
            Keras layers, such as the skip nets: with no BatchNorm to fold, the pads and biases
            change).
        dtype: the copy's dtype policy ("bfloat16", "float16", "mixed_bfloat16", ...); None keeps
            each layer's own.

    Returns:
        A new model with the same inputs and outputs; `trunk` is left unchanged.
    """
    folded_names = {
        layer.name[: -len("_bn")]
        for layer in trunk.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.name.endswith("_bn")
        and isinstance(_layer_or_none(trunk, layer.name[: -len("_bn")] + "_conv"), keras.layers.Conv2D)
    }
    folded_bn = {f"{name}_bn" for name in folded_names}
    pads, border_convs = set(), {}
    for layer in trunk.layers:
        conv = _sole_consumer(layer)
        if (
            isinstance(layer, MirrorPad2D)
            and layer.padding == 1
            and type(conv) is keras.layers.Conv2D
            and tuple(conv.kernel_size) == (3, 3)
            and tuple(conv.strides) == (1, 1)
            and tuple(conv.dilation_rate) == (1, 1)
            and conv.padding == "valid"
            and conv.filters < conv.input.shape[-1]
        ):
            pads.add(layer.name)
            border_convs[conv.name] = layer.mode

    def clone(layer):
        config = layer.get_config() if dtype is None else {**layer.get_config(), "dtype": dtype}
        if (isinstance(layer, keras.layers.BatchNormalization) and layer.name in folded_bn) or layer.name in pads:
            return _Identity(name=layer.name, dtype=dtype)
        if type(layer) is keras.layers.Conv2D:
            config["use_bias"] = layer.use_bias or layer.name[: -len("_conv")] in folded_names
            if layer.name in border_convs:
                return _MirrorBorderConv2D.from_config(
                    {**config, "padding": "same", "border": border_convs[layer.name]}
                )
            return _BiasAddConv2D.from_config(config)
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(trunk, clone_function=clone)
    for layer in trunk.layers:
        target = copy.get_layer(layer.name)
        if isinstance(layer, keras.layers.Conv2D) and layer.name[: -len("_conv")] in folded_names:
            bn = trunk.get_layer(layer.name[: -len("_conv")] + "_bn")
            gamma, beta, mean, variance = (np.asarray(w) for w in bn.get_weights())
            g = gamma / np.sqrt(variance + bn.epsilon)
            kernel = np.asarray(layer.kernel) * g
            bias = np.asarray(layer.bias) if layer.use_bias else np.zeros_like(g)
            target.set_weights([kernel, (bias - mean) * g + beta])
        elif layer.weights and not isinstance(target, _Identity):
            target.set_weights(layer.get_weights())
    return copy


def _sole_consumer(layer: keras.layers.Layer):
    """The layer that alone consumes `layer`'s output in its functional model, else None."""
    nodes = layer._outbound_nodes
    return nodes[0].operation if len(nodes) == 1 else None


def _mirror_index(index, size, mode: str):
    """The pixel that index -1 or `size` (one past an edge) mirrors in `mode` padding."""
    if mode == "reflect":
        return tf.where(index < 0, -index, tf.where(index >= size, 2 * size - 2 - index, index))
    return tf.where(index < 0, -index - 1, tf.where(index >= size, 2 * size - 1 - index, index))


class _BiasAddConv2D(keras.layers.Conv2D):
    """Conv2D adding its bias with `tf.nn.bias_add`, which TensorFlow's graph optimiser fuses
    with the convolution and a following ReLU (Keras adds a reshaped bias, which it does not)."""

    def call(self, inputs):
        outputs = self.convolution_op(inputs, self.kernel)
        if self.use_bias:
            outputs = tf.nn.bias_add(outputs, self.bias)
        return outputs if self.activation is None else self.activation(outputs)


class _MirrorBorderConv2D(_BiasAddConv2D):
    """A 3x3 stride-1 convolution of its input padded by one mirrored pixel (`border`, as
    `MirrorPad2D` pads), computed without the padded copy: a "same" convolution with zero padding,
    then its first and last rows and columns replaced, in place, by their exact values: the 3x3
    mirrored neighbourhoods of the border pixels, gathered from the input, times the kernel as
    one matmul. Maps need at least 2 rows and columns, as reflect padding does."""

    def __init__(self, border: str = "reflect", **kwargs):
        super().__init__(**kwargs)
        self.border = border

    def call(self, inputs):
        outputs = super().call(inputs)
        if self.border == "zero":
            return outputs
        batch, h, w = tf.shape(inputs)[0], tf.shape(inputs)[1], tf.shape(inputs)[2]
        # The border pixels, top row, bottom row, left column, right column (corners twice), and
        # their 3x3 neighbourhoods in the mirror-padded input as pixels of the input itself.
        rw, rh = tf.range(w), tf.range(h)
        rows = tf.concat([tf.zeros_like(rw), tf.fill([w], h - 1), rh, rh], axis=0)
        cols = tf.concat([rw, rw, tf.zeros_like(rh), tf.fill([h], w - 1)], axis=0)
        taps = tf.constant([-1, 0, 1])
        source_rows = _mirror_index(rows[:, None, None] + taps[None, :, None], h, self.border)
        source_cols = _mirror_index(cols[:, None, None] + taps[None, None, :], w, self.border)
        channels = inputs.shape[-1]
        flat = tf.reshape(inputs, [batch, h * w, channels])
        patches = tf.gather(flat, tf.reshape(source_rows * w + source_cols, [-1]), axis=1)
        kernel = tf.reshape(tf.cast(self.kernel, inputs.dtype), [9 * channels, self.filters])
        border = tf.matmul(tf.reshape(patches, [-1, 9 * channels]), kernel)
        if self.use_bias:
            border = tf.nn.bias_add(border, tf.cast(self.bias, border.dtype))
        if self.activation is not None:
            border = self.activation(border)
        top, bottom, left, right = tf.split(tf.reshape(border, [batch, -1, self.filters]), [w, w, h, h], axis=1)
        # Row 0 and h-1 (axis 1), column 0 and w-1 (axis 2); the other three axes are taken whole.
        for axis, index, value in (
            (1, 0, top[:, None]),
            (1, h - 1, bottom[:, None]),
            (2, 0, left[:, :, None]),
            (2, w - 1, right[:, :, None]),
        ):
            begin = [0, 0, 0, 0]
            begin[axis] = index
            end = [0, 0, 0, 0]
            end[axis] = index + 1
            whole = 0b1111 & ~(1 << axis)
            outputs = tf.raw_ops.TensorStridedSliceUpdate(
                input=outputs,
                begin=tf.stack(begin),
                end=tf.stack(end),
                strides=[1, 1, 1, 1],
                value=value,
                begin_mask=whole,
                end_mask=whole,
            )
        return outputs

    def get_config(self):
        return {**super().get_config(), "border": self.border}


class _Identity(keras.layers.Layer):
    """Stands where a layer was folded into a neighbouring convolution: passes inputs through."""

    def call(self, inputs, training=None, mask=None):
        return inputs


def _layer_or_none(model: keras.Model, name: str):
    try:
        return model.get_layer(name)
    except ValueError:
        return None


class ProposalGenerator(tf.Module):
    """Object proposals over whole images from a DeepMask or SharpMask model.

    Example:
        ```python
        generator = ProposalGenerator.from_saved("runs/x")  # or ProposalGenerator(model, config)
        out = generator.propose(image)  # numpy dict, see `propose`
        ```

    Args:
        model: a model from `sharpmask_tf.sharpmask.build_model` (trained).
        config: inference settings; `InferenceConfig()` if None.
        coarse: use DeepMask's coarse masks even if the model has the refinement.
        full_masks: also paste masks at image size ("masks"); crops and boxes are always given.
        jit_compile: XLA-compile the per-scale network (trunk, head, skip features).
        fold_bn: run copies of the trunk with BatchNorm folded into the convolutions and of
            SharpMask's skip nets without padded copies of their inputs (`fold_batch_norm`;
            faster, same outputs up to float rounding). The copies do not follow later weight
            changes of `model`: build a new generator after changing them.
        compute_dtype: run the per-scale network (trunk, the object vectors' convolution, skip
            features) in this dtype: "bfloat16" (its convolutions about 2x faster on CPUs with
            AVX-512 BF16) or "float16" (for GPUs); None takes `config.compute_dtype` (whose
            default, None, computes in the model's own dtype). Scores,
            masks and everything after the ranking stay float32. Needs `fold_bn`.
        phase_refine: run SharpMask's vertical path as `sharpmask_tf.fast_refine` (sub-pixel
            convolutions instead of upsample, pad and convolve; same logits up to float
            rounding, about 3x faster). Also a copy of the weights, like `fold_bn`.
    """

    def __init__(
        self,
        model: keras.Model,
        config: InferenceConfig | None = None,
        coarse: bool = False,
        full_masks: bool = True,
        jit_compile: bool = False,
        fold_bn: bool = True,
        phase_refine: bool = True,
        compute_dtype: str | None = None,
    ):
        super().__init__(name="proposal_generator")
        self.model = model
        self.config = config or InferenceConfig()
        self.patch_size, self.context = model_geometry(model)
        self.coarse = coarse
        self.refine = not coarse and any(layer.name == "refine" for layer in model.layers)
        self.full_masks = full_masks
        self.scales = self.config.scales
        self._normalize = model.get_layer("normalize")
        if compute_dtype:  # validated by the config
            self.config = dataclasses.replace(self.config, compute_dtype=compute_dtype)
        compute_dtype = self.config.compute_dtype
        if compute_dtype and not fold_bn:
            raise ValueError("compute_dtype runs an inference copy of the trunk: it needs fold_bn=True.")
        trunk = model.get_layer("trunk")
        self._trunk = fold_batch_norm(trunk, compute_dtype) if fold_bn else trunk
        self._head_reduce = model.get_layer(HEAD_REDUCE)
        self._head_object = model.get_layer(HEAD_OBJECT)
        self._score_hidden = model.get_layer(SCORE_HIDDEN)
        self._score_logits = model.get_layer(SCORE_LOGITS)
        self._mask_logits = None if self.refine else model.get_layer(MASK_LOGITS)
        self._skip = self._refine_net = None
        if self.refine:
            skip = model.get_layer("skip")
            self._skip = fold_batch_norm(skip, compute_dtype) if fold_bn else skip
            refine = model.get_layer("refine")
            self._refine_net = fast_refine(refine) if phase_refine else refine
        self._level = tf.function(self._level_features, jit_compile=jit_compile, reduce_retracing=True)
        self._propose = tf.function(self.propose_tensors, reduce_retracing=True)

    @classmethod
    def from_saved(cls, path: str | os.PathLike, config: InferenceConfig | None = None, **kwargs):
        """Loads a generator from a `.keras` file or a training run directory.

        A directory must hold `sharpmask.keras` or `deepmask.keras` (SharpMask preferred); the
        inference settings come from `config`, else `config.json` beside the model, else defaults.

        Raises:
            FileNotFoundError: if no model file is found.
        """
        import sharpmask_tf.layers  # noqa: F401  (registers the custom layers)

        path = Path(path)
        if path.is_dir():
            candidates = [path / "sharpmask.keras", path / "deepmask.keras"]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"No sharpmask.keras or deepmask.keras in the model directory. Received: path={str(path)!r}"
                )
            model_path = found[0]
        elif path.is_file():
            model_path = path
        else:
            raise FileNotFoundError(f"No such model file or directory. Received: path={str(path)!r}")
        if config is None:
            config_json = model_path.parent / "config.json"
            config = Config.from_json(config_json.read_text()).inference if config_json.is_file() else None
        model = keras.saving.load_model(model_path, compile=False)
        return cls(model, config, **kwargs)

    def _level_features(self, padded):
        """Network over one padded scaled image (1, Hp, Wp, 3): score logits (Ho, Wo), object
        vectors (Ho, Wo, D) and, for SharpMask, skip features {skip_i: (Hp/t_i, Wp/t_i, c_i)}."""
        compute_dtype = self.config.compute_dtype
        normalized = self._normalize(padded)
        if compute_dtype:
            normalized = tf.cast(normalized, compute_dtype)
        taps = self._trunk(normalized)
        reduced = self._head_reduce(taps["conv4"])
        fs = self.patch_size // TRUNK_STRIDE
        kernel = tf.reshape(self._head_object.kernel, [fs, fs, reduced.shape[-1], -1])
        if compute_dtype:
            reduced = tf.cast(reduced, compute_dtype)
        objects = tf.nn.conv2d(reduced, tf.cast(kernel, reduced.dtype), 1, "VALID")
        objects = tf.nn.bias_add(tf.cast(objects, self._head_object.bias.dtype), self._head_object.bias)
        scores = self._score_logits(self._score_hidden(objects))[0, :, :, 0]
        skips = {}
        if self.refine:
            skips = {k: tf.cast(v[0], tf.float32) for k, v in self._skip({t: taps[t] for t in REFINE_TAPS}).items()}
        return scores, objects[0], skips

    def propose_tensors(self, image) -> dict[str, tf.Tensor]:
        """Proposals for one image, as graph-mode TensorFlow (wrap in `tf.function` to export).

        Args:
            image: (H, W, C) with C in 1..4, or (H, W); uint8 or float in [0, 1]. H, W >= 1.

        Returns:
            A dict of tensors, proposals sorted by decreasing score, padded to N = top_n rows:
            "scores" (N,) float32 probabilities (0 for padding rows);
            "boxes" (N, 4) float32 tight boxes (x0, y0, x1, y1) of the binarised masks in image
              pixels, x1/y1 exclusive, (0, 0, 0, 0) for empty masks and padding;
            "window_boxes" (N, 4) float32, the windows (patch_size/scale image px) the masks cover;
            "mask_crops" (N, crop_size, crop_size) float32 mask probabilities over window_boxes;
            "scales" (N,) float32, the scale of each proposal relative to the input image
              (pyramid scale times the max_side cap);
            "masks" (N, H, W) bool, the binarised masks at image size (if full_masks);
            "num_proposals" () int32, the number of valid rows.
        """
        cfg = self.config
        p = self.patch_size
        rgb = to_rgb(image)
        height, width = tf.shape(rgb)[0], tf.shape(rgb)[1]
        cap = tf.minimum(1.0, cfg.max_side / tf.cast(tf.maximum(height, width), tf.float32))
        scores, objects, level_sizes, level_scale_y, level_scale_x = [], [], [], [], []
        skip_maps = {f"skip{i}": [] for i in range(1, 5)}
        skip_widths = {f"skip{i}": [] for i in range(1, 5)}
        for s in self.scales:
            hs, ws = scaled_size(height, cap * s), scaled_size(width, cap * s)
            # Antialiasing only matters when shrinking, and costs 10x plain bilinear when enlarging.
            size = tf.stack([hs, ws])
            scaled = tf.cond(
                cap * s < 1,
                lambda size=size: tf.image.resize(rgb, size, method="bilinear", antialias=True),
                lambda size=size: tf.image.resize(rgb, size, method="bilinear"),
            )
            hp, wp = padded_size(hs, p), padded_size(ws, p)
            padding = [[p // 2, hp - hs - p // 2], [p // 2, wp - ws - p // 2], [0, 0]]
            padded = tf.pad(scaled, padding, constant_values=GREY)
            level_scores, level_objects, skips = self._level(padded[None])
            scores.append(tf.reshape(level_scores, [-1]))
            objects.append(tf.reshape(level_objects, [-1, level_objects.shape[-1]]))
            level_sizes.append(tf.shape(level_scores))
            level_scale_y.append(tf.cast(hs, tf.float32) / tf.cast(height, tf.float32))
            level_scale_x.append(tf.cast(ws, tf.float32) / tf.cast(width, tf.float32))
            for name, feature in skips.items():
                skip_maps[name].append(tf.reshape(feature, [-1, feature.shape[-1]]))
                skip_widths[name].append(tf.shape(feature)[1])
        level_sizes = tf.stack(level_sizes)
        counts = level_sizes[:, 0] * level_sizes[:, 1]
        offsets = tf.concat([[0], tf.cumsum(counts)[:-1]], axis=0)
        all_scores = tf.concat(scores, axis=0)
        k = tf.minimum(cfg.top_n, tf.shape(all_scores)[0])
        top_scores, top_index = tf.math.top_k(all_scores, k=k)
        level, rows, cols = level_positions(top_index, offsets, level_sizes[:, 1])
        windows = window_boxes(
            rows, cols, tf.gather(tf.stack(level_scale_y), level), tf.gather(tf.stack(level_scale_x), level), p
        )
        top_objects = tf.gather(tf.concat(objects, axis=0), top_index)
        if self.refine:
            window_skips = []
            for name, stride in zip(skip_maps, SKIP_STRIDES):
                widths = tf.stack(skip_widths[name])
                sizes = tf.stack([tf.shape(f)[0] for f in skip_maps[name]])
                skip_offsets = tf.concat([[0], tf.cumsum(sizes)[:-1]], axis=0)
                window_skips.append(
                    _gather_windows(
                        tf.concat(skip_maps[name], axis=0),
                        tf.gather(skip_offsets, level)
                        + rows * (TRUNK_STRIDE // stride) * tf.gather(widths, level)
                        + cols * (TRUNK_STRIDE // stride),
                        tf.gather(widths, level),
                        p // stride,
                    )
                )
            logits = self._refine_net([top_objects, *window_skips])
        else:
            m = self._mask_logits.units
            side = round(math.sqrt(m))
            logits = tf.reshape(self._mask_logits(top_objects), [-1, side, side])
        probabilities = tf.sigmoid(tf.cast(logits, tf.float32))
        probabilities, windows, top_scores, level = _pad_rows(cfg.top_n, probabilities, windows, top_scores, level)
        num = k
        masks = boxes = None
        if self.full_masks or cfg.nms_threshold is not None:
            masks, boxes = paste_masks_and_boxes(probabilities, windows, height, width, cfg.mask_threshold)
        if cfg.nms_threshold is not None:
            keep = greedy_nms(mask_iou_matrix(_nms_view(masks)), cfg.nms_threshold)
            keep = keep & (tf.range(cfg.top_n) < k)
            order = tf.concat([tf.where(keep)[:, 0], tf.where(~keep)[:, 0]], axis=0)
            num = tf.reduce_sum(tf.cast(keep, tf.int32))
            probabilities, windows, top_scores, level, masks, boxes = (
                tf.gather(t, order) for t in (probabilities, windows, top_scores, level, masks, boxes)
            )
            valid = tf.range(cfg.top_n) < num
            top_scores = tf.where(valid, top_scores, 0.0)
            masks = masks & valid[:, None, None]
            boxes = tf.where(valid[:, None], boxes, 0.0)
        valid = tf.range(cfg.top_n) < num
        crop = cfg.crop_size
        crops = resize_masks(probabilities, crop)
        out = {
            "scores": tf.where(valid, tf.sigmoid(top_scores), 0.0),
            "window_boxes": tf.where(valid[:, None], windows, 0.0),
            "mask_crops": crops * tf.cast(valid, tf.float32)[:, None, None],
            "scales": tf.where(valid, tf.gather(tf.constant(self.scales, tf.float32), level) * cap, 0.0),
            "num_proposals": tf.cast(num, tf.int32),
        }
        if self.full_masks:
            out["masks"] = masks
            out["boxes"] = boxes
        else:
            out["boxes"] = _crop_boxes(crops, out["window_boxes"], height, width, cfg.mask_threshold)
        return out

    def propose(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Proposals for one image, as numpy.

        Args:
            image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, uint8 or float in [0, 1].

        Returns:
            The dict of `propose_tensors`, as numpy arrays trimmed to the `num_proposals` valid
            rows (so "masks" is (n, H, W) bool), plus "num_proposals" as an int.

        Raises:
            ValueError: for an empty image, more than 4 channels, or a dtype that is neither
                uint8 nor float.
        """
        out = {k: v.numpy() for k, v in self._propose(tf.convert_to_tensor(check_image(image))).items()}
        n = int(out.pop("num_proposals"))
        out = {k: v[:n] for k, v in out.items()}
        out["num_proposals"] = n
        return out


def _gather_windows(flat_map, top_left, widths, size: int):
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


def _pad_rows(n: int, *tensors):
    """Pads every tensor's first axis with zeros to n rows."""
    out = []
    for t in tensors:
        pad = [[0, n - tf.shape(t)[0]]] + [[0, 0]] * (t.shape.rank - 1)
        out.append(tf.ensure_shape(tf.pad(t, pad), [n, *t.shape[1:]]))
    return out


def _nms_view(masks):
    """Masks subsampled to at most NMS_GRID px per side, for the IoU of mask NMS."""
    h, w = tf.shape(masks)[1], tf.shape(masks)[2]
    step = tf.maximum(1, (tf.maximum(h, w) + NMS_GRID - 1) // NMS_GRID)
    return masks[:, ::step, ::step]


def _crop_boxes(crops, windows, height, width, threshold):
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


# ---------------------------------------------------------------------------------------------
# Images from files and arrays.
# ---------------------------------------------------------------------------------------------


def check_image(image: Any) -> np.ndarray:
    """Validates an image array for `ProposalGenerator.propose`.

    Returns:
        The image as (H, W, C) uint8 or float32, C in 1..4.

    Raises:
        ValueError: if it is empty, not 2-D/3-D, has more than 4 channels, or an unusable dtype.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(f"An image must be (H, W) or (H, W, C) with C in 1..4. Received: shape={image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"An image must have at least one pixel. Received: shape={image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"An image must be uint8 or float in [0, 1]. Received: dtype={image.dtype}")
    if np.issubdtype(image.dtype, np.integer):
        raise ValueError(
            f"Integer images must be uint8 (0..255); scale others to float in [0, 1]. Received: dtype={image.dtype}"
        )
    return image.astype(np.float32)


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as an (H, W, C) uint8 array (C = 1, 3 or 4; palettes become RGB(A)).

    Raises:
        ValueError: if the file cannot be decoded as an image (names the file).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("L", "RGB", "RGBA"):
                converted = im
            elif im.mode in ("LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                converted = im.convert("RGBA")
            elif im.mode in ("I;16", "I", "F", "1"):
                converted = im.convert("L")
            else:
                converted = im.convert("RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"Cannot read an image from {str(path)!r}: {err}") from err
    return array[..., None] if array.ndim == 2 else array


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by `inputs`: files as given, folders expanded to their image files.

    Raises:
        FileNotFoundError: if an input does not exist.
    """
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or folder. Received: {str(path)!r}")
    return files


def coco_results(proposals: dict[str, np.ndarray], image_id: int) -> list[dict[str, Any]]:
    """COCO results entries (class-agnostic, category_id 1) for one image's proposals.

    Args:
        proposals: the numpy dict of `ProposalGenerator.propose` (needs "masks").
        image_id: the COCO image id.

    Returns:
        A list of {"image_id", "category_id", "segmentation" (RLE, counts as str), "bbox"
        ([x, y, w, h] of the tight box), "score"} dicts, best first.
    """
    from pycocotools import mask as mask_utils

    masks = proposals["masks"]
    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(np.transpose(masks, (1, 2, 0)).astype(np.uint8)))
    results = []
    for rle, box, score in zip(rles, proposals["boxes"], proposals["scores"]):
        x0, y0, x1, y1 = (float(v) for v in box)
        results.append(
            {
                "image_id": int(image_id),
                "category_id": 1,
                "segmentation": {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")},
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "score": float(score),
            }
        )
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: proposals for images or folders, written as COCO results JSON (and PNG pictures)."""
    parser = argparse.ArgumentParser(
        prog="python -m sharpmask_tf.inference",
        description="Object proposals for images, written as COCO results JSON.",
    )
    parser.add_argument("--model", required=True, help="a .keras file or a training run directory")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument("--out", required=True, help="results JSON path")
    parser.add_argument("--annotations", help="COCO annotations JSON: image ids are matched by file name")
    parser.add_argument("--visualize", metavar="DIR", help="write a PNG per image with the top proposals")
    parser.add_argument("--draw", type=int, default=10, help="proposals drawn per picture (default 10)")
    parser.add_argument("--coarse", action="store_true", help="DeepMask's coarse masks from a SharpMask model")
    parser.add_argument(
        "--compute-dtype",
        choices=[d for d in COMPUTE_DTYPES if d],
        help="run the per-scale network in this dtype (bfloat16: about 2x faster on CPUs with AVX-512 BF16)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="inference.FIELD=VALUE", help="inference config overrides"
    )
    args = parser.parse_args(argv)

    options = {"coarse": args.coarse, "compute_dtype": args.compute_dtype}
    generator = ProposalGenerator.from_saved(args.model, **options)
    if args.set:
        config = Config(inference=generator.config).override(args.set).inference
        generator = ProposalGenerator(generator.model, config, **options)
    ids_by_name = {}
    if args.annotations:
        images = json.loads(Path(args.annotations).read_text())["images"]
        ids_by_name = {Path(im["file_name"]).name: int(im["id"]) for im in images}
    results, failed, start = [], [], time.perf_counter()
    files = list_images(args.inputs)
    next_id = 1
    for path in files:
        if ids_by_name:
            if path.name not in ids_by_name:
                print(f"skipping {path}: not in {args.annotations}", file=sys.stderr)
                failed.append(str(path))
                continue
            image_id = ids_by_name[path.name]
        else:
            image_id, next_id = next_id, next_id + 1
        try:
            image = load_image(path)
        except ValueError as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
            failed.append(str(path))
            continue
        proposals = generator.propose(image)
        results.extend(coco_results(proposals, image_id))
        if args.visualize:
            from sharpmask_tf.visualize import save_proposals

            out_png = Path(args.visualize) / f"{path.stem}.png"
            save_proposals(out_png, image, proposals, max_draw=args.draw)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results))
    done = len(files) - len(failed)
    seconds = time.perf_counter() - start
    print(f"{done} images, {len(results)} proposals -> {args.out} ({seconds:.1f} s); {len(failed)} skipped")
    return 1 if failed and not done else 0


if __name__ == "__main__":
    sys.exit(main())
