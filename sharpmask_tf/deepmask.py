"""DeepMask: the ResNet trunk and head C, giving a coarse mask and an objectness score per patch."""

from __future__ import annotations

import keras

from sharpmask_tf.backbone import TAP_STRIDES, input_normalization, resnet_trunk
from sharpmask_tf.layers import CenterCrop2D

# Layers of head C, by role. Inference rebuilds them as convolutions from these names.
HEAD_REDUCE = "head_reduce"
HEAD_OBJECT = "head_object"
MASK_LOGITS = "mask_logits"
SCORE_HIDDEN = "score_hidden"
SCORE_LOGITS = "score_logits"


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
):
    """Builds DeepMask's tensors; SharpMask extends the same graph.

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
    x = CenterCrop2D(context // TAP_STRIDES["conv4"], name="head_crop")(taps["conv4"])
    x = keras.layers.Conv2D(head_channels, 1, activation="relu", name=HEAD_REDUCE)(x)
    x = keras.layers.Flatten(name="head_flatten")(x)
    object_vector = keras.layers.Dense(object_dim, name=HEAD_OBJECT)(x)

    m = keras.layers.Dense(mask_size * mask_size, name=MASK_LOGITS)(object_vector)
    m = keras.layers.Reshape((mask_size, mask_size), name="mask_reshape")(m)
    masks = keras.layers.Activation("linear", dtype="float32", name="masks")(m)

    s = keras.layers.Dropout(dropout, name="score_dropout1")(object_vector)
    s = keras.layers.Dense(score_hidden, activation="relu", name=SCORE_HIDDEN)(s)
    s = keras.layers.Dropout(dropout, name="score_dropout2")(s)
    s = keras.layers.Dense(1, name=SCORE_LOGITS)(s)
    scores = keras.layers.Activation("linear", dtype="float32", name="scores")(s)
    return inputs, taps, object_vector, {"masks": masks, "scores": scores}


def deepmask_model(
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
    name: str = "deepmask",
) -> keras.Model:
    """DeepMask with head C.

    Takes (B, S, S, 3) RGB patches in [0, 1], S = patch_size + 2*context (192 for the paper),
    and returns {"masks": (B, mask_size, mask_size), "scores": (B, 1)}, both logits.
    `trunk_flavour` is `backbone.resnet_trunk`'s `flavour`; `pretrained_trunk` (the trunk will get
    pretrained weights) freezes its BatchNorm and picks the flavour's input transform
    (`backbone.input_normalization`).
    """
    inputs, _, _, outputs = deepmask_graph(
        patch_size,
        context,
        trunk_blocks,
        trunk_width,
        padding,
        head_channels,
        object_dim,
        mask_size,
        score_hidden,
        dropout,
        trunk_flavour,
        pretrained_trunk,
    )
    return keras.Model(inputs, outputs, name=name)
