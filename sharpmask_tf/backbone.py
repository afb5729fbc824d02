"""The ResNet trunk (conv1 .. conv4) with mirror padding, BatchNorm and named feature taps.

Layer names equal those of `keras.applications.ResNet50`, so ImageNet weights transfer by name.
A trunk *flavour* fixes what a family of pretrained weights needs: the bottleneck's layout, the
convolutions' biases, BatchNorm's epsilon and the input transform the weights were trained on.
"""

from __future__ import annotations

import dataclasses
import re

import keras
import numpy as np

from sharpmask_tf.config import TRUNK_FLAVOURS
from sharpmask_tf.layers import FrozenBatchNormalization, ImageNormalization, MirrorPad2D

RESNET50_BLOCKS = (3, 4, 6)
RESNET50_WIDTH = 64
# The momentum of BatchNorm's moving statistics when it trains: Torch's (and PyTorch's) 0.1 per
# step, in Keras' convention (the share kept).
BN_MOMENTUM = 0.9
# The file `ResNet50(weights="imagenet", include_top=False)` downloads into ~/.keras/models/.
KERAS_RESNET50_FILE = "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
# The trunk weights a conversion of the authors' files writes into its run directory.
TRUNK_WEIGHTS_FILE = "trunk.weights.h5"
_NEEDS_RESNET50 = (
    f"ImageNet weights need the ResNet-50 geometry (model.trunk_blocks={RESNET50_BLOCKS}, "
    f"model.trunk_width={RESNET50_WIDTH})."
)


@dataclasses.dataclass(frozen=True)
class TrunkFlavour:
    """What one family of pretrained ResNet-50 weights fixes in the trunk."""

    stride_on_3x3: bool  # a downsampling bottleneck strides on its 3x3 conv (else on the first 1x1)
    conv_bias: bool  # convolutions have biases
    bn_epsilon: float  # BatchNorm's epsilon
    normalization: str  # the input transform the weights were trained on (an ImageNormalization mode)
    # BatchNorm follows the residual addition (`{block}_out_bn`) instead of ending the branch and
    # the shortcut (fb.resnet.torch's released ResNet-50, its pretrained/README.md)
    bn_after_add: bool = False
    stem_padding: str | None = None  # the 7x7 conv's padding mode, if not the trunk's `padding`


FLAVOURS = {
    # keras.applications.ResNet50: stride on the first 1x1, biased convs, caffe-style input.
    "keras": TrunkFlavour(stride_on_3x3=False, conv_bias=True, bn_epsilon=1.001e-5, normalization="caffe"),
    # torchvision's ResNet-50 and fb.resnet.torch's bottleneck: stride on the 3x3, no conv biases,
    # ImageNet mean/std RGB input.
    "torch": TrunkFlavour(stride_on_3x3=True, conv_bias=False, bn_epsilon=1e-5, normalization="torch"),
    # The authors' release (resnet-50.t7, and the DeepMask / SharpMask model.t7 built on it): the
    # torch layout with biased convs and BatchNorm after every addition.
    "reference": TrunkFlavour(
        stride_on_3x3=True, conv_bias=True, bn_epsilon=1e-5, normalization="torch", bn_after_add=True
    ),
    # The PyTorch port's DeepMask (foolwood/deepmask-pytorch): torchvision's layout with a
    # symmetric-padded 7x7 conv (its 3x3 convs reflect-pad: model.padding=reflect).
    "deepmask_pytorch": TrunkFlavour(
        stride_on_3x3=True, conv_bias=False, bn_epsilon=1e-5, normalization="torch", stem_padding="symmetric"
    ),
}


def trunk_flavour(flavour: str) -> TrunkFlavour:
    """The `TrunkFlavour` of a flavour name.

    Raises:
        ValueError: for a name not in `config.TRUNK_FLAVOURS`.
    """
    if flavour not in FLAVOURS:
        raise ValueError(f"The trunk flavour must be one of {TRUNK_FLAVOURS}. Received: flavour={flavour!r}")
    return FLAVOURS[flavour]


def input_normalization(flavour: str, pretrained: bool = True, name: str = "normalize") -> ImageNormalization:
    """The layer mapping RGB in [0, 1] to the input of a trunk of this flavour.

    Pretrained weights get the input they were trained on; a trunk trained from scratch gets
    unit-scale ImageNet mean/std RGB whatever the flavour (caffe's 0..255 buys nothing without
    its weights and costs float precision in BatchNorm's batch statistics).
    """
    return ImageNormalization(trunk_flavour(flavour).normalization if pretrained else "torch", name=name)


class _Builder:
    """Builds the trunk's layers with one flavour's choices, one padding and one BatchNorm kind."""

    def __init__(self, flavour: TrunkFlavour, padding: str, frozen_batch_norm: bool):
        self.flavour, self.padding, self.frozen_batch_norm = flavour, padding, frozen_batch_norm

    def conv(self, x, filters: int, kernel: int, name: str, strides: int = 1, padding: str | None = None):
        """A convolution whose spatial padding (for kernels > 1) is an explicit mirror/zero pad."""
        if kernel > 1:
            pad_name = f"{name}_pad" if name != "conv1_conv" else "conv1_pad"
            x = MirrorPad2D(kernel // 2, padding or self.padding, name=pad_name)(x)
        return keras.layers.Conv2D(
            filters, kernel, strides=strides, padding="valid", use_bias=self.flavour.conv_bias, name=name
        )(x)

    def bn(self, x, name: str):
        if self.frozen_batch_norm:
            return FrozenBatchNormalization(axis=-1, epsilon=self.flavour.bn_epsilon, name=name)(x)
        # Batch statistics of the global batch under tf.distribute, not of each replica's share.
        return keras.layers.BatchNormalization(
            axis=-1, epsilon=self.flavour.bn_epsilon, momentum=BN_MOMENTUM, synchronized=True, name=name
        )(x)

    def block(self, x, filters: int, stride: int, shortcut_conv: bool, name: str):
        """The bottleneck block, Keras ResNet50's layer names whatever the flavour."""
        post_add = self.flavour.bn_after_add
        if shortcut_conv:
            shortcut = self.conv(x, 4 * filters, 1, f"{name}_0_conv", strides=stride)
            shortcut = shortcut if post_add else self.bn(shortcut, f"{name}_0_bn")
        else:
            shortcut = x
        first, middle = (1, stride) if self.flavour.stride_on_3x3 else (stride, 1)
        x = self.conv(x, filters, 1, f"{name}_1_conv", strides=first)
        x = keras.layers.Activation("relu", name=f"{name}_1_relu")(self.bn(x, f"{name}_1_bn"))
        x = self.conv(x, filters, 3, f"{name}_2_conv", strides=middle)
        x = keras.layers.Activation("relu", name=f"{name}_2_relu")(self.bn(x, f"{name}_2_bn"))
        x = self.conv(x, 4 * filters, 1, f"{name}_3_conv")
        x = keras.layers.Add(name=f"{name}_add")([shortcut, x if post_add else self.bn(x, f"{name}_3_bn")])
        x = self.bn(x, f"{name}_out_bn") if post_add else x
        return keras.layers.Activation("relu", name=f"{name}_out")(x)


def resnet_trunk(
    blocks: tuple[int, int, int] = RESNET50_BLOCKS,
    width: int = RESNET50_WIDTH,
    padding: str = "reflect",
    flavour: str = "keras",
    frozen_batch_norm: bool = True,
    name: str = "trunk",
) -> keras.Model:
    """ResNet trunk through conv4, on normalised images of any size.

    Args:
        blocks: residual blocks in conv2_x, conv3_x and conv4_x ((3, 4, 6) is ResNet-50).
        width: conv1 filters; stage widths are width, 2*width, 4*width (x4 at block outputs).
        padding: `reflect`, `symmetric` or `zero` for every 3x3/7x7 convolution and the pool.
        flavour: a name in `config.TRUNK_FLAVOURS` (see `FLAVOURS`): `keras` (Keras ResNet50's
            layout), `torch` (torchvision's), `reference` (the authors' resnet-50.t7) or
            `deepmask_pytorch` (the PyTorch port's). Its input is what `input_normalization(flavour)`
            makes of RGB in [0, 1].
        frozen_batch_norm: BatchNorm is a fixed affine transform of its moving statistics
            (`FrozenBatchNormalization`, for pretrained weights); False: BatchNorm normalises with
            the batch's statistics, synchronised across replicas, in training calls and updates
            its moving statistics, which calls with `training=False` use (for a trunk trained from
            scratch).
        name: the model's name.

    Returns:
        A functional model from (B, H, W, 3) normalised images to a dict of taps `conv1`..`conv4`
        at strides 2, 4, 8, 16 (`sharpmask_tf.config.TAP_STRIDES`) with width, 4*width, 8*width and 16*width channels.

    Raises:
        ValueError: for an unknown flavour.
    """
    build = _Builder(trunk_flavour(flavour), padding, frozen_batch_norm)
    inputs = keras.Input((None, None, 3), name="trunk_input")
    x = build.conv(inputs, width, 7, "conv1_conv", strides=2, padding=build.flavour.stem_padding)
    x = keras.layers.Activation("relu", name="conv1_relu")(build.bn(x, "conv1_bn"))
    conv1 = x
    x = MirrorPad2D(1, padding, name="pool1_pad")(x)
    x = keras.layers.MaxPooling2D(3, strides=2, name="pool1_pool")(x)
    taps = {"conv1": conv1}
    for stage, (n_blocks, mult, stride) in enumerate(zip(blocks, (1, 2, 4), (1, 2, 2)), start=2):
        for b in range(1, n_blocks + 1):
            x = build.block(
                x, width * mult, stride if b == 1 else 1, shortcut_conv=b == 1, name=f"conv{stage}_block{b}"
            )
        taps[f"conv{stage}"] = x
    return keras.Model(inputs, taps, name=name)


def load_trunk_weights(trunk: keras.Model, weights: str, flavour: str) -> list[str]:
    """Loads a flavour's pretrained ResNet-50 weights into a trunk of that flavour.

    Args:
        trunk: a model from `resnet_trunk(flavour=flavour)` with the ResNet-50 geometry.
        weights: for `keras`, "imagenet" or a Keras ResNet50 weights file (`load_imagenet_weights`);
            for `torch`, a torchvision-format state-dict file (`load_torchvision_weights`); for
            `reference` and `deepmask_pytorch`, the trunk's Keras weights file (`TRUNK_WEIGHTS_FILE`)
            that `python -m sharpmask_tf.convert` writes from the authors' files.
        flavour: the trunk's flavour.

    Returns:
        The names of the layers whose weights were copied.
    """
    trunk_flavour(flavour)
    if flavour == "keras":
        return load_imagenet_weights(trunk, weights)
    if flavour == "torch":
        return load_torchvision_weights(trunk, weights)
    trunk.load_weights(weights)
    return [layer.name for layer in trunk.layers if layer.weights]


def _set_layer_weights(layer: keras.layers.Layer, values: list[np.ndarray], source: str) -> None:
    have = layer.get_weights()
    if len(have) != len(values):
        raise ValueError(
            f"Layer {layer.name!r} has {len(have)} tensors and {source} gives it {len(values)}: the trunk's "
            f"flavour (model.trunk_flavour) is not that of the weights."
        )
    for h, v in zip(have, values):
        if h.shape != v.shape:
            raise ValueError(
                f"Shape mismatch in {layer.name!r}: trunk {h.shape} vs {source} {v.shape}. {_NEEDS_RESNET50}"
            )
    layer.set_weights(values)


def load_imagenet_weights(trunk: keras.Model, weights: str = "imagenet") -> list[str]:
    """Copies Keras' ResNet50 weights into a ResNet-50-shaped `keras`-flavour trunk, by layer name.

    The weights expect caffe-style input, which `input_normalization("keras")` makes.

    Args:
        trunk: a model from `resnet_trunk(flavour="keras")` with the ResNet-50 geometry.
        weights: "imagenet" (Keras downloads them once into ~/.keras/models/; needs the internet)
            or the path of a weights file for `keras.applications.ResNet50(include_top=False)`.

    Returns:
        The names of the layers whose weights were copied.

    Raises:
        ValueError: if the trunk is not ResNet-50 shaped or a tensor's shape disagrees.
        OSError: if "imagenet" weights cannot be downloaded; it says how to pass a local file.
    """
    try:
        reference = keras.applications.ResNet50(include_top=False, weights=weights, input_shape=(None, None, 3))
    except Exception as err:
        if weights != "imagenet":
            raise
        raise OSError(
            f"Could not get Keras' ImageNet ResNet-50 weights ({err}). Without internet, copy {KERAS_RESNET50_FILE} "
            f"(Keras keeps it in ~/.keras/models/ on a machine that downloaded it) to this machine and pass "
            f"--set model.trunk_weights=/path/{KERAS_RESNET50_FILE}, or --set model.trunk_weights=null to train "
            f"the trunk from scratch."
        ) from err
    ours = {layer.name: layer for layer in trunk.layers}
    copied = []
    for layer in reference.layers:
        values = layer.get_weights()
        if not values or layer.name.startswith("conv5"):
            continue
        if layer.name not in ours:
            raise ValueError(f"The trunk has no layer {layer.name!r}. {_NEEDS_RESNET50}")
        _set_layer_weights(ours[layer.name], values, "the weights")
        copied.append(layer.name)
    return copied


# torchvision's ResNet-50 parameter prefixes per trunk layer: conv1/bn1, then layer<s-1>.<b-1>.
_TORCH_BLOCK_LAYER = re.compile(r"conv(\d)_block(\d+)_(\d)_(conv|bn)")
_TORCH_BN = ("weight", "bias", "running_mean", "running_var")  # gamma, beta, moving mean, variance


def _torchvision_prefix(layer_name: str) -> str | None:
    """The torchvision ResNet-50 module a trunk layer corresponds to (None: none)."""
    if layer_name in ("conv1_conv", "conv1_bn"):
        return "conv1" if layer_name == "conv1_conv" else "bn1"
    match = _TORCH_BLOCK_LAYER.fullmatch(layer_name)
    if match is None:
        return None
    stage, block, index, kind = int(match[1]), int(match[2]), int(match[3]), match[4]
    module = f"layer{stage - 1}.{block - 1}"
    if index == 0:
        return f"{module}.downsample.{0 if kind == 'conv' else 1}"
    return f"{module}.{kind}{index}"


def read_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a PyTorch state-dict file (`.pth`), as NumPy arrays.

    Read with `torch.load(weights_only=True)`, which unpickles tensors and containers only.

    Raises:
        ImportError: if the `torch` package is not installed.
        ValueError: if the file does not hold a state dict.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError(
            f"Reading the PyTorch weights file {path} needs the `torch` package, which is not installed: "
            f"pip install torch."
        ) from err
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"Expected a state dict (parameter name -> tensor) in {path}. Received: {type(state).__name__}"
        )
    return {k: v.detach().numpy() for k, v in state.items()}


def load_torchvision_weights(trunk: keras.Model, path: str) -> list[str]:
    """Copies a torchvision-format ResNet-50 state dict into a `torch`-flavour trunk.

    conv1/bn1 and layer1..layer3 fill conv1 and conv2_x..conv4_x; layer4 and fc are not used.
    Kernels turn from (out, in, h, w) to (h, w, in, out).

    Args:
        trunk: a model from `resnet_trunk(flavour="torch")` with the ResNet-50 geometry.
        path: a `.pth` file of `torchvision.models.resnet50().state_dict()`'s layout.

    Returns:
        The names of the layers whose weights were copied.

    Raises:
        ImportError: if `torch` is not installed.
        ValueError: if a tensor is missing, left over, or of another shape.
    """
    state = read_torch_state_dict(path)
    used = set()
    copied = []
    for layer in trunk.layers:
        prefix = _torchvision_prefix(layer.name)
        if prefix is None or not layer.weights:
            continue
        keys = [f"{prefix}.weight"] if isinstance(layer, keras.layers.Conv2D) else [f"{prefix}.{k}" for k in _TORCH_BN]
        missing = [k for k in keys if k not in state]
        if missing:
            raise ValueError(f"{path} has no {missing} for layer {layer.name!r}. {_NEEDS_RESNET50}")
        values = [state[k].transpose(2, 3, 1, 0) if state[k].ndim == 4 else state[k] for k in keys]
        _set_layer_weights(layer, values, path)
        used.update(keys)
        copied.append(layer.name)
    trunk_keys = re.compile(r"(conv1|bn1|layer[123])\..*")
    left = sorted(
        k for k in state if trunk_keys.fullmatch(k) and k not in used and not k.endswith("num_batches_tracked")
    )
    if left:
        raise ValueError(f"The trunk has no layer for {left[:4]} ... of {path}. {_NEEDS_RESNET50}")
    return copied
