"""SharpMask: DeepMask plus the top-down refinement modules R1..R4, and `build_model`."""

from __future__ import annotations

import keras

from sharpmask_tf.backbone import load_trunk_weights
from sharpmask_tf.config import (
    REFINEMENT_LAYOUTS,
    SKIP_CROPS,
    TAP_STRIDES,
    TRUNK_STRIDE,
    Config,
    ModelConfig,
    refine_channels,
)
from sharpmask_tf.deepmask import DeepMask
from sharpmask_tf.layers import CenterCrop2D, MirrorPad2D, Upsample2D

# Module i (1 = coarsest) refines with the tap at this position, coarse to fine: every tap, deepest first.
REFINE_TAPS = tuple(reversed(TAP_STRIDES))
# The stride of skip feature i's map (skip1 .. skip4), the same order.
REFINE_STRIDES = tuple(TAP_STRIDES[t] for t in REFINE_TAPS)
# Names of the nested models and output keys that other modules look up.
SKIP_NET = "skip"
REFINE_NET = "refine"


def is_sharpmask(model: keras.Model) -> bool:
    """Whether a model is a SharpMask, DeepMask with the refinement (its `refine` net)."""
    return isinstance(model, SharpMask)


def model_geometry(model: keras.Model) -> tuple[int, int]:
    """(patch_size, context) of a DeepMask/SharpMask model, the arguments it was built with.

    Raises:
        ValueError: if the model is not a DeepMask or SharpMask.
    """
    if not isinstance(model, DeepMask):
        raise ValueError(
            "Expected a DeepMask or SharpMask model (sharpmask_tf.deepmask.DeepMask or "
            f"sharpmask_tf.sharpmask.SharpMask, as build_model makes). Received: {type(model).__name__} {model.name!r}"
        )
    return model.patch_size, model.context


def _conv3x3(x, filters: int, padding: str, name: str, activation=None):
    x = MirrorPad2D(1, padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, padding="valid", activation=activation, name=name)(x)


def skip_network(
    tap_channels: dict[str, int],
    refine_channels: tuple[int, ...],
    skip_hidden: int,
    skip_hidden_last: int,
    padding: str,
    name: str = SKIP_NET,
) -> keras.Model:
    """The horizontal nets: bottom-up taps to the skip terms S1*..S4*, on feature maps of any size.

    Net i is the paper's (section 3.2, Fig. 7b) and SharpMask.lua's: skip features
    S_i = ReLU(3x3 conv -> k_s^i)(ReLU(3x3 conv -> skip_hidden)(F_i)), k_s^i = refine_channels[i-1]
    (skip_hidden_last at the finest stage), then the linear 3x3 conv S_i* -> k_m^(i+1) =
    refine_channels[i] that the vertical path adds to its own. Running them on whole feature maps
    lets full-image inference compute S* once per scale and crop every window out of it: since a
    patch's nets also run on its whole context-padded maps before the crop, its S* window equals
    the crop of a full image's S* computed from the same features.

    Returns:
        A model from the dict of taps to {"skip1".."skip4"}, skip i the term S_i* with
        refine_channels[i] channels at the resolution of tap REFINE_TAPS[i-1].
    """
    inputs = {t: keras.Input((None, None, c), name=t) for t, c in tap_channels.items()}
    outputs = {}
    for i, tap in enumerate(REFINE_TAPS, start=1):
        hidden = skip_hidden_last if i == len(REFINE_TAPS) else skip_hidden
        x = _conv3x3(inputs[tap], hidden, padding, f"refine{i}_skip_conv1", "relu")
        x = _conv3x3(x, refine_channels[i - 1], padding, f"refine{i}_skip_conv2", "relu")
        outputs[f"skip{i}"] = _conv3x3(x, refine_channels[i], padding, f"refine{i}_skip_conv3")
    return keras.Model(inputs, outputs, name=name)


def vertical_channels(layout: str, channels: int) -> tuple[int, ...]:
    """The output channels of a module's vertical convolutions, for a mask encoding of `channels`.

    `paper`: one linear 3x3 conv M_i* to channels/2 (Fig. 7b); `reference`: SharpMask.lua's
    3x3 conv to channels, ReLU, 3x3 conv to channels/2.

    Raises:
        ValueError: for another layout.
    """
    if layout == "paper":
        return (channels // 2,)
    if layout == "reference":
        return (channels, channels // 2)
    raise ValueError(f"refinement_layout must be one of {REFINEMENT_LAYOUTS}. Received: refinement_layout={layout!r}")


def refine_network(
    object_dim: int,
    feature_size: int,
    refine_channels: tuple[int, ...],
    padding: str,
    upsampling: str,
    layout: str = "paper",
    name: str = REFINE_NET,
) -> keras.Model:
    """The vertical path: object vector and window skip terms to 16*feature_size mask logits.

    M1 = linear(object vector) as (feature_size, feature_size, k); module i adds its vertical
    convolutions of M_i (`vertical_channels(layout, ...)`, named refine{i}_vertical_conv{j}) to
    skip term S_i*, applies ReLU and upsamples x2; a final 3x3 conv gives the logits. With the
    paper's layout both terms are linear 3x3 convs, so their sum is one 3x3 conv of
    concat(M_i, S_i): the concat + conv module of Fig. 7a (S_i* runs before the window is cut,
    so at the window's border it reads S_i's neighbours where M_i is mirror-padded).

    Returns:
        A model from [object (B, object_dim), skip1 .. skip4 windows] to (B, 16fs, 16fs) logits.
    """
    k = refine_channels[0]
    obj = keras.Input((object_dim,), name="object")
    skips = [
        keras.Input((feature_size * 2**i, feature_size * 2**i, refine_channels[i + 1]), name=f"skip{i + 1}")
        for i in range(len(REFINE_TAPS))
    ]
    m = keras.layers.Dense(k * feature_size * feature_size, name="refine_m1")(obj)
    m = keras.layers.Reshape((feature_size, feature_size, k), name="refine_m1_reshape")(m)
    for i, s in enumerate(skips, start=1):
        v = m
        for j, filters in enumerate(vertical_channels(layout, refine_channels[i - 1]), start=1):
            if j > 1:
                v = keras.layers.Activation("relu", name=f"refine{i}_vertical_relu{j - 1}")(v)
            v = _conv3x3(v, filters, padding, f"refine{i}_vertical_conv{j}")
        m = keras.layers.Add(name=f"refine{i}_add")([v, s])
        m = keras.layers.Activation("relu", name=f"refine{i}_relu")(m)
        m = Upsample2D(2, upsampling, name=f"refine{i}_up")(m)
    m = _conv3x3(m, 1, padding, "refine_out")
    m = keras.layers.Reshape((16 * feature_size, 16 * feature_size), name="refine_squeeze")(m)
    return keras.Model([obj, *skips], m, name=name)


@keras.saving.register_keras_serializable(package="sharpmask_tf")
class SharpMask(DeepMask):
    """SharpMask: DeepMask's trunk and head C plus refinement modules R1..R4, a functional model
    that keeps its constructor's arguments.

    Takes (B, S, S, 3) RGB patches in [0, 1], S = patch_size + 2*context, and returns logits
    {"masks": (B, patch_size, patch_size), "scores": (B, 1), "coarse_masks": (B, mask_size,
    mask_size)}; the coarse DeepMask masks stay available beside the refined ones.

    Args:
        refine_k: mask channels entering R1 (k), halved by every module; a multiple of 16.
        refine_skip_hidden: width of the horizontal nets' first convolution (R1..R3).
        refine_skip_hidden_last: width of that convolution at the finest stage (R4).
        upsampling: `bilinear` or `nearest` upsampling between the modules.
        refinement_layout: the vertical nets, `paper` (one linear conv per module, Fig. 7b) or
            `reference` (SharpMask.lua's two convs; with padding `symmetric` and upsampling
            `nearest` the release's refinement exactly).
        skip_crop: where a patch's window is cut from the skip path: `after` the horizontal nets
            (they run on the whole context-padded maps, as full-image inference runs them) or
            `before` them (SharpMask.lua's patch net: the taps are cropped, the nets pad at the
            window's edge).
        name: the model's name.
        **kwargs: `sharpmask_tf.deepmask.DeepMask`'s arguments (patch_size, context, trunk_blocks,
            trunk_width, padding, head_channels, object_dim, mask_size, score_hidden, dropout,
            trunk_flavour, pretrained_trunk, dtype: the three outputs are float32 under any
            policy) and keras.Model's.

    Raises:
        ValueError: if refine_k is not a positive multiple of 16, or for an unknown
            refinement_layout or skip_crop.
    """

    ARGUMENTS = DeepMask.ARGUMENTS + (
        "refine_k",
        "refine_skip_hidden",
        "refine_skip_hidden_last",
        "upsampling",
        "refinement_layout",
        "skip_crop",
    )

    def __init__(
        self,
        refine_k: int = 32,
        refine_skip_hidden: int = 64,
        refine_skip_hidden_last: int = 32,
        upsampling: str = "bilinear",
        refinement_layout: str = "paper",
        skip_crop: str = "after",
        name: str = "sharpmask",
        **kwargs,
    ):
        if skip_crop not in SKIP_CROPS:
            raise ValueError(f"skip_crop must be one of {SKIP_CROPS}. Received: skip_crop={skip_crop!r}")
        super().__init__(
            refine_k=refine_k,
            refine_skip_hidden=refine_skip_hidden,
            refine_skip_hidden_last=refine_skip_hidden_last,
            upsampling=upsampling,
            refinement_layout=refinement_layout,
            skip_crop=skip_crop,
            name=name,
            **kwargs,
        )

    def _graph(self, arguments: dict):
        """DeepMask's graph with the horizontal nets on its taps and the vertical path on its
        object vector; the coarse masks stay an output."""
        inputs, head, features = super()._graph(arguments)
        object_vector, taps = features[0], dict(zip(TAP_STRIDES, features[1:]))
        channels = refine_channels(arguments["refine_k"])
        padding, context = arguments["padding"], arguments["context"]
        tap_channels = {t: int(taps[t].shape[-1]) for t in REFINE_TAPS}
        skip = skip_network(
            tap_channels,
            channels,
            arguments["refine_skip_hidden"],
            arguments["refine_skip_hidden_last"],
            padding,
            SKIP_NET,
        )
        if arguments["skip_crop"] == "before":
            skips = skip({t: CenterCrop2D(context // TAP_STRIDES[t], name=f"{t}_window")(taps[t]) for t in taps})
            windows = [skips[f"skip{i}"] for i in range(1, len(REFINE_TAPS) + 1)]
        else:
            skips = skip(taps)
            windows = [
                CenterCrop2D(context // TAP_STRIDES[tap], name=f"refine{i}_skip_crop")(skips[f"skip{i}"])
                for i, tap in enumerate(REFINE_TAPS, start=1)
            ]
        feature_size = arguments["patch_size"] // TRUNK_STRIDE
        refine = refine_network(
            arguments["object_dim"],
            feature_size,
            channels,
            padding,
            arguments["upsampling"],
            arguments["refinement_layout"],
            REFINE_NET,
        )
        masks = keras.layers.Activation("linear", dtype="float32", name="refined_masks")(
            refine([object_vector, *windows])
        )
        return inputs, {"masks": masks, "scores": head["scores"], "coarse_masks": head["masks"]}, features


def refinement_split(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a SharpMask model where stage 2's gradients stop.

    Returns:
        (frozen, refinement): `frozen` maps images to [object vector (B, object_dim), trunk taps
        conv1..conv4], that is the trunk and head C up to the object vector; `refinement` maps that
        list to the refined (B, P, P) mask logits through the horizontal nets and the vertical
        path. Both share the model's layers and weights.

    Raises:
        ValueError: if the model is not a SharpMask.
    """
    if not isinstance(model, SharpMask):
        raise ValueError(
            f"refinement_split needs a SharpMask (build_model with model.refinement=true). "
            f"Received: {type(model).__name__} {model.name!r}"
        )
    features = model._head_features
    frozen = keras.Model(model.input, features, name="frozen_trunk_and_head")
    refinement = keras.Model(features, model.output["masks"], name="refinement")
    return frozen, refinement


def build_model(config: Config | ModelConfig, trunk_weights: bool = True) -> DeepMask:
    """Builds SharpMask (model.refinement) or DeepMask from a config.

    Args:
        config: the configuration or its model section.
        trunk_weights: load `model.trunk_weights` into the trunk when it is set (see
            `backbone.load_trunk_weights`). False builds the same model without loading them, for
            a model whose weights come from a checkpoint or from another model: nothing is
            downloaded.
    """
    model_config = config.model if isinstance(config, Config) else config
    build = SharpMask if model_config.refinement else DeepMask
    model = build(**{key: getattr(model_config, key) for key in build.ARGUMENTS})
    if trunk_weights and model_config.trunk_weights is not None:
        load_trunk_weights(model.get_layer("trunk"), model_config.trunk_weights, model_config.trunk_flavour)
    return model


def _leaf_layers(model: keras.Model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def copy_weights(source: keras.Model, target: keras.Model) -> list[str]:
    """Copies weights between models layer by layer, matching layer names (also inside nested
    models): DeepMask's trunk and head into a SharpMask, or back.

    Returns:
        The names of the layers copied.

    Raises:
        ValueError: if a layer of the same name has differently shaped weights.
    """
    wanted = {layer.name: layer for layer in _leaf_layers(target) if layer.weights}
    copied = []
    for layer in _leaf_layers(source):
        if not layer.weights or layer.name not in wanted:
            continue
        values = layer.get_weights()
        shapes = [w.shape for w in wanted[layer.name].get_weights()]
        if shapes != [v.shape for v in values]:
            raise ValueError(
                f"Layer {layer.name!r} has weights of shapes {[v.shape for v in values]} in the source "
                f"and {shapes} in the target: the two models come from different configs."
            )
        wanted[layer.name].set_weights(values)
        copied.append(layer.name)
    return copied
