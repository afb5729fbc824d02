import os

import numpy as np
import pytest
from data_testing import exact_dataset, malformed_dataset
from pycocotools.coco import COCO

from sharpmask_tf.data import packed
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.packed import PackedSplit, load_packed


@pytest.fixture
def validations(monkeypatch, tmp_path):
    """Counts the CocoDataset validations load_packed runs, with the cache in tmp_path."""
    monkeypatch.setenv("SHARPMASK_TF_CACHE", str(tmp_path / "cache"))
    count = []

    def counting(*args, **kwargs):
        count.append(1)
        return CocoDataset(*args, **kwargs)

    monkeypatch.setattr(packed, "CocoDataset", counting)
    return count


def test_packed_split_holds_the_validated_records_and_round_trips(tmp_path):
    path, image_dir = exact_dataset(str(tmp_path))
    coco = COCO(path)
    split = PackedSplit.from_dataset(CocoDataset(path, image_dir))
    split.save(str(tmp_path / "split.npz"))
    loaded = PackedSplit.load(str(tmp_path / "split.npz"), path, image_dir)
    for s in (split, loaded):
        assert s.image_ids.tolist() == [1] and s.sizes.tolist() == [[160, 120]]
        assert s.image_path(0) == os.path.join(image_dir, "a.jpg") and s.image_index(1) == 0
        assert s.ann_ids.tolist() == [1, 2, 3] and list(s.annotation_rows(0)) == [0, 1, 2]
        for annotation_id in (1, 2, 3):
            row = s.annotation_row(annotation_id)
            ann = coco.anns[annotation_id]
            np.testing.assert_array_equal(s.annotation_mask(row), coco.annToMask(ann))
            np.testing.assert_array_equal(s.boxes[row], ann["bbox"])
            assert s.areas[row] == coco.annToMask(ann).sum()


def test_cache_is_reused_and_follows_the_files(tmp_path, validations):
    path, image_dir = exact_dataset(str(tmp_path))
    first = load_packed(path, image_dir, "skip")
    second = load_packed(path, image_dir, "skip")
    assert len(validations) == 1
    np.testing.assert_array_equal(first.rles, second.rles)
    load_packed(path, image_dir, "error")  # another validation mode is another cache entry
    assert len(validations) == 2
    with open(path) as f:
        text = f.read()
    with open(path, "w") as f:
        f.write(text.replace('"category_id": 2', '"category_id": 3').replace("[104, 8, 32, 32]", "[105, 8, 31, 32]"))
    changed = load_packed(path, image_dir, "skip")
    assert len(validations) == 3 and changed.boxes[1].tolist() == [105, 8, 31, 32]
    image = os.path.join(image_dir, "a.jpg")
    stat = os.stat(image)
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # an image rewritten in place
    load_packed(path, image_dir, "skip")
    load_packed(path, image_dir, "skip")
    assert len(validations) == 4


def test_cached_split_keeps_what_validation_skipped(tmp_path, validations):
    path, image_dir = malformed_dataset(str(tmp_path))
    fresh = load_packed(path, image_dir, "skip")
    cached = load_packed(path, image_dir, "skip")
    assert len(validations) == 1
    assert cached.skipped == fresh.skipped and cached.skipped["image file not found"] == 1
    assert cached.image_ids.tolist() == fresh.image_ids.tolist()
