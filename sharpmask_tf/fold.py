"""Inference copies of trained networks: BatchNorm folded into the convolutions, mirror pads
folded into the convolutions after them, biases added where the graph optimiser fuses them.

The copies compute what the originals do up to float rounding, in fewer elementwise passes;
they are built in memory for `sharpmask_tf.inference` and never saved.
"""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from sharpmask_tf.layers import MirrorPad2D, mirror_index


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
    folded_names, pads, border_convs = _foldable(trunk)
    folded_bn = {f"{name}_bn" for name in folded_names}

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
    _copy_weights(trunk, copy, folded_names)
    return copy


def _foldable(trunk: keras.Model) -> tuple[set[str], set[str], dict[str, str]]:
    """What `fold_batch_norm` folds: the `<name>` of every `<name>_bn` after a `<name>_conv`, the
    names of the mirror pads to drop, and the mode of each convolution that takes a pad's place."""
    layers = {layer.name: layer for layer in trunk.layers}
    folded_names = {
        layer.name[: -len("_bn")]
        for layer in trunk.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        and layer.name.endswith("_bn")
        and isinstance(layers.get(layer.name[: -len("_bn")] + "_conv"), keras.layers.Conv2D)
    }
    pads, border_convs = set(), {}
    consumers = _consumers(trunk)
    for layer in trunk.layers:
        conv = consumers[layer.name][0] if len(consumers[layer.name]) == 1 else None
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
    return folded_names, pads, border_convs


def _consumers(model: keras.Model) -> dict[str, list[keras.layers.Layer]]:
    """The layers that take each layer's output in a functional model, by the producer's name.

    Read from each layer's public `input` and `output` tensors (the first call's: the models
    folded here call every layer once).
    """
    producers = {id(t): layer.name for layer in model.layers for t in keras.tree.flatten(layer.output)}
    consumers = {layer.name: [] for layer in model.layers}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        for t in keras.tree.flatten(layer.input):
            if id(t) in producers:
                consumers[producers[id(t)]].append(layer)
    return consumers


def _copy_weights(trunk: keras.Model, copy: keras.Model, folded_names: set[str]) -> None:
    """Sets the copy's weights from the trunk's, folding each `<name>_bn` into `<name>_conv`."""
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
        source_rows = mirror_index(rows[:, None, None] + taps[None, :, None], h, self.border)
        source_cols = mirror_index(cols[:, None, None] + taps[None, None, :], w, self.border)
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
