import json
import re

import numpy as np
import pytest
from data_testing import (
    HEIGHT,
    WIDTH,
    annotation,
    compressed_rle,
    config_for,
    disc_mask,
    exact_dataset,
    image_record,
    malformed_dataset,
    uncompressed_rle,
    write_image,
    write_json,
)
from image_files import bomb_png, png16
from PIL import Image
from pycocotools.coco import COCO

from sharpmask_tf.data.coco import CocoDataset, DatasetError, segmentation_problem
from sharpmask_tf.data.sampler import PatchSampler, Window
from sharpmask_tf.images import GREY


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


def typed_dataset(root):
    """One good image and object, plus one record per badly typed field the loader must count and skip."""
    image_dir = root / "images"
    image_dir.mkdir()
    disc = disc_mask(60, 60, 20)
    write_image(str(image_dir / "good.jpg"), objects=((disc, (0, 0, 255)),))
    outside = root / "outside.jpg"
    write_image(str(outside))
    good, box = compressed_rle(disc), [40, 40, 40, 40]
    images = [
        image_record(1, "good.jpg"),
        image_record([2], "good.jpg"),  # a list id
        image_record(3, str(outside)),  # absolute: outside the image folder
        image_record(4, "../outside.jpg"),  # climbs out of it
        {**image_record(5, "good.jpg"), "height": True},
        image_record(6, 17),
    ]
    anns = [
        annotation(1, 1, good, box),
        annotation(2, 1, good, box, iscrowd="no"),
        annotation(3, [1], good, box),  # a list image_id
        annotation(4, 1, {"size": HEIGHT * WIDTH, "counts": good["counts"]}, box),  # an int RLE size
        {**annotation(5, 1, good, box), "category_id": "person"},
        {**annotation(6, 1, good, box), "area": "large"},
        annotation(7.5, 1, good, box),
        annotation(8, 3, good, box),  # on the image refused for its absolute file_name
    ]
    path = str(root / "instances.json")
    write_json(path, images, anns)
    return path, str(image_dir)


TYPED_PROBLEMS = {
    "image id is not an integer": 1,
    "image file_name outside the image folder": 2,
    "image with a non-positive or non-integer size": 1,
    "image file_name is not a non-empty string": 1,
    "iscrowd is not 0 or 1": 1,
    "annotation id or image_id is not an integer": 2,
    "RLE size is not [height, width]": 1,
    "category_id is not an integer": 1,
    "area is not a non-negative number": 1,
}


def test_badly_typed_fields_are_counted_and_skipped(tmp_path):
    path, image_dir = typed_dataset(tmp_path)
    dataset = CocoDataset(path, image_dir, on_bad_annotation="skip")
    assert dict(dataset.skipped) == TYPED_PROBLEMS
    assert dataset.image_ids == [1] and sorted(dataset.coco.anns) == [1]
    # The same checks without opening the files.
    assert dict(CocoDataset(path, image_dir, check_image_files=False).skipped) == TYPED_PROBLEMS


@pytest.mark.parametrize("problem", sorted(TYPED_PROBLEMS))
def test_badly_typed_fields_raise_in_error_mode(tmp_path, problem):
    path, image_dir = typed_dataset(tmp_path)
    with open(path) as f:
        raw = json.load(f)
    # Keep the good records and the first bad one with this problem.
    keep_images, keep_anns = [raw["images"][0]], [raw["annotations"][0]]
    for kind, records, keep in (("image", raw["images"][1:], keep_images), ("ann", raw["annotations"][1:], keep_anns)):
        for record in records:
            probe = str(tmp_path / "probe.json")
            write_json(
                probe,
                [raw["images"][0], record] if kind == "image" else [raw["images"][0]],
                [record] if kind == "ann" else [],
            )
            if problem in CocoDataset(probe, image_dir).skipped:
                keep.append(record)
                break
    write_json(path, keep_images, keep_anns)
    with pytest.raises(DatasetError, match=re.escape(problem)):
        CocoDataset(path, image_dir, on_bad_annotation="error")


def test_a_decompression_bomb_is_skipped_and_the_rest_kept(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    write_image(str(image_dir / "a.jpg"))
    (image_dir / "bomb.png").write_bytes(bomb_png())
    side = int(np.sqrt(2 * Image.MAX_IMAGE_PIXELS)) + 8
    path = str(tmp_path / "instances.json")
    disc = disc_mask(50, 50, 10)
    write_json(
        path,
        [image_record(1, "a.jpg"), image_record(2, "bomb.png", side, side)],
        [annotation(1, 1, compressed_rle(disc), [40, 40, 20, 20])],
    )
    dataset = CocoDataset(path, str(image_dir))
    assert dict(dataset.skipped) == {"image over Pillow's decompression-bomb limit": 1}
    assert dataset.image_ids == [1]
    with pytest.raises(DatasetError, match="decompression-bomb"):
        CocoDataset(path, str(image_dir), on_bad_annotation="error")


def test_16_bit_grayscale_images_are_rescaled_in_training(tmp_path):
    image_dir = tmp_path / "images"
    image_dir.mkdir()
    # A mid-grey 16-bit picture: Pillow's own conversion clips it to white.
    (image_dir / "deep.png").write_bytes(png16(np.full((HEIGHT, WIDTH), 0x4000, np.uint16)))
    disc = disc_mask(60, 60, 20)
    path = str(tmp_path / "instances.json")
    write_json(path, [image_record(1, "deep.png")], [annotation(1, 1, compressed_rle(disc), [40, 40, 40, 40])])
    dataset = CocoDataset(path, str(image_dir), on_bad_annotation="error")
    np.testing.assert_array_equal(dataset.load_image(1), np.float32(0x40 / 255))
    sampler = PatchSampler.from_config(dataset, config_for(path, str(image_dir)), stage=1)
    patch = sampler.crop_image(Window(1, WIDTH / 2, HEIGHT / 2, 1.0, False, None))
    inside = patch[patch != np.float32(GREY)]
    assert inside.size > 0
    np.testing.assert_allclose(inside, 0x40 / 255, atol=1e-6)


@pytest.mark.parametrize(
    "polygon",
    [
        [0, 0, 1e9, 0, 1e9, 1e9],  # pycocotools' rasteriser dies on this (segmentation fault)
        [0, 0, 10, 0, 10, -2 * HEIGHT],
    ],
)
def test_far_off_polygon_points_are_refused_before_pycocotools_sees_them(polygon):
    assert "outside it" in segmentation_problem([polygon], HEIGHT, WIDTH)
    # Points just beyond the border, as COCO polygons of objects cut by it have, are fine.
    assert segmentation_problem([[-0.5, -0.5, WIDTH + 0.5, 0, WIDTH, HEIGHT + 0.5]], HEIGHT, WIDTH) is None
