"""Custom layers. All are serialisable and work on inputs of unknown spatial size."""

from __future__ import annotations

import keras
import tensorflow as tf

from sharpmask_tf.config import PADDING_MODES, UPSAMPLING_MODES

# ImageNet statistics; the models take RGB in [0, 1] and normalise inside the graph.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The per-channel mean `keras.applications.resnet.preprocess_input` subtracts from BGR in 0..255.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
# The input transforms pretrained trunks expect (the names of keras.applications' preprocessing
# modes): `torch` is RGB (x - mean) / std, `caffe` is BGR 255 * x - mean.
NORMALIZATION_MODES = ("torch", "caffe")

_TF_PAD_MODES = {"reflect": "REFLECT", "symmetric": "SYMMETRIC", "zero": "CONSTANT"}


def mirror_index(index, size, mode: str):
    """The pixel of a side of `size` pixels that `index` reads under `MirrorPad2D`'s `mode`.

    `reflect` mirrors about the edge pixels' centres (-1 reads 1, size reads size - 2),
    `symmetric` about the edges themselves (-1 reads 0, size reads size - 1); an index inside the
    side reads itself. One mirroring: -size < index < 2*size - 1 for `reflect` (and size >= 2),
    -size <= index < 2*size for `symmetric`.

    Args:
        index: int, NumPy array or integer tensor of indices.
        size: the side's length (int or integer tensor).
        mode: "reflect" or "symmetric".

    Returns:
        The mirrored indices, of the type of `index`.
    """
    if mode == "reflect":
        fold = abs  # about pixel 0's centre
    elif mode == "symmetric":
        fold = lambda i: abs(2 * i + 1) // 2  # noqa: E731  (about pixel 0's outer edge)
    else:
        raise ValueError(f"Only reflect and symmetric padding mirror pixels. Received: mode={mode!r}")
    return size - 1 - fold(size - 1 - fold(index))


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class MirrorPad2D(keras.layers.Layer):
    """Pads height and width of an NHWC tensor by mirroring (or zeros).

    `reflect` mirrors without repeating the edge pixel (the paper's reflective padding),
    `symmetric` repeats it (the 2016 release's choice), `zero` pads with zeros.
    """

    def __init__(self, padding: int = 1, mode: str = "reflect", **kwargs):
        super().__init__(**kwargs)
        if mode not in PADDING_MODES:
            raise ValueError(f"padding mode must be one of {PADDING_MODES}. Received: mode={mode!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0. Received: padding={padding!r}")
        self.padding = int(padding)
        self.mode = mode

    def call(self, x):
        p = self.padding
        return tf.pad(x, [[0, 0], [p, p], [p, p], [0, 0]], mode=_TF_PAD_MODES[self.mode])

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        grow = lambda n: None if n is None else n + 2 * self.padding  # noqa: E731
        return (b, grow(h), grow(w), c)

    def get_config(self):
        return {**super().get_config(), "padding": self.padding, "mode": self.mode}


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class CenterCrop2D(keras.layers.Layer):
    """Removes `crop` pixels from every side of an NHWC tensor."""

    def __init__(self, crop: int = 1, **kwargs):
        super().__init__(**kwargs)
        if crop < 0:
            raise ValueError(f"crop must be >= 0. Received: crop={crop!r}")
        self.crop = int(crop)

    def call(self, x):
        c = self.crop
        if c == 0:
            return x
        return x[:, c:-c, c:-c, :]

    def compute_output_shape(self, input_shape):
        b, h, w, ch = input_shape
        shrink = lambda n: None if n is None else n - 2 * self.crop  # noqa: E731
        return (b, shrink(h), shrink(w), ch)

    def get_config(self):
        return {**super().get_config(), "crop": self.crop}


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class GradientScale(keras.layers.Layer):
    """The identity forward; backward, the gradient times `factor` (0 stops it).

    The forward value is the input itself, bit for bit: stop_gradient(x) + factor * (x -
    stop_gradient(x)) adds an exact zero.
    """

    def __init__(self, factor: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        if not 0.0 <= factor <= 1.0:
            raise ValueError(f"factor must be in [0, 1]. Received: factor={factor!r}")
        self.factor = float(factor)

    def call(self, x):
        held = keras.ops.stop_gradient(x)
        return held + keras.ops.cast(self.factor, x.dtype) * (x - held)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class Upsample2D(keras.layers.Layer):
    """Integer-factor upsampling, bilinear or nearest, for any (also unknown) spatial size.

    Keras 3.15's `UpSampling2D(interpolation="bilinear")` fails when height/width are unknown;
    this computes the output size from the tensor's runtime shape.
    """

    def __init__(self, factor: int = 2, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in UPSAMPLING_MODES:
            raise ValueError(
                f"interpolation must be one of {UPSAMPLING_MODES}. Received: interpolation={interpolation!r}"
            )
        if factor < 1:
            raise ValueError(f"factor must be >= 1. Received: factor={factor!r}")
        self.factor = int(factor)
        self.interpolation = interpolation

    def call(self, x):
        size = tf.shape(x)[1:3] * self.factor
        method = "bilinear" if self.interpolation == "bilinear" else "nearest"
        # Resize in float32: XLA refuses half-precision bilinear resize under mixed precision.
        return tf.cast(tf.image.resize(tf.cast(x, tf.float32), size, method=method), x.dtype)

    def compute_output_shape(self, input_shape):
        b, h, w, c = input_shape
        grow = lambda n: None if n is None else n * self.factor  # noqa: E731
        return (b, grow(h), grow(w), c)

    def get_config(self):
        return {**super().get_config(), "factor": self.factor, "interpolation": self.interpolation}


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class ImageNormalization(keras.layers.Layer):
    """Maps RGB in [0, 1] to the input a pretrained trunk was trained on.

    `mode="torch"` gives ImageNet-normalised RGB, (x - IMAGENET_MEAN) / IMAGENET_STD (torchvision's
    and fb.resnet.torch's input); `mode="caffe"` gives BGR in 0..255 less CAFFE_MEAN_BGR, what
    `keras.applications.resnet.preprocess_input` makes of 255 * x (Keras' ResNet50 weights' input).
    """

    def __init__(self, mode: str = "torch", **kwargs):
        super().__init__(**kwargs)
        if mode not in NORMALIZATION_MODES:
            raise ValueError(f"mode must be one of {NORMALIZATION_MODES}. Received: mode={mode!r}")
        self.mode = mode

    def call(self, x):
        if self.mode == "caffe":
            return 255.0 * x[..., ::-1] - tf.constant(CAFFE_MEAN_BGR, dtype=x.dtype)
        mean = tf.constant(IMAGENET_MEAN, dtype=x.dtype)
        std = tf.constant(IMAGENET_STD, dtype=x.dtype)
        return (x - mean) / std

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class FrozenBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization used as a fixed affine transform: never trains, always uses the
    moving statistics, whatever `training` says. Its weights have BatchNormalization's names
    so ImageNet weights transfer unchanged."""

    def __init__(self, **kwargs):
        kwargs["trainable"] = False
        super().__init__(**kwargs)

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)
