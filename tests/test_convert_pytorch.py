import sys

import numpy as np
import pytest

from sharpmask_tf.convert import ir
from sharpmask_tf.convert.pytorch import deepmask_pytorch_record, read_state_dict

BATCH = 2


def test_reading_without_torch_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match="needs the package `torch`"):
        read_state_dict(tmp_path / "model.pth")


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="writing and reading .pth files needs torch")


@pytest.fixture(scope="module")
def port(torch):
    from pytorch_port import random_port

    return random_port()


def _checkpoint(torch, port, path, prefix="module."):
    state = {prefix + k: v for k, v in port.state_dict().items()}
    torch.save({"epoch": 3, "arch": "DeepMask", "state_dict": state, "best_acc": 0.5}, path)


def test_port_deepmask_matches_torch(tmp_path, torch, port):
    _checkpoint(torch, port, tmp_path / "model_best.pth.tar")
    side, target = port.patch + 32, port.target
    patches = np.random.default_rng(1).normal(size=(BATCH, 3, side, side)).astype(np.float32)

    record = deepmask_pytorch_record(read_state_dict(tmp_path / "model_best.pth.tar"), target_size=target)
    ours = ir.run_deepmask(record, patches)
    with torch.no_grad():
        masks, scores = port(torch.from_numpy(patches))

    assert record.config == {"iSz": port.patch, "oSz": port.mask, "gSz": target}
    np.testing.assert_allclose(ours["masks"], masks.numpy().reshape(BATCH, target, target), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ours["scores"], scores.numpy().reshape(BATCH, 1), rtol=1e-4, atol=1e-4)
    assert np.std(ours["masks"]) > 0.1


def test_plain_state_dict_and_coarse_masks(tmp_path, torch, port):
    torch.save(port.state_dict(), tmp_path / "model.pth")
    state = read_state_dict(tmp_path / "model.pth")
    record = deepmask_pytorch_record(state, target_size=None)

    assert all(not k.startswith("module.") for k in state) and "trunk.0.4.0.conv2.1.weight" in state
    assert [type(n).__name__ for n in record.mask_branch.layers] == ["Conv2D", "Reshape"]
    stem_pad = record.trunk.layers[0].layers[0]
    block_pad = record.trunk.layers[4].layers[0].layers[0].branches[0].layers[3]
    assert (stem_pad.mode, stem_pad.top, block_pad.mode, block_pad.top) == ("symmetric", 3, "reflect", 1)
    assert record.trunk.layers[5].layers[0].layers[0].branches[0].layers[4].stride == (2, 2)  # stride on the 3x3


def test_pth_tar_without_state_dict(tmp_path, torch, port):
    torch.save({"epoch": 3, "model": port.state_dict()}, tmp_path / "bad.pth.tar")
    with pytest.raises(ValueError, match=r"must hold a 'state_dict'. Received keys: \['epoch', 'model'\]"):
        read_state_dict(tmp_path / "bad.pth.tar")


def test_not_a_pytorch_file(tmp_path, torch):
    (tmp_path / "x.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="is not a readable PyTorch file"):
        read_state_dict(tmp_path / "x.pth")


def test_mismatched_state_dicts(tmp_path, port):
    state = {k: v.numpy() for k, v in port.state_dict().items()}
    with pytest.raises(ValueError, match=r"lacks: \['extra.weight'\]"):
        deepmask_pytorch_record({**state, "extra.weight": np.ones(2)})
    del state["scoreBranch.4.bias"]
    with pytest.raises(ValueError, match="has no 'scoreBranch.4.bias'"):
        deepmask_pytorch_record(state)
