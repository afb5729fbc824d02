"""Full-image proposals: index arithmetic end to end, consistency with the patch model, edge cases, the CLI."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from image_files import bomb_png

from sharpmask_tf.config import REFINEMENT_LAYOUTS, TAP_STRIDES, InferenceConfig, get_config
from sharpmask_tf.images import GREY, to_rgb
from sharpmask_tf.inference import ProposalGenerator, main
from sharpmask_tf.masks import mask_iou_matrix, paste_masks
from sharpmask_tf.pyramid import padded_size, scale_and_pad, scaled_size, window_boxes
from sharpmask_tf.sharpmask import build_model, refinement_split

P, C = 64, 16  # the small preset's patch size and context


@pytest.fixture(scope="module")
def deepmask():
    tf.keras.utils.set_random_seed(1)
    return build_model(get_config("small", ["model.refinement=false"]))


@pytest.fixture(scope="module")
def sharpmask():
    tf.keras.utils.set_random_seed(2)
    return build_model(get_config("small"))


# The reference layout as SharpMask.lua builds it.
REFERENCE = ["model.refinement_layout=reference", "model.padding=symmetric", "model.upsampling=nearest"]


@pytest.fixture(scope="module")
def reference_sharpmask():
    tf.keras.utils.set_random_seed(2)
    return build_model(get_config("small", REFERENCE))


def smooth_image(h, w, seed=0):
    """A textured uint8 image: low-frequency noise plus a few bright rectangles."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, (h // 16 + 2, w // 16 + 2, 3)).astype(np.float32)
    image = tf.image.resize(coarse[None], (h, w), method="bicubic")[0].numpy()
    for _ in range(4):
        y, x = rng.integers(0, h - 20), rng.integers(0, w - 20)
        image[y : y + rng.integers(10, 40), x : x + rng.integers(10, 40)] = rng.uniform(0, 1, 3)
    return (np.clip(image, 0, 1) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- index arithmetic, end to end


class PeakGenerator(ProposalGenerator):
    """Replaces the score maps by -10 everywhere except +10 at one (row, col) of the scale whose
    padded image has `target` (Hp, Wp): the pipeline's ranking, index arithmetic, window
    placement and pasting then decide where that one window lands."""

    def __init__(self, model, config):
        super().__init__(model, config)
        self.target = tf.Variable([0, 0, 0, 0], dtype=tf.int32, trainable=False)

    def _level_features(self, padded):
        scores, objects, skips = super()._level_features(padded)
        here = tf.reduce_all(tf.shape(padded)[1:3] == self.target[:2])
        at = tf.minimum(self.target[2:], tf.shape(scores) - 1)  # in range on the other levels
        peak = tf.scatter_nd([at], [20.0], tf.shape(scores)) - 10.0
        return tf.where(here, peak, -10.0 * tf.ones_like(scores)), objects, skips


@pytest.mark.parametrize("height,width", [(151, 131), (177, 95)])
def test_a_single_peak_lands_on_its_window_at_every_scale(deepmask, height, width):
    # An all-ones mask, so the pasted mask is the window itself.
    layer = deepmask.get_layer("mask_logits")
    saved = layer.get_weights()
    layer.set_weights([np.zeros_like(saved[0]), np.full_like(saved[1], 10.0)])
    try:
        config = InferenceConfig(top_n=3)
        gen = PeakGenerator(deepmask, config)
        image = np.full((height, width, 3), 128, np.uint8)
        ys, xs = np.mgrid[0:height, 0:width] + 0.5
        sizes = []
        for s in config.scales:
            hs, ws = (max(1, int(np.round(np.float32(n) * np.float32(s)))) for n in (height, width))
            hp, wp = (-(-(n + P) // 16) * 16 for n in (hs, ws))
            sizes.append((s, hs, ws, hp, wp))
        assert len({(hp, wp) for *_, hp, wp in sizes}) == len(sizes), "levels must be distinguishable"
        for s, hs, ws, hp, wp in sizes:
            rows, cols = hp // 16 - P // 16 + 1, wp // 16 - P // 16 + 1
            for row, col in [(0, 0), (rows - 1, cols - 1), (rows // 2, (cols - 1) // 3)]:
                gen.target.assign([hp, wp, row, col])
                out = gen.propose(image)
                sy, sx = hs / height, ws / width
                x0, y0 = (16 * col - P / 2) / sx, (16 * row - P / 2) / sy
                expected = [x0, y0, x0 + P / sx, y0 + P / sy]
                np.testing.assert_allclose(out["window_boxes"][0], expected, rtol=1e-5, atol=1e-3)
                assert out["scales"][0] == pytest.approx(s)
                assert out["scores"][0] == pytest.approx(1 / (1 + np.exp(-10.0)))
                inside = (xs >= expected[0]) & (xs < expected[2]) & (ys >= expected[1]) & (ys < expected[3])
                near_edge = (
                    np.minimum.reduce(
                        [abs(xs - expected[0]), abs(xs - expected[2]), abs(ys - expected[1]), abs(ys - expected[3])]
                    )
                    < 1e-3
                )
                np.testing.assert_array_equal(out["masks"][0][~near_edge], inside[~near_edge])
                if inside.any() and not near_edge.any():
                    r, c = np.nonzero(inside)
                    np.testing.assert_array_equal(out["boxes"][0], [c.min(), r.min(), c.max() + 1, r.max() + 1])
    finally:
        layer.set_weights(saved)


# ----------------------------------------------------------------------------- full image vs patch


@pytest.mark.parametrize("layout", REFINEMENT_LAYOUTS)
def test_full_image_sharpmask_agrees_with_the_patch_model(layout, request):
    sharpmask = request.getfixturevalue({"paper": "sharpmask", "reference": "reference_sharpmask"}[layout])
    config = InferenceConfig(scale_min=-0.5, scale_max=0.0, top_n=1000, crop_size=32)
    gen = ProposalGenerator(sharpmask, config)
    height, width = 208, 240
    image = smooth_image(height, width, seed=3)
    out = gen.propose(image)
    rgb = to_rgb(image)
    checked, ious, score_gaps = 0, [], []
    for s in config.scales:
        hs, ws = int(scaled_size(height, s)), int(scaled_size(width, s))
        hp, wp = int(padded_size(hs, P)), int(padded_size(ws, P))
        scaled = tf.image.resize(rgb, (hs, ws), method="bilinear", antialias=True)
        padded = tf.pad(scaled, [[P // 2, hp - hs - P // 2], [P // 2, wp - ws - P // 2], [0, 0]], constant_values=GREY)
        # Windows whose whole network input (with context) lies 16 px inside the scaled image.
        lo = (P // 2 + C + 16 + 15) // 16
        for row in range(lo, (P // 2 + hs - 16 - P - C) // 16 + 1):
            for col in range(lo, (P // 2 + ws - 16 - P - C) // 16 + 1):
                box = window_boxes([row], [col], [hs / height], [ws / width], P).numpy()[0]
                match = np.nonzero(np.abs(out["window_boxes"] - box).max(axis=1) < 1e-3)[0]
                assert len(match) == 1, f"window ({row}, {col}) at scale {s} not among the proposals"
                i = match[0]
                patch = padded[16 * row - C : 16 * row + P + C, 16 * col - C : 16 * col + P + C]
                ref = sharpmask.predict_on_batch(patch[None].numpy())
                ref_mask = paste_masks(tf.sigmoid(ref["masks"]), box[None], height, width, 0.2).numpy()[0]
                inter = np.logical_and(ref_mask, out["masks"][i]).sum()
                union = np.logical_or(ref_mask, out["masks"][i]).sum()
                ious.append(inter / union if union else 1.0)
                score_gaps.append(abs(out["scores"][i] - float(tf.sigmoid(ref["scores"][0, 0]))))
                checked += 1
    assert checked >= 6
    assert min(ious) >= 0.95, f"mask IoU full image vs patch: {np.round(ious, 3)}"
    assert max(score_gaps) < 0.05, f"score gaps: {np.round(score_gaps, 4)}"


@pytest.mark.parametrize("overrides", [[], REFERENCE], ids=REFINEMENT_LAYOUTS)
def test_full_image_refinement_equals_the_patch_models_on_the_same_features(overrides):
    # With 48 px of context every crop (3, 6, 12, 24 cells at conv4 .. conv1) covers the skip
    # nets' 3-cell reach: the patch model's refinement, fed the full image's trunk features over
    # its patch, must give exactly the logits of the generator's path (skip nets folded and run
    # once on the whole map, windows gathered from them, phase-convolution vertical path). That
    # holds for windows cut after the horizontal nets (`model.skip_crop=after`, ModelConfig's
    # default); the small preset cuts them before, as SharpMask.lua's patch net does.
    tf.keras.utils.set_random_seed(7)
    context = 48
    model = build_model(get_config("small", [*overrides, f"model.context={context}", "model.skip_crop=after"]))
    rng = np.random.default_rng(8)
    for net in ("skip", "refine"):  # biases too, so every border term matters
        for w in model.get_layer(net).weights:
            w.assign(rng.normal(0, 1.5 / np.sqrt(np.prod(w.shape[:-1]) if len(w.shape) > 1 else 4), w.shape))
    gen = ProposalGenerator(model, InferenceConfig(scale_min=0.0, scale_max=0.0))
    rgb = to_rgb(smooth_image(150, 170, seed=5))
    levels = gen._pyramid(rgb, tf.constant(1.0))
    padded, _ = scale_and_pad(rgb, tf.constant(1.0), P)
    taps = model.get_layer("trunk")(model.get_layer("normalize")(padded[None]))
    cols_per_row = int(levels["sizes"][0, 1])
    windows = [(3, 3), (3, 8), (7, 5), (5, 4)]  # 16 * row - context >= 0 and inside the padded image
    rows, cols = (tf.constant(v, tf.int32) for v in zip(*windows))
    index = rows * cols_per_row + cols
    got = gen._window_mask_logits(levels, index, tf.zeros_like(rows), rows, cols)
    _, refinement = refinement_split(model)
    features = [tf.gather(levels["objects"], index)]
    for tap, stride in TAP_STRIDES.items():
        crops = [taps[tap][0, (16 * r - context) // stride : (16 * r + P + context) // stride] for r, _ in windows]
        crops = [
            crop[:, (16 * c - context) // stride : (16 * c + P + context) // stride]
            for crop, (_, c) in zip(crops, windows)
        ]
        features.append(tf.stack(crops))
    want = np.asarray(refinement(features))
    # Logits that vary on the scale of the tolerance (relative to their largest), so it means something.
    assert want.std() > 0.1 * np.abs(want).max(), (want.std(), np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4 * np.abs(want).max())


# ----------------------------------------------------------------------------- outputs and edge cases


def test_proposals_are_sorted_capped_and_image_sized(sharpmask):
    gen = ProposalGenerator(sharpmask, InferenceConfig(top_n=40, crop_size=24))
    image = smooth_image(90, 121)
    out = gen.propose(image)
    n = out["num_proposals"]
    assert n == 40
    assert np.all(np.diff(out["scores"]) <= 0)
    assert out["masks"].shape == (40, 90, 121) and out["masks"].dtype == bool
    assert out["mask_crops"].shape == (40, 24, 24)
    assert out["boxes"].shape == out["window_boxes"].shape == (40, 4)
    for mask, box in zip(out["masks"], out["boxes"]):
        if mask.any():
            r, c = np.nonzero(mask)
            np.testing.assert_array_equal(box, [c.min(), r.min(), c.max() + 1, r.max() + 1])
        else:
            np.testing.assert_array_equal(box, 0)
    # Crops and windows reproduce the masks.
    pasted = paste_masks(out["mask_crops"], out["window_boxes"], 90, 121, 0.2).numpy()
    agree = [(np.logical_and(a, b).sum() + 1) / (np.logical_or(a, b).sum() + 1) for a, b in zip(pasted, out["masks"])]
    assert np.mean(agree) > 0.9


def test_bfloat16_network_gives_nearly_the_same_proposals(sharpmask):
    config = InferenceConfig(top_n=40)
    image = smooth_image(90, 121)
    want = ProposalGenerator(sharpmask, config).propose(image)
    fast = ProposalGenerator(sharpmask, dataclasses.replace(config, compute_dtype="bfloat16"))
    assert {layer.compute_dtype for layer in fast._trunk.layers if layer.weights} == {"bfloat16"}
    got = fast.propose(image)
    assert got["masks"].dtype == bool and got["scores"].dtype == np.float32
    index = {tuple(np.round(box, 2)): i for i, box in enumerate(got["window_boxes"])}
    matched = [(i, index.get(tuple(np.round(box, 2)))) for i, box in enumerate(want["window_boxes"][:20])]
    assert all(j is not None for _, j in matched), "the float32 top 20 must be among the bfloat16 top 40"
    ious = [
        (np.logical_and(want["masks"][i], got["masks"][j]).sum() + 1)
        / (np.logical_or(want["masks"][i], got["masks"][j]).sum() + 1)
        for i, j in matched
    ]
    assert np.mean(ious) > 0.9, np.round(ious, 3)
    assert max(abs(want["scores"][i] - got["scores"][j]) for i, j in matched) < 0.05


def test_compute_dtype_is_validated(deepmask):
    with pytest.raises(ValueError, match="compute_dtype must be one of"):
        ProposalGenerator(deepmask, InferenceConfig(compute_dtype="int8"))
    with pytest.raises(ValueError, match="fold_bn"):
        ProposalGenerator(deepmask, InferenceConfig(compute_dtype="bfloat16"), fold_bn=False)


def test_fixed_size_tensors_are_padded_to_top_n(deepmask):
    gen = ProposalGenerator(deepmask, InferenceConfig(scale_min=0, scale_max=0, top_n=500))
    out = {k: v.numpy() for k, v in gen.propose_tensors(np.zeros((20, 30, 3), np.uint8)).items()}
    n = out["num_proposals"]
    assert 0 < n < 500
    assert out["scores"].shape == (500,) and out["masks"].shape == (500, 20, 30)
    assert np.all(out["scores"][n:] == 0) and not out["masks"][n:].any() and np.all(out["boxes"][n:] == 0)


def test_an_image_without_objects_still_gets_ranked_proposals(deepmask):
    gen = ProposalGenerator(deepmask, InferenceConfig(top_n=10))
    out = gen.propose(np.full((64, 80, 3), 0.5, np.float32))
    assert out["num_proposals"] == 10 and np.all(np.diff(out["scores"]) <= 0)


def test_an_image_smaller_than_a_window(deepmask):
    gen = ProposalGenerator(deepmask, InferenceConfig(top_n=10))
    out = gen.propose(smooth_image(24, 24)[:7, :5])
    assert out["num_proposals"] == 10
    assert out["masks"].shape == (10, 7, 5)
    assert np.all(out["boxes"][:, [0, 2]] <= 5) and np.all(out["boxes"][:, [1, 3]] <= 7)
    # Every window is at least patch_size px of the largest scale wide, so it exceeds the image.
    assert np.all(out["window_boxes"][:, 2] - out["window_boxes"][:, 0] > 5)


def test_a_huge_image_is_capped_but_answered_in_its_own_pixels(deepmask):
    config = InferenceConfig(top_n=5, max_side=128, scale_min=-1, scale_max=0)
    gen = ProposalGenerator(deepmask, config)
    height, width = 1000, 700
    out = gen.propose(np.full((height, width, 3), 100, np.uint8))
    cap = 128 / 1000
    assert out["masks"].shape == (5, height, width)
    assert np.all(np.min(np.abs(out["scales"][:, None] / cap - np.array([0.5, 2**-0.5, 1.0])), axis=1) < 1e-5)
    sides = out["window_boxes"][:, 2] - out["window_boxes"][:, 0]
    np.testing.assert_allclose(sides, P / out["scales"], rtol=0.02)


def test_grayscale_and_rgba_match_their_rgb(deepmask):
    gen = ProposalGenerator(deepmask, InferenceConfig(top_n=5))
    rgb = smooth_image(48, 64)
    gray = rgb[..., 0]
    from_gray = gen.propose(gray)
    from_rgb = gen.propose(np.repeat(gray[..., None], 3, axis=-1))
    np.testing.assert_allclose(from_gray["scores"], from_rgb["scores"], rtol=1e-5)
    opaque = np.concatenate([rgb, np.full((48, 64, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(gen.propose(opaque)["scores"], gen.propose(rgb)["scores"], rtol=1e-5)
    np.testing.assert_allclose(
        gen.propose(rgb.astype(np.float32) / 255)["scores"], gen.propose(rgb)["scores"], rtol=1e-4
    )


def test_mask_nms_leaves_no_overlapping_pair(deepmask):
    gen = ProposalGenerator(deepmask, InferenceConfig(top_n=30, nms_threshold=0.5))
    out = gen.propose(smooth_image(64, 96))
    n = out["num_proposals"]
    assert 0 < n <= 30
    iou = mask_iou_matrix(out["masks"]).numpy()
    assert np.all(iou[np.triu_indices(n, 1)] <= 0.5)
    assert np.all(np.diff(out["scores"]) <= 0)


def test_generator_exports_as_a_saved_model_signature(deepmask, tmp_path):
    gen = ProposalGenerator(deepmask, InferenceConfig(top_n=8, scale_min=-1, scale_max=0))
    module = tf.Module()
    module.generator = gen
    module.propose = tf.function(gen.propose_tensors, input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])
    tf.saved_model.save(module, str(tmp_path / "export"))
    loaded = tf.saved_model.load(str(tmp_path / "export"))
    image = smooth_image(40, 56)
    got = loaded.propose(tf.constant(image))
    want = gen.propose(image)
    np.testing.assert_allclose(got["scores"].numpy(), want["scores"], rtol=1e-5)
    np.testing.assert_array_equal(got["masks"].numpy(), want["masks"])


# ----------------------------------------------------------------------------- files, saving and the CLI


def test_from_saved_run_directory_uses_its_config(sharpmask, tmp_path):
    config = get_config("small", ["inference.top_n=7"])
    sharpmask.save(tmp_path / "sharpmask.keras")
    (tmp_path / "config.json").write_text(config.to_json())
    gen = ProposalGenerator.from_saved(tmp_path)
    assert gen.config.top_n == 7 and gen.refine
    image = smooth_image(40, 40)
    np.testing.assert_allclose(
        gen.propose(image)["scores"], ProposalGenerator(sharpmask, config.inference).propose(image)["scores"], rtol=1e-5
    )
    with pytest.raises(FileNotFoundError, match="no_such"):
        ProposalGenerator.from_saved(tmp_path / "no_such")


def _cli_model_and_images(deepmask, folder):
    """Saves `deepmask` with a 6-proposal config.json in `folder` (a run directory for the CLI);
    returns `folder/images` holding one 50x70 a.png."""
    from PIL import Image

    config = get_config("small", ["model.refinement=false", "inference.top_n=6"])
    deepmask.save(folder / "deepmask.keras")
    (folder / "config.json").write_text(config.to_json())
    images = folder / "images"
    images.mkdir()
    Image.fromarray(smooth_image(50, 70)).save(images / "a.png")
    return images


def test_cli_writes_coco_results_and_pictures(deepmask, tmp_path):
    from PIL import Image

    images = _cli_model_and_images(deepmask, tmp_path)
    Image.fromarray(smooth_image(40, 30, seed=1)[..., 0]).save(images / "b.png")  # grayscale
    (images / "c.jpg").write_bytes(b"corrupt")
    annotations = {
        "images": [
            {"id": 11, "file_name": "a.png"},
            {"id": 12, "file_name": "b.png"},
            {"id": 13, "file_name": "c.jpg"},
        ],
        "annotations": [],
    }
    (tmp_path / "ann.json").write_text(json.dumps(annotations))
    out = tmp_path / "results.json"
    code = main(
        [
            "--model",
            str(tmp_path),
            str(images),
            "--out",
            str(out),
            "--annotations",
            str(tmp_path / "ann.json"),
            "--visualize",
            str(tmp_path / "vis"),
        ]
    )
    assert code == 0
    results = json.loads(out.read_text())
    assert sorted({r["image_id"] for r in results}) == [11, 12] and len(results) == 12
    from pycocotools import mask as mask_utils

    first = results[0]
    assert first["category_id"] == 1 and first["segmentation"]["size"] == [50, 70]
    area = mask_utils.area(first["segmentation"])
    _, _, w, h = first["bbox"]
    assert area == 0 or (w * h >= area and np.allclose(mask_utils.toBbox(first["segmentation"]), first["bbox"]))
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["a.png", "b.png"]
    # The same in bfloat16, with an inference override.
    out16 = tmp_path / "results16.json"
    args = ["--model", str(tmp_path), str(images / "a.png"), "--out", str(out16)]
    assert main([*args, "--compute-dtype", "bfloat16", "--set", "inference.top_n=3"]) == 0
    assert len(json.loads(out16.read_text())) == 3


def test_cli_keeps_going_names_every_picture_apart_and_maps_the_ids(deepmask, tmp_path, capsys):
    from PIL import Image
    from pycocotools import mask as mask_utils

    from sharpmask_tf.coco_format import image_map_path

    images = _cli_model_and_images(deepmask, tmp_path)
    Image.fromarray(smooth_image(40, 30, seed=1)).save(images / "a.jpg")
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(images / "tiny.png")
    (images / "bomb.png").write_bytes(bomb_png())
    out = tmp_path / "results.json"
    argv = ["--model", str(tmp_path), str(images), "--out", str(out), "--visualize", str(tmp_path / "vis")]
    assert main(argv) == 0
    assert "bomb.png" in capsys.readouterr().err  # skipped with a warning, the rest kept
    assert sorted(p.name for p in (tmp_path / "vis").iterdir()) == ["a.jpg.png", "a.png.png", "tiny.png"]
    mapped = json.loads(image_map_path(out).read_text())["images"]
    assert image_map_path(out).name == "results.images.json"
    by_name = {Path(m["file_name"]).name: m for m in mapped}
    assert sorted(by_name) == ["a.jpg", "a.png", "tiny.png"]
    assert (by_name["a.jpg"]["height"], by_name["a.jpg"]["width"]) == (40, 30)
    assert by_name["a.jpg"]["picture"] == "a.jpg.png" and by_name["tiny.png"]["picture"] == "tiny.png"
    results = json.loads(out.read_text())
    assert {r["image_id"] for r in results} <= {m["id"] for m in mapped}
    for r in results:  # proposals whose mask is empty are not results
        size = [by_name[n]["height"] for n in by_name if by_name[n]["id"] == r["image_id"]]
        assert r["segmentation"]["size"][0] == size[0]
        assert mask_utils.area(r["segmentation"]) > 0 and r["bbox"][2] > 0 and r["bbox"][3] > 0
    tiny = [r for r in results if r["image_id"] == by_name["tiny.png"]["id"]]
    assert all(r["bbox"] == [0.0, 0.0, 1.0, 1.0] for r in tiny)


@pytest.mark.parametrize("mask_logit, kept", [(-10.0, 0), (10.0, 8)])
def test_empty_mask_proposals_of_a_1x1_image_are_left_out_of_the_results(deepmask, mask_logit, kept):
    from sharpmask_tf.coco_format import coco_results

    # Constant mask logits: every mask is empty (-10) or covers the whole window (+10).
    layer = deepmask.get_layer("mask_logits")
    saved = layer.get_weights()
    layer.set_weights([np.zeros_like(saved[0]), np.full_like(saved[1], mask_logit)])
    try:
        out = ProposalGenerator(deepmask, InferenceConfig(top_n=8)).propose(np.full((1, 1, 3), 200, np.uint8))
    finally:
        layer.set_weights(saved)
    assert out["num_proposals"] == 8  # the generator still ranks 8 windows
    results = coco_results(out, 1)
    assert len(results) == kept
    assert all(r["bbox"] == [0.0, 0.0, 1.0, 1.0] and r["segmentation"]["size"] == [1, 1] for r in results)


def test_picture_names_are_distinct():
    from sharpmask_tf.visualize import picture_names

    names = picture_names(["x/a.jpg", "x/a.png", "y/a.jpg", "x/b.png", "x/a.jpg.png"])
    assert names == ["a.jpg.png", "a.png.png", "a.jpg-2.png", "b.png", "a.jpg-3.png"]
    assert len(set(names)) == len(names)


def test_cli_names_a_malformed_config_json(deepmask, tmp_path, capsys):
    deepmask.save(tmp_path / "deepmask.keras")
    (tmp_path / "config.json").write_text('{"inference": {"top_n": ')
    image = tmp_path / "a.png"
    from PIL import Image

    Image.fromarray(smooth_image(40, 40)).save(image)
    with pytest.raises(SystemExit):
        main(["--model", str(tmp_path), str(image), "--out", str(tmp_path / "r.json")])
    assert str(tmp_path / "config.json") in capsys.readouterr().err
