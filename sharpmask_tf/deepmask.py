"""DeepMask: the ResNet trunk and head C, giving a coarse mask and an objectness score per patch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import keras

from sharpmask_tf.backbone import input_normalization, resnet_trunk
from sharpmask_tf.config import TAP_STRIDES, TRUNK_STRIDE
from sharpmask_tf.layers import CenterCrop2D, GradientScale

# Layers of head C, by role. Inference rebuilds them as convolutions from these names.
HEAD_REDUCE = "head_reduce"
HEAD_OBJECT = "head_object"
MASK_LOGITS = "mask_logits"
SCORE_HIDDEN = "score_hidden"
SCORE_LOGITS = "score_logits"
SCORE_GRADIENT = "score_gradient"


def deepmask_graph(
    patch_size: int,
    context: int,
    trunk_blocks: tuple[int, int, int],
    trunk_width: int,
    padding: str,
    head_channels: int,
    object_dim: int,
    mask_size: int,
    score_hidden: int,
    dropout: float,
    trunk_flavour: str = "keras",
    pretrained_trunk: bool = True,
    score_gradient: float = 1.0,
):
    """Builds DeepMask's tensors; SharpMask extends the same graph. A `score_gradient` under 1
    puts a `GradientScale` layer ("score_gradient") at the score branch's input.

    Returns:
        (inputs, taps, object_vector, outputs): the (B, S, S, 3) patch input with
        S = patch_size + 2*context, the trunk's dict of uncropped feature taps, the (B, object_dim)
        object vector, and the dict {"masks": (B, mask_size, mask_size), "scores": (B, 1)} of logits.
    """
    input_size = patch_size + 2 * context
    inputs = keras.Input((input_size, input_size, 3), name="images")
    trunk = resnet_trunk(
        trunk_blocks, trunk_width, padding, trunk_flavour, frozen_batch_norm=pretrained_trunk, name="trunk"
    )
    taps = trunk(input_normalization(trunk_flavour, pretrained_trunk, name="normalize")(inputs))
    x = CenterCrop2D(context // TRUNK_STRIDE, name="head_crop")(taps["conv4"])
    x = keras.layers.Conv2D(head_channels, 1, activation="relu", name=HEAD_REDUCE)(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    object_vector = keras.layers.Dense(object_dim, name=HEAD_OBJECT)(x)

    m = keras.layers.Dense(mask_size * mask_size, name=MASK_LOGITS)(object_vector)
    m = keras.layers.Reshape((mask_size, mask_size), name="mask_reshape")(m)
    masks = keras.layers.Activation("linear", dtype="float32", name="masks")(m)

    s = object_vector
    if score_gradient != 1.0:
        s = GradientScale(score_gradient, name=SCORE_GRADIENT)(s)
    s = keras.layers.Dropout(dropout, name="score_dropout1")(s)
    s = keras.layers.Dense(score_hidden, activation="relu", name=SCORE_HIDDEN)(s)
    s = keras.layers.Dropout(dropout, name="score_dropout2")(s)
    s = keras.layers.Dense(1, name=SCORE_LOGITS)(s)
    scores = keras.layers.Activation("linear", dtype="float32", name="scores")(s)
    return inputs, taps, object_vector, {"masks": masks, "scores": scores}


@contextlib.contextmanager
def dtype_policy_scope(dtype: str | None) -> Iterator[None]:
    """Makes `dtype` (a Keras dtype policy name; None keeps the current one) the global dtype
    policy inside the block, so layers built there take it; the previous policy comes back after."""
    previous = keras.config.dtype_policy()
    if dtype is not None:
        keras.config.set_dtype_policy(dtype)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class DeepMask(keras.Model):
    """DeepMask with head C, a functional model that keeps its constructor's arguments.

    Takes (B, S, S, 3) RGB patches in [0, 1], S = patch_size + 2*context (192 for the paper),
    and returns {"masks": (B, mask_size, mask_size), "scores": (B, 1)}, both logits.

    Args:
        patch_size: side of the window the mask covers (iSz), a multiple of the trunk stride.
        context: context added on every side of the window, a multiple of the trunk stride.
        trunk_blocks: residual blocks in conv2_x, conv3_x and conv4_x ((3, 4, 6) is ResNet-50).
        trunk_width: conv1 filters; the stages scale from it as in ResNet-50.
        padding: `reflect`, `symmetric` or `zero` for every 3x3/7x7 trunk convolution.
        head_channels: the 1x1 reduction of the conv4 features.
        object_dim: length of the object vector.
        mask_size: side of the coarse mask logits (oSz).
        score_hidden: hidden units of the score branch.
        dropout: dropout rate of the score branch.
        trunk_flavour: `backbone.resnet_trunk`'s `flavour` ("keras" or "torch"): the block layout
            and the input transform its pretrained weights expect.
        pretrained_trunk: whether the trunk gets pretrained weights: True freezes its BatchNorm
            and picks the flavour's input transform; False trains BatchNorm with batch statistics
            on mean/std RGB input (`backbone.input_normalization`).
        score_gradient: the factor on the score loss's gradient where it enters the object vector
            (so in the head and trunk); 1 is the paper's joint training, 0 trains the score branch
            alone on features the masks shape. The forward pass is the same for any factor.
        name: the model's name.
        dtype: the dtype policy its layers are built with (None: the global policy); the masks and
            scores are float32 under any policy.
    """

    # The constructor arguments that `get_config` returns (besides name, trainable and dtype).
    ARGUMENTS = (
        "patch_size",
        "context",
        "trunk_blocks",
        "trunk_width",
        "padding",
        "head_channels",
        "object_dim",
        "mask_size",
        "score_hidden",
        "dropout",
        "trunk_flavour",
        "pretrained_trunk",
        "score_gradient",
    )

    def __init__(
        self,
        patch_size: int = 160,
        context: int = 16,
        trunk_blocks: tuple[int, int, int] = (3, 4, 6),
        trunk_width: int = 64,
        padding: str = "reflect",
        head_channels: int = 128,
        object_dim: int = 512,
        mask_size: int = 56,
        score_hidden: int = 1024,
        dropout: float = 0.5,
        trunk_flavour: str = "keras",
        pretrained_trunk: bool = True,
        score_gradient: float = 1.0,
        name: str = "deepmask",
        dtype: str | None = None,
        **kwargs,
    ):
        # A subclass passes its own `ARGUMENTS` through kwargs; they are stored with these.
        given = {**locals(), **kwargs}
        arguments = {key: given[key] for key in self.ARGUMENTS}
        arguments["trunk_blocks"] = tuple(trunk_blocks)
        arguments["pretrained_trunk"] = bool(pretrained_trunk)
        arguments["score_gradient"] = float(score_gradient)
        kwargs = {key: value for key, value in kwargs.items() if key not in arguments}
        with dtype_policy_scope(dtype):
            inputs, outputs, features = self._graph(arguments)
            super().__init__(inputs, outputs, name=name, **kwargs)
        for key, value in arguments.items():
            setattr(self, key, value)
        # Where stage 2's gradients stop: the object vector and the trunk's taps in this graph.
        self._head_features = features

    def _graph(self, arguments: dict):
        """The layers and functional graph of the model `arguments` describe.

        Returns:
            (inputs, outputs, [object vector, trunk taps conv1..conv4]).
        """
        inputs, taps, object_vector, outputs = deepmask_graph(**{key: arguments[key] for key in DeepMask.ARGUMENTS})
        return inputs, outputs, [object_vector, *(taps[t] for t in TAP_STRIDES)]

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "dtype": self.dtype_policy.name,
            **{key: getattr(self, key) for key in self.ARGUMENTS},
        }
