"""Average recall through pycocotools, the recall curve, per-patch IoU and evaluate_model."""

import json

import numpy as np
import pytest
import tensorflow as tf
from pycocotools import mask as mask_utils

from sharpmask_tf.coco_format import coco_results, load_coco
from sharpmask_tf.config import CONFIG_FILE, InferenceConfig, get_config
from sharpmask_tf.data.coco import DatasetError
from sharpmask_tf.evaluation import (
    MAX_DETS,
    average_recall,
    evaluate_model,
    evaluate_patches,
    format_table,
    main,
)
from sharpmask_tf.inference import ProposalGenerator
from sharpmask_tf.masks import mask_boxes
from sharpmask_tf.sharpmask import build_model

THRESHOLDS = np.linspace(0.5, 0.95, 10)


def rle(mask):
    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"].decode("ascii")}


def square(h, w, x, y, side_x, side_y=None):
    m = np.zeros((h, w), bool)
    m[y : y + (side_y or side_x), x : x + side_x] = True
    return m


def dataset(objects_per_image, h=120, w=160):
    """COCO annotations of the given masks: {image_id: [mask, ...]}; ids from 1."""
    images, anns = [], []
    for image_id, masks in objects_per_image.items():
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": h, "width": w})
        for m in masks:
            r = rle(m)
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": 1 + len(anns) % 3,
                    "segmentation": r,
                    "area": float(m.sum()),
                    "bbox": mask_utils.toBbox(r).tolist(),
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": anns, "categories": [{"id": i, "name": f"c{i}"} for i in (1, 2, 3)]}


def results_of(masks_by_image, score=1.0):
    out = []
    for image_id, masks in masks_by_image.items():
        for k, m in enumerate(masks):
            r = rle(m)
            out.append(
                {
                    "image_id": image_id,
                    "category_id": 1,
                    "segmentation": r,
                    "bbox": mask_utils.toBbox(r).tolist(),
                    "score": score - 0.001 * k,
                }
            )
    return out


@pytest.fixture
def objects():
    h, w = 120, 160
    return {
        1: [square(h, w, 5, 5, 20), square(h, w, 40, 30, 40), square(h, w, 90, 10, 100 - 40, 100)],
        2: [square(h, w, 10, 60, 30)],
        3: [],  # an image without objects
    }


@pytest.mark.parametrize("iou_type", ["segm", "bbox"])
def test_perfect_proposals_recall_everything(objects, iou_type):
    ar = average_recall(dataset(objects), results_of(objects), iou_type)
    for m in (10, 100, 1000):
        assert ar[f"AR@{m}"] == pytest.approx(1.0)
    # At one proposal per image: image 1 recalls 1 of its 3 objects, image 2 its only one.
    assert ar["AR@1"] == pytest.approx(2 / 4)
    assert ar["curve"][0] == pytest.approx(2 / 4) and ar["curve"][2] == pytest.approx(1.0)
    assert ar["AUC"] == pytest.approx(np.mean(ar["curve"])) and len(ar["curve"]) == 1000
    assert ar["num_objects"] == 4


def test_no_proposals_recall_nothing(objects):
    assert average_recall(dataset(objects), [], "segm")["AR@100"] == 0.0
    # Proposals that overlap nothing: pycocotools finds no match.
    far = {1: [square(120, 160, 150, 110, 10)], 2: [square(120, 160, 100, 0, 5)]}
    ar = average_recall(dataset(objects), results_of(far), "segm")
    assert ar["AR@1000"] == 0.0 and ar["AUC"] == 0.0


@pytest.mark.parametrize("shift", [4, 8, 12])
def test_a_shifted_mask_scores_its_iou(shift):
    gt = {1: [square(100, 100, 20, 20, 40)]}
    moved = {1: [square(100, 100, 20 + shift, 20, 40)]}
    iou = (40 - shift) * 40 / (2 * 1600 - (40 - shift) * 40)
    expected = float(np.mean(iou >= THRESHOLDS))
    for iou_type in ("segm", "bbox"):
        assert average_recall(dataset(gt, 100, 100), results_of(moved), iou_type)["AR@10"] == pytest.approx(expected)


def test_recall_counts_only_the_best_k_proposals_per_image(objects):
    gt = {1: [square(120, 160, 40, 30, 40)]}
    decoys = [square(120, 160, 0, 0, 5)] * 10
    ranked = results_of({1: decoys + gt[1]})  # the true object is 11th
    ar = average_recall(dataset(gt), ranked, "segm")
    assert ar["AR@10"] == 0.0 and ar["AR@100"] == pytest.approx(1.0)
    assert ar["curve"][9] == 0.0 and ar["curve"][10] == pytest.approx(1.0)


def test_area_ranges(objects):
    # Small < 32^2 <= medium < 96^2 <= large; 20x20 is small, 40x40 medium, 60x100 medium, 30x30 small.
    big = {1: [square(200, 200, 0, 0, 120)]}
    both = {1: objects[1] + [], 2: objects[2]}
    ar = average_recall(dataset(both), results_of({1: objects[1][:1], 2: objects[2]}), "segm")
    assert ar["AR_small@100"] == pytest.approx(1.0)
    assert ar["AR_medium@100"] == 0.0
    assert np.isnan(ar["AR_large@100"])  # no large objects
    assert average_recall(dataset(big, 200, 200), results_of(big), "segm")["AR_large@100"] == pytest.approx(1.0)


def test_the_curve_matches_cocoeval_at_its_operating_points():
    rng = np.random.default_rng(0)
    h, w = 80, 80
    gt, props = {}, {}
    for image_id in range(1, 4):
        gt[image_id] = [square(h, w, *rng.integers(0, 40, 2), int(rng.integers(8, 40))) for _ in range(3)]
        props[image_id] = [square(h, w, *rng.integers(0, 50, 2), int(rng.integers(6, 40))) for _ in range(120)]
    results = results_of(props)
    for r in results:
        r["score"] = float(rng.uniform())
    ar = average_recall(dataset(gt, h, w), results, "segm")
    assert ar["AR@100"] > 0
    for m in (1, 10, 100):
        assert ar["curve"][m - 1] == pytest.approx(ar[f"AR@{m}"])


def test_no_ground_truth_gives_nan():
    ar = average_recall(dataset({1: []}), results_of({1: [square(120, 160, 0, 0, 9)]}), "segm")
    assert np.isnan(ar["AR@100"]) and ar["num_objects"] == 0


def test_bad_arguments_are_named(objects):
    with pytest.raises(ValueError, match="iou_type='mask'"):
        average_recall(dataset(objects), [], "mask")
    with pytest.raises(ValueError, match="'images'"):
        load_coco({"annotations": []})


def test_per_patch_iou_of_a_model_against_its_own_and_inverted_masks():
    tf.keras.utils.set_random_seed(0)
    model = build_model(get_config("small"))
    patches = np.random.default_rng(0).uniform(0, 1, (6, 96, 96, 3)).astype(np.float32)
    logits = model.predict_on_batch(patches)["masks"]
    labels = np.where(logits > 0, 1.0, -1.0)
    assert evaluate_patches(model, [{"images": patches, "masks": labels}])["mean_iou"] == pytest.approx(1.0)
    worst = evaluate_patches(model, [{"images": patches, "masks": -labels}])
    assert worst["mean_iou"] == 0.0 and worst["iou_over_50"] == 0.0 and worst["num_patches"] == 6
    # Labels at another resolution (stage 1's label_size): logits are resized bilinearly to them.
    small = np.where(tf.image.resize(logits[..., None], (32, 32))[..., 0].numpy() > 0, 1.0, -1.0)
    assert evaluate_patches(model, [{"images": patches, "masks": small}])["mean_iou"] == pytest.approx(1.0)


def write_split(tmp_path, objects, h=96, w=128):
    from PIL import Image

    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for image_id, masks in objects.items():
        image = rng.uniform(0.3, 0.5, (h, w, 3))
        for m in masks:
            image[m] = rng.uniform(0, 1, 3)
        Image.fromarray((image * 255).astype(np.uint8)).save(folder / f"{image_id}.png")
    path = tmp_path / "ann.json"
    path.write_text(json.dumps(dataset(objects, h, w)))
    return path, folder


def test_evaluate_model_end_to_end(tmp_path):
    h, w = 96, 128
    objects = {1: [square(h, w, 10, 10, 40)], 2: [square(h, w, 60, 30, 50, 40), square(h, w, 5, 50, 30)], 3: []}
    ann, images = write_split(tmp_path, objects, h, w)
    tf.keras.utils.set_random_seed(0)
    generator = ProposalGenerator(build_model(get_config("small")), InferenceConfig(top_n=60))
    metrics = evaluate_model(generator, ann, images, max_images=2, out_dir=tmp_path / "out")
    assert metrics["num_images"] == 2 and metrics["top_n"] == 60
    for t in ("segm", "bbox"):
        assert metrics[t]["num_objects"] == 3
        curve = np.array(metrics[t]["curve"])
        assert np.all(np.diff(curve) >= 0) and 0 <= curve[-1] <= 1
        assert metrics[t]["AR@1000"] == pytest.approx(curve[59])  # no more than 60 proposals per image
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert "curve" not in written["segm"] and written["segm"]["AR@10"] == pytest.approx(metrics["segm"]["AR@10"])
    assert (tmp_path / "out" / "recall.png").stat().st_size > 1000
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["image_id"] for r in results} == {1, 2} and len(results) == 120
    # The CLI re-evaluates the written results to the same numbers.
    assert (
        main(["--annotations", str(ann), "--results", str(tmp_path / "out" / "results.json"), "--max-images", "2"]) == 0
    )


def test_evaluate_model_refuses_a_generator_without_full_masks(tmp_path):
    ann, images = write_split(tmp_path, {1: []})
    generator = ProposalGenerator(build_model(get_config("small", ["model.refinement=false"])), full_masks=False)
    with pytest.raises(ValueError, match="full_masks=False"):
        evaluate_model(generator, ann, images)


def test_cli_set_overrides_the_run_config(tmp_path, capsys):
    h, w = 96, 128
    ann, images = write_split(tmp_path, {1: [square(h, w, 10, 10, 40)], 2: [square(h, w, 5, 50, 30)]}, h, w)
    run = tmp_path / "run"
    run.mkdir()
    config = get_config("small", ["model.refinement=false", "inference.top_n=40"])
    (run / CONFIG_FILE).write_text(config.to_json())
    build_model(config).save(run / "deepmask.keras")
    out = tmp_path / "out"
    argv = ["--annotations", str(ann), "--model", str(run), "--images", str(images), "--out", str(out)]
    assert main([*argv, "--set", "inference.top_n=7", "--set", "inference.max_side=100"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["top_n"] == 7
    assert json.loads((out / "metrics.json").read_text())["top_n"] == 7
    results = json.loads((out / "results.json").read_text())
    assert [sum(r["image_id"] == i for r in results) for i in (1, 2)] == [7, 7]
    with pytest.raises(SystemExit):
        main([*argv, "--set", "inference.top_m=7"])
    assert "Unknown field 'top_m'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--annotations", str(ann), "--results", str(out / "results.json"), "--set", "inference.top_n=7"])
    assert "--set" in capsys.readouterr().err


def test_format_table_in_percent():
    row = {k: 0.25 for k in ["AR@10", "AR@100", "AR@1000", "AR_small@100", "AR_medium@100", "AR_large@100", "AUC"]}
    table = format_table({"segm": row, "bbox": row})
    assert table.count("25.0") == 14 and "| segm |" in table and "| bbox |" in table
    assert MAX_DETS == (1, 10, 100, 1000)


def test_coco_results_round_trip_masks():
    masks = np.zeros((2, 5, 6), bool)
    masks[0, 1:3, 2:5] = True
    proposals = {"masks": masks, "boxes": mask_boxes(masks).numpy(), "scores": np.array([0.9, 0.1])}
    results = coco_results(proposals, 4)
    np.testing.assert_array_equal(mask_utils.decode(results[0]["segmentation"]), masks[0])
    # The second mask is empty: it covers nothing and has no box, so it is not a result.
    assert results[0]["bbox"] == [2.0, 1.0, 3.0, 2.0] and len(results) == 1
    assert coco_results({"masks": masks[:0], "boxes": np.zeros((0, 4)), "scores": np.zeros(0)}, 1) == []


def test_coco_results_encode_the_bytes_pycocotools_encodes_of_whole_masks():
    # coco_results encodes each mask from the columns it occupies; the reference is pycocotools'
    # own encoder over every pixel of the mask (Fortran order, as its documentation asks).
    rng = np.random.default_rng(3)
    height, width = 13, 11
    masks = np.zeros((12, height, width), bool)
    masks[0] = True  # every pixel: first and last pixels set, no zeros at all
    masks[1, 0, 0] = True  # the very first pixel alone
    masks[2, -1, -1] = True  # the very last pixel alone
    masks[3, 5, 4] = True  # one interior pixel
    masks[4, :, 3] = True  # a whole column: runs that cross from one column into the next
    masks[5, 2:9, 0] = masks[5, 1:4, -1] = True  # the first and the last column, the middle empty
    masks[6:] = rng.random((6, height, width)) < np.linspace(0.05, 0.9, 6)[:, None, None]
    masks[7, :, :4] = masks[7, :, -3:] = False
    scores = np.linspace(1, 0, len(masks))
    results = coco_results({"masks": masks, "boxes": mask_boxes(masks).numpy(), "scores": scores}, 1)
    assert len(results) == len(masks)
    for mask, result in zip(masks, results):
        expected = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert result["segmentation"] == {"size": [height, width], "counts": expected["counts"].decode("ascii")}
        np.testing.assert_array_equal(mask_utils.decode(result["segmentation"]), mask)


def run_cli(*args, timeout=120):
    """The evaluation CLI in its own process, so that a hang fails the test instead of CI."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.run(
        [sys.executable, "-m", "sharpmask_tf.evaluation", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def overrunning_rle(h, w, on_pixels):
    """A compressed RLE whose counts run three images past the end (pycocotools' IoU loops forever on it)."""
    r = mask_utils.frPyObjects({"size": [h, w], "counts": [0, on_pixels, 3 * h * w]}, h, w)
    return {"size": [h, w], "counts": r["counts"].decode("ascii")}


def test_bad_ground_truth_is_skipped_before_pycocotools_hangs_on_it(tmp_path):
    h, w = 40, 50
    good = square(h, w, 5, 5, 15)
    gt = dataset({1: [good]}, h, w)
    # Overlaps the proposal's box, so pycocotools computes their IoU.
    gt["annotations"].append({**gt["annotations"][0], "id": 2, "segmentation": overrunning_rle(h, w, 400)})
    gt["annotations"].append({**gt["annotations"][0], "id": 3, "segmentation": [[5, 5, 20, 20]]})  # 2 points
    gt["annotations"].append({**gt["annotations"][0], "id": 4, "iscrowd": "no"})
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    (tmp_path / "results.json").write_text(json.dumps(results_of({1: [good]})))
    args = ["--annotations", tmp_path / "gt.json", "--results", tmp_path / "results.json", "--out", tmp_path / "out"]
    done = run_cli(*args)
    assert done.returncode == 0, done.stderr
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["segm"]["num_objects"] == 1 and metrics["segm"]["AR@100"] == pytest.approx(1.0)
    assert metrics["skipped"] == {
        "RLE counts do not sum to height*width": 1,
        "polygon with fewer than 3 points or an odd number of coordinates": 1,
        "iscrowd is not 0 or 1": 1,
    }
    strict = run_cli(*args, "--on-bad-annotation", "error")
    assert strict.returncode == 2 and "RLE counts do not sum" in strict.stderr and "Traceback" not in strict.stderr


def test_a_result_pycocotools_would_hang_on_is_refused(tmp_path):
    h, w = 40, 50
    good = square(h, w, 5, 5, 15)
    (tmp_path / "gt.json").write_text(json.dumps(dataset({1: [good]}, h, w)))
    bad = results_of({1: [good]})
    bad[0]["segmentation"] = overrunning_rle(h, w, 400)
    (tmp_path / "results.json").write_text(json.dumps(bad))
    done = run_cli("--annotations", tmp_path / "gt.json", "--results", tmp_path / "results.json")
    assert done.returncode != 0 and "cannot be evaluated" in done.stderr
    with pytest.raises(ValueError, match="do not sum"):
        average_recall(dataset({1: [good]}, h, w), bad, "segm")


@pytest.mark.parametrize("categories", [None, [{"id": 1, "name": "c1"}], [{"id": 7, "name": "other"}]])
def test_evaluation_is_class_agnostic_whatever_the_categories_list(objects, categories):
    gt = dataset(objects)
    for k, ann in enumerate(gt["annotations"]):
        ann["category_id"] = 1 + k  # 1..4: most not in any list below
    if categories is None:
        del gt["categories"]
    else:
        gt["categories"] = categories
    results = results_of(objects)
    for k, r in enumerate(results):
        r["category_id"] = 50 + k
    ar = average_recall(gt, results, "segm")
    assert ar["num_objects"] == 4 and ar["AR@100"] == pytest.approx(1.0)


def corrupt_split(tmp_path):
    """write_split's images with image 2's file truncated after its header and image 3's garbage,
    and one good object each on images 1, 2 and 3, plus a 2-point polygon on image 1."""
    h, w = 96, 128
    objects = {1: [square(h, w, 10, 10, 40)], 2: [square(h, w, 5, 50, 30)], 3: [square(h, w, 60, 30, 30)]}
    ann, images = write_split(tmp_path, objects, h, w)
    data = (images / "2.png").read_bytes()
    (images / "2.png").write_bytes(data[: len(data) // 2])
    (images / "3.png").write_bytes(b"not a png")
    raw = json.loads(ann.read_text())
    raw["annotations"].append({**raw["annotations"][0], "id": 9, "segmentation": [[10, 10, 50, 50]]})
    ann.write_text(json.dumps(raw))
    return ann, images


class CountingGenerator(ProposalGenerator):
    """A ProposalGenerator that counts the images it was asked about."""

    calls = 0

    def propose(self, image):
        type(self).calls += 1
        return super().propose(image)


def test_evaluate_model_survives_corrupt_images_and_records(tmp_path):
    ann, images = corrupt_split(tmp_path)
    tf.keras.utils.set_random_seed(0)
    generator = CountingGenerator(
        build_model(get_config("small", ["model.refinement=false"])), InferenceConfig(top_n=20)
    )
    metrics = evaluate_model(generator, ann, images, out_dir=tmp_path / "out")
    assert metrics["num_images"] == 1 and CountingGenerator.calls == 1
    assert metrics["skipped"] == {
        "image file unreadable": 1,  # found by validation, before any inference
        "polygon with fewer than 3 points or an odd number of coordinates": 1,
        "image file undecodable": 1,  # its header passed: found when decoded
    }
    assert metrics["segm"]["num_objects"] == 1  # the objects of the skipped images are not evaluated
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["skipped"] == metrics["skipped"]
    # In error mode the first bad record stops the evaluation before any image is run.
    CountingGenerator.calls = 0
    with pytest.raises(DatasetError, match="image file unreadable"):
        evaluate_model(generator, ann, images, on_bad_annotation="error")
    assert CountingGenerator.calls == 0


def test_the_cli_evaluates_as_many_proposals_as_it_reports_and_says_when_fewer(tmp_path, caplog):
    h, w = 96, 128
    ann, images = write_split(tmp_path, {1: [square(h, w, 10, 10, 40)]}, h, w)
    run = tmp_path / "run"
    run.mkdir()
    config = get_config("small", ["model.refinement=false", "inference.max_side=64"])  # top_n 500
    (run / CONFIG_FILE).write_text(config.to_json())
    build_model(config).save(run / "deepmask.keras")
    argv = ["--annotations", str(ann), "--model", str(run), "--images", str(images)]
    assert main([*argv, "--out", str(tmp_path / "full")]) == 0
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert full["top_n"] == MAX_DETS[-1] and full["warnings"] == []
    caplog.clear()
    assert main([*argv, "--top-n", "30", "--out", str(tmp_path / "short")]) == 0
    short = json.loads((tmp_path / "short" / "metrics.json").read_text())
    assert short["top_n"] == 30 and "Only 30 proposals per image" in short["warnings"][0]
    assert any("Only 30 proposals" in r.getMessage() for r in caplog.records)
    # A results file with fewer proposals per image than AR@1000 needs says so too.
    assert (
        main(
            [
                "--annotations",
                str(ann),
                "--results",
                str(tmp_path / "short" / "results.json"),
                "--out",
                str(tmp_path / "re"),
            ]
        )
        == 0
    )
    assert "Only 30 proposals" in json.loads((tmp_path / "re" / "metrics.json").read_text())["warnings"][0]


def test_a_malformed_config_json_is_named(tmp_path, capsys):
    ann, images = write_split(tmp_path, {1: []})
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG_FILE).write_text('{"model": {"trunk_depth": "deep"')
    with pytest.raises(SystemExit):
        main(["--annotations", str(ann), "--model", str(run), "--images", str(images)])
    assert str(run / CONFIG_FILE) in capsys.readouterr().err
