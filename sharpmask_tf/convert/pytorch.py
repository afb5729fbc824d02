"""Reads the PyTorch port's DeepMask (foolwood/deepmask-pytorch, `.pth` / `.pth.tar`) into the IR.

The port builds torchvision's ResNet-50 through layer3 (stride on the 3x3 convolution), wraps the
7x7 convolution in a symmetric padding and every 3x3 convolution in a reflection padding (its
`updatePadding`), adds a 1x1 reduction and a fSz x fSz convolution, crops one position of context
(`crop_trick`), and convolutional heads. Its checkpoints hold a `state_dict`, with `module.`
prefixes when trained under DataParallel. Reading needs the package `torch`; nothing else here does.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np

from sharpmask_tf.convert import ir

# torch.nn.BatchNorm2d's default; the state dict does not store it.
BN_EPSILON = 1e-5
TARGET_SIZE = 112  # the port's default gSz: training masks are upsampled to it


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Loads a PyTorch state dict (`.pth`) or a checkpoint holding one (`.pth.tar`).

    Returns:
        Parameter and buffer arrays by name, `module.` prefixes removed.

    Raises:
        ImportError: if the package `torch` is not installed.
        ValueError: if the file is not a PyTorch file, a `.pth.tar` has no `state_dict`, or the
            state dict holds something other than tensors.
    """
    try:
        import torch
    except ImportError as err:
        raise ImportError("Reading .pth / .pth.tar files needs the package `torch` (pip install torch).") from err
    name = os.fspath(path)
    try:
        loaded = torch.load(name, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # pickle, zip and weights_only errors alike
        raise ValueError(f"{name} is not a readable PyTorch file: {err}") from err
    if isinstance(loaded, dict) and "state_dict" in loaded:
        state = loaded["state_dict"]
    elif name.endswith(".pth.tar"):
        keys = sorted(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        raise ValueError(f"{name}: a .pth.tar checkpoint must hold a 'state_dict'. Received keys: {keys}")
    else:
        state = loaded
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: expected a state dict of tensors. Received: {type(state).__name__}")
    return {key.removeprefix("module."): value.detach().cpu().numpy() for key, value in state.items()}


class _Weights:
    """Hands out state-dict entries once each, so leftovers show an architecture mismatch."""

    def __init__(self, state: dict[str, np.ndarray]):
        self.state = state
        self.used: set[str] = set()

    def __call__(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise ValueError(f"The state dict has no {key!r}: not the PyTorch port's DeepMask.")
        self.used.add(key)
        return np.array(self.state[key], dtype=np.float32, order="C")

    def has(self, key: str) -> bool:
        return key in self.state

    def conv(self, prefix: str, stride: int = 1, bias: bool = False) -> ir.Conv2D:
        weight = self(f"{prefix}.weight")
        return ir.Conv2D(
            path=prefix,
            weight=weight,
            bias=self(f"{prefix}.bias") if bias else np.zeros(weight.shape[0], np.float32),
            stride=(stride, stride),
            padding=(0, 0),
        )

    def batch_norm(self, prefix: str) -> ir.BatchNorm:
        self.used.add(f"{prefix}.num_batches_tracked")
        return ir.BatchNorm(
            path=prefix,
            mean=self(f"{prefix}.running_mean"),
            var=self(f"{prefix}.running_var"),
            weight=self(f"{prefix}.weight"),
            bias=self(f"{prefix}.bias"),
            eps=BN_EPSILON,
        )


def _pad(path: str, size: int, mode: str) -> ir.Pad2D:
    return ir.Pad2D(path=path, top=size, bottom=size, left=size, right=size, mode=mode)


def _bottleneck(w: _Weights, prefix: str, stride: int) -> ir.Sequential:
    """torchvision's Bottleneck with the port's reflection-padded 3x3 convolution."""
    branch = [
        w.conv(f"{prefix}.conv1"),
        w.batch_norm(f"{prefix}.bn1"),
        ir.ReLU(path=f"{prefix}.relu"),
        _pad(f"{prefix}.conv2.0", 1, "reflect"),
        w.conv(f"{prefix}.conv2.1", stride),
        w.batch_norm(f"{prefix}.bn2"),
        ir.ReLU(path=f"{prefix}.relu"),
        w.conv(f"{prefix}.conv3"),
        w.batch_norm(f"{prefix}.bn3"),
    ]
    if w.has(f"{prefix}.downsample.0.weight"):
        shortcut = ir.Sequential(
            path=f"{prefix}.downsample",
            layers=(w.conv(f"{prefix}.downsample.0", stride), w.batch_norm(f"{prefix}.downsample.1")),
        )
    else:
        shortcut = ir.Identity(path=f"{prefix}.shortcut", source="identity")
    return ir.Sequential(
        path=prefix,
        layers=(
            ir.ConcatTable(
                path=f"{prefix}.residual",
                branches=(ir.Sequential(path=f"{prefix}.branch", layers=tuple(branch)), shortcut),
            ),
            ir.AddTable(path=f"{prefix}.add"),
            ir.ReLU(path=f"{prefix}.relu"),
        ),
    )


def _stage(w: _Weights, prefix: str, stride: int) -> ir.Sequential:
    count = len({m.group(1) for key in w.state if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.conv1\.weight$", key))})
    if count == 0:
        raise ValueError(f"The state dict has no blocks under {prefix!r}: not the PyTorch port's DeepMask.")
    blocks = tuple(_bottleneck(w, f"{prefix}.{b}", stride if b == 0 else 1) for b in range(count))
    return ir.Sequential(path=prefix, layers=blocks)


def deepmask_pytorch_record(state: dict[str, np.ndarray], target_size: int | None = TARGET_SIZE) -> ir.DeepMaskRecord:
    """The PyTorch port's DeepMask (patch mode, with its context crop) from its state dict.

    Args:
        state: from `read_state_dict`.
        target_size: side the mask branch upsamples to (bilinear, corners aligned, as the port's
            UpsamplingBilinear2d); None or a size not above the mask's keeps the coarse mask.

    Raises:
        ValueError: if a parameter is missing or left over.
    """
    w = _Weights(state)
    trunk = [
        ir.Sequential(path="trunk.0.0", layers=(_pad("trunk.0.0.0", 3, "symmetric"), w.conv("trunk.0.0.1", 2))),
        w.batch_norm("trunk.0.1"),
        ir.ReLU(path="trunk.0.2"),
        ir.MaxPool2D(path="trunk.0.3", kernel=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False),
        _stage(w, "trunk.0.4", 1),
        _stage(w, "trunk.0.5", 2),
        _stage(w, "trunk.0.6", 2),
        w.conv("trunk.1.0", bias=True),
        ir.ReLU(path="trunk.1.1"),
        w.conv("trunk.1.2", bias=True),
        _pad("crop_trick", -1, "zero"),
    ]
    mask_conv = "maskBranch.0.0" if w.has("maskBranch.0.0.weight") else "maskBranch.0"
    mask = w.conv(mask_conv, bias=True)
    mask_size = int(round(np.sqrt(mask.weight.shape[0])))
    mask_layers: list[Any] = [mask, ir.Reshape(path=f"{mask_conv}.reshape", shape=(1, mask_size, mask_size))]
    if target_size is not None and target_size > mask_size:
        mask_layers.append(ir.ResizeBilinear(path="maskBranch.1", height=target_size, width=target_size))
    score = (
        ir.Identity(path="scoreBranch.0", source="nn.Dropout"),
        w.conv("scoreBranch.1", bias=True),
        ir.Threshold(path="scoreBranch.2", threshold=0.0, value=1e-6),
        ir.Identity(path="scoreBranch.3", source="nn.Dropout"),
        w.conv("scoreBranch.4", bias=True),
    )
    left = sorted(set(state) - w.used)
    if left:
        raise ValueError(f"The state dict has parameters the PyTorch port's DeepMask lacks: {left[:8]}")
    f_size = int(trunk[9].weight.shape[-1])
    return ir.DeepMaskRecord(
        trunk=ir.Sequential(path="trunk", layers=tuple(trunk)),
        mask_branch=ir.Sequential(path="maskBranch", layers=tuple(mask_layers)),
        score_branch=ir.Sequential(path="scoreBranch", layers=score),
        config={"iSz": 16 * f_size, "oSz": mask_size, "gSz": max(target_size or 0, mask_size)},
    )
