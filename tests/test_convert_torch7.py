import numpy as np
import pytest
import torch_trees
import torchfile
from reference_forward import deepmask_forward, forward
from torch7_writer import Object, Storage, Tensor, dumps, save, tensor

from sharpmask_tf.convert import ir
from sharpmask_tf.convert.torch7 import module_ir, read_deepmask_t7, read_torch7

BATCH = 2


def _patches(rng, size):
    return rng.normal(size=(BATCH, 3, size, size))


def test_reader_reads_what_the_writer_writes(tmp_path):
    storage = Storage("torch.FloatStorage", np.arange(12, dtype=np.float32))
    column = Tensor("torch.FloatTensor", storage, 1, (3, 2), (1, 4))  # a strided view from offset 1
    shared = Object("nn.Foo", {"x": 1.5, "flag": False, "name": "nn", "nothing": None})
    data = {"a": column, "b": Tensor("torch.FloatTensor", storage, 0, (12,), (1,)), "c": [shared, shared], 0: "zero"}
    save(tmp_path / "x.t7", data)

    back = read_torch7(tmp_path / "x.t7")

    np.testing.assert_array_equal(back[b"a"], [[1, 5], [2, 6], [3, 7]])
    np.testing.assert_array_equal(back[b"b"], np.arange(12))
    assert np.shares_memory(back[b"a"], back[b"b"])  # one storage, read once
    assert list(back[b"c"]) == [1, 2]  # Lua arrays stay 1-based tables
    first, second = back[b"c"][1], back[b"c"][2]
    assert first is second and first.torch_typename() == b"nn.Foo"
    assert (first.x, first.flag, first.name) == (1.5, False, b"nn") and back[0] == b"zero"


def test_pinned_torchfile_needs_the_8_byte_long_workaround(tmp_path):
    """torchfile 0.1.0's force_8bytes_long path calls Python 2's xrange; ours reads the file."""
    save(tmp_path / "t.t7", tensor(np.ones((2, 3)), "torch.FloatTensor"))
    with open(tmp_path / "t.t7", "rb") as f, pytest.raises(NameError, match="xrange"):
        torchfile.T7Reader(f, force_8bytes_long=True).read_obj()
    np.testing.assert_array_equal(read_torch7(tmp_path / "t.t7"), np.ones((2, 3)))


@pytest.mark.parametrize("affine_type", ["nn.SpatialConstDiagonal", "inn.ConstAffine"])
def test_deepmask_t7_matches_the_reference_forward(tmp_path, affine_type):
    rng = np.random.default_rng(2)
    saved = torch_trees.deepmask(rng, batch=BATCH, affine_type=affine_type)
    save(tmp_path / "model.t7", saved)
    patches = _patches(rng, 64)

    record = read_deepmask_t7(tmp_path / "model.t7")
    ours = ir.run_deepmask(record, patches)
    want = deepmask_forward(saved, patches)

    assert not record.is_sharpmask and record.config["iSz"] == 32 and record.config["gSz"] == 10
    assert ours["masks"].shape == (BATCH, 10, 10) and ours["scores"].shape == (BATCH, 1)
    np.testing.assert_allclose(ours["masks"], want["masks"].reshape(BATCH, 10, 10), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    assert np.std(want["masks"]) > 0.1 and np.std(want["scores"]) > 0  # a test of something


def test_deepmask_t7_structure(tmp_path, deepmask_file):
    save(tmp_path / "model.t7", deepmask_file)
    record = read_deepmask_t7(tmp_path / "model.t7")
    kinds = [type(layer).__name__ for layer in record.trunk.layers]

    # conv1 (padding + conv), affine, relu, pool, 3 stages, crop, 1x1 conv, relu, view, linear
    assert kinds == [
        "Sequential",
        "Affine",
        "ReLU",
        "MaxPool2D",
        *["Sequential"] * 3,
        "Pad2D",
        "Conv2D",
        "ReLU",
        "Reshape",
        "Dense",
    ]
    pad, conv1 = record.trunk.layers[0].layers
    assert (pad.mode, pad.top, pad.left, conv1.padding, conv1.stride) == ("symmetric", 3, 3, (0, 0), (2, 2))
    assert conv1.path == "model.trunk.modules[1].modules[2]" and conv1.weight.shape == (8, 3, 7, 7)
    crop = record.trunk.layers[7]
    assert (crop.mode, crop.top, crop.bottom, crop.left, crop.right) == ("zero", -1, -1, -1, -1)
    assert record.trunk.layers[10].shape == (8 * 2 * 2,)  # View(batch, 128*fSz*fSz) keeps the batch
    block = record.trunk.layers[4].layers[0]
    assert [type(n).__name__ for n in block.layers] == ["ConcatTable", "AddTable", "Affine", "ReLU"]
    assert block.layers[2].scale.shape == (32,)
    score = record.score_branch.layers
    assert [type(n).__name__ for n in score] == ["Identity", "Dense", "Threshold", "Identity", "Dense"]
    assert (score[2].threshold, score[2].value) == (0.0, 1e-6)
    listing = ir.summary(record.trunk).splitlines()
    assert listing[3] == "    Conv2D 3->8 7x7 stride 2x2 pad 0x0  [model.trunk.modules[1].modules[2]]"
    assert listing[-1] == "  Dense 32->16  [model.trunk.modules[12]]"
    # the file stores this matrix transposed (strides (1, rows)); the record holds it as (out, in)
    want = deepmask_file["model"].fields["scoreBranch"].fields["modules"][1].fields["weight"].numpy()
    np.testing.assert_array_equal(score[1].weight, want)
    assert score[1].weight.flags.c_contiguous and score[1].weight.dtype == np.float32


def test_sharpmask_t7_matches_the_reference_forward(tmp_path, sharpmask_file):
    save(tmp_path / "model.t7", sharpmask_file)
    patches = _patches(np.random.default_rng(3), 64)

    record = read_deepmask_t7(tmp_path / "model.t7")
    ours = ir.run_deepmask(record, patches)
    want = deepmask_forward(sharpmask_file, patches)

    assert record.is_sharpmask and record.skip_layers == (7, 5, 4, 2)
    assert ours["refined_masks"].shape == (BATCH, 32, 32)
    np.testing.assert_allclose(
        ours["refined_masks"], want["refined_masks"].reshape(BATCH, 32, 32), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(ours["scores"], want["scores"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours["masks"], want["masks"].reshape(BATCH, 10, 10), rtol=1e-4, atol=1e-5)
    assert np.std(want["refined_masks"]) > 0


def test_sharpmask_t7_structure(tmp_path, sharpmask_file):
    save(tmp_path / "model.t7", sharpmask_file)
    record = read_deepmask_t7(tmp_path / "model.t7")
    vertical0 = record.refinements[0]
    assert [type(n).__name__ for n in vertical0.layers] == ["Dense", "Reshape"]
    assert vertical0.layers[1].shape == (16, 2, 2)
    refine4 = record.refinements[4]
    assert [type(n).__name__ for n in refine4.layers] == [
        "ParallelTable", "AddTable", "ReLU", "UpsampleNearest", "Pad2D", "Conv2D", "Reshape"
    ]  # fmt: skip
    skip4, vertical4 = refine4.layers[0].branches
    assert (skip4.layers[0].mode, skip4.layers[0].top) == ("zero", -8)
    assert [n.weight.shape for n in skip4.layers if isinstance(n, ir.Conv2D)] == [
        (4, 8, 3, 3),
        (2, 4, 3, 3),
        (1, 2, 3, 3),
    ]
    assert [n.weight.shape for n in vertical4.layers if isinstance(n, ir.Conv2D)] == [(2, 2, 3, 3), (1, 2, 3, 3)]
    assert skip4.layers[1].path == "model.refs[4].modules[1].modules[1].modules[2]"


@pytest.mark.parametrize("released", [True, False])
def test_resnet_trunk_with_batch_norm_matches_the_reference_forward(tmp_path, released):
    """fb.resnet.torch trunks through conv4 as read before BNtoFixed: released resnet-50.t7's
    layout (BN after the addition, conv biases) and resnet.lua's (BN in branches, no biases)."""
    rng = np.random.default_rng(4)
    trunk = torch_trees.resnet(rng, width=4, blocks=(2, 1, 1, 1), released=released)
    trunk.fields["modules"] = trunk.fields["modules"][:-4]
    save(tmp_path / "resnet.t7", trunk)
    patches = _patches(rng, 33)

    node = module_ir(read_torch7(tmp_path / "resnet.t7"))

    batch_norms = [n for n in _walk(node) if isinstance(n, ir.BatchNorm)]
    assert len(batch_norms) == (1 + 4 * 3 if released else 1 + 4 * 3 + 3)
    np.testing.assert_allclose(ir.run(node, patches), forward(trunk, patches, {}), rtol=1e-4, atol=1e-5)


def _walk(node):
    yield node
    for child in getattr(node, "layers", ()) + getattr(node, "branches", ()):
        yield from _walk(child)


def test_unknown_module_names_its_path(tmp_path):
    save(tmp_path / "resnet.t7", torch_trees.resnet(np.random.default_rng(5), width=4))
    with pytest.raises(ValueError, match=r"^model\.modules\[9\]: unknown module cudnn\.SpatialAveragePooling$"):
        module_ir(read_torch7(tmp_path / "resnet.t7"))


def test_unknown_module_deep_in_a_deepmask(tmp_path):
    saved = torch_trees.deepmask(np.random.default_rng(6), batch=BATCH)
    saved["model"].fields["trunk"].fields["modules"][4].fields["modules"][0].fields["modules"][1] = Object("nn.Foo")
    save(tmp_path / "model.t7", saved)
    with pytest.raises(
        ValueError, match=r"model\.trunk\.modules\[5\]\.modules\[1\]\.modules\[2\]: unknown module nn\.Foo"
    ):
        read_deepmask_t7(tmp_path / "model.t7")


def test_not_a_torch7_file(tmp_path):
    (tmp_path / "a.t7").write_text("this is not a torch file")
    with pytest.raises(ValueError, match="is not a Torch7 binary file"):
        read_torch7(tmp_path / "a.t7")
    (tmp_path / "b.t7").write_bytes(b"PK\x03\x04" + bytes(40))
    with pytest.raises(ValueError, match="PyTorch checkpoint"):
        read_torch7(tmp_path / "b.t7")
    (tmp_path / "c.t7").write_bytes(b"")
    with pytest.raises(ValueError, match="is not a Torch7 binary file"):
        read_torch7(tmp_path / "c.t7")


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9, 0.9999])
def test_truncated_file(tmp_path, deepmask_file, keep):
    data = dumps(deepmask_file)
    (tmp_path / "cut.t7").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="ends early: a truncated Torch7 file"):
        read_torch7(tmp_path / "cut.t7")


def test_tensor_past_its_storage_is_an_error(tmp_path):
    short = Storage("torch.CudaStorage", np.ones(5, np.float32))
    layer = torch_trees.linear(np.random.default_rng(7), 3, 2)
    layer.fields["weight"] = Tensor("torch.CudaTensor", short, 0, (2, 3), (3, 1))
    save(tmp_path / "l.t7", layer)
    with pytest.raises(ValueError, match=r"model\.weight: the tensor reaches past the end of its storage"):
        module_ir(read_torch7(tmp_path / "l.t7"))


def test_not_a_deepmask_model(tmp_path):
    save(tmp_path / "r.t7", torch_trees.resnet(np.random.default_rng(8), width=4))
    with pytest.raises(ValueError, match=r"expected \{model = nn.DeepMask \| nn.SharpMask.*Received: nn.Sequential"):
        read_deepmask_t7(tmp_path / "r.t7")


def test_less_common_module_variants_match_the_reference_forward(tmp_path):
    """Old-style dropout (scaled at inference), nn.ReLU, batch-norm without affine, ceil-mode
    pooling, nn.SpatialConvolution with a bias and 2-D (MM-style) weights, identity."""
    rng = np.random.default_rng(9)
    bn = torch_trees.batch_norm(rng, 4)
    for name in ("weight", "bias", "gradWeight", "gradBias"):
        del bn.fields[name]
    bn.fields["affine"] = False
    pool = torch_trees.max_pool(3, 2, 1)
    pool.fields["ceil_mode"] = True
    conv = torch_trees.conv(rng, 3, 4, 3, stride=2, pad=1, typename="nn.SpatialConvolution")
    conv.fields["weight"] = tensor(conv.fields["weight"].numpy().reshape(4, 27))
    drop = torch_trees.dropout(0.3)
    drop.fields["v2"] = False
    tree = torch_trees.sequential(
        conv,
        bn,
        torch_trees.relu("nn.ReLU"),
        pool,
        torch_trees.module("nn.Identity"),
        torch_trees.view(4 * 3 * 3),
        drop,
    )
    save(tmp_path / "m.t7", tree)
    x = rng.normal(size=(BATCH, 3, 10, 10))

    node = module_ir(read_torch7(tmp_path / "m.t7"))

    assert [type(n).__name__ for n in node.layers] == [
        "Conv2D", "BatchNorm", "ReLU", "MaxPool2D", "Identity", "Reshape", "Scale"
    ]  # fmt: skip
    np.testing.assert_allclose(ir.run(node, x), forward(tree, x, {}), rtol=1e-5, atol=1e-6)


def test_deepmask_file_without_a_batch_size(tmp_path):
    saved = torch_trees.deepmask(np.random.default_rng(10), batch=BATCH)
    del saved["config"]["batch"]
    save(tmp_path / "model.t7", saved)
    with pytest.raises(ValueError, match="the saved config has no batch size"):
        read_deepmask_t7(tmp_path / "model.t7")
