"""A faster, numerically equivalent evaluation of SharpMask's vertical refinement path.

The refine net (`sharpmask_tf.sharpmask.refine_network`) enters modules R2, R3, R4 and the output
layer with the same pattern: x2 upsampling, 1-pixel mirror padding and a 3x3 valid convolution,
on maps with very few channels. Those ops are memory-bound: the upsampled and the padded maps are
each four times the size of their input. Here each such triple is a sub-pixel ("phase")
convolution: output pixel (2i + a, 2j + b) of conv(pad(up(x))) depends on input pixels i-1..i+1,
j-1..j+1 only, so one 3x3 convolution of the input with 4x the output channels, one channel group
per phase (a, b), followed by interleaving the phases, gives the same map without materialising
the upsampled or the padded one. `PhaseConv` describes how the borders are kept exact. The
other convolutions (module 1's, and in the reference layout each module's second vertical
convolution, at the resolution of its input) run as padded convolutions (`PaddedConv`).

Example:
    ```python
    refine = fast_refine(model.get_layer("refine"))
    logits = refine([object_vectors, skip1, skip2, skip3, skip4])  # as model.get_layer("refine")
    ```
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from sharpmask_tf.layers import MirrorPad2D, Upsample2D, mirror_index

# Upsampled pixel 2m + r as weights on input pixels m + offset (tf.image.resize, half-pixel
# centres), for parity r = 0, 1; offsets past the edges are clamped onto the edge pixel.
_UPSAMPLE_TAPS = {
    "bilinear": ({-1: 0.25, 0: 0.75}, {0: 0.75, 1: 0.25}),
    "nearest": ({0: 1.0}, {0: 1.0}),
}


def _resampling_matrix(n: int, interpolation: str, padding: str) -> np.ndarray:
    """T (2n + 2, n): the 1-D map from a signal of n pixels to its x2 upsampled, 1-pixel padded
    version; row r is padded pixel r - 1."""
    up = np.zeros((2 * n, n))
    for m in range(n):
        for r, taps in enumerate(_UPSAMPLE_TAPS[interpolation]):
            for offset, weight in taps.items():
                up[2 * m + r, min(max(m + offset, 0), n - 1)] += weight
    if padding == "zero":
        first = last = np.zeros(n)
    else:
        first, last = up[mirror_index(-1, 2 * n, padding)], up[mirror_index(2 * n, 2 * n, padding)]
    return np.concatenate([first[None], up, last[None]])


def _phase_taps(interpolation: str, padding: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 1-D weights of input pixels in tap d of the 3-tap filter centred on output pixel
    2i + a, which reads padded upsampled pixel 2i + a + d - 1.

    Returns:
        interior (2, 3, 3): [a, d, t], the weight of input pixel i + t - 1 away from the edges;
        first (2, 3, 2): [a, d, t], for i = 0, the weight of input pixel t;
        last (2, 3, 2): [a, d, t], for i = n - 1, the weight of input pixel n - 2 + t.
    """
    n = 6
    t = _resampling_matrix(n, interpolation, padding)
    taps = lambda i: np.stack([t[2 * i + a : 2 * i + a + 3] for a in range(2)])  # noqa: E731
    return taps(2)[:, :, 1:4], taps(0)[:, :, :2], taps(n - 1)[:, :, n - 2 :]


def _separable(row_taps: np.ndarray, col_taps: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A kernel on x equivalent to the 3x3 `kernel` on the upsampled, padded map.

    Args:
        row_taps: (2, 3, Th) 1-D tap weights along rows, as from `_phase_taps`.
        col_taps: (2, 3, Tw) the same along columns.
        kernel: (3, 3, Cin, Cout).

    Returns:
        (Th, Tw, Cin, 4 * Cout) float32, output channels ordered (row phase, column phase,
        channel) as `tf.nn.depth_to_space` expects.
    """
    fused = np.einsum("ayt,bxu,yxio->tuiabo", row_taps, col_taps, np.asarray(kernel, np.float64))
    return fused.reshape(*fused.shape[:3], -1).astype(np.float32)


def _update(x: tf.Tensor, begin: int, end: int, value: tf.Tensor) -> tf.Tensor:
    """x (N, M) with x[:, begin:end] replaced by value; in place when x has no other consumer."""
    return tf.raw_ops.TensorStridedSliceUpdate(
        input=x, begin=[0, begin], end=[0, end], strides=[1, 1], value=value, begin_mask=1, end_mask=1
    )


def _pad(x: tf.Tensor, padding: str) -> tf.Tensor:
    """MirrorPad2D(1, padding)(x) for x (B, H, W, C) of static H, W, C: mirror padding as one
    gather of pixels, several times faster than tf.pad's, and also for B = 0."""
    _, h, w, c = x.shape
    if padding == "zero":
        return tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]])
    side = lambda n: [mirror_index(k, n, padding) for k in range(-1, n + 1)]  # noqa: E731
    pixels = [r * w + q for r in side(h) for q in side(w)]
    return tf.reshape(tf.gather(tf.reshape(x, [-1, h * w, c]), pixels, axis=1), [-1, h + 2, w + 2, c])


class PhaseConv(tf.Module):
    """conv3x3(pad(upsample_x2(x))) + bias, computed as one sub-pixel convolution of x.

    The main convolution pads x with zeros, which makes the outermost two output rows and
    columns (phase rows 0, H-1 and phase columns 0, W-1) wrong wherever the padding of the
    upsampled map does not amount to that; it does for nearest upsampling with zero padding only.
    Small convolutions with the edge rule of the original ops give them exactly, from the first
    and last two input columns (edge rule along columns, all rows), the first and last two input
    rows (edge rule along rows, inner columns) and the 2x2 input corners (both). They are written
    into the phase map before its phases are interleaved, in place: the map has no other consumer.
    Maps smaller than 3x3 are upsampled, padded and convolved as they are.

    Args:
        kernel: (3, 3, Cin, Cout) kernel of the valid convolution after the padding.
        bias: (Cout,) its bias.
        interpolation: the upsampling, "bilinear" or "nearest".
        padding: the 1-pixel padding of the upsampled map, "reflect", "symmetric" or "zero".
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, interpolation: str, padding: str):
        super().__init__()
        self.interpolation = interpolation
        self.padding = padding
        cin, self.channels = kernel.shape[2:]
        bias = np.asarray(bias, np.float32)
        self.direct_kernel = tf.constant(np.asarray(kernel, np.float32))
        self.direct_bias = tf.constant(bias)
        interior, first, last = _phase_taps(interpolation, padding)
        self.kernel = tf.constant(_separable(interior, interior, kernel))
        self.bias = tf.constant(np.tile(bias, 4))
        self.exact_borders = np.array_equal(first, interior[:, :, 1:]) and np.array_equal(last, interior[:, :, :2])
        # Columns (0, 1) and (W-2, W-1) are convolved as signals along the rows, with channels
        # (column, Cin), under (1, 3) kernels; rows (0, 1) and (H-2, H-1) under (2, 3) kernels.
        self.left_kernel = tf.constant(_separable(interior, first, kernel).reshape(1, 3, 2 * cin, -1))
        self.right_kernel = tf.constant(_separable(interior, last, kernel).reshape(1, 3, 2 * cin, -1))
        self.top_kernel = tf.constant(_separable(first, interior, kernel))
        self.bottom_kernel = tf.constant(_separable(last, interior, kernel))
        # The 4x4 pixels at rows and columns (0, 1, n-2, n-1) to the four 2x2 corners.
        corners = np.zeros((4, 4, cin, 2, 2, 4 * self.channels), np.float32)
        for i, row_taps in enumerate((first, last)):
            for j, col_taps in enumerate((first, last)):
                corners[2 * i : 2 * i + 2, 2 * j : 2 * j + 2, :, i, j] = _separable(row_taps, col_taps, kernel)
        self.corner_matrix = tf.constant(corners.reshape(16 * cin, -1))
        self.corner_bias = tf.constant(np.tile(bias, 16))

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """Args:
            x: (B, H, W, Cin) float32 with static H, W.

        Returns:
            (B, 2H, 2W, Cout) float32, conv(pad(upsample(x))) + bias.
        """
        h, w, cin = x.shape[1:]
        if min(h, w) < 3:
            up = tf.image.resize(x, [2 * h, 2 * w], method=self.interpolation)
            return tf.nn.bias_add(
                tf.nn.conv2d(_pad(up, self.padding), self.direct_kernel, 1, "VALID"), self.direct_bias
            )
        c = 4 * self.channels
        y = tf.nn.bias_add(tf.nn.conv2d(x, self.kernel, 1, "SAME"), self.bias)
        if not self.exact_borders:
            conv = lambda v, k, p: tf.nn.bias_add(tf.nn.conv2d(v, k, 1, p), self.bias)  # noqa: E731
            pixel_rows = tf.reshape(x, [-1, h, w * cin])
            pad = [[0, 0], [0, 0], [1, 1], [0, 0]]
            left = conv(tf.reshape(pixel_rows[:, :, : 2 * cin], [-1, 1, h, 2 * cin]), self.left_kernel, pad)
            right = conv(tf.reshape(pixel_rows[:, :, -2 * cin :], [-1, 1, h, 2 * cin]), self.right_kernel, pad)
            top = conv(x[:, :2], self.top_kernel, "VALID")
            bottom = conv(x[:, -2:], self.bottom_kernel, "VALID")
            pixels = tf.gather(tf.gather(x, [0, 1, h - 2, h - 1], axis=1), [0, 1, w - 2, w - 1], axis=2)
            corners = tf.matmul(tf.reshape(pixels, [-1, 16 * cin]), self.corner_matrix) + self.corner_bias
            y = tf.reshape(y, [-1, w * c])
            y = _update(y, 0, c, tf.reshape(left, [-1, c]))
            y = _update(y, (w - 1) * c, w * c, tf.reshape(right, [-1, c]))
            y = tf.reshape(y, [-1, h * w * c])
            y = _update(y, c, (w - 1) * c, tf.reshape(top, [-1, (w - 2) * c]))
            y = _update(y, ((h - 1) * w + 1) * c, (h * w - 1) * c, tf.reshape(bottom, [-1, (w - 2) * c]))
            y = tf.raw_ops.TensorStridedSliceUpdate(
                input=tf.reshape(y, [-1, h, w, c]),
                begin=[0, 0, 0, 0],
                end=[0, h, w, c],
                strides=[1, h - 1, w - 1, 1],
                value=tf.reshape(corners, [-1, 2, 2, c]),
                begin_mask=1,
                end_mask=1,
            )
        # Interleave the phases: (B, H, W, a, (b, Cout)) -> (B, H, a, W, (b, Cout)).
        y = tf.transpose(tf.reshape(y, [-1, h, w, 2, c // 2]), [0, 1, 3, 2, 4])
        return tf.reshape(y, [-1, 2 * h, 2 * w, self.channels])


class PaddedConv(tf.Module):
    """conv3x3(pad(x)) + bias: a `MirrorPad2D(1)` and the 3x3 valid convolution after it.

    Args:
        kernel: (3, 3, Cin, Cout) kernel of the valid convolution.
        bias: (Cout,) its bias.
        padding: the 1-pixel padding of x, "reflect", "symmetric" or "zero".
    """

    def __init__(self, kernel: np.ndarray, bias: np.ndarray, padding: str):
        super().__init__()
        self.kernel = tf.constant(np.asarray(kernel, np.float32))
        self.bias = tf.constant(np.asarray(bias, np.float32))
        self.padding = padding

    def __call__(self, x: tf.Tensor) -> tf.Tensor:
        """Args:
            x: (B, H, W, Cin) float32 with static H, W.

        Returns:
            (B, H, W, Cout) float32.
        """
        return tf.nn.bias_add(tf.nn.conv2d(_pad(x, self.padding), self.kernel, 1, "VALID"), self.bias)


class FastRefine(tf.Module):
    """The refine net's computation with `PhaseConv`s; build it with `fast_refine`.

    Args:
        dense: (kernel (D, fs*fs*k), bias (fs*fs*k,)) of `refine_m1`.
        feature_size: fs, the side of M1.
        vertical: for each module, its vertical convolutions, a ReLU between consecutive ones:
            `PaddedConv`s, except that the first of modules 2..4 is a `PhaseConv` that takes the
            previous module's output before its x2 upsampling.
        out: the `PhaseConv` of refine_out, with the last module's upsampling.
    """

    def __init__(self, dense, feature_size: int, vertical: list[list[tf.Module]], out: PhaseConv):
        super().__init__(name="fast_refine")
        self.dense_kernel, self.dense_bias = (tf.constant(np.asarray(w, np.float32)) for w in dense)
        self.feature_size = feature_size
        self.vertical = vertical
        self.out = out

    @tf.function(reduce_retracing=True)
    def __call__(self, inputs) -> tf.Tensor:
        """Args:
            inputs: [object vectors (B, D), skip1 .. skip4 (B, fs*2^(i-1), fs*2^(i-1), c_i)],
                any float dtype, as for the refine net.

        Returns:
            (B, 16fs, 16fs) float32 mask logits.
        """
        objects, *skips = (tf.cast(t, tf.float32) for t in inputs)
        side = 16 * self.feature_size
        # TensorFlow's CPU convolution returns its input unchanged when it is empty.
        return tf.cond(
            tf.shape(objects)[0] > 0, lambda: self._logits(objects, skips), lambda: tf.zeros([0, side, side])
        )

    def _logits(self, objects: tf.Tensor, skips: list[tf.Tensor]) -> tf.Tensor:
        fs = self.feature_size
        m = tf.nn.bias_add(tf.matmul(objects, self.dense_kernel), self.dense_bias)
        m = tf.reshape(m, [-1, fs, fs, self.dense_kernel.shape[1] // (fs * fs)])
        for skip, convs in zip(skips, self.vertical):
            v = convs[0](m)
            for conv in convs[1:]:
                v = conv(tf.nn.relu(v))
            m = tf.nn.relu(v + skip)
        return tf.reshape(self.out(m), [-1, 16 * fs, 16 * fs])


def _layer(refine: keras.Model, name: str, kind: type) -> keras.layers.Layer:
    """The layer `name` of the refine net, checked to be a `kind`."""
    try:
        layer = refine.get_layer(name)
    except ValueError:
        raise ValueError(
            f"The refine net has no layer {name!r}; fast_refine expects a `refine_network` model."
        ) from None
    if not isinstance(layer, kind):
        raise ValueError(f"Layer {name!r} of the refine net is a {type(layer).__name__}, expected a {kind.__name__}.")
    return layer


def _require(condition: bool, layer: keras.layers.Layer, what: str) -> None:
    """Raises a ValueError naming `layer` and saying `what` is wrong with it, unless `condition`."""
    if not condition:
        raise ValueError(
            f"Layer {layer.name!r} of the refine net {what}; fast_refine expects a `refine_network` model."
        )


def _padded_conv(refine: keras.Model, name: str, source) -> tuple[keras.layers.Layer, tuple]:
    """Checks the MirrorPad2D(1) + 3x3 valid Conv2D pair `name` fed by the Keras tensor `source`.

    Returns:
        The convolution layer and (kernel, bias, padding mode).
    """
    pad = _layer(refine, f"{name}_pad", MirrorPad2D)
    _require(pad.input is source and pad.padding == 1, pad, "is not a 1-pixel padding of the previous output")
    conv = _layer(refine, name, keras.layers.Conv2D)
    _require(conv.input is pad.output, conv, f"does not take the output of {pad.name!r}")
    _require(
        tuple(conv.kernel_size) == (3, 3)
        and tuple(conv.strides) == (1, 1)
        and tuple(conv.dilation_rate) == (1, 1)
        and conv.padding == "valid"
        and conv.groups == 1
        and conv.data_format == "channels_last"
        and conv.get_config()["activation"] == "linear",
        conv,
        "is not a linear 3x3 valid convolution with stride 1 on channels-last maps",
    )
    kernel = np.asarray(conv.kernel)
    bias = np.asarray(conv.bias) if conv.use_bias else np.zeros(kernel.shape[3], np.float32)
    return conv, (kernel, bias, pad.mode)


def _skip_relu(refine: keras.Model, i: int, conv: keras.layers.Layer) -> keras.layers.Layer:
    """Checks that module i adds skip input i to `conv` and applies a ReLU; returns the ReLU."""
    add = _layer(refine, f"refine{i}_add", keras.layers.Add)
    _require(
        len(add.input) == 2 and add.input[0] is conv.output and add.input[1] is refine.inputs[i],
        add,
        f"does not add the output of {conv.name!r} and skip input {i}",
    )
    relu = _layer(refine, f"refine{i}_relu", keras.layers.Activation)
    _require(
        relu.input is add.output and relu.get_config()["activation"] == "relu", relu, f"is not a ReLU of {add.name!r}"
    )
    return relu


def _vertical_convs(refine: keras.Model, i: int, source) -> list[tuple[keras.layers.Layer, tuple]]:
    """Checks module i's vertical convolutions refine{i}_vertical_conv1, conv2, ... from the
    Keras tensor `source`, a ReLU refine{i}_vertical_relu{j} after each but the last.

    Returns:
        [(convolution layer, (kernel, bias, padding mode))] in order.
    """
    convs = [_padded_conv(refine, f"refine{i}_vertical_conv1", source)]
    names = {layer.name for layer in refine.layers}
    j = 1
    while f"refine{i}_vertical_relu{j}" in names:
        relu = _layer(refine, f"refine{i}_vertical_relu{j}", keras.layers.Activation)
        conv = convs[-1][0]
        _require(
            relu.input is conv.output and relu.get_config()["activation"] == "relu",
            relu,
            f"is not a ReLU of {conv.name!r}",
        )
        j += 1
        convs.append(_padded_conv(refine, f"refine{i}_vertical_conv{j}", relu.output))
    return convs


def fast_refine(refine: keras.Model) -> FastRefine:
    """A faster equivalent of SharpMask's refine net (`model.get_layer("refine")`), of either
    refinement layout.

    Every upsampling -> mirror padding -> 3x3 convolution becomes a `PhaseConv`; the rest (the
    linear layer M1, the other vertical convolutions, the skip additions, the ReLUs) is computed
    as in the refine net, all in float32. Outputs equal the refine net's up to float rounding, for
    every padding and upsampling mode. The weights are copied: build a new one after changing them.

    Args:
        refine: a model from `sharpmask_tf.sharpmask.refine_network`.

    Returns:
        A `FastRefine` (a `tf.Module`): called with [object vectors (B, D), skip1 .. skip4] like
        the refine net, for any batch size B (also 0, eagerly or inside `tf.function`), it returns
        (B, 16fs, 16fs) float32 logits.

    Raises:
        ValueError: naming the layer, if `refine` does not have the structure of `refine_network`.
    """
    if len(refine.inputs) != 5 or len(refine.outputs) != 1:
        raise ValueError(
            "The refine net must take [object, skip1 .. skip4] and return the logits. Received: a model with "
            f"{len(refine.inputs)} inputs and {len(refine.outputs)} outputs."
        )
    dense = _layer(refine, "refine_m1", keras.layers.Dense)
    _require(
        dense.input is refine.inputs[0] and dense.get_config()["activation"] == "linear",
        dense,
        "is not a linear layer of the object vector",
    )
    reshape = _layer(refine, "refine_m1_reshape", keras.layers.Reshape)
    fs = reshape.target_shape[0]
    _require(reshape.input is dense.output and reshape.target_shape[1] == fs, reshape, "does not make M1 a square map")
    dense_bias = np.asarray(dense.bias) if dense.use_bias else np.zeros(dense.units, np.float32)
    source, up, vertical = reshape.output, None, []
    for i in range(1, len(refine.inputs)):
        convs = _vertical_convs(refine, i, source)
        (_, (kernel, bias, padding)), *rest = convs
        first = PaddedConv(kernel, bias, padding) if up is None else PhaseConv(kernel, bias, up.interpolation, padding)
        vertical.append([first, *(PaddedConv(*weights) for _, weights in rest)])
        relu = _skip_relu(refine, i, convs[-1][0])
        up = _layer(refine, f"refine{i}_up", Upsample2D)
        _require(up.input is relu.output and up.factor == 2, up, f"is not a x2 upsampling of {relu.name!r}")
        source = up.output
    conv, (kernel, bias, padding) = _padded_conv(refine, "refine_out", source)
    squeeze = _layer(refine, "refine_squeeze", keras.layers.Reshape)
    _require(
        squeeze.input is conv.output and refine.outputs[0] is squeeze.output,
        squeeze,
        "does not return the squeezed logits",
    )
    return FastRefine(
        (np.asarray(dense.kernel), dense_bias), fs, vertical, PhaseConv(kernel, bias, up.interpolation, padding)
    )
