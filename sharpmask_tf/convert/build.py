"""Builds our Keras DeepMask / SharpMask from a record of a reference model (`ir`), weights copied.

`convert_record` (and `convert_trunk` for an ImageNet ResNet alone) reads the record's layout and
picks the `ModelConfig` that computes it: the trunk flavour (BatchNorm after the addition:
`reference`; torchvision's layout: `torch`, or `deepmask_pytorch` with its symmetric stem), the
padding, the refinement layout, nearest upsampling and where the skip windows are cut (`before`
the horizontal nets, as SharpMask.lua's patch net); with it come our weights by layer name, in
our layouts: conv kernels (out, in, kh, kw) -> (kh, kw, in, out); the object vector's Linear
reads a (C, H, W) flattening where Keras flattens (H, W, C); refs[0]'s View(km, fs, fs) is
(C, H, W) where our Reshape is (H, W, C). `keras_model` builds the model and sets them. A record
our models cannot express raises a ValueError naming the module's path, never a silently
different model.

One file over 400 lines: it is one concept, reading a record's layout part by part (trunk, head,
refinement) into our configuration and weights, each part with the checks that name the module
that does not fit; split, the parts would share the `_Stream` reader and its error helpers
across modules.
"""

from __future__ import annotations

import dataclasses
import math

import keras
import numpy as np

from sharpmask_tf.backbone import resnet_trunk, trunk_flavour
from sharpmask_tf.config import TAP_STRIDES, TRUNK_STRIDE, ModelConfig
from sharpmask_tf.convert import ir
from sharpmask_tf.sharpmask import REFINE_TAPS, _leaf_layers, build_model

# A Threshold(0, v) (DeepMask.lua's score ReLU keeps 1e-6 for negatives) is built as a ReLU
# when v times the next layer's largest absolute row sum, the most it can move an output, is
# at most this.
THRESHOLD_TOLERANCE = 1e-4
_STEM_LAYERS = 4  # conv1, its norm, ReLU, max pool: trunk.layers[0:4]; the stages follow
_STAGES = 3  # conv2_x .. conv4_x
# SharpMask.lua's refinement (its defaults km = ks = 32 and 64 / 32 hidden units are ModelConfig's).
REFERENCE_REFINEMENT = dict(refinement=True, upsampling="nearest", refinement_layout="reference", skip_crop="before")


def _fail(node: ir.Node | None, where: str, what: str) -> None:
    raise ValueError(f"{node.path if node is not None else where}: {what}")


def _leaves(node: ir.Node) -> list[ir.Node]:
    """The nodes a Sequential runs, nested Sequentials opened, identities dropped."""
    if isinstance(node, ir.Sequential):
        return [leaf for child in node.layers for leaf in _leaves(child)]
    return [] if isinstance(node, ir.Identity) else [node]


def _found(node: ir.Node | None) -> str:
    return "nothing more" if node is None else ir.summary(node).splitlines()[0]


class _Stream:
    """Hands out a module's leaves in order, each checked to be what our model computes there."""

    def __init__(self, nodes: list[ir.Node], where: str, paddings: list):
        # paddings collects (path, mode, is the stem) of every convolution's padding
        self.nodes, self.where, self.paddings = nodes, where, paddings

    def peek(self) -> ir.Node | None:
        return self.nodes[0] if self.nodes else None

    def take(self, kind: type, expected: str) -> ir.Node:
        node = self.peek()
        if not isinstance(node, kind):
            _fail(node, self.where, f"expected {expected}; found {_found(node)}")
        return self.nodes.pop(0)

    def end(self) -> None:
        if self.nodes:
            _fail(self.nodes[0], self.where, f"our model has nothing for {_found(self.nodes[0])}")

    def conv(self, kernel: int, stride: int = 1, stem: bool = False) -> ir.Conv2D:
        """A kernel x kernel convolution with 'same' padding; records its padding mode."""
        pad = self.take(ir.Pad2D, "a padding") if kernel > 1 and isinstance(self.peek(), ir.Pad2D) else None
        conv = self.take(ir.Conv2D, f"a {kernel}x{kernel} convolution")
        if conv.weight.shape[2:] != (kernel, kernel) or conv.stride != (stride, stride):
            _fail(conv, self.where, f"expected a {kernel}x{kernel} stride {stride} convolution; found {_found(conv)}")
        p = kernel // 2
        if pad is not None and conv.padding == (0, 0) and (pad.top, pad.bottom, pad.left, pad.right) == (p,) * 4:
            mode = pad.mode
        elif pad is None and conv.padding == (p, p):
            mode = "zero"
        else:
            _fail(conv, self.where, f"expected padding {p} on every side; found {_found(pad or conv)}")
        if kernel > 1:
            self.paddings.append((conv.path, mode, stem))
        return conv

    def norm(self) -> ir.Affine | ir.BatchNorm:
        return self.take((ir.Affine, ir.BatchNorm), "a BatchNorm or fixed affine")

    def at_crop(self) -> bool:
        node = self.peek()
        return isinstance(node, ir.Pad2D) and min(node.top, node.bottom, node.left, node.right) < 0

    def crop(self) -> int:
        node = self.take(ir.Pad2D, "a crop (negative padding)")
        sides = {node.top, node.bottom, node.left, node.right}
        if len(sides) != 1 or node.top > 0:
            _fail(node, self.where, f"expected the same crop on every side; found {_found(node)}")
        return -node.top

    def dense(self) -> ir.Dense | ir.Conv2D:
        """A Linear, or a 1x1 convolution over a 1x1 map (the PyTorch port's heads)."""
        node = self.take((ir.Dense, ir.Conv2D), "a Linear or 1x1 convolution")
        if isinstance(node, ir.Conv2D) and node.weight.shape[2:] != (1, 1):
            _fail(node, self.where, f"expected a 1x1 convolution; found {_found(node)}")
        return node


def _stream(node: ir.Node, paddings: list) -> _Stream:
    return _Stream(_leaves(node), node.path, paddings)


def _affine(norm: ir.Affine | ir.BatchNorm) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(norm, ir.Affine):
        return norm.scale, norm.shift
    scale = norm.weight / np.sqrt(norm.var + norm.eps)
    return scale, norm.bias - norm.mean * scale


def _matrix(node: ir.Dense | ir.Conv2D) -> np.ndarray:
    """(out, in) of a Linear or 1x1 convolution."""
    return node.weight.reshape(node.weight.shape[0], -1)


def chw_to_hwc(weight: np.ndarray, channels: int, side: int) -> np.ndarray:
    """Reorders the columns of a (rows, C*H*W) matrix that index a (C, H, W) flattening (Torch's)
    to index Keras' (H, W, C) flattening."""
    out = weight.shape[0]
    return weight.reshape(out, channels, side, side).transpose(0, 2, 3, 1).reshape(out, -1)


@dataclasses.dataclass
class _Trunk:
    """A trunk read from a record: its geometry and layers in Keras names."""

    blocks: tuple[int, int, int]
    width: int
    bn_after_add: bool
    convs: dict[str, tuple[ir.Conv2D, ir.Affine | ir.BatchNorm | None]] = dataclasses.field(default_factory=dict)
    norms: dict[str, ir.Affine | ir.BatchNorm] = dataclasses.field(default_factory=dict)


def _bottleneck(trunk: _Trunk, node: ir.ConcatTable, add: _Stream, name: str, n: int, stride: int, paddings: list):
    if len(node.branches) != 2:
        _fail(node, "", f"expected a residual branch and a shortcut; found {len(node.branches)} branches")
    branch = _stream(node.branches[0], paddings)
    c1 = branch.conv(1)
    n1 = branch.norm()
    branch.take(ir.ReLU, "a ReLU")
    c2 = branch.conv(3, stride)
    n2 = branch.norm()
    branch.take(ir.ReLU, "a ReLU")
    c3 = branch.conv(1)
    n3 = branch.norm() if branch.peek() is not None else None
    branch.end()
    shortcut = _stream(node.branches[1], paddings)
    s0 = shortcut.conv(1, stride) if shortcut.peek() is not None else None
    s0_norm = shortcut.norm() if s0 is not None and shortcut.peek() is not None else None
    shortcut.end()
    add.take(ir.AddTable, "the residual addition")
    post = add.norm() if isinstance(add.peek(), (ir.Affine, ir.BatchNorm)) else None
    add.take(ir.ReLU, "a ReLU")
    if (post is not None) != trunk.bn_after_add or (n3 is None) != trunk.bn_after_add:
        _fail(node, "", "the block puts its BatchNorm neither as the trunk's first block does nor as our trunks can")
    if s0 is not None and (s0_norm is None) != trunk.bn_after_add:
        _fail(s0, "", "the shortcut's BatchNorm does not follow the trunk's layout")
    for conv, channels in ((c1, n), (c2, n), (c3, 4 * n)) + (((s0, 4 * n),) if s0 is not None else ()):
        if conv.weight.shape[0] != channels:
            _fail(conv, "", f"expected {channels} output channels (ResNet widths); found {_found(conv)}")
    trunk.convs.update({f"{name}_1_conv": (c1, n1), f"{name}_2_conv": (c2, n2), f"{name}_3_conv": (c3, n3)})
    if s0 is not None:
        trunk.convs[f"{name}_0_conv"] = (s0, s0_norm)
    if post is not None:
        trunk.norms[f"{name}_out_bn"] = post
    return s0 is not None


def read_trunk(layers: tuple[ir.Node, ...], paddings: list) -> _Trunk:
    """conv1 .. conv4 of a ResNet record: trunk.layers[0:4] the stem, [4:7] the three stages."""
    if len(layers) < _STEM_LAYERS + _STAGES:
        _fail(None, "trunk", f"expected conv1, its norm, ReLU, max pool and three stages; found {len(layers)} modules")
    stem = _Stream([leaf for layer in layers[:_STEM_LAYERS] for leaf in _leaves(layer)], "trunk", paddings)
    conv1 = stem.conv(7, 2, stem=True)
    conv1_norm = stem.norm()
    stem.take(ir.ReLU, "a ReLU")
    pool = stem.take(ir.MaxPool2D, "a 3x3 stride-2 max pool")
    if (pool.kernel, pool.stride, pool.padding, pool.ceil_mode) != ((3, 3), (2, 2), (1, 1), False):
        _fail(pool, "", f"expected a 3x3 stride-2 max pool padded 1, floor mode; found {_found(pool)}")
    stem.end()
    width = conv1.weight.shape[0]
    first_block = _leaves(layers[_STEM_LAYERS])
    add_index = next((i for i, n in enumerate(first_block) if isinstance(n, ir.AddTable)), len(first_block))
    after_add = first_block[add_index + 1 : add_index + 2]
    bn_after_add = bool(after_add) and isinstance(after_add[0], (ir.Affine, ir.BatchNorm))
    trunk = _Trunk(blocks=(0, 0, 0), width=width, bn_after_add=bn_after_add)
    trunk.convs["conv1_conv"] = (conv1, conv1_norm)
    blocks = []
    for stage, layer in enumerate(layers[_STEM_LAYERS : _STEM_LAYERS + _STAGES], start=2):
        n = width * 2 ** (stage - 2)
        stream = _stream(layer, paddings)
        count = 0
        while stream.peek() is not None:
            count += 1
            block = stream.take(ir.ConcatTable, "a residual block")
            stride = 2 if stage > 2 and count == 1 else 1
            projected = _bottleneck(trunk, block, stream, f"conv{stage}_block{count}", n, stride, paddings)
            if projected != (count == 1):
                _fail(block, "", "only a stage's first block may (and must) project its shortcut")
        blocks.append(count)
    trunk.blocks = tuple(blocks)
    return trunk


def _flavour(trunk: _Trunk, paddings: list) -> tuple[str, str]:
    """(trunk flavour, padding mode) that compute the record's trunk."""
    body = [(path, mode) for path, mode, stem in paddings if not stem]
    stem_mode = next(mode for _, mode, stem in paddings if stem)
    padding = body[0][1] if body else stem_mode
    for path, mode in body:
        if mode != padding:
            _fail(None, path, f"pads {mode} where the first 3x3 convolution pads {padding}: our trunk has one mode")
    if trunk.bn_after_add:
        flavour = "reference"
    elif stem_mode != padding and stem_mode == trunk_flavour("deepmask_pytorch").stem_padding:
        flavour = "deepmask_pytorch"
    else:
        flavour = "torch"
    if (trunk_flavour(flavour).stem_padding or padding) != stem_mode:
        _fail(None, paddings[0][0], f"pads {stem_mode} where the trunk pads {padding} ({flavour} flavour)")
    return flavour, padding


def _frozen_bn(scale: np.ndarray, shift: np.ndarray, epsilon: float) -> list[np.ndarray]:
    """FrozenBatchNormalization weights computing x * scale + shift."""
    return [scale, shift, np.zeros_like(scale), np.full_like(scale, 1.0 - epsilon)]


def _kernel(conv: ir.Conv2D) -> np.ndarray:
    return conv.weight.transpose(2, 3, 1, 0)


def _trunk_keras_weights(trunk: _Trunk, flavour: str) -> dict[str, list[np.ndarray]]:
    """Keras weights by layer name for a trunk of `flavour`: a bias the flavour's convs lack goes
    into the shift of the norm that follows (norm(conv(x) + b) = norm(conv(x)) + scale * b)."""
    spec = trunk_flavour(flavour)
    out = {}
    for name, (conv, norm) in trunk.convs.items():
        out[name] = [_kernel(conv), conv.bias] if spec.conv_bias else [_kernel(conv)]
        if norm is not None:
            scale, shift = _affine(norm)
            out[name.removesuffix("_conv") + "_bn"] = _frozen_bn(
                scale, shift if spec.conv_bias else shift + scale * conv.bias, spec.bn_epsilon
            )
        elif not spec.conv_bias and np.any(conv.bias):
            _fail(conv, "", f"a biased convolution the {flavour} flavour (no conv biases) cannot express")
    for name, norm in trunk.norms.items():
        out[name] = _frozen_bn(*_affine(norm), spec.bn_epsilon)
    return out


def _dense_weights(node: ir.Dense | ir.Conv2D, matrix: np.ndarray | None = None) -> list[np.ndarray]:
    return [(_matrix(node) if matrix is None else matrix).T, node.bias]


def _score_branch(node: ir.Node, paddings: list) -> tuple[dict[str, list[np.ndarray]], int]:
    s = _stream(node, paddings)
    hidden = s.dense()
    act = s.take((ir.ReLU, ir.Threshold), "a ReLU")
    logits = s.dense()
    s.end()
    if isinstance(act, ir.Threshold):
        moved = abs(act.value) * np.abs(_matrix(logits)).sum(axis=1).max()
        if act.threshold != 0 or moved > THRESHOLD_TOLERANCE:
            _fail(act, "", f"only a ReLU or Threshold(0, v) with |v| tiny is expressible; found {_found(act)}")
    if _matrix(logits).shape[0] != 1:
        _fail(logits, "", f"expected one score; found {_found(logits)}")
    weights = {"score_hidden": _dense_weights(hidden), "score_logits": _dense_weights(logits)}
    return weights, _matrix(hidden).shape[0]


def _mask_branch(node: ir.Node, paddings: list) -> tuple[dict[str, list[np.ndarray]], int]:
    """The mask Linear; what follows it (the reference's upsampling to gSz) our masks leave out."""
    s = _stream(node, paddings)
    logits = s.dense()
    while s.peek() is not None:
        s.take((ir.Reshape, ir.ResizeBilinear), "a reshape or the upsampling to the label size")
    side = math.isqrt(_matrix(logits).shape[0])
    if side * side != _matrix(logits).shape[0]:
        _fail(logits, "", f"expected side x side mask logits; found {_found(logits)}")
    return {"mask_logits": _dense_weights(logits)}, side


def _head(layers: tuple[ir.Node, ...], paddings: list, where: str) -> tuple[dict[str, list[np.ndarray]], dict]:
    """What follows conv4: crop, 1x1 conv + ReLU, the object vector (DeepMask.lua's View + Linear,
    or the PyTorch port's fSz x fSz convolution before its crop)."""
    s = _Stream([leaf for layer in layers for leaf in _leaves(layer)], where, paddings)
    crop = s.crop() if s.at_crop() else None
    reduce = s.conv(1)
    s.take(ir.ReLU, "a ReLU")
    channels = reduce.weight.shape[0]
    if crop is not None:
        s.take(ir.Reshape, "a View")
        linear = s.take(ir.Dense, "the object vector's Linear")
        side = math.isqrt(linear.weight.shape[1] // channels)
        if side * side * channels != linear.weight.shape[1]:
            _fail(linear, "", f"expected {channels} x side x side inputs; found {_found(linear)}")
        matrix = chw_to_hwc(linear.weight, channels, side)
    else:
        linear = s.take(ir.Conv2D, "the object vector's convolution")
        side = linear.weight.shape[-1]
        if linear.padding != (0, 0) or linear.stride != (1, 1):
            _fail(linear, "", f"expected an unpadded stride-1 convolution; found {_found(linear)}")
        crop = s.crop()
        matrix = chw_to_hwc(linear.weight.reshape(linear.weight.shape[0], -1), channels, side)
    s.end()
    weights = {"head_reduce": [_kernel(reduce), reduce.bias], "head_object": [matrix.T, linear.bias]}
    geometry = dict(
        patch_size=TRUNK_STRIDE * side, context=TRUNK_STRIDE * crop, head_channels=channels, object_dim=linear.bias.size
    )
    return weights, geometry


def _refine_m1(node: ir.Node, paddings: list) -> tuple[dict, int, int]:
    """refs[0]: the Linear and its View(km, fSz, fSz), as refine_m1's weights, km and fSz."""
    first = _stream(node, paddings)
    linear = first.take(ir.Dense, "refs[0]'s Linear")
    view = first.take(ir.Reshape, "refs[0]'s View(km, fSz, fSz)")
    first.end()
    if len(view.shape) != 3 or view.shape[1] != view.shape[2]:
        _fail(view, "", f"expected View(km, fSz, fSz); found {_found(view)}")
    k, side = view.shape[0], view.shape[1]
    # View(km, fSz, fSz) reads the Linear's outputs as (C, H, W); our Reshape as (H, W, C).
    kernel = chw_to_hwc(linear.weight.T, k, side)
    return {"refine_m1": [kernel, chw_to_hwc(linear.bias[None], k, side)[0]]}, k, side


def _refinement_module(ref: ir.Node, i: int, k: int, crop: int, tap: tuple, paddings: list, weights: dict):
    """Module i (1 = coarsest): a ParallelTable of the horizontal net (its crop, three 3x3 convs)
    and the vertical net, add, ReLU, nearest x2; the last module ends with a 3x3 conv to one
    channel and a View. Adds the module's weights to `weights`.

    Returns:
        (the horizontal net's first width, the vertical net's depth).
    """
    channels = k // 2 ** (i - 1)
    tap_name, tap_crop = tap
    s = _stream(ref, paddings)
    pair = s.take(ir.ParallelTable, "a ParallelTable of the horizontal and vertical nets")
    s.take(ir.AddTable, "an addition")
    s.take(ir.ReLU, "a ReLU")
    up = s.take(ir.UpsampleNearest, "a nearest upsampling")
    if up.factor != 2:
        _fail(up, "", f"expected x2; found {_found(up)}")
    if i == len(REFINE_TAPS):
        out = s.conv(3)
        s.take(ir.Reshape, "a View")
        if out.weight.shape[0] != 1:
            _fail(out, "", f"expected one output channel; found {_found(out)}")
        weights["refine_out"] = [_kernel(out), out.bias]
    s.end()
    neth, netv = (_stream(b, paddings) for b in pair.branches)
    total_crop = tap_crop + (neth.crop() if neth.at_crop() else 0)
    want_crop = crop * TRUNK_STRIDE // TAP_STRIDES[tap_name]
    if total_crop != want_crop:
        _fail(pair, "", f"crops {total_crop} of the {tap_name} features before the net; the window needs {want_crop}")
    convs = [neth.conv(3)]
    neth.take(ir.ReLU, "a ReLU")
    convs.append(neth.conv(3))
    neth.take(ir.ReLU, "a ReLU")
    convs.append(neth.conv(3))
    neth.end()
    for j, conv in enumerate(convs, start=1):
        weights[f"refine{i}_skip_conv{j}"] = [_kernel(conv), conv.bias]
    vertical = [netv.conv(3)]
    while netv.peek() is not None:
        netv.take(ir.ReLU, "a ReLU")
        vertical.append(netv.conv(3))
    for j, conv in enumerate(vertical, start=1):
        weights[f"refine{i}_vertical_conv{j}"] = [_kernel(conv), conv.bias]
    for conv, n in ((convs[1], channels), (convs[2], channels // 2), (vertical[-1], channels // 2)):
        if conv.weight.shape[0] != n:
            _fail(conv, "", f"expected {n} channels (km = ks = {k}, halved per module); found {_found(conv)}")
    return convs[0].weight.shape[0], len(vertical)


def _refinement(record: ir.DeepMaskRecord, crop: int, paddings: list) -> tuple[dict, dict]:
    """SharpMask.lua's refs: refs[0] (Linear + View(km, fs, fs)), then one module per tap."""
    weights, k, _ = _refine_m1(record.refinements[0], paddings)
    taps = {_STEM_LAYERS - 2: ("conv1", 0)}
    taps.update({_STEM_LAYERS + i: (f"conv{i + 2}", 0) for i in range(_STAGES)})
    taps[_STEM_LAYERS + _STAGES] = ("conv4", crop)  # the head's crop of conv4
    hidden, layouts = [], set()
    for i, (ref, skip_layer) in enumerate(zip(record.refinements[1:], record.skip_layers, strict=True), start=1):
        tap = taps.get(skip_layer, (None, 0))
        if tap[0] != REFINE_TAPS[i - 1]:
            want = REFINE_TAPS[i - 1]
            _fail(ref, "", f"reads trunk.modules[{skip_layer + 1}], where our module {i} reads the {want} features")
        width, depth = _refinement_module(ref, i, k, crop, tap, paddings, weights)
        hidden.append(width)
        layouts.add(depth)
    if len(set(hidden[:-1])) != 1 or len(layouts) != 1 or not layouts <= {1, 2}:
        _fail(record.refinements[1], "", "the horizontal nets' widths or the vertical nets' depths differ by module")
    config = dict(
        refine_k=k,
        refine_skip_hidden=hidden[0],
        refine_skip_hidden_last=hidden[-1],
        refinement_layout="reference" if layouts == {2} else "paper",
    )
    return weights, config


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A record read into our terms: the config that computes it and the weights by layer name.

    For a DeepMask (and a trunk) the config's refinement is SharpMask.lua's (`REFERENCE_REFINEMENT`),
    so stage 2 trains the refinement the authors did on it.
    """

    config: ModelConfig
    weights: dict[str, list[np.ndarray]]
    sharpmask: bool  # the weights include the refinement


def _trunk_parts(trunk_layers: tuple[ir.Node, ...]) -> tuple[_Trunk, str, str, list]:
    paddings: list = []
    trunk = read_trunk(trunk_layers, paddings)
    flavour, padding = _flavour(trunk, paddings)
    return trunk, flavour, padding, paddings


def convert_record(record: ir.DeepMaskRecord, trunk_weights: str) -> Conversion:
    """The `ModelConfig` computing a DeepMask / SharpMask record and our weights for it.

    Args:
        record: from `torch7.read_deepmask_t7` or `pytorch.deepmask_pytorch_record`.
        trunk_weights: the `model.trunk_weights` to record: the trunk's weights file
            (`backbone.TRUNK_WEIGHTS_FILE` in the run directory), which training starts from.

    Raises:
        ValueError: naming the module our models cannot express.
    """
    trunk, flavour, padding, paddings = _trunk_parts(record.trunk.layers)
    head, geometry = _head(record.trunk.layers[_STEM_LAYERS + _STAGES :], paddings, record.trunk.path)
    weights = {**_trunk_keras_weights(trunk, flavour), **head}
    masks, mask_size = _mask_branch(record.mask_branch, paddings)
    scores, score_hidden = _score_branch(record.score_branch, paddings)
    weights.update(masks)
    weights.update(scores)
    fields = dict(
        geometry,
        trunk_blocks=trunk.blocks,
        trunk_width=trunk.width,
        padding=padding,
        trunk_flavour=flavour,
        trunk_weights=trunk_weights,
        mask_size=mask_size,
        score_hidden=score_hidden,
        **REFERENCE_REFINEMENT,
    )
    if record.is_sharpmask:
        refine, refine_config = _refinement(record, geometry["context"] // TRUNK_STRIDE, paddings)
        weights.update(refine)
        fields.update(refine_config)
    for path, mode, stem in paddings:
        if not stem and mode != padding:
            _fail(None, path, f"pads {mode} where the trunk pads {padding}: our model has one padding mode")
    patch = record.config.get("iSz")
    if patch is not None and patch != geometry["patch_size"]:
        _fail(None, record.trunk.path, f"the saved iSz={patch} disagrees with the head's {geometry['patch_size']}")
    return Conversion(ModelConfig(**fields), weights, record.is_sharpmask)


def convert_trunk(layers: tuple[ir.Node, ...], trunk_weights: str) -> Conversion:
    """The config and weights of an ImageNet ResNet's conv1 .. conv4 (the released resnet-50.t7).

    The config is DeepMask.lua's model on it: the reference flavour, symmetric padding (its
    updatePadding), SharpMask.lua's refinement (reference layout, nearest upsampling, windows cut
    before the horizontal nets) and the paper's head widths; `trunk_weights` as for
    `convert_record`.
    """
    trunk, flavour, _, _ = _trunk_parts(layers)
    config = ModelConfig(
        trunk_blocks=trunk.blocks,
        trunk_width=trunk.width,
        padding="symmetric",
        trunk_flavour=flavour,
        trunk_weights=trunk_weights,
        **REFERENCE_REFINEMENT,
    )
    return Conversion(config, _trunk_keras_weights(trunk, flavour), sharpmask=False)


def set_weights(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
    """Sets every weighted layer of `model` (nested models opened) from `weights` by name.

    Raises:
        ValueError: if a layer has no entry, an entry has no layer, or shapes differ.
    """
    layers = {layer.name: layer for layer in _leaf_layers(model) if layer.weights}
    missing, extra = sorted(set(layers) - set(weights)), sorted(set(weights) - set(layers))
    if missing or extra:
        raise ValueError(f"The record and the model disagree: layers without weights {missing}, weights {extra}")
    for name, values in weights.items():
        have = [w.shape for w in layers[name].get_weights()]
        if have != [v.shape for v in values]:
            raise ValueError(f"Layer {name!r} has weights {have}; the record gives {[v.shape for v in values]}")
        layers[name].set_weights([np.asarray(v, np.float32) for v in values])


def keras_model(conversion: Conversion) -> keras.Model:
    """Our DeepMask or SharpMask with the converted weights."""
    config = dataclasses.replace(conversion.config, refinement=conversion.sharpmask)
    model = build_model(config, trunk_weights=False)
    set_weights(model, conversion.weights)
    return model


def keras_trunk(conversion: Conversion) -> keras.Model:
    """The trunk alone (`backbone.resnet_trunk`) with the weights of a `convert_trunk`."""
    c = conversion.config
    trunk = resnet_trunk(c.trunk_blocks, c.trunk_width, c.padding, c.trunk_flavour, name="trunk")
    set_weights(trunk, conversion.weights)
    return trunk
