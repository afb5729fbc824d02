"""Builders of the Torch7 module trees the reference release saves, at small widths.

They follow the Lua constructors step by step: fb.resnet.torch's models/resnet.lua (and the
released resnet-50.t7, whose bottlenecks put a batch-norm after the addition), DeepMask.lua's
createTrunk / createMaskBranch / createScoreBranch (BN folded to constants by inn's BNtoFixed,
classifier removed, central crop, 3x3/7x7 zero padding moved into nn.SpatialSymmetricPadding),
SharpMask.lua's horizontal/vertical nets and refinement modules, and the trainers' save of
{model = ..., config = ...}. Like real files they carry gradients, output buffers and
parameters that are views into one flattened storage (what getParameters leaves behind).
"""

from __future__ import annotations

import numpy as np
from torch7_writer import Object, Storage, Tensor, long_storage, tensor

TENSOR = "torch.CudaTensor"
SKIP_POSITIONS = (8, 6, 5, 3)  # SharpMask.lua's skpos (1-based trunk positions)
SKIP_CROPS = (0, -2, -4, -8)  # the horizontal nets' crops of 16 context pixels at strides 16, 8, 4, 2


def _empty() -> Tensor:
    return Tensor(TENSOR, None, 0, (), ())


def module(typename: str, **fields) -> Object:
    """An nn.Module: output and gradInput buffers, the tensor type, the train flag."""
    return Object(typename, {"output": _empty(), "gradInput": _empty(), "_type": TENSOR, "train": True, **fields})


def container(typename: str, *children: Object) -> Object:
    return module(typename, modules=list(children))


def sequential(*children: Object) -> Object:
    return container("nn.Sequential", *children)


def conv(rng, n_in, n_out, k, stride=1, pad=0, bias=True, typename="cudnn.SpatialConvolution") -> Object:
    weight = rng.normal(0.0, np.sqrt(2.0 / (n_in * k * k)), (n_out, n_in, k, k))
    fields = dict(
        nInputPlane=n_in,
        nOutputPlane=n_out,
        kW=k,
        kH=k,
        dW=stride,
        dH=stride,
        padW=pad,
        padH=pad,
        weight=tensor(weight),
        gradWeight=tensor(np.zeros_like(weight)),
    )
    if bias:
        fields.update(bias=tensor(rng.normal(0.0, 0.1, n_out)), gradBias=tensor(np.zeros(n_out)))
    if typename.startswith("cudnn"):
        fields.update(groups=1, iSize=long_storage([0, 0, 0, 0]))
    else:
        fields.update(finput=tensor(rng.normal(size=(2, 5))), fgradInput=_empty())
    return module(typename, **fields)


def batch_norm(rng, n, typename="nn.SpatialBatchNormalization") -> Object:
    return module(
        typename,
        eps=1e-5,
        momentum=0.1,
        affine=True,
        running_mean=tensor(rng.normal(0.0, 0.2, n)),
        running_var=tensor(rng.uniform(0.5, 2.0, n)),
        weight=tensor(rng.uniform(0.5, 1.5, n)),
        bias=tensor(rng.normal(0.0, 0.2, n)),
        gradWeight=tensor(np.zeros(n)),
        gradBias=tensor(np.zeros(n)),
        save_mean=tensor(rng.normal(size=n)),
        save_std=tensor(rng.normal(size=n)),
    )


def relu(typename="cudnn.ReLU") -> Object:
    if typename == "nn.ReLU":
        return module(typename, threshold=0, val=0, inplace=True)
    return module(typename, inplace=True, mode="CUDNN_ACTIVATION_RELU")


def linear(rng, n_in, n_out) -> Object:
    weight = rng.normal(0.0, np.sqrt(2.0 / n_in), (n_out, n_in))
    return module(
        "nn.Linear",
        weight=tensor(weight),
        bias=tensor(rng.normal(0.0, 0.1, n_out)),
        gradWeight=tensor(np.zeros_like(weight)),
        gradBias=tensor(np.zeros(n_out)),
        addBuffer=tensor(np.ones(4)),
    )


def view(*size, num_input_dims=None) -> Object:
    fields = dict(size=long_storage(size), numElements=int(np.prod(size)))
    if num_input_dims is not None:
        fields["numInputDims"] = num_input_dims
    return module("nn.View", **fields)


def padding(typename, left, right, top, bottom) -> Object:
    return module(typename, pad_l=left, pad_r=right, pad_t=top, pad_b=bottom)


def max_pool(k, stride, pad) -> Object:
    return module(
        "nn.SpatialMaxPooling", kW=k, kH=k, dW=stride, dH=stride, padW=pad, padH=pad, ceil_mode=False, indices=_empty()
    )


def threshold(th, val) -> Object:
    return module("nn.Threshold", threshold=th, val=val, inplace=False)


def dropout(p=0.5) -> Object:
    return module("nn.Dropout", p=p, v2=True, inplace=False, noise=tensor(np.ones(3)))


def copy(intype, outtype) -> Object:
    return module("nn.Copy", intype=intype, outtype=outtype, dontCast=False)


def resampling(size) -> Object:
    return module(
        "nn.SpatialReSamplingEx",
        owidth=size,
        oheight=size,
        mode="bilinear",
        mode_c=2,
        yDim=2,
        xDim=3,
        inputSize=long_storage([1, 1, 1, 1]),
        outputSize=long_storage([1, 1, 1, 1]),
    )


def upsampling_nearest(factor) -> Object:
    return module("nn.SpatialUpSamplingNearest", scale_factor=factor)


def bottleneck(rng, n_in, n, stride, released: bool) -> Object:
    """models/resnet.lua's bottleneck (stride on the 3x3 conv); `released` is resnet-50.t7's
    variant: conv biases, no BN on the last conv of the branch nor on the shortcut, BN after
    the addition."""
    branch = [conv(rng, n_in, n, 1, bias=released), batch_norm(rng, n), relu()]
    branch += [conv(rng, n, n, 3, stride, 1, bias=released), batch_norm(rng, n), relu()]
    branch += [conv(rng, n, 4 * n, 1, bias=released)]
    if not released:
        branch.append(batch_norm(rng, 4 * n))
    if n_in != 4 * n:
        shortcut = conv(rng, n_in, 4 * n, 1, stride, bias=released)
        if not released:
            shortcut = sequential(shortcut, batch_norm(rng, 4 * n))
    else:
        shortcut = module("nn.Identity")
    block = [container("nn.ConcatTable", sequential(*branch), shortcut), module("nn.CAddTable", inplace=True)]
    if released:
        block.append(batch_norm(rng, 4 * n))
    return sequential(*block, relu())


def resnet(rng, width=8, blocks=(1, 1, 1, 1), released=True, classes=10) -> Object:
    """The ImageNet ResNet of models/resnet.lua at `width` (64 for ResNet-50), with its head."""
    layers = [conv(rng, 3, width, 7, 2, 3, bias=released), batch_norm(rng, width), relu(), max_pool(3, 2, 1)]
    n_in = width
    for stage, count in enumerate(blocks):
        n = width * 2**stage
        stride = 1 if stage == 0 else 2
        layers.append(
            sequential(
                *[
                    bottleneck(rng, n_in if b == 0 else 4 * n, n, stride if b == 0 else 1, released)
                    for b in range(count)
                ]
            )
        )
        n_in = 4 * n
    features = 4 * width * 2 ** (len(blocks) - 1)
    layers += [
        module("cudnn.SpatialAveragePooling", kW=7, kH=7, dW=1, dH=1, padW=0, padH=0),
        view(features, num_input_dims=3),
        linear(rng, features, classes),
    ]
    return sequential(*layers)


def replace(tree: Object, swap) -> Object:
    """nn.Module:replace: `swap` applied to every module, children first, as Torch does."""
    if "modules" in tree.fields:
        tree.fields["modules"] = [replace(m, swap) for m in tree.fields["modules"]]
    return swap(tree)


def bn_to_fixed(tree: Object, affine_type: str) -> Object:
    """inn.utils.BNtoFixed: every batch-norm becomes constants a = w / sqrt(var + eps),
    b = bias - mean * a, as inn.ConstAffine (shape (C)) or nn.SpatialConstDiagonal (1, C, 1, 1)."""

    def swap(m: Object) -> Object:
        if "BatchNormalization" not in m.typename:
            return m
        f = m.fields
        invstd = (f["running_var"].numpy() + f["eps"]) ** -0.5
        a = invstd * f["weight"].numpy()
        b = -f["running_mean"].numpy() * a + f["bias"].numpy()
        shape = (1, a.size, 1, 1) if affine_type == "nn.SpatialConstDiagonal" else (a.size,)
        return module(affine_type, a=tensor(a.reshape(shape)), b=tensor(b.reshape(shape)), inplace=True)

    return replace(tree, swap)


def update_padding(net: Object) -> None:
    """modelUtils.updatePadding: 3x3 and 7x7 convolutions inside Sequential/ConcatTable lose
    their zero padding to a nn.SpatialSymmetricPadding in a new Sequential around them."""
    if net.typename not in ("nn.Sequential", "nn.ConcatTable"):
        return
    children = net.fields["modules"]
    for i in reversed(range(len(children))):
        child = children[i]
        update_padding(child)
        f = child.fields
        if child.typename.endswith("SpatialConvolution") and f["kW"] == f["kH"] and f["kW"] in (3, 7):
            pw, ph = f["padW"], f["padH"]
            f["padW"], f["padH"] = 0, 0
            children[i] = sequential(padding("nn.SpatialSymmetricPadding", pw, pw, ph, ph), child)


def _parameters(tree: Object, names, seen) -> list[tuple[Object, str]]:
    """(module, field) of every parameter in Torch's parameters() order, shared modules once."""
    if id(tree) in seen:
        return []
    seen.add(id(tree))
    found = [(tree, n) for n in names if isinstance(tree.fields.get(n), Tensor) and tree.fields[n].storage]
    for child in tree.fields.get("modules", []):
        found += _parameters(child, names, seen)
    return found


def flatten_parameters(tree: Object, transpose_matrices: bool = False) -> None:
    """getParameters: weights and biases (and, apart, their gradients) become views into one
    storage each. With `transpose_matrices`, 2-D weights are stored column-major (a transposed
    view, stride (1, rows)) to exercise strided reads."""
    for names in (("weight", "bias"), ("gradWeight", "gradBias")):
        params = _parameters(tree, names, set())
        chunks, offset = [], 0
        for owner, name in params:
            old = owner.fields[name]
            values = old.numpy()
            if transpose_matrices and values.ndim == 2:
                chunks.append(values.T.reshape(-1))
                stride = (1, values.shape[0])
            else:
                chunks.append(values.reshape(-1))
                stride = tuple(int(np.prod(values.shape[d + 1 :])) for d in range(values.ndim))
            owner.fields[name] = (values.shape, stride, offset)
            offset += values.size
        storage = Storage("torch.CudaStorage", np.concatenate(chunks).astype(np.float32) if chunks else np.zeros(0))
        for owner, name in params:
            shape, stride, start = owner.fields[name]
            owner.fields[name] = Tensor(TENSOR, storage, start, shape, stride)


def fill_output_buffers(tree: Object, rng, seen=None) -> None:
    """Leaves an output buffer in every module, as after a training batch."""
    seen = set() if seen is None else seen
    if id(tree) in seen:
        return
    seen.add(id(tree))
    buffer = lambda: tensor(rng.normal(size=(2, 3, 2)))  # noqa: E731
    tables = ("nn.ConcatTable", "nn.ParallelTable")
    tree.fields["output"] = [buffer(), buffer()] if tree.typename in tables else buffer()
    for child in tree.fields.get("modules", []):
        fill_output_buffers(child, rng, seen)


def deepmask(
    rng,
    width=8,
    patch_size=32,
    mask_size=6,
    target_size=10,
    batch=2,
    head_channels=8,
    object_dim=16,
    score_hidden=12,
    affine_type="nn.SpatialConstDiagonal",
) -> dict:
    """DeepMask.lua's model at small widths, saved as TrainerDeepMask does: {model, config}."""
    f_size = patch_size // 16
    trunk = bn_to_fixed(resnet(rng, width), affine_type)
    trunk.fields["modules"] = trunk.fields["modules"][:-4]
    trunk.fields["modules"] += [
        padding("nn.SpatialZeroPadding", -1, -1, -1, -1),
        conv(rng, 16 * width, head_channels, 1),
        relu(),
        view(batch, head_channels * f_size * f_size),
        linear(rng, head_channels * f_size * f_size, object_dim),
    ]
    update_padding(trunk)
    mask_branch = sequential(sequential(linear(rng, object_dim, mask_size * mask_size)))
    if target_size > mask_size:
        mask_branch.fields["modules"].append(
            sequential(
                copy("torch.CudaTensor", "torch.FloatTensor"),
                view(batch, mask_size, mask_size),
                resampling(target_size),
                view(batch, target_size * target_size),
                copy("torch.FloatTensor", "torch.CudaTensor"),
            )
        )
    score_branch = sequential(
        dropout(), linear(rng, object_dim, score_hidden), threshold(0, 1e-6), dropout(), linear(rng, score_hidden, 1)
    )
    for branch, transposed in ((trunk, False), (mask_branch, False), (score_branch, True)):
        flatten_parameters(branch, transpose_matrices=transposed)
        fill_output_buffers(branch, rng)
    model = Object(
        "nn.DeepMask", {"trunk": trunk, "maskBranch": mask_branch, "scoreBranch": score_branch, "fSz": f_size}
    )
    config = dict(iSz=patch_size, oSz=mask_size, gSz=target_size, batch=batch, lr=0, scratch=False, rundir="exps/")
    return {"model": model, "config": config}


def sharpmask(rng, deepmask_file: dict, width=8, km=16, ks=16, skip_hidden=(8, 8, 8, 4)) -> dict:
    """SharpMask.lua's model on a DeepMask of `deepmask`, saved as TrainerSharpMask does."""
    dm, config = deepmask_file["model"], dict(deepmask_file["config"])
    f_size, batch = dm.fields["fSz"], config["batch"]
    config.update(gSz=config["iSz"], km=km, ks=ks, hfreq=0, dm="exps/deepmask")
    tap_channels = (16 * width, 8 * width, 4 * width, width)
    object_dim = dm.fields["scoreBranch"].fields["modules"][1].fields["weight"].size[1]

    def sym():
        return padding("nn.SpatialSymmetricPadding", 1, 1, 1, 1)

    neths = []
    for i, (n_tap, hidden, crop) in enumerate(zip(tap_channels, skip_hidden, SKIP_CROPS)):
        n = ks // 2**i
        layers = [padding("nn.SpatialZeroPadding", crop, crop, crop, crop)] if crop else []
        layers += [sym(), conv(rng, n_tap, hidden, 3), relu(), sym(), conv(rng, hidden, n, 3), relu()]
        layers += [sym(), conv(rng, n, n // 2, 3)]
        neths.append(sequential(*layers))
    netvs = {0: sequential(linear(rng, object_dim, f_size * f_size * km), view(batch, km, f_size, f_size))}
    for i in range(len(SKIP_POSITIONS)):
        n = km // 2**i
        netvs[i + 1] = sequential(sym(), conv(rng, n, n, 3), relu(), sym(), conv(rng, n, n // 2, 3))
    refs = {0: netvs[0]}
    for i in range(1, len(SKIP_POSITIONS) + 1):
        refs[i] = sequential(
            container("nn.ParallelTable", neths[i - 1], netvs[i]),
            module("nn.CAddTable", inplace=False),
            relu(),
            upsampling_nearest(2),
        )
    final = refs[len(SKIP_POSITIONS)].fields["modules"]
    final += [sym(), conv(rng, km // 2 ** len(SKIP_POSITIONS), 1, 3), view(batch, config["gSz"] ** 2)]
    for ref in refs.values():
        fill_output_buffers(ref, rng)
    model = Object(
        "nn.SharpMask",
        {
            "km": km,
            "ks": ks,
            "skpos": list(SKIP_POSITIONS),
            "inps": [[tensor(rng.normal(size=(2, 4))), tensor(rng.normal(size=(2, 4)))] for _ in SKIP_POSITIONS],
            "trunk": dm.fields["trunk"],
            "scoreBranch": dm.fields["scoreBranch"],
            "maskBranchDM": dm.fields["maskBranch"],
            "fSz": f_size,
            "neths": neths,
            "netvs": netvs,
            "refs": refs,
        },
    )
    return {"model": model, "config": config}
