import json

import pytest

from sharpmask_tf.config import PRESETS, Config, ModelConfig, get_config


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_json_round_trip(preset):
    config = get_config(preset)
    assert Config.from_json(config.to_json()) == config
    assert json.loads(config.to_json())["model"]["patch_size"] == config.model.patch_size


def test_presets_share_the_trunk_geometry():
    big, small = get_config("sharpmask_resnet50"), get_config("small")
    assert big.model.input_size == 192 and big.model.feature_size == 10
    assert big.model.refine_channels == (32, 16, 8, 4, 2)
    assert small.model.input_size % 16 == 0 and small.model.context == big.model.context
    assert get_config("deepmask_resnet50").model.refinement is False
    assert big.model.refinement is True


def test_overrides_are_typed():
    c = get_config(
        "small",
        [
            "model.refine_k=32",
            "training.lr_decay_epochs=[25,75]",
            "model.padding=symmetric",
            "inference.nms_threshold=0.5",
            "inference.compute_dtype=bfloat16",
            "model.trunk_weights=null",
        ],
    )
    assert c.model.refine_k == 32 and c.model.padding == "symmetric"
    assert c.training.lr_decay_epochs == (25.0, 75.0)
    assert c.inference.nms_threshold == 0.5 and c.model.trunk_weights is None
    assert c.inference.compute_dtype == "bfloat16"
    assert get_config("small").model.refine_k == 128  # presets are not mutated


def test_resnet50_presets_start_from_imagenet_and_freeze_batch_norm():
    for preset in ("sharpmask_resnet50", "deepmask_resnet50"):
        model = get_config(preset).model
        assert (model.trunk_flavour, model.trunk_weights, model.pretrained_trunk) == ("keras", "imagenet", True)
    small = get_config("small").model
    assert small.trunk_weights is None and not small.pretrained_trunk
    assert get_config("sharpmask_resnet50", ["model.trunk_weights=null"]).model.pretrained_trunk is False


def test_imagenet_download_needs_the_keras_flavour():
    with pytest.raises(ValueError, match="torchvision ResNet-50 .pth.*Received: trunk_weights='imagenet'"):
        get_config("sharpmask_resnet50", ["model.trunk_flavour=torch"])
    torch = get_config("sharpmask_resnet50", ["model.trunk_flavour=torch", "model.trunk_weights=/w/resnet50.pth"])
    assert torch.model.pretrained_trunk


def test_default_pyramid_is_the_papers():
    scales = get_config("sharpmask_resnet50").inference.scales
    assert len(scales) == 7
    assert scales[0] == pytest.approx(2**-2.5) and scales[-1] == pytest.approx(2**0.5)


@pytest.mark.parametrize(
    "override, field, value",
    [
        ("model.refine_k=40", "refine_k", "40"),
        ("model.refine_k=8", "refine_k", "8"),
        ("model.patch_size=150", "patch_size", "150"),
        ("model.context=8", "context", "8"),
        ("model.padding=circular", "padding", "'circular'"),
        ("model.upsampling=cubic", "upsampling", "'cubic'"),
        ("data.score_frequency=1.5", "score_frequency", "1.5"),
        ("data.mask_only_steps=-1", "mask_only_steps", "-1"),
        ("model.score_gradient=-0.5", "score_gradient", "-0.5"),
        ("training.batch_size=0", "batch_size", "0"),
        ("inference.mask_threshold=1", "mask_threshold", "1"),
        ("inference.compute_dtype=int8", "compute_dtype", "'int8'"),
        ('model.patch_size="big"', "patch_size", "'big'"),
        ("model.trunk_flavour=caffe", "trunk_flavour", "'caffe'"),
        ('model.trunk_weights=""', "trunk_weights", "''"),
    ],
)
def test_bad_values_name_field_and_value(override, field, value):
    with pytest.raises(ValueError) as e:
        get_config("small", [override])
    assert f"{field}={value}" in str(e.value)


def test_unknown_preset_section_and_field():
    with pytest.raises(ValueError, match="preset='resnet9000'"):
        get_config("resnet9000")
    with pytest.raises(ValueError, match="Unknown config section 'modle'"):
        get_config("small", ["modle.patch_size=160"])
    with pytest.raises(ValueError, match="Unknown field 'patchsize'"):
        get_config("small", ["model.patchsize=160"])
    with pytest.raises(ValueError, match="section.field=value"):
        get_config("small", ["patch_size"])
    with pytest.raises(ValueError, match="Unknown fields"):
        Config.from_dict({"model": {"nope": 1}})


def test_direct_construction_validates():
    with pytest.raises(ValueError, match="patch_size=100"):
        ModelConfig(patch_size=100)
