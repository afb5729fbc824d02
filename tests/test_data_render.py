import math
import os

import numpy as np
import pytest
import tensorflow as tf
from data_testing import (
    crowded_dataset,
    photograph_dataset,
    truncated_image_dataset,
)
from PIL import Image
from pycocotools import mask as mask_utils

from sharpmask_tf.config import get_config
from sharpmask_tf.data.coco import CocoDataset, DatasetError, _decode_rle_string
from sharpmask_tf.data.render import PatchPlanner, cut_patches, image_problem, jpeg_reduction, render, rle_bounds
from sharpmask_tf.data.sampler import PatchSampler
from sharpmask_tf.images import GREY


def planner_for(path, image_dir, preset="sharpmask_resnet50", stage=1, *overrides):
    config = get_config(preset, [f"data.train_annotations={path}", f"data.train_images={image_dir}", *overrides])
    return PatchPlanner(PatchSampler.from_config(CocoDataset(path, image_dir), config, stage))


def cut(planner, windows, k, with_labels):
    """The windows' patches and labels as the pipeline renders them, in one batch."""
    plan = planner.plan(windows, k, with_labels)
    s = planner.sampler
    groups = tf.data.Dataset.from_tensor_slices(plan)
    batch = render(groups, tf.constant(planner.paths), s.input_size, s.label_size, len(windows) // k, 2)
    out = batch.get_single_element()
    return out["images"].numpy(), out["masks"].numpy(), plan


def reference(sampler, window, with_label):
    image = sampler.crop_image(window)
    if with_label and window.annotation_id is not None:
        label = sampler.crop_label(window)
    else:
        label = np.full((sampler.label_size,) * 2, -1.0, np.float32)
    return (image[:, ::-1], label[:, ::-1]) if window.flip else (image, label)


@pytest.mark.parametrize("dataset", ["crowded", "photographs"])
def test_patches_equal_the_numpy_sampler_within_rounding(tmp_path, dataset):
    """Small images (upsampled) and 640x480 photographs (decoded at 1/2..1/8 for small scales)."""
    path, image_dir = (crowded_dataset if dataset == "crowded" else photograph_dataset)(str(tmp_path))
    for stage in (1, 2):
        planner = planner_for(path, image_dir, "sharpmask_resnet50", stage)
        rng = np.random.default_rng(stage)
        reductions = set()
        for kind in ("mask", "score"):
            windows = planner.sampler.draw_windows(rng, kind, 24, 1, planner.usable)
            images, masks, plan = cut(planner, windows, 1, kind == "mask")
            reductions.update(plan["decoder"].tolist())
            assert {w.flip for w in windows} == {False, True}
            for window, image, mask in zip(windows, images, masks):
                expected_image, expected_mask = reference(planner.sampler, window, kind == "mask")
                assert np.abs(image - expected_image).max() <= 1.01 / 255
                np.testing.assert_array_equal(mask, expected_mask)
        if dataset == "photographs":
            assert len(reductions) > 1  # several JPEG reductions were exercised


def test_groups_share_an_image_and_keep_exact_labels(tmp_path):
    path, image_dir = crowded_dataset(str(tmp_path))
    planner = planner_for(path, image_dir)
    windows = planner.sampler.draw_windows(np.random.default_rng(0), "mask", 16, 4, planner.usable)
    assert all(len({w.image_id for w in windows[i : i + 4]}) == 1 for i in range(0, 16, 4))
    assert len({w.image_id for w in windows}) > 1
    images, masks, _ = cut(planner, windows, 4, True)
    for window, image, mask in zip(windows, images, masks):
        expected_image, expected_mask = reference(planner.sampler, window, True)
        np.testing.assert_array_equal(mask, expected_mask)
        # Small images are never reduced, so a shared decode gives the same pixels.
        assert np.abs(image - expected_image).max() <= 1.01 / 255


def test_rle_bounds_give_pycocotools_masks():
    rng = np.random.default_rng(0)
    for trial in range(40):
        height, width = (int(v) for v in rng.integers(1, 90, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        if trial % 4 == 0:
            mask[:] = 0
            mask[height // 3 :, width // 4 :] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"]
        ends = rle_bounds(counts)
        np.testing.assert_array_equal(ends, np.cumsum(_decode_rle_string(counts.decode())))
        pixels = np.arange(height * width)
        decoded = (np.searchsorted(ends, pixels, side="right") % 2).reshape(width, height).T
        np.testing.assert_array_equal(decoded, mask_utils.decode({"size": [height, width], "counts": counts}))


def _runs(mask):
    """Run lengths of a mask in column-major order, zeros first: what COCO's RLE holds."""
    flat = np.asarray(mask, np.uint8).T.reshape(-1)
    edges = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
    return [0, *runs] if flat.size and flat[0] else runs


def test_rle_strings_decode_to_the_masks_runs():
    rng = np.random.default_rng(1)
    for trial in range(60):
        height, width = (int(v) for v in rng.integers(1, 700 if trial % 3 == 0 else 60, 2))
        mask = (rng.random((height, width)) < rng.random()).astype(np.uint8)
        if trial % 5 == 0:  # a few long runs: several characters per count, negative differences
            mask[:] = 0
            mask[height // 3 :, width // 4 :] = 1
        counts = mask_utils.encode(np.asfortranarray(mask))["counts"].decode()
        assert _decode_rle_string(counts) == _runs(mask)


def test_jpeg_reduction_is_pillows_draft(tmp_path):
    path = str(tmp_path / "a.jpg")
    Image.fromarray(np.zeros((480, 640, 3), np.uint8)).save(path)
    for scale in (0.05, 0.124, 0.125, 0.126, 0.2, 0.25, 0.3, 0.5, 0.51, 0.9, 1.0, 3.0):
        with Image.open(path) as image:
            image.draft("RGB", (math.ceil(640 * scale), math.ceil(480 * scale)))
            assert 640 // image.size[0] == jpeg_reduction(640, 480, scale), scale


def test_truncated_jpeg_is_found_by_its_missing_end(tmp_path):
    image = Image.fromarray(np.full((60, 80, 3), 128, np.uint8))
    image.save(tmp_path / "good.jpg")
    image.save(tmp_path / "b.png")
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    assert image_problem(str(tmp_path / "good.jpg")) == (True, None)
    assert image_problem(str(tmp_path / "b.png")) == (False, None)
    assert image_problem(str(tmp_path / "cut.jpg"))[1].startswith("truncated JPEG")
    assert image_problem(str(tmp_path / "missing.jpg"))[1].startswith("unreadable")


def test_png_images_are_cut_like_jpegs(tmp_path):
    path, image_dir = crowded_dataset(str(tmp_path))
    for name in os.listdir(image_dir):
        Image.open(os.path.join(image_dir, name)).save(os.path.join(image_dir, name[:-4] + ".png"))
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('.jpg"', '.png"'))
    planner = planner_for(path, image_dir)
    windows = planner.sampler.draw_windows(np.random.default_rng(0), "mask", 8, 1, planner.usable)
    images, masks, plan = cut(planner, windows, 1, True)
    assert set(plan["decoder"].tolist()) == {4}
    for window, image, mask in zip(windows, images, masks):
        expected_image, expected_mask = reference(planner.sampler, window, True)
        assert np.abs(image - expected_image).max() <= 1.01 / 255
        np.testing.assert_array_equal(mask, expected_mask)


def test_undecodable_images_are_redrawn_or_raise(tmp_path):
    path, image_dir = truncated_image_dataset(str(tmp_path))
    planner = planner_for(path, str(image_dir))
    windows = planner.sampler.draw_windows(np.random.default_rng(0), "mask", 20, 1, planner.usable)
    assert {w.image_id for w in windows} == {1} and planner.sampler.skipped["undecodable image"] > 0
    strict = planner_for(path, str(image_dir), "sharpmask_resnet50", 1, "data.on_bad_annotation=error")
    with pytest.raises(DatasetError, match="truncated JPEG"):
        strict.sampler.draw_windows(np.random.default_rng(0), "mask", 20, 1, strict.usable)


def _bilinear(image, ys, xs):
    """Bilinear samples of an (h, w, c) image at rows ys and columns xs (pixel centres at
    integers), its edge pixels repeated beyond it: an independent reference for cut_patches."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    y = np.clip(ys + 1, 0, padded.shape[0] - 1)
    x = np.clip(xs + 1, 0, padded.shape[1] - 1)
    y0 = np.minimum(np.floor(y).astype(int), padded.shape[0] - 2)
    x0 = np.minimum(np.floor(x).astype(int), padded.shape[1] - 2)
    wy, wx = (y - y0)[:, None, None], (x - x0)[None, :, None]
    top = padded[y0][:, x0] * (1 - wx) + padded[y0][:, x0 + 1] * wx
    bottom = padded[y0 + 1][:, x0] * (1 - wx) + padded[y0 + 1][:, x0 + 1] * wx
    return top * (1 - wy) + bottom * wy


def test_cut_patches_are_exact_bilinear_samples_grey_outside():
    """Exact to float32 rounding (OpenCV 4 rounds positions to 1/32 pixel: up to 7 of 255 off here),
    flipped windows included, one crop shared by a group's windows."""
    rng = np.random.default_rng(0)
    size = 24
    crops = [rng.integers(0, 256, shape).astype(np.uint8) for shape in [(40, 31, 3), (17, 50, 3)]]
    affine = np.zeros((2, 2, 4), np.float32)
    inside = np.zeros((2, 2, 4), np.int32)
    for g, crop in enumerate(crops):
        for j in range(2):
            dy, dx = (rng.uniform(0.3, min(1.6, (n - 1) / (size - 1))) for n in crop.shape[:2])
            y0 = rng.uniform(-0.5, crop.shape[0] - 0.5 - dy * (size - 1))
            x0 = rng.uniform(-0.5, crop.shape[1] - 0.5 - dx * (size - 1))
            if j == 1:  # flipped: column 0 samples the right end
                x0, dx = x0 + dx * (size - 1), -dx
            affine[g, j] = y0, dy, x0, dx
            inside[g, j] = rng.integers(0, 6), size - rng.integers(0, 6), rng.integers(0, 6), size - rng.integers(0, 6)
    pixels = np.concatenate([c.reshape(-1) for c in crops])
    starts = np.cumsum([0, *(c.size for c in crops)])
    shapes = np.array([c.shape[:2] for c in crops])
    out = cut_patches(pixels, starts, shapes, affine, inside, size)
    assert out.shape == (4, size, size, 3) and out.dtype == np.float32
    for g, crop in enumerate(crops):
        for j in range(2):
            y0, dy, x0, dx = affine[g, j].astype(np.float64)
            expected = _bilinear(crop, y0 + dy * np.arange(size), x0 + dx * np.arange(size)) / 255
            r0, r1, c0, c1 = inside[g, j]
            patch = out[g * 2 + j]
            np.testing.assert_allclose(patch[r0:r1, c0:c1], expected[r0:r1, c0:c1], atol=2e-6)
            outside = np.ones((size, size), bool)
            outside[r0:r1, c0:c1] = False
            assert np.all(patch[outside] == GREY)
