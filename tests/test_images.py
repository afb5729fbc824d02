"""Images from arrays and files: RGB conversion, validation, decoding errors."""

import numpy as np
import pytest

from sharpmask_tf.images import GREY, check_image, load_image, to_rgb


def test_to_rgb_handles_gray_alpha_and_uint8():
    gray = np.array([[0, 255]], np.uint8)
    np.testing.assert_allclose(to_rgb(gray).numpy(), [[[0, 0, 0], [1, 1, 1]]])
    rgba = np.array([[[255, 0, 0, 255], [255, 0, 0, 0]]], np.uint8)
    np.testing.assert_allclose(to_rgb(rgba).numpy(), [[[1, 0, 0], [GREY] * 3]])
    gray_alpha = np.array([[[1.0, 0.5]]], np.float32)
    np.testing.assert_allclose(to_rgb(gray_alpha).numpy(), [[[0.75] * 3]])


def test_check_image_rejects_what_it_cannot_use():
    with pytest.raises(ValueError, match="shape=\\(4, 4, 5\\)"):
        check_image(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="at least one pixel"):
        check_image(np.zeros((0, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="dtype=int32"):
        check_image(np.zeros((4, 4, 3), np.int32))
    assert check_image(np.zeros((4, 4), np.float64)).shape == (4, 4, 1)


def test_load_image_names_a_corrupt_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match="bad.jpg"):
        load_image(bad)
