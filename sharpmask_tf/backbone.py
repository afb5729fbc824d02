"""The ResNet trunk (conv1 .. conv4) with mirror padding, frozen BatchNorm and named feature taps.

Layer names equal those of `keras.applications.ResNet50`, so ImageNet weights transfer by name.
"""

from __future__ import annotations

import keras

from sharpmask_tf.layers import FrozenBatchNormalization, MirrorPad2D

# keras.applications.ResNet50's BatchNorm epsilon.
BN_EPSILON = 1.001e-5
RESNET50_BLOCKS = (3, 4, 6)
RESNET50_WIDTH = 64
_NEEDS_RESNET50 = (
    f"ImageNet weights need the ResNet-50 geometry (model.trunk_blocks={RESNET50_BLOCKS}, "
    f"model.trunk_width={RESNET50_WIDTH})."
)


def _conv(x, filters: int, kernel: int, name: str, padding: str, strides: int = 1):
    """A convolution whose spatial padding (for kernels > 1) is an explicit mirror/zero pad."""
    if kernel > 1:
        x = MirrorPad2D(kernel // 2, padding, name=f"{name}_pad" if name != "conv1_conv" else "conv1_pad")(x)
    return keras.layers.Conv2D(filters, kernel, strides=strides, padding="valid", name=name)(x)


def _bn(x, name: str):
    return FrozenBatchNormalization(axis=-1, epsilon=BN_EPSILON, name=name)(x)


def _block(x, filters: int, stride: int, shortcut_conv: bool, name: str, padding: str):
    """Keras ResNet50's bottleneck block (stride on the first 1x1 conv), same layer names."""
    if shortcut_conv:
        shortcut = _conv(x, 4 * filters, 1, f"{name}_0_conv", padding, strides=stride)
        shortcut = _bn(shortcut, f"{name}_0_bn")
    else:
        shortcut = x
    x = _conv(x, filters, 1, f"{name}_1_conv", padding, strides=stride)
    x = keras.layers.Activation("relu", name=f"{name}_1_relu")(_bn(x, f"{name}_1_bn"))
    x = _conv(x, filters, 3, f"{name}_2_conv", padding)
    x = keras.layers.Activation("relu", name=f"{name}_2_relu")(_bn(x, f"{name}_2_bn"))
    x = _conv(x, 4 * filters, 1, f"{name}_3_conv", padding)
    x = _bn(x, f"{name}_3_bn")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.Activation("relu", name=f"{name}_out")(x)


def resnet_trunk(
    blocks: tuple[int, int, int] = RESNET50_BLOCKS,
    width: int = RESNET50_WIDTH,
    padding: str = "reflect",
    name: str = "trunk",
) -> keras.Model:
    """ResNet trunk through conv4, on normalised images of any size.

    Args:
        blocks: residual blocks in conv2_x, conv3_x and conv4_x ((3, 4, 6) is ResNet-50).
        width: conv1 filters; stage widths are width, 2*width, 4*width (x4 at block outputs).
        padding: `reflect`, `symmetric` or `zero` for every 3x3/7x7 convolution and the pool.
        name: the model's name.

    Returns:
        A functional model from (B, H, W, 3) normalised images to a dict of taps `conv1`..`conv4`
        at strides 2, 4, 8, 16 (`sharpmask_tf.config.TAP_STRIDES`) with width, 4*width, 8*width and 16*width channels.
    """
    inputs = keras.Input((None, None, 3), name="trunk_input")
    x = _conv(inputs, width, 7, "conv1_conv", padding, strides=2)
    x = keras.layers.Activation("relu", name="conv1_relu")(_bn(x, "conv1_bn"))
    conv1 = x
    x = MirrorPad2D(1, padding, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    taps = {"conv1": conv1}
    for stage, (n_blocks, mult, stride) in enumerate(zip(blocks, (1, 2, 4), (1, 2, 2)), start=2):
        for b in range(1, n_blocks + 1):
            x = _block(
                x,
                width * mult,
                stride if b == 1 else 1,
                shortcut_conv=b == 1,
                name=f"conv{stage}_block{b}",
                padding=padding,
            )
        taps[f"conv{stage}"] = x
    return keras.Model(inputs, taps, name=name)


def load_imagenet_weights(trunk: keras.Model, weights: str = "imagenet") -> list[str]:
    """Copies ResNet-50 weights into a ResNet-50-shaped trunk, layer by layer, by name.

    Args:
        trunk: a model from `resnet_trunk` with the ResNet-50 geometry.
        weights: "imagenet" (Keras downloads them; needs the internet) or the path of a weights
            file for `keras.applications.ResNet50(include_top=False)`.

    Returns:
        The names of the layers whose weights were copied.

    Raises:
        ValueError: if the trunk is not ResNet-50 shaped or a tensor's shape disagrees.
    """
    reference = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(None, None, 3))
    ours = {layer.name: layer for layer in trunk.layers}
    copied = []
    for layer in reference.layers:
        values = layer.get_weights()
        if not values or layer.name.startswith("conv5"):
            continue
        if layer.name not in ours:
            raise ValueError(f"The trunk has no layer {layer.name!r}. {_NEEDS_RESNET50}")
        target = ours[layer.name]
        for have, want in zip(target.get_weights(), values):
            if have.shape != want.shape:
                raise ValueError(
                    f"Shape mismatch in {layer.name!r}: trunk {have.shape} vs weights {want.shape}. {_NEEDS_RESNET50}"
                )
        target.set_weights(values)
        copied.append(layer.name)
    return copied
