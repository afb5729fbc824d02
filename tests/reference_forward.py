"""An independent NumPy forward pass of Torch7 module trees (tests.torch7_writer objects), written
from the Torch modules' own updateOutput code (nn, cudnn, nnx, inn, DeepMask's
SpatialSymmetricPadding) in evaluation mode, and DeepMask.lua / SharpMask.lua's composition.

It reads parameters through the writer's tensors (offset and strides into their storage), never
through torchfile, and shares no code with sharpmask_tf.convert.
"""

from __future__ import annotations

import math

import numpy as np
from torch7_writer import Object


def _param(m: Object, name: str):
    t = m.fields.get(name)
    return None if t is None else t.numpy().astype(np.float64)


def _conv(m, x):
    f = m.fields
    w = _param(m, "weight").reshape(f["nOutputPlane"], f["nInputPlane"], f["kH"], f["kW"])
    x = np.pad(x, ((0, 0), (0, 0), (f["padH"], f["padH"]), (f["padW"], f["padW"])))
    oh = (x.shape[2] - f["kH"]) // f["dH"] + 1
    ow = (x.shape[3] - f["kW"]) // f["dW"] + 1
    y = np.zeros((x.shape[0], f["nOutputPlane"], oh, ow))
    for i in range(f["kH"]):
        for j in range(f["kW"]):
            window = x[:, :, i : i + f["dH"] * (oh - 1) + 1 : f["dH"], j : j + f["dW"] * (ow - 1) + 1 : f["dW"]]
            y += np.einsum("bchw,oc->bohw", window, w[:, :, i, j])
    b = _param(m, "bias")
    return y if b is None else y + b[None, :, None, None]


def _zero_padding(m, x, mirror=False):
    """nn.SpatialZeroPadding, and DeepMask's SpatialSymmetricPadding when `mirror`."""
    f = m.fields
    pl, pr, pt, pb = f["pad_l"], f["pad_r"], f["pad_t"], f["pad_b"]
    h, w = x.shape[2] + pt + pb, x.shape[3] + pl + pr
    assert h >= 1 and w >= 1, "input is too small"
    out = np.zeros(x.shape[:2] + (h, w))
    c_in = x
    if pt < 0:
        c_in = c_in[:, :, -pt:]
    if pb < 0:
        c_in = c_in[:, :, : c_in.shape[2] + pb]
    if pl < 0:
        c_in = c_in[:, :, :, -pl:]
    if pr < 0:
        c_in = c_in[:, :, :, : c_in.shape[3] + pr]
    out[:, :, max(pt, 0) : h - max(pb, 0), max(pl, 0) : w - max(pr, 0)] = c_in
    if mirror:
        assert w >= 2 * pl and w >= 2 * pr and h >= 2 * pt and h >= 2 * pb, "input is too small"
        for i in range(1, pt + 1):
            out[:, :, pt - i] = out[:, :, i + pt - 1]
        for i in range(1, pb + 1):
            out[:, :, h - pb + i - 1] = out[:, :, h - pb - i]
        for i in range(1, pl + 1):
            out[:, :, :, pl - i] = out[:, :, :, i + pl - 1]
        for i in range(1, pr + 1):
            out[:, :, :, w - pr + i - 1] = out[:, :, :, w - pr - i]
    return out


def _const_affine(m, x):
    a, b = _param(m, "a"), _param(m, "b")
    if m.typename == "nn.SpatialConstDiagonal":  # (1, C, 1, 1), expanded as the input
        return x * a + b
    shape = (1, a.size) if x.ndim == 2 else (1, a.size, 1, 1)
    return x * a.reshape(shape) + b.reshape(shape)


def _batch_norm(m, x):
    shape = (1, -1, 1, 1)
    mean, var = _param(m, "running_mean").reshape(shape), _param(m, "running_var").reshape(shape)
    y = (x - mean) / np.sqrt(var + m.fields["eps"])
    if m.fields.get("weight") is None:  # affine = false
        return y
    return y * _param(m, "weight").reshape(shape) + _param(m, "bias").reshape(shape)


def _view(m, x):
    """nn.View with its batchsize() rule: the size may carry the batch or leave it implicit."""
    size = [int(s) for s in m.fields["size"].data]
    n_elements = math.prod(s for s in size if s >= 0)
    num_input_dims = m.fields.get("numInputDims")
    maxdim = num_input_dims if num_input_dims is not None else x.ndim
    ine = math.prod(x.shape[x.ndim - maxdim :])
    assert ine % n_elements == 0, "input view doesn't match desired view"
    bsz = ine // n_elements
    if -1 in size:
        bsz = 1
    for d in range(x.ndim - maxdim):
        bsz *= x.shape[d]
    if bsz == 1 and (num_input_dims is None or x.ndim <= num_input_dims):
        return x.reshape(size)
    return x.reshape([bsz, *size])


def _linear(m, x):
    return x @ _param(m, "weight").T + _param(m, "bias")


def _dropout(m, x):
    return x if m.fields.get("v2", True) else x * (1 - m.fields["p"])


def _resampling(m, x):
    """nnx's SpatialReSamplingEx bilinear mode on (K1, H, W) input, as its C loop computes it."""
    f = m.fields
    assert f["mode"] == "bilinear" and (f["yDim"], f["xDim"]) == (2, 3)
    ih, iw = x.shape[1], x.shape[2]
    oh, ow = f["oheight"], f["owidth"]
    wratio = np.float32(iw - 1) / np.float32(ow - 1)
    hratio = np.float32(ih - 1) / np.float32(oh - 1)
    out = np.zeros((x.shape[0], oh, ow))
    for y in range(oh):
        for xx in range(ow):
            ix, iy = np.float32(wratio * xx), np.float32(hratio * y)
            ix_nw, iy_nw = math.floor(ix), math.floor(iy)
            ix_ne, iy_ne = ix_nw + 1, iy_nw
            ix_sw, iy_sw = ix_nw, iy_nw + 1
            ix_se, iy_se = ix_nw + 1, iy_nw + 1
            se = (ix - ix_nw) * (iy - iy_nw)
            sw = (ix_ne - ix) * (iy - iy_ne)
            ne = (ix - ix_sw) * (iy_sw - iy)
            nw = (ix_se - ix) * (iy_se - iy)
            out[:, y, xx] = (
                x[:, iy_nw, ix_nw] * nw
                + x[:, iy_ne, min(ix_ne, iw - 1)] * ne
                + x[:, min(iy_sw, ih - 1), ix_sw] * sw
                + x[:, min(iy_se, ih - 1), min(ix_se, iw - 1)] * se
            )
    return out


def _upsampling(m, x):
    s = m.fields["scale_factor"]
    rows = np.arange(x.shape[-2] * s) // s
    cols = np.arange(x.shape[-1] * s) // s
    return x[..., rows[:, None], cols[None, :]]


def _max_pool(m, x):
    f = m.fields
    kh, kw, dh, dw, ph, pw = f["kH"], f["kW"], f["dH"], f["dW"], f["padH"], f["padW"]
    rounding = math.ceil if f["ceil_mode"] else math.floor
    oh = rounding((x.shape[2] + 2 * ph - kh) / dh) + 1
    ow = rounding((x.shape[3] + 2 * pw - kw) / dw) + 1
    if f["ceil_mode"]:  # the last window must start inside the image or its left/top padding
        oh -= (oh - 1) * dh >= x.shape[2] + ph
        ow -= (ow - 1) * dw >= x.shape[3] + pw
    out = np.empty(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            r0, c0 = i * dh - ph, j * dw - pw
            window = x[:, :, max(r0, 0) : min(r0 + kh, x.shape[2]), max(c0, 0) : min(c0 + kw, x.shape[3])]
            out[:, :, i, j] = window.max(axis=(2, 3))
    return out


def forward(m: Object, x, outputs: dict):
    """Runs module `m` on `x`, recording every module's output in `outputs` by id (Torch's
    module.output)."""
    kind = m.typename
    if kind == "nn.Sequential":
        for child in m.fields["modules"]:
            x = forward(child, x, outputs)
        y = x
    elif kind == "nn.ConcatTable":
        y = [forward(child, x, outputs) for child in m.fields["modules"]]
    elif kind == "nn.ParallelTable":
        y = [forward(child, v, outputs) for child, v in zip(m.fields["modules"], x, strict=True)]
    elif kind == "nn.CAddTable":
        y = x[0].copy()
        for v in x[1:]:
            y = y + v
    elif kind.endswith("SpatialConvolution"):
        y = _conv(m, x)
    elif kind == "nn.SpatialSymmetricPadding":
        y = _zero_padding(m, x, mirror=True)
    elif kind == "nn.SpatialZeroPadding":
        y = _zero_padding(m, x)
    elif kind in ("inn.ConstAffine", "nn.SpatialConstDiagonal"):
        y = _const_affine(m, x)
    elif kind.endswith("SpatialBatchNormalization"):
        y = _batch_norm(m, x)
    elif kind in ("cudnn.ReLU", "nn.ReLU"):
        y = np.maximum(x, 0.0)
    elif kind == "nn.Threshold":
        y = np.where(x > m.fields["threshold"], x, m.fields["val"])
    elif kind == "nn.View":
        y = _view(m, x)
    elif kind == "nn.Linear":
        y = _linear(m, x)
    elif kind == "nn.Dropout":
        y = _dropout(m, x)
    elif kind in ("nn.Copy", "nn.Identity"):
        y = x
    elif kind == "nn.SpatialReSamplingEx":
        y = _resampling(m, x)
    elif kind == "nn.SpatialUpSamplingNearest":
        y = _upsampling(m, x)
    elif kind == "nn.SpatialMaxPooling":
        y = _max_pool(m, x)
    else:
        raise NotImplementedError(kind)
    outputs[id(m)] = y
    return y


def deepmask_forward(saved: dict, patches: np.ndarray) -> dict:
    """{"masks", "scores"} of a saved DeepMask or SharpMask, plus "refined_masks" for SharpMask
    (SharpMask:forward: refs[k] takes {trunk.modules[skpos[k]].output, previous output})."""
    model = saved["model"].fields
    outputs: dict = {}
    features = forward(model["trunk"], patches, outputs)
    mask_branch = model.get("maskBranch", model.get("maskBranchDM"))
    result = {"masks": forward(mask_branch, features, {}), "scores": forward(model["scoreBranch"], features, {})}
    if "refs" in model:
        refs, trunk_modules = model["refs"], model["trunk"].fields["modules"]
        current = forward(refs[0], features, {})
        for k, position in enumerate(model["skpos"], start=1):
            current = forward(refs[k], [outputs[id(trunk_modules[position - 1])], current], {})
        result["refined_masks"] = current
    return result
