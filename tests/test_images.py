"""Images from arrays and files: RGB conversion, validation, decoding errors."""

import numpy as np
import pytest
import tensorflow as tf
from image_files import bomb_png, png16
from PIL import Image

from sharpmask_tf.images import GREY, check_image, load_image, to_8bit, to_rgb


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


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
def test_16_bit_pngs_decode_as_the_serving_path_decodes_them(tmp_path, channels):
    # A dark-to-bright ramp: Pillow's own 16-bit grayscale conversion clips it to white.
    rng = np.random.default_rng(channels)
    shape = (9, 11) if channels == 1 else (9, 11, channels)
    values = rng.integers(0, 65536, shape).astype(np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(png16(values))
    served = tf.io.decode_image(path.read_bytes(), channels=0, expand_animations=False).numpy()
    loaded = load_image(path)
    if channels == 2:  # gray + alpha: Pillow reads it as RGBA with the gray replicated
        np.testing.assert_array_equal(loaded[..., [0, 3]], served)
        np.testing.assert_array_equal(loaded[..., 1], loaded[..., 0])
    else:
        np.testing.assert_array_equal(loaded, served)
    assert loaded.dtype == np.uint8 and loaded.min() < 64  # not clipped to white


def test_to_8bit_keeps_the_high_byte_of_16_bit_grayscale():
    values = np.array([[0, 255, 256, 40000, 65535]], np.uint16)
    converted = to_8bit(Image.fromarray(values))
    assert converted.mode == "L"
    np.testing.assert_array_equal(np.asarray(converted), [[0, 0, 1, 156, 255]])
    rgb = Image.new("RGB", (2, 2))
    assert to_8bit(rgb) is rgb


def test_a_decompression_bomb_is_a_value_error_naming_the_file(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(bomb_png())
    with pytest.raises(ValueError, match="bomb.png"):
        load_image(bomb)
