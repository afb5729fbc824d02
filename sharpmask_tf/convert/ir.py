"""A framework-neutral record of a reference network, and a NumPy executor for it.

Readers of foreign model files (`torch7.py`, `pytorch.py`) turn a module tree into these nodes;
a builder for another framework walks them and copies their arrays. Every node keeps `path`, the
place of its module in the source file, so an error or a mismatch names the module it came from.

Tensors are NCHW, as in Torch. Arrays are float32 copies owned by the node. `run` executes a node
with inference semantics (dropout off, batch-norm from running statistics); it is the check that a
reading is complete: a converted model must match `run` on the same record.

A little over 400 lines: each node type and the executor step that runs it are kept in one file,
so a node and its semantics are read together.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PAD_MODES = ("zero", "symmetric", "reflect")


@dataclass(frozen=True, eq=False)
class Conv2D:
    """Cross-correlation with zero padding: weight (out, in, kh, kw), bias (out,)."""

    path: str
    weight: np.ndarray
    bias: np.ndarray
    stride: tuple[int, int]  # (rows, columns)
    padding: tuple[int, int]  # zeros added on both sides of (rows, columns)


@dataclass(frozen=True, eq=False)
class Affine:
    """Per-channel `x * scale + shift` on axis 1 (a batch-norm folded into constants)."""

    path: str
    scale: np.ndarray  # (C,)
    shift: np.ndarray  # (C,)


@dataclass(frozen=True, eq=False)
class BatchNorm:
    """Batch normalisation with running statistics: (x - mean) / sqrt(var + eps) * weight + bias."""

    path: str
    mean: np.ndarray
    var: np.ndarray
    weight: np.ndarray  # ones when the module had no affine part
    bias: np.ndarray  # zeros when the module had no affine part
    eps: float


@dataclass(frozen=True, eq=False)
class Pad2D:
    """Pads (positive) or crops (negative) rows and columns; `mode` fills what is added."""

    path: str
    top: int
    bottom: int
    left: int
    right: int
    mode: str  # "zero" | "symmetric" (mirror repeating the edge: cba|abcd) | "reflect" (dcb|abcd)

    def __post_init__(self) -> None:
        if self.mode not in PAD_MODES:
            raise ValueError(f"{self.path}: pad mode must be one of {PAD_MODES}. Received: mode={self.mode!r}")


@dataclass(frozen=True, eq=False)
class ReLU:
    path: str


@dataclass(frozen=True, eq=False)
class Threshold:
    """`x if x > threshold else value`."""

    path: str
    threshold: float
    value: float


@dataclass(frozen=True, eq=False)
class Reshape:
    """Reshapes every sample to `shape` (row-major), keeping the batch axis."""

    path: str
    shape: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class Dense:
    """`x @ weight.T + bias` on (batch, in) inputs: weight (out, in), bias (out,)."""

    path: str
    weight: np.ndarray
    bias: np.ndarray


@dataclass(frozen=True, eq=False)
class Scale:
    """Multiplies by a constant (what old-style dropout does at inference)."""

    path: str
    factor: float


@dataclass(frozen=True, eq=False)
class Identity:
    """Passes its input on (inference dropout, device copies, identity modules)."""

    path: str
    source: str  # the module type it stands for


@dataclass(frozen=True, eq=False)
class UpsampleNearest:
    """Repeats every pixel `factor` times along rows and columns."""

    path: str
    factor: int


@dataclass(frozen=True, eq=False)
class ResizeBilinear:
    """Bilinear resize of the last two axes to (height, width), corners aligned: output pixel
    i samples input position i * (n_in - 1) / (n_out - 1). Works on (B, H, W) and (B, C, H, W)."""

    path: str
    height: int
    width: int


@dataclass(frozen=True, eq=False)
class MaxPool2D:
    """Max pooling; padded positions never win (they hold -inf)."""

    path: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool


@dataclass(frozen=True, eq=False)
class Sequential:
    path: str
    layers: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class ConcatTable:
    """Applies every branch to the same input; the output is the list of their outputs."""

    path: str
    branches: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class ParallelTable:
    """Applies branch i to element i of a list input."""

    path: str
    branches: tuple[Node, ...]


@dataclass(frozen=True, eq=False)
class AddTable:
    """Sums the elements of a list input."""

    path: str


Node = (
    Conv2D
    | Affine
    | BatchNorm
    | Pad2D
    | ReLU
    | Threshold
    | Reshape
    | Dense
    | Scale
    | Identity
    | UpsampleNearest
    | ResizeBilinear
    | MaxPool2D
    | Sequential
    | ConcatTable
    | ParallelTable
    | AddTable
)


@dataclass(frozen=True, eq=False)
class DeepMaskRecord:
    """A DeepMask or SharpMask read from a reference file, as the reference composes it.

    `trunk` maps normalised (B, 3, S, S) patches to the (B, D) object vector; `mask_branch` and
    `score_branch` map that vector to coarse mask logits and score logits. For SharpMask,
    `refinements[0]` maps the object vector to the coarsest mask features and refinement k >= 1
    takes [output of trunk.layers[skip_layers[k-1]], previous mask features].
    """

    trunk: Sequential
    mask_branch: Node
    score_branch: Node
    refinements: tuple[Node, ...] = ()
    skip_layers: tuple[int, ...] = ()  # 0-based indices into trunk.layers, coarse to fine
    config: dict[str, Any] = field(default_factory=dict)  # the training options saved with it

    @property
    def is_sharpmask(self) -> bool:
        return bool(self.refinements)


Value = np.ndarray | list


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]) -> np.ndarray:
    """(B, C, H, W) -> (B, C, OH, OW, kh, kw) strided windows, a view."""
    view = np.lib.stride_tricks.sliding_window_view(x, kernel, axis=(2, 3))
    return view[:, :, :: stride[0], :: stride[1]]


def _conv(node: Conv2D, x: np.ndarray) -> np.ndarray:
    ph, pw = node.padding
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = _windows(x, node.weight.shape[2:], node.stride)
    y = np.einsum("bchwij,ocij->bohw", windows, node.weight, optimize=True)
    return y + node.bias[None, :, None, None]


def _pad(node: Pad2D, x: np.ndarray) -> np.ndarray:
    h, w = x.shape[-2:]
    x = x[..., max(0, -node.top) : h - max(0, -node.bottom), max(0, -node.left) : w - max(0, -node.right)]
    widths = [(0, 0)] * (x.ndim - 2) + [
        (max(0, node.top), max(0, node.bottom)),
        (max(0, node.left), max(0, node.right)),
    ]
    return np.pad(x, widths, mode="constant" if node.mode == "zero" else node.mode)


def _interpolation_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) weights of corner-aligned linear interpolation."""
    position = np.arange(n_out) * ((n_in - 1) / (n_out - 1) if n_out > 1 else 0.0)
    low = np.minimum(np.floor(position).astype(int), n_in - 1)
    high = np.minimum(low + 1, n_in - 1)
    frac = position - low
    matrix = np.zeros((n_out, n_in))
    np.add.at(matrix, (np.arange(n_out), low), 1.0 - frac)
    np.add.at(matrix, (np.arange(n_out), high), frac)
    return matrix


def _resize(node: ResizeBilinear, x: np.ndarray) -> np.ndarray:
    rows = _interpolation_matrix(node.height, x.shape[-2])
    cols = _interpolation_matrix(node.width, x.shape[-1])
    return np.einsum("oh,...hw,pw->...op", rows, x, cols)


def _pooled_size(n: int, kernel: int, stride: int, pad: int, ceil_mode: bool) -> int:
    span = n + 2 * pad - kernel
    out = (-(-span // stride) if ceil_mode else span // stride) + 1
    # Torch drops a last window that would start inside the right padding.
    if ceil_mode and (out - 1) * stride >= n + pad:
        out -= 1
    return out


def _max_pool(node: MaxPool2D, x: np.ndarray) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = node.kernel, node.stride, node.padding
    oh = _pooled_size(x.shape[2], kh, sh, ph, node.ceil_mode)
    ow = _pooled_size(x.shape[3], kw, sw, pw, node.ceil_mode)
    extra_h = max(0, (oh - 1) * sh + kh - x.shape[2] - 2 * ph)
    extra_w = max(0, (ow - 1) * sw + kw - x.shape[3] - 2 * pw)
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph + extra_h), (pw, pw + extra_w)), constant_values=-np.inf)
    return _windows(x, (kh, kw), (sh, sw))[:, :, :oh, :ow].max(axis=(-2, -1))


def _channel_shape(x: np.ndarray) -> tuple[int, ...]:
    """Broadcasts a per-channel vector over axis 1 of x."""
    return (1, -1) + (1,) * (x.ndim - 2)


def _affine(node: Affine, x: np.ndarray) -> np.ndarray:
    return x * node.scale.reshape(_channel_shape(x)) + node.shift.reshape(_channel_shape(x))


def _batch_norm(node: BatchNorm, x: np.ndarray) -> np.ndarray:
    shape = _channel_shape(x)
    scale = node.weight / np.sqrt(node.var + node.eps)
    return (x - node.mean.reshape(shape)) * scale.reshape(shape) + node.bias.reshape(shape)


# The forward pass of every node without children, by node type.
_LEAVES = {
    Conv2D: _conv,
    Affine: _affine,
    BatchNorm: _batch_norm,
    Pad2D: _pad,
    ReLU: lambda node, x: np.maximum(x, 0),
    Threshold: lambda node, x: np.where(x > node.threshold, x, node.value),
    Reshape: lambda node, x: x.reshape((x.shape[0], *node.shape)),
    Dense: lambda node, x: x @ node.weight.T + node.bias,
    Scale: lambda node, x: x * node.factor,
    Identity: lambda node, x: x,
    UpsampleNearest: lambda node, x: np.repeat(np.repeat(x, node.factor, axis=-2), node.factor, axis=-1),
    ResizeBilinear: _resize,
    MaxPool2D: _max_pool,
    AddTable: lambda node, x: sum(x[1:], x[0]),
}


def run(
    node: Node,
    x: Value,
    capture: Collection[str] = (),
    found: dict[str, Value] | None = None,
) -> Value:
    """Runs a node on NCHW float arrays (lists for table inputs) with inference semantics.

    Args:
        node: the node to run.
        x: its input.
        capture: paths of nodes whose outputs to keep.
        found: where the captured outputs go, keyed by path.

    Returns:
        The node's output.
    """
    found = {} if found is None else found
    if isinstance(node, Sequential):
        for layer in node.layers:
            x = run(layer, x, capture, found)
        y = x
    elif isinstance(node, ConcatTable):
        y = [run(b, x, capture, found) for b in node.branches]
    elif isinstance(node, ParallelTable):
        y = [run(b, v, capture, found) for b, v in zip(node.branches, x, strict=True)]
    elif type(node) in _LEAVES:
        y = _LEAVES[type(node)](node, x)
    else:
        raise TypeError(f"run() got a {type(node).__name__}, not an IR node.")
    if node.path in capture:
        found[node.path] = y
    return y


def run_deepmask(record: DeepMaskRecord, patches: np.ndarray) -> dict[str, np.ndarray]:
    """DeepMask/SharpMask outputs for a batch, composed as the reference's forward passes.

    Args:
        record: the model.
        patches: (B, 3, S, S) normalised patches, S the size the trunk was built for.

    Returns:
        {"masks": the mask branch output, "scores": (B, 1) score logits}, masks reshaped to
        (B, side, side); a SharpMask adds "refined_masks" (B, side, side) from the refinements.
    """
    taps = [record.trunk.layers[i].path for i in record.skip_layers]
    found: dict[str, Value] = {}
    features = run(record.trunk, patches.astype(np.float64), taps, found)
    outputs = {"masks": run(record.mask_branch, features), "scores": run(record.score_branch, features)}
    if record.is_sharpmask:
        m = run(record.refinements[0], features)
        for refinement, tap in zip(record.refinements[1:], taps, strict=True):
            m = run(refinement, [found[tap], m])
        outputs["refined_masks"] = m
    batch = patches.shape[0]
    for key in ("masks", "refined_masks"):
        if key in outputs:
            side = int(round(np.sqrt(outputs[key].size // batch)))
            outputs[key] = outputs[key].reshape(batch, side, side)
    outputs["scores"] = outputs["scores"].reshape(batch, 1)
    return outputs


def _describe(node: Node) -> str:
    if isinstance(node, Conv2D):
        out, inp, kh, kw = node.weight.shape
        return (
            f"{inp}->{out} {kh}x{kw} stride {node.stride[0]}x{node.stride[1]} pad {node.padding[0]}x{node.padding[1]}"
        )
    if isinstance(node, Dense):
        return f"{node.weight.shape[1]}->{node.weight.shape[0]}"
    if isinstance(node, Affine):
        return f"{node.scale.size} channels"
    if isinstance(node, BatchNorm):
        return f"{node.mean.size} channels eps {node.eps:g}"
    if isinstance(node, Pad2D):
        return f"{node.mode} top {node.top} bottom {node.bottom} left {node.left} right {node.right}"
    if isinstance(node, Threshold):
        return f"x > {node.threshold:g} else {node.value:g}"
    if isinstance(node, Reshape):
        return f"to {node.shape}"
    if isinstance(node, (UpsampleNearest, Scale)):
        return f"x{node.factor}"
    if isinstance(node, ResizeBilinear):
        return f"to {node.height}x{node.width}"
    if isinstance(node, MaxPool2D):
        return f"{node.kernel[0]}x{node.kernel[1]} stride {node.stride[0]} pad {node.padding[0]} ceil {node.ceil_mode}"
    if isinstance(node, Identity):
        return node.source
    return ""


def summary(node: Node, depth: int = 0) -> str:
    """One indented line per node (path, kind, shapes), to read a file's layout at a glance."""
    lines = [f"{'  ' * depth}{type(node).__name__} {_describe(node)}".rstrip() + f"  [{node.path}]"]
    for child in getattr(node, "layers", ()) + getattr(node, "branches", ()):
        lines.append(summary(child, depth + 1))
    return "\n".join(lines)
