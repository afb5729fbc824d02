"""Trunk flavours against the programs their weights come from, the offline ImageNet error, and
BatchNorm of trunks trained from scratch (batch statistics in stage 1, synchronised, frozen after)."""

import sys
import urllib.error

import keras
import numpy as np
import pytest
import tensorflow as tf
import test_train_fakes as fakes
from strategies import two_cpus

from sharpmask_tf import sharpmask
from sharpmask_tf.backbone import (
    FLAVOURS,
    KERAS_RESNET50_FILE,
    input_normalization,
    load_trunk_weights,
    read_torch_state_dict,
    resnet_trunk,
)
from sharpmask_tf.config import TRUNK_FLAVOURS, get_config
from sharpmask_tf.layers import FrozenBatchNormalization
from sharpmask_tf.sharpmask import build_model
from sharpmask_tf.trainer import stage_model, train

TINY = [
    "training.batch_size=4",
    "training.stage1_steps=2",
    "training.stage2_steps=1",
    "training.validate_every=100",
    "training.checkpoint_every=100",
    "training.val_patches=8",
]
DATA = dict(make_dataset=fakes.make_dataset, make_validation_patches=fakes.make_validation_patches)
# An image that is not symmetric in its channels, so a swapped red and blue shows.
IMAGE = np.random.default_rng(3).random((2, 64, 48, 3)).astype("float32") * [1.0, 0.7, 0.4]


def _features(config, image):
    """conv4 of `build_model(config)`'s trunk on an RGB [0, 1] image, through its own normalisation."""
    model = build_model(config)
    return np.asarray(model.get_layer("trunk")(model.get_layer("normalize")(image))["conv4"])


def _assert_close(got, want):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_every_config_flavour_is_defined():
    assert tuple(FLAVOURS) == TRUNK_FLAVOURS


def test_keras_flavour_equals_keras_resnet50_on_its_preprocessing(tmp_path):
    reference = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(None, None, 3))
    rng = np.random.default_rng(0)
    for layer in reference.layers:
        layer.set_weights(
            [
                rng.uniform(0.5, 1.5, w.shape).astype("float32")
                if "variance" in v.name
                else rng.normal(0.0, 0.05, w.shape).astype("float32")
                for v, w in zip(layer.weights, layer.get_weights())
            ]
        )
    path = str(tmp_path / "resnet50_notop.weights.h5")
    reference.save_weights(path)
    loaded = keras.applications.ResNet50(weights=path, include_top=False, input_shape=(None, None, 3))
    conv4 = keras.Model(loaded.input, loaded.get_layer("conv4_block6_out").output)
    want = np.asarray(conv4(keras.applications.resnet.preprocess_input(255.0 * IMAGE)))
    # Zero padding is Keras' own; the paper's reflect padding changes only the borders.
    config = get_config("deepmask_resnet50", ["model.padding=zero", f"model.trunk_weights={path}"])
    assert config.model.trunk_flavour == "keras"
    _assert_close(_features(config, IMAGE), want)


class _TorchvisionLayout:
    """torchvision's ResNet-50 (stride on the 3x3, downsample = 1x1 conv + BN, no conv biases),
    written with torch.nn; its state dict has torchvision's names, layer4 and fc included."""

    @staticmethod
    def build(torch):
        nn = torch.nn

        class Bottleneck(nn.Module):
            def __init__(self, inplanes, planes, stride):
                super().__init__()
                self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(planes)
                self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
                self.bn2 = nn.BatchNorm2d(planes)
                self.conv3 = nn.Conv2d(planes, 4 * planes, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(4 * planes)
                self.relu = nn.ReLU()
                self.downsample = None
                if stride != 1 or inplanes != 4 * planes:
                    self.downsample = nn.Sequential(
                        nn.Conv2d(inplanes, 4 * planes, 1, stride=stride, bias=False), nn.BatchNorm2d(4 * planes)
                    )

            def forward(self, x):
                identity = x if self.downsample is None else self.downsample(x)
                out = self.relu(self.bn1(self.conv1(x)))
                out = self.relu(self.bn2(self.conv2(out)))
                return self.relu(self.bn3(self.conv3(out)) + identity)

        class ResNet50(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
                self.bn1 = nn.BatchNorm2d(64)
                self.relu = nn.ReLU()
                self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
                inplanes = 64
                for i, (planes, blocks, stride) in enumerate(((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))):
                    layers = []
                    for b in range(blocks):
                        layers.append(Bottleneck(inplanes, planes, stride if b == 0 else 1))
                        inplanes = 4 * planes
                    setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
                self.avgpool = nn.AdaptiveAvgPool2d(1)
                self.fc = nn.Linear(2048, 1000)

            def conv4(self, x):
                x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
                return self.layer3(self.layer2(self.layer1(x)))

        return ResNet50()


def test_torch_flavour_equals_a_torchvision_resnet50(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch flavour's weights are read with torch")
    torch.manual_seed(0)
    net = _TorchvisionLayout.build(torch).eval()
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.1)
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = str(tmp_path / "resnet50.pth")
    torch.save(net.state_dict(), path)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        nchw = torch.from_numpy(((IMAGE - mean) / std).astype("float32").transpose(0, 3, 1, 2))
        want = net.conv4(nchw).numpy().transpose(0, 2, 3, 1)
    config = get_config(
        "deepmask_resnet50", ["model.padding=zero", "model.trunk_flavour=torch", f"model.trunk_weights={path}"]
    )
    _assert_close(_features(config, IMAGE), want)


def test_torch_weights_are_read_without_unpickling_objects(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch flavour's weights are read with torch")
    path = str(tmp_path / "not_weights.pth")
    torch.save({"conv1.weight": torch.zeros(1), "payload": ValueError("an arbitrary object")}, path)
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        read_torch_state_dict(path)


def test_torch_flavour_without_torch_names_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch raises ImportError
    trunk = resnet_trunk(flavour="torch")
    with pytest.raises(ImportError, match="needs the `torch` package.*pip install torch"):
        load_trunk_weights(trunk, str(tmp_path / "resnet50.pth"), "torch")


def test_flavours_differ_in_layout_and_input():
    keras_trunk, torch_trunk = resnet_trunk((1, 1, 1), 8, flavour="keras"), resnet_trunk((1, 1, 1), 8, flavour="torch")
    assert keras_trunk.get_layer("conv3_block1_1_conv").strides == (2, 2)
    assert keras_trunk.get_layer("conv3_block1_2_conv").strides == (1, 1)
    assert torch_trunk.get_layer("conv3_block1_1_conv").strides == (1, 1)
    assert torch_trunk.get_layer("conv3_block1_2_conv").strides == (2, 2)
    assert keras_trunk.get_layer("conv1_conv").use_bias and not torch_trunk.get_layer("conv1_conv").use_bias
    want = keras.applications.resnet.preprocess_input(255.0 * IMAGE)
    np.testing.assert_allclose(np.asarray(input_normalization("keras")(IMAGE)), want, rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="flavour='t7'"):
        resnet_trunk(flavour="t7")


def test_only_pretrained_weights_get_their_own_input_transform():
    from_scratch = build_model(get_config("small"))
    pretrained = build_model(get_config("small", ["model.trunk_weights=imagenet"]), trunk_weights=False)
    assert from_scratch.get_layer("normalize").mode == "torch"
    assert pretrained.get_layer("normalize").mode == "caffe"
    assert isinstance(_trunk_bn(pretrained), FrozenBatchNormalization)
    assert type(_trunk_bn(from_scratch)) is keras.layers.BatchNormalization


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No internet and an empty Keras cache; records the URLs Keras tried."""
    from keras.src.utils import file_utils

    tried = []

    def refuse(url, *args, **kwargs):
        tried.append(url)
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(file_utils, "urlretrieve", refuse)
    monkeypatch.setattr(file_utils.config, "keras_home", lambda: str(tmp_path / "keras_home"))
    return tried


def test_resnet50_presets_load_imagenet_weights_and_say_how_to_work_offline(offline):
    config = get_config("deepmask_resnet50")
    assert (config.model.trunk_flavour, config.model.trunk_weights) == ("keras", "imagenet")
    with pytest.raises(OSError) as info:
        build_model(config)
    assert offline and offline[0].endswith(KERAS_RESNET50_FILE)
    message = str(info.value)
    assert f"--set model.trunk_weights=/path/{KERAS_RESNET50_FILE}" in message
    assert "model.trunk_weights=null" in message


def test_models_whose_weights_come_from_elsewhere_build_offline(offline):
    config = get_config("sharpmask_resnet50")
    model = build_model(config, trunk_weights=False)
    assert isinstance(model.get_layer("trunk").get_layer("conv1_bn"), FrozenBatchNormalization)
    stage_model(config, "sharpmask")
    stage_model(config, "deepmask", trunk_weights=False)
    assert offline == []


def _trunk_bn(model, name="conv2_block1_1_bn"):
    return model.get_layer("trunk").get_layer(name)


def test_stage_two_and_resumption_do_not_load_trunk_weights_again(tmp_path, monkeypatch):
    loads = []
    monkeypatch.setattr(sharpmask, "load_trunk_weights", lambda trunk, weights, flavour: loads.append(weights))
    config = get_config("small", [*TINY, "model.trunk_weights=/weights/on/the/first/node.h5"])
    train(config, str(tmp_path), stage="deepmask", progress=False, **DATA)
    assert loads == ["/weights/on/the/first/node.h5"]
    train(config, str(tmp_path), stage="both", progress=False, **DATA)  # resumes stage 1, runs stage 2
    assert len(loads) == 1
    deepmask = keras.saving.load_model(tmp_path / "deepmask.keras")
    assert isinstance(_trunk_bn(deepmask), FrozenBatchNormalization)
    np.testing.assert_array_equal(np.asarray(_trunk_bn(deepmask).moving_mean), 0.0)  # pretrained: frozen


def test_a_trunk_from_scratch_learns_batch_statistics_in_stage_one_only(tmp_path):
    config = get_config("small", TINY)
    assert config.model.trunk_weights is None and not config.model.pretrained_trunk
    train(config, str(tmp_path), progress=False, **DATA)
    deepmask = keras.saving.load_model(tmp_path / "deepmask.keras")
    sharp = keras.saving.load_model(tmp_path / "sharpmask.keras")
    bn = _trunk_bn(deepmask)
    assert type(bn) is keras.layers.BatchNormalization and bn.synchronized
    assert bn.gamma.trainable
    assert np.abs(np.asarray(bn.moving_mean)).min() > 0  # updated by stage 1's training calls
    for name in ("conv1_bn", "conv2_block1_1_bn", "conv4_block1_3_bn"):
        for a, b in zip(_trunk_bn(deepmask, name).weights, _trunk_bn(sharp, name).weights):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=a.path)  # not by stage 2's


def test_synchronised_batch_norm_uses_the_global_batch():
    strategy = two_cpus()
    keras.utils.set_random_seed(0)
    with strategy.scope():
        mirrored = resnet_trunk((1, 1, 1), 8, frozen_batch_norm=False)
    single = resnet_trunk((1, 1, 1), 8, frozen_batch_norm=False)
    single.set_weights(mirrored.get_weights())
    rng = np.random.default_rng(5)
    # The replicas' shares differ, so per-replica statistics would not be the global ones.
    halves = [rng.normal(0.0, 1.0, (2, 32, 32, 3)), rng.normal(3.0, 0.2, (2, 32, 32, 3))]
    halves = [h.astype("float32") for h in halves]
    shares = strategy.experimental_distribute_values_from_function(lambda ctx: halves[ctx.replica_id_in_sync_group])

    @tf.function
    def step(x):
        return strategy.run(lambda t: mirrored(t, training=True)["conv4"], args=(x,))

    outputs = strategy.experimental_local_results(step(shares))
    want = single(np.concatenate(halves), training=True)["conv4"]
    _assert_close(np.concatenate([np.asarray(o) for o in outputs]), np.asarray(want))
    for name in ("conv1_bn", "conv3_block1_2_bn"):
        for a, b in zip(mirrored.get_layer(name).weights, single.get_layer(name).weights):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6, err_msg=a.path)
        moved = np.asarray(single.get_layer(name).moving_mean)
        assert np.abs(moved).max() > 0


def test_torch_flavour_survives_a_keras_round_trip(tmp_path):
    model = build_model(get_config("small", ["model.trunk_flavour=torch"]))
    path = tmp_path / "m.keras"
    model.save(path)
    clone = keras.saving.load_model(path)
    x = np.resize(IMAGE, (2, 96, 96, 3))
    for k, v in model(x).items():
        np.testing.assert_allclose(np.asarray(clone(x)[k]), np.asarray(v), rtol=1e-5, atol=1e-5)
    assert clone.get_layer("normalize").mode == "torch"
    assert not clone.get_layer("trunk").get_layer("conv1_conv").use_bias


def test_xla_steps_refuse_synchronised_batch_norm_over_replicas(tmp_path):
    from sharpmask_tf.trainer import Trainer

    strategy = two_cpus()
    config = get_config("small", [*TINY, "training.jit=true"])
    trainer = Trainer(config, str(tmp_path), strategy, progress=False, **DATA)
    with pytest.raises(ValueError, match="training.jit=true, model.trunk_weights=None"):
        trainer.build_task("deepmask")
    trainer.build_task("sharpmask")  # stage 2 runs the trunk on its moving statistics: no all-reduce
