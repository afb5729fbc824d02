import json

import numpy as np
import pytest
from data_testing import (
    HEIGHT,
    WIDTH,
    annotation,
    compressed_rle,
    disc_mask,
    exact_dataset,
    image_record,
    malformed_dataset,
    uncompressed_rle,
    write_image,
    write_json,
)
from pycocotools.coco import COCO

from sharpmask_tf.data.coco import CocoDataset, DatasetError, segmentation_problem


def test_loads_polygon_and_both_rle_formats_as_pycocotools_decodes_them(tmp_path):
    path, image_dir = exact_dataset(str(tmp_path))
    dataset = CocoDataset(path, image_dir, on_bad_annotation="error")
    reference = COCO(path)
    assert dataset.image_ids == [1]
    anns = dataset.annotations(1)
    assert [a["id"] for a in anns] == [1, 2, 3]
    for ann in anns:
        expected = reference.annToMask(reference.anns[ann["id"]])
        np.testing.assert_array_equal(dataset.annotation_mask(ann), expected)
        assert dataset.mask_area[ann["id"]] == expected.sum() > 0
    image = dataset.load_image(1)
    assert image.shape == (HEIGHT, WIDTH, 3) and image.dtype == np.float32 and 0 <= image.min() <= image.max() <= 1


def test_image_id_subset_keeps_only_those_images(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    for name in ("a.jpg", "b.jpg"):
        write_image(str(image_dir / name))
    disc = disc_mask(50, 50, 10)
    path = str(tmp_path / "instances.json")
    write_json(
        path,
        [image_record(1, "a.jpg"), image_record(2, "b.jpg")],
        [
            annotation(1, 1, compressed_rle(disc), [40, 40, 20, 20]),
            annotation(2, 2, compressed_rle(disc), [40, 40, 20, 20]),
        ],
    )
    dataset = CocoDataset(path, str(image_dir), image_ids=[2], on_bad_annotation="error")
    assert dataset.image_ids == [2] and [a["id"] for a in dataset.coco.anns.values()] == [2]
    with pytest.raises(DatasetError, match="image_ids=\\[7\\]"):
        CocoDataset(path, str(image_dir), image_ids=[7])


def test_malformed_dataset_skip_mode_counts_every_problem(tmp_path):
    path, image_dir = malformed_dataset(str(tmp_path))
    dataset = CocoDataset(path, image_dir, on_bad_annotation="skip")
    assert dict(dataset.skipped) == {
        "image file not found": 1,
        "image file unreadable": 1,
        "empty polygon list": 1,
        "empty segmentation": 1,
        "annotation on an unknown image": 1,
        "RLE counts do not sum to height*width": 1,
        "bbox has a non-positive width or height": 1,
        "polygon with fewer than 3 points or an odd number of coordinates": 1,
    }
    assert sorted(dataset.image_ids) == [1, 3, 4, 5, 7, 8, 9, 10]
    assert sorted(dataset.coco.anns) == [1, 4, 7]
    assert [a["id"] for a in dataset.annotations(4, include_crowd=False)] == []
    assert [a["id"] for a in dataset.annotations(4)] == [4]


@pytest.mark.parametrize(
    "drop, message",
    [
        ((), "image file not found"),
        ((2,), "image file unreadable"),
        ((2, 6), "empty polygon list"),
        ((2, 6, 3), "empty segmentation"),
        ((2, 6, 3, 5), "annotation on an unknown image"),
    ],
)
def test_malformed_dataset_error_mode_names_the_first_problem(tmp_path, drop, message):
    path, image_dir = malformed_dataset(str(tmp_path))
    with open(path) as f:
        raw = json.load(f)
    raw["images"] = [i for i in raw["images"] if i["id"] not in drop]
    raw["annotations"] = [a for a in raw["annotations"] if a["image_id"] not in drop]
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(DatasetError, match=message):
        CocoDataset(path, image_dir, on_bad_annotation="error")


def test_structural_errors_always_raise(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        CocoDataset(str(tmp_path / "nope.json"), str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        CocoDataset(str(bad), str(tmp_path))
    write_json(str(bad), [image_record(1, "a.jpg"), image_record(1, "b.jpg")], [])
    with pytest.raises(DatasetError, match="Duplicate image id"):
        CocoDataset(str(bad), str(tmp_path), check_image_files=False)


@pytest.mark.parametrize(
    "segmentation, problem",
    [
        ([[1, 2, 3, 4, 5]], "fewer than 3 points"),
        ([[1, 2, 3, 4, 5, float("nan")]], "non-finite"),
        ({"size": [HEIGHT, WIDTH], "counts": "\x7f\x7f"}, "malformed compressed RLE"),
        ({"size": [HEIGHT, WIDTH], "counts": "0"}, "do not sum"),
        ({"size": [10, 10], "counts": [100]}, "differs from the image size"),
        ({"size": [HEIGHT, WIDTH], "counts": [-5, HEIGHT * WIDTH + 5]}, "negative"),
        ("nonsense", "neither a polygon list nor an RLE dict"),
    ],
)
def test_segmentation_problems_are_named(segmentation, problem):
    assert problem in segmentation_problem(segmentation, HEIGHT, WIDTH)


def test_valid_compressed_rle_passes_the_string_check():
    mask = disc_mask(30, 40, 12)
    assert segmentation_problem(compressed_rle(mask), HEIGHT, WIDTH) is None
    assert segmentation_problem(uncompressed_rle(mask), HEIGHT, WIDTH) is None
