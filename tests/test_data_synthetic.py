import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO

from sharpmask_tf.config import DataConfig
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.synthetic import ensure_dataset, generate_dataset


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("synthetic"))
    return root, generate_dataset(root, num_train=24, num_val=3, seed=5)


def test_output_loads_with_pycocotools_and_passes_validation(generated):
    root, paths = generated
    assert paths["train"] == os.path.join(root, "annotations", "instances_train.json")
    coco = COCO(paths["train"])
    dataset = CocoDataset(paths["train"], os.path.join(root, "train"), on_bad_annotation="error")
    assert not dataset.skipped and len(dataset) == 24
    assert len(CocoDataset(paths["val"], os.path.join(root, "val"), on_bad_annotation="error")) == 3
    for image_id in dataset.image_ids:
        info = dataset.image_info(image_id)
        assert 320 <= info["width"] <= 640 and 240 <= info["height"] <= 480
        assert 1 <= len(dataset.annotations(image_id)) <= 10
    for ann in coco.anns.values():
        mask = coco.annToMask(ann)
        assert ann["area"] == mask.sum() > 0 and ann["iscrowd"] == 0
        ys, xs = np.nonzero(mask)
        assert ann["bbox"] == [xs.min(), ys.min(), np.ptp(xs) + 1, np.ptp(ys) + 1]


def test_visible_parts_are_annotated_and_formats_and_sizes_vary(generated):
    _, paths = generated
    coco = COCO(paths["train"])
    occluded = 0
    for image_id in coco.imgs:
        masks = [coco.annToMask(a) for a in coco.imgToAnns[image_id]]
        assert np.sum(masks, axis=0).max() == 1  # visible parts never overlap
        occluded += sum(isinstance(a["segmentation"], dict) for a in coco.imgToAnns[image_id])
    anns = list(coco.anns.values())
    assert occluded > 0 and any(isinstance(a["segmentation"], list) for a in anns)
    areas = np.array([a["area"] for a in anns])
    assert (areas < 32**2).any() and ((areas >= 32**2) & (areas <= 96**2)).any() and (areas > 96**2).any()
    assert len({a["category_id"] for a in anns}) == 5


def test_deterministic_by_seed(tmp_path, generated):
    root, paths = generated
    again = generate_dataset(str(tmp_path / "a"), num_train=3, num_val=0, seed=5)
    generate_dataset(str(tmp_path / "b"), num_train=3, num_val=0, seed=6)
    with open(paths["train"]) as f:
        first = json.load(f)
    with open(again["train"]) as f:
        second = json.load(f)
    assert second["annotations"] == [a for a in first["annotations"] if a["image_id"] <= 3]
    name = "000001.jpg"
    with open(os.path.join(root, "train", name), "rb") as f:
        original = f.read()
    assert (tmp_path / "a" / "train" / name).read_bytes() == original
    assert (tmp_path / "b" / "train" / name).read_bytes() != original


def test_ensure_dataset_generates_the_synthetic_layout_only(tmp_path):
    root = tmp_path / "synthetic"
    data = DataConfig(
        train_annotations=str(root / "annotations" / "instances_train.json"),
        train_images=str(root / "train"),
        val_annotations=str(root / "annotations" / "instances_val.json"),
        val_images=str(root / "val"),
    )
    ensure_dataset(data, num_train=2, num_val=1)
    assert len(os.listdir(root / "train")) == 2 and len(os.listdir(root / "val")) == 1
    stamp = os.path.getmtime(data.train_annotations)
    ensure_dataset(data, num_train=2, num_val=1)
    assert os.path.getmtime(data.train_annotations) == stamp
    custom = DataConfig(train_annotations=str(tmp_path / "coco.json"), train_images=str(tmp_path / "images"))
    with pytest.raises(FileNotFoundError, match="coco.json"):
        ensure_dataset(custom)
