"""Reads the reference release's Torch7 files (`.t7`) into the framework-neutral IR.

`read_torch7` loads a file with the `torchfile` package; `module_ir` walks a module tree as the
reference builds it (DeepMask.lua, SharpMask.lua, fb.resnet.torch's resnet.lua) and records what
its forward pass needs; `read_deepmask_t7` reads a DeepMask or SharpMask `model.t7` as saved by
the reference's trainers ({model = nn.DeepMask | nn.SharpMask, config = options}).

Real files carry more than weights: gradients, output buffers of the last batch, and parameters
that are views into one flattened storage. Only the forward pass's tensors are read, each
bounds-checked against its storage and copied out. Paths name modules the way Torch prints
them: Lua's 1-based `modules[i]`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torchfile
from numpy.lib.array_utils import byte_bounds

from sharpmask_tf.convert import ir

# A Torch7 binary file starts with the type tag of its root object: nil, number, string, table,
# torch object, boolean, function, or (legacy) recursive function.
_TYPE_TAGS = range(9)
_ZIP_MAGIC = b"PK\x03\x04"


class _Reader(torchfile.T7Reader):
    """torchfile's reader with repairs: 8-byte longs on every platform (its `force_8bytes_long`
    path calls Python 2's `xrange`), strings that end early are errors, and tables of tensors read."""

    def __init__(self, fileobj):
        # Tables stay dicts: torchfile's list heuristic compares list elements with `==`,
        # which fails on tables of tensors (a ConcatTable's output, SharpMask's inps).
        super().__init__(fileobj, use_list_heuristic=False, force_8bytes_long=True)

    def read_long_array(self, n):
        return [self.read_long() for _ in range(n)]

    def read_string(self, disable_utf8=False):
        size = self.read_int()
        data = self.f.read(size)
        if len(data) != size:
            raise EOFError(f"a string of {size} bytes has only {len(data)}")
        return data if disable_utf8 or not self.utf8_decode_strings else data.decode("utf8")


def read_torch7(path: str | os.PathLike) -> Any:
    """Loads a Torch7 binary file with `torchfile`.

    Returns:
        The root object: Lua tables as dicts (keys bytes or numbers, arrays 1-based), torch
        objects as torchfile `TorchObject`s, tensors as NumPy views into their storages.

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not a Torch7 binary file or ends early.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if head == _ZIP_MAGIC or head[:1] == b"\x80":
            raise ValueError(f"{path} is a PyTorch checkpoint, not a Torch7 file: read it with convert.pytorch.")
        if len(head) < 4 or int.from_bytes(head, "little", signed=True) not in _TYPE_TAGS:
            raise ValueError(f"{path} is not a Torch7 binary file: it starts with bytes {head!r}.")
        f.seek(0)
        try:
            return _Reader(f).read_obj()
        except Exception as err:  # struct.error, EOFError, T7ReaderException, ...: all mean bad bytes
            if isinstance(err, EOFError) or f.tell() >= os.fstat(f.fileno()).st_size:
                raise ValueError(f"{path} ends early: a truncated Torch7 file ({err}).") from err
            raise ValueError(f"{path} is not a readable Torch7 binary file: {err}") from err


def _text(value: Any) -> Any:
    return value.decode("utf8", "replace") if isinstance(value, bytes) else value


def _type(obj: Any) -> str:
    return _text(obj.torch_typename()) if isinstance(obj, torchfile.TorchObject) else type(obj).__name__


def _get(obj: Any, name: str, path: str, default: Any = ...) -> Any:
    fields = obj._obj if isinstance(obj, torchfile.TorchObject) else obj
    value = fields.get(name.encode(), fields.get(name)) if isinstance(fields, dict) else None
    if value is None:
        if default is ...:
            raise ValueError(f"{path}: {_type(obj)} has no field {name!r}.")
        return default
    return value


def _storage(array: np.ndarray) -> np.ndarray:
    """The array owning the memory a (possibly strided) view reads."""
    owner, base = array, array.base
    while base is not None:  # torchfile's as_strided views hold their storage through a DummyArray
        if isinstance(base, np.ndarray):
            owner = base
        base = getattr(base, "base", None)
    return owner


def _array(obj: Any, name: str, path: str, shape: tuple[int, ...] | None = None, optional: bool = False):
    """A float32 copy of a tensor field, checked to lie inside its storage and, if given, to hold
    `shape`'s elements (then reshaped to it)."""
    value = _get(obj, name, path, None if optional else ...)
    if value is None:
        return None
    if not isinstance(value, np.ndarray):
        raise ValueError(f"{path}.{name}: expected a tensor. Received: {type(value).__name__}")
    if value.size:
        low, high = byte_bounds(value)
        root_low, root_high = byte_bounds(_storage(value))
        if low < root_low or high > root_high:
            raise ValueError(f"{path}.{name}: the tensor reaches past the end of its storage (truncated file?).")
    out = np.array(value, dtype=np.float32, order="C")  # a copy: the storage may be huge
    if shape is not None:
        if out.size != int(np.prod(shape)):
            raise ValueError(f"{path}.{name}: expected {int(np.prod(shape))} values for {shape}. Received: {out.shape}")
        out = out.reshape(shape)
    return out


def _int(obj: Any, name: str, path: str, default: Any = ...) -> int:
    return int(_get(obj, name, path, default))


def _sequence(table: Any, path: str, first: int = 1) -> list:
    """The values of a Lua array (a table keyed first, first+1, ...), in order."""
    if not isinstance(table, dict) or set(table) != set(range(first, first + len(table))):
        keys = list(table) if isinstance(table, dict) else type(table).__name__
        raise ValueError(f"{path}: expected an array indexed from {first}. Received keys: {keys}")
    return [table[i] for i in range(first, first + len(table))]


def _child_nodes(obj: Any, path: str, batch: int | None) -> tuple[ir.Node, ...]:
    children = _sequence(_get(obj, "modules", path, {}), f"{path}.modules")
    return tuple(module_ir(m, f"{path}.modules[{i}]", batch) for i, m in enumerate(children, start=1))


def _conv(obj: Any, path: str) -> ir.Conv2D:
    n_out, n_in = _int(obj, "nOutputPlane", path), _int(obj, "nInputPlane", path)
    kh, kw = _int(obj, "kH", path), _int(obj, "kW", path)
    if _int(obj, "groups", path, 1) != 1:
        raise ValueError(
            f"{path}: grouped convolutions are not supported. Received: groups={_get(obj, 'groups', path)}"
        )
    bias = _array(obj, "bias", path, (n_out,), optional=True)
    return ir.Conv2D(
        path=path,
        weight=_array(obj, "weight", path, (n_out, n_in, kh, kw)),
        bias=np.zeros(n_out, np.float32) if bias is None else bias,
        stride=(_int(obj, "dH", path, 1), _int(obj, "dW", path, 1)),
        padding=(_int(obj, "padH", path, 0), _int(obj, "padW", path, 0)),
    )


def _affine(obj: Any, path: str) -> ir.Affine:
    scale = _array(obj, "a", path)
    return ir.Affine(path=path, scale=scale.reshape(-1), shift=_array(obj, "b", path, (scale.size,)))


def _batch_norm(obj: Any, path: str) -> ir.BatchNorm:
    if _get(obj, "running_var", path, None) is None:
        raise ValueError(f"{path}: batch-norm without running_var (an nn release before 2016?) is not supported.")
    mean = _array(obj, "running_mean", path)
    n = mean.size
    weight = _array(obj, "weight", path, (n,), optional=True)
    bias = _array(obj, "bias", path, (n,), optional=True)
    return ir.BatchNorm(
        path=path,
        mean=mean.reshape(n),
        var=_array(obj, "running_var", path, (n,)),
        weight=np.ones(n, np.float32) if weight is None else weight,
        bias=np.zeros(n, np.float32) if bias is None else bias,
        eps=float(_get(obj, "eps", path, 1e-5)),
    )


def _padding(mode: str) -> Callable[[Any, str], ir.Pad2D]:
    def convert(obj: Any, path: str) -> ir.Pad2D:
        sides = {side: _int(obj, f"pad_{side[0]}", path) for side in ("top", "bottom", "left", "right")}
        return ir.Pad2D(path=path, mode=mode, **sides)

    return convert


def _view(obj: Any, path: str, batch: int | None) -> ir.Reshape:
    size = [int(s) for s in np.asarray(_get(obj, "size", path)).reshape(-1)]
    # nn.View's size leaves the batch out (Torch infers it), except that DeepMask.lua and
    # SharpMask.lua build theirs with the training batch leading: nn.View(config.batch, ...).
    leading_batch = _get(obj, "numInputDims", path, None) is None and batch is not None
    if leading_batch and len(size) > 1 and size[0] == batch:
        size = size[1:]
    return ir.Reshape(path=path, shape=tuple(size))


def _linear(obj: Any, path: str) -> ir.Dense:
    weight = _array(obj, "weight", path)
    if weight.ndim != 2:
        raise ValueError(f"{path}.weight: expected (out, in). Received: {weight.shape}")
    bias = _array(obj, "bias", path, (weight.shape[0],), optional=True)
    return ir.Dense(path=path, weight=weight, bias=np.zeros(weight.shape[0], np.float32) if bias is None else bias)


def _dropout(obj: Any, path: str) -> ir.Identity | ir.Scale:
    # nn.Dropout scales by 1/(1-p) while training (v2, the default); the old v1 instead scaled
    # by (1-p) at inference.
    if _get(obj, "v2", path, True) is False:
        return ir.Scale(path=path, factor=1.0 - float(_get(obj, "p", path)))
    return ir.Identity(path=path, source="nn.Dropout")


def _threshold(obj: Any, path: str) -> ir.ReLU | ir.Threshold:
    threshold, value = float(_get(obj, "threshold", path)), float(_get(obj, "val", path))
    if threshold == 0 and value == 0:
        return ir.ReLU(path=path)
    return ir.Threshold(path=path, threshold=threshold, value=value)


def _upsampling(obj: Any, path: str) -> ir.UpsampleNearest:
    return ir.UpsampleNearest(path=path, factor=_int(obj, "scale_factor", path))


def _resampling(obj: Any, path: str) -> ir.ResizeBilinear:
    mode = _text(_get(obj, "mode", path, b"simple"))
    height, width = _get(obj, "oheight", path, None), _get(obj, "owidth", path, None)
    if mode != "bilinear" or height is None or width is None:
        raise ValueError(
            f"{path}: only bilinear nn.SpatialReSamplingEx to a fixed size is supported. "
            f"Received: mode={mode!r}, oheight={height!r}, owidth={width!r}"
        )
    if (_int(obj, "yDim", path, 2), _int(obj, "xDim", path, 3)) != (2, 3):
        raise ValueError(f"{path}: expected yDim=2, xDim=3 (a (B, H, W) input).")
    return ir.ResizeBilinear(path=path, height=int(height), width=int(width))


def _max_pool(obj: Any, path: str) -> ir.MaxPool2D:
    return ir.MaxPool2D(
        path=path,
        kernel=(_int(obj, "kH", path), _int(obj, "kW", path)),
        stride=(_int(obj, "dH", path), _int(obj, "dW", path)),
        padding=(_int(obj, "padH", path, 0), _int(obj, "padW", path, 0)),
        ceil_mode=bool(_get(obj, "ceil_mode", path, False)),
    )


def _identity(obj: Any, path: str) -> ir.Identity:
    return ir.Identity(path=path, source=_type(obj))


_CONVERTERS: dict[str, Callable[[Any, str], ir.Node]] = {
    "nn.CAddTable": lambda obj, path: ir.AddTable(path=path),
    "nn.SpatialConvolution": _conv,
    "cudnn.SpatialConvolution": _conv,
    "nn.SpatialConvolutionMM": _conv,
    "nn.SpatialConstDiagonal": _affine,
    "inn.ConstAffine": _affine,
    "nn.SpatialBatchNormalization": _batch_norm,
    "cudnn.SpatialBatchNormalization": _batch_norm,
    "nn.SpatialSymmetricPadding": _padding("symmetric"),
    "nn.SpatialZeroPadding": _padding("zero"),
    "nn.Linear": _linear,
    "nn.Dropout": _dropout,
    "nn.Threshold": _threshold,
    "nn.ReLU": lambda obj, path: ir.ReLU(path=path),
    "cudnn.ReLU": lambda obj, path: ir.ReLU(path=path),
    "nn.SpatialUpSamplingNearest": _upsampling,
    "nn.SpatialReSamplingEx": _resampling,
    "nn.SpatialMaxPooling": _max_pool,
    "cudnn.SpatialMaxPooling": _max_pool,
    "nn.Copy": _identity,
    "nn.Identity": _identity,
}
_CONTAINERS = {"nn.Sequential": ir.Sequential, "nn.ConcatTable": ir.ConcatTable, "nn.ParallelTable": ir.ParallelTable}
SUPPORTED_MODULES = tuple(sorted([*_CONVERTERS, *_CONTAINERS, "nn.View"]))


def module_ir(module: Any, path: str = "model", batch: int | None = None) -> ir.Node:
    """Records a Torch7 module tree (as `read_torch7` returns it) for its forward pass.

    Args:
        module: a torchfile `TorchObject` of one of `SUPPORTED_MODULES`.
        path: the name of this module in error messages and in the nodes' `path`.
        batch: the batch size the tree's nn.Views were built with as their leading size
            (DeepMask's config.batch); None when the Views leave the batch out.

    Raises:
        ValueError: for an unknown module (naming its path) or a module missing what its
            forward pass needs.
    """
    if not isinstance(module, torchfile.TorchObject):
        raise ValueError(f"{path}: expected a Torch module. Received: {type(module).__name__}")
    kind = _type(module)
    if kind in _CONTAINERS:
        children = _child_nodes(module, path, batch)
        return _CONTAINERS[kind](path, children)
    if kind == "nn.View":
        return _view(module, path, batch)
    if kind not in _CONVERTERS:
        raise ValueError(f"{path}: unknown module {kind}")
    return _CONVERTERS[kind](module, path)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {_text(k): _plain(v) for k, v in value.items()}
    return _text(value)


def _sequential(module: Any, path: str, batch: int) -> ir.Sequential:
    node = module_ir(module, path, batch)
    if not isinstance(node, ir.Sequential):
        raise ValueError(f"{path}: expected nn.Sequential. Received: {_type(module)}")
    return node


def is_deepmask_file(root: Any) -> bool:
    """Whether a `read_torch7` root is a reference trainer's save {model = nn.DeepMask | nn.SharpMask, ...}."""
    model = _get(root, "model", "file", None) if isinstance(root, dict) else None
    return model is not None and _type(model) in ("nn.DeepMask", "nn.SharpMask")


def read_deepmask_t7(path: str | os.PathLike, root: Any = None) -> ir.DeepMaskRecord:
    """Reads a DeepMask or SharpMask `model.t7` of the reference release (training layout).

    Args:
        path: the file.
        root: its `read_torch7` result, if already read.

    Returns:
        The record; for SharpMask, `refinements` are refs[0..4] and `skip_layers` the 0-based
        trunk positions of skpos (SharpMask.lua's {8, 6, 5, 3}).

    Raises:
        ValueError: if the file is not such a model or holds an unknown module.
    """
    root = read_torch7(path) if root is None else root
    if not is_deepmask_file(root):
        kind = _type(_get(root, "model", "file", None) if isinstance(root, dict) else root)
        raise ValueError(
            f"{os.fspath(path)}: expected {{model = nn.DeepMask | nn.SharpMask, config = ...}}. Received: {kind}"
        )
    model = _get(root, "model", "file")
    kind = _type(model)
    config = _plain(_get(root, "config", "file", {}))
    batch = config.get("batch") if isinstance(config, dict) else None
    if not isinstance(batch, int):
        raise ValueError(f"{os.fspath(path)}: the saved config has no batch size, which its nn.Views were built with.")
    trunk = _sequential(_get(model, "trunk", "model"), "model.trunk", batch)
    score_branch = module_ir(_get(model, "scoreBranch", "model"), "model.scoreBranch", batch)
    if kind == "nn.DeepMask":
        mask_branch = module_ir(_get(model, "maskBranch", "model"), "model.maskBranch", batch)
        return ir.DeepMaskRecord(trunk=trunk, mask_branch=mask_branch, score_branch=score_branch, config=config)
    refs = _sequence(_get(model, "refs", "model"), "model.refs", first=0)
    refinements = tuple(module_ir(ref, f"model.refs[{i}]", batch) for i, ref in enumerate(refs))
    skip_positions = [int(p) for p in _sequence(_get(model, "skpos", "model"), "model.skpos")]
    if len(skip_positions) != len(refinements) - 1 or not all(1 <= p <= len(trunk.layers) for p in skip_positions):
        raise ValueError(
            f"model.skpos {skip_positions} does not fit {len(refinements) - 1} refinements "
            f"and a trunk of {len(trunk.layers)} modules."
        )
    return ir.DeepMaskRecord(
        trunk=trunk,
        mask_branch=module_ir(_get(model, "maskBranchDM", "model"), "model.maskBranchDM", batch),
        score_branch=score_branch,
        refinements=refinements,
        skip_layers=tuple(p - 1 for p in skip_positions),
        config=config,
    )


# fb.resnet.torch's ImageNet ResNet: conv1, its BatchNorm, ReLU, max pool, then the stages
# conv2_x .. conv5_x, average pool, View, Linear. DeepMask keeps the first seven modules.
RESNET_TRUNK_MODULES = 7


def read_resnet_t7(path: str | os.PathLike, root: Any = None) -> tuple[ir.Node, ...]:
    """Reads conv1 .. conv4 (modules 1..7) of an fb.resnet.torch ImageNet ResNet (`resnet-50.t7`).

    Args:
        path: the file.
        root: its `read_torch7` result, if already read.

    Raises:
        ValueError: if the file is not an nn.Sequential of at least seven modules, or one of
            those is unknown.
    """
    root = read_torch7(path) if root is None else root
    if _type(root) != "nn.Sequential":
        raise ValueError(f"{os.fspath(path)}: expected an ImageNet ResNet (nn.Sequential). Received: {_type(root)}")
    modules = _sequence(_get(root, "modules", "model"), "model.modules")
    if len(modules) < RESNET_TRUNK_MODULES:
        raise ValueError(
            f"{os.fspath(path)}: expected conv1, BatchNorm, ReLU, max pool and the ResNet stages. "
            f"Received: {len(modules)} modules"
        )
    return tuple(module_ir(m, f"model.modules[{i}]") for i, m in enumerate(modules[:RESNET_TRUNK_MODULES], start=1))
