"""SharpMask: DeepMask plus the top-down refinement modules R1..R4, and `build_model`."""

from __future__ import annotations

import keras

from sharpmask_tf.backbone import TAP_STRIDES, load_trunk_weights
from sharpmask_tf.config import TRUNK_STRIDE, Config, ModelConfig
from sharpmask_tf.deepmask import deepmask_graph, deepmask_model
from sharpmask_tf.layers import CenterCrop2D, MirrorPad2D, Upsample2D

# Module i (1 = coarsest) refines with the tap at this position, coarse to fine.
REFINE_TAPS = ("conv4", "conv3", "conv2", "conv1")
# The stride of skip feature i's map (skip1 .. skip4), the same order.
REFINE_STRIDES = tuple(TAP_STRIDES[t] for t in REFINE_TAPS)
# Names of the nested models and output keys that other modules look up.
SKIP_NET = "skip"
REFINE_NET = "refine"


def is_sharpmask(model: keras.Model) -> bool:
    """Whether a DeepMask-family model has SharpMask's refinement (its `refine` net)."""
    return any(layer.name == REFINE_NET for layer in model.layers)


def model_geometry(model: keras.Model) -> tuple[int, int]:
    """(patch_size, context) of a DeepMask/SharpMask model, read from its layers.

    Raises:
        ValueError: if the model lacks DeepMask's named layers.
    """
    try:
        crop = model.get_layer("head_crop").crop
    except ValueError as err:
        raise ValueError(
            f"Expected a DeepMask or SharpMask model with a 'head_crop' layer. Received: model {model.name!r}"
        ) from err
    input_size = int(model.inputs[0].shape[1])
    context = crop * TRUNK_STRIDE
    return input_size - 2 * context, context


def _conv3x3(x, filters: int, padding: str, name: str, activation=None):
    x = MirrorPad2D(1, padding, name=f"{name}_pad")(x)
    return keras.layers.Conv2D(filters, 3, padding="valid", activation=activation, name=name)(x)


def skip_network(
    tap_channels: dict[str, int],
    refine_channels: tuple[int, ...],
    skip_hidden: int,
    skip_hidden_last: int,
    padding: str,
    name: str = "skip",
) -> keras.Model:
    """The horizontal nets: bottom-up taps to skip features S1..S4, on feature maps of any size.

    Running them on whole feature maps lets full-image inference compute S once per scale and
    crop every window out of it; a patch's S equals the matching crop of the full image's.

    Returns:
        A model from the dict of taps to {"skip1".."skip4"}, skip i with refine_channels[i]
        channels at the resolution of tap REFINE_TAPS[i-1].
    """
    inputs = {t: keras.Input((None, None, c), name=t) for t, c in tap_channels.items()}
    outputs = {}
    for i, tap in enumerate(REFINE_TAPS, start=1):
        hidden = skip_hidden_last if i == len(REFINE_TAPS) else skip_hidden
        x = _conv3x3(inputs[tap], hidden, padding, f"refine{i}_skip_conv1", "relu")
        outputs[f"skip{i}"] = _conv3x3(x, refine_channels[i], padding, f"refine{i}_skip_conv2", "relu")
    return keras.Model(inputs, outputs, name=name)


def refine_network(
    object_dim: int,
    feature_size: int,
    refine_channels: tuple[int, ...],
    padding: str,
    upsampling: str,
    name: str = "refine",
) -> keras.Model:
    """The vertical path: object vector and window skip features to 16*feature_size mask logits.

    M1 = linear(object vector) as (feature_size, feature_size, k); module i adds a 3x3 conv of
    M_i to S_i (the paper's concat + conv, split in two), applies ReLU and upsamples x2.

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
        v = _conv3x3(m, refine_channels[i], padding, f"refine{i}_vertical")
        m = keras.layers.Add(name=f"refine{i}_add")([v, s])
        m = keras.layers.Activation("relu", name=f"refine{i}_relu")(m)
        m = Upsample2D(2, upsampling, name=f"refine{i}_up")(m)
    m = _conv3x3(m, 1, padding, "refine_out")
    m = keras.layers.Reshape((16 * feature_size, 16 * feature_size), name="refine_squeeze")(m)
    return keras.Model([obj, *skips], m, name=name)


def sharpmask_model(
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
    refine_k: int = 32,
    refine_skip_hidden: int = 64,
    refine_skip_hidden_last: int = 32,
    upsampling: str = "bilinear",
    trunk_flavour: str = "keras",
    pretrained_trunk: bool = True,
    name: str = "sharpmask",
) -> keras.Model:
    """SharpMask: DeepMask's trunk and head C plus refinement modules R1..R4.

    Takes (B, S, S, 3) RGB patches in [0, 1], S = patch_size + 2*context, and returns logits
    {"masks": (B, patch_size, patch_size), "scores": (B, 1), "coarse_masks": (B, mask_size,
    mask_size)}; the coarse DeepMask masks stay available beside the refined ones.
    `trunk_flavour` and `pretrained_trunk` are as in `deepmask.deepmask_model`.
    """
    if refine_k % 16:
        raise ValueError(f"refine_k must be a multiple of 16. Received: refine_k={refine_k!r}")
    refine_channels = tuple(refine_k // 2**i for i in range(len(REFINE_TAPS) + 1))
    inputs, taps, object_vector, head = deepmask_graph(
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
    tap_channels = {t: int(taps[t].shape[-1]) for t in REFINE_TAPS}
    skips = skip_network(tap_channels, refine_channels, refine_skip_hidden, refine_skip_hidden_last, padding)(taps)
    windows = [
        CenterCrop2D(context // TAP_STRIDES[tap], name=f"refine{i}_skip_crop")(skips[f"skip{i}"])
        for i, tap in enumerate(REFINE_TAPS, start=1)
    ]
    refine = refine_network(object_dim, patch_size // TAP_STRIDES["conv4"], refine_channels, padding, upsampling)
    masks = keras.layers.Activation("linear", dtype="float32", name="refined_masks")(refine([object_vector, *windows]))
    outputs = {"masks": masks, "scores": head["scores"], "coarse_masks": head["masks"]}
    return keras.Model(inputs, outputs, name=name)


def model_kwargs(config: ModelConfig) -> dict:
    """The model constructor's keyword arguments for a model config."""
    kwargs = dict(
        patch_size=config.patch_size,
        context=config.context,
        trunk_blocks=config.trunk_blocks,
        trunk_width=config.trunk_width,
        padding=config.padding,
        head_channels=config.head_channels,
        object_dim=config.object_dim,
        mask_size=config.mask_size,
        score_hidden=config.score_hidden,
        dropout=config.dropout,
        trunk_flavour=config.trunk_flavour,
        pretrained_trunk=config.pretrained_trunk,
    )
    if config.refinement:
        kwargs.update(
            refine_k=config.refine_k,
            refine_skip_hidden=config.refine_skip_hidden,
            refine_skip_hidden_last=config.refine_skip_hidden_last,
            upsampling=config.upsampling,
        )
    return kwargs


def build_model(config: Config | ModelConfig, trunk_weights: bool = True) -> keras.Model:
    """Builds SharpMask (model.refinement) or DeepMask from a config.

    Args:
        config: the configuration or its model section.
        trunk_weights: load `model.trunk_weights` into the trunk when it is set (see
            `backbone.load_trunk_weights`). False builds the same model without loading them, for
            a model whose weights come from a checkpoint or from another model: nothing is
            downloaded.
    """
    model_config = config.model if isinstance(config, Config) else config
    build = sharpmask_model if model_config.refinement else deepmask_model
    model = build(**model_kwargs(model_config))
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
