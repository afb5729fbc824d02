"""The pyramid's geometry: index arithmetic, sizes, window boxes and pixels."""

import numpy as np

from sharpmask_tf.pyramid import level_positions, padded_size, scaled_size, window_boxes, window_pixels


def test_level_positions_walks_every_map_row_major_from_zero():
    heights, widths = np.array([3, 1, 4, 2]), np.array([5, 2, 1, 3])
    counts = heights * widths
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])
    expected = [(lv, r, c) for lv in range(4) for r in range(heights[lv]) for c in range(widths[lv])]
    level, row, col = level_positions(np.arange(counts.sum()), offsets, widths)
    assert list(zip(level.numpy(), row.numpy(), col.numpy())) == expected


def test_window_boxes_known_values():
    boxes = window_boxes([0, 2], [0, 3], [1.0, 0.5], [1.0, 0.25], patch_size=160).numpy()
    # (0, 0) at scale 1: the window starts half a window before the image.
    np.testing.assert_allclose(boxes[0], [-80, -80, 80, 80])
    # (2, 3): x0 = (48 - 80) / 0.25, y0 = (32 - 80) / 0.5, side 160 / scale.
    np.testing.assert_allclose(boxes[1], [-128, -96, -128 + 640, -96 + 320])


def test_sizes_are_multiples_of_the_stride_with_half_a_window_each_side():
    for scaled in (1, 15, 16, 17, 63, 100):
        hp = int(padded_size(scaled, 64))
        assert hp % 16 == 0 and hp - scaled - 32 >= 32 and hp - scaled - 32 < 48
        # Window centres 16*row cover the whole scaled image.
        assert 16 * (hp // 16 - 64 // 16) >= scaled
    assert int(scaled_size(97, 2**-2.5)) == round(97 * 2**-2.5)
    assert int(scaled_size(3, 0.01)) == 1


def test_window_pixels_are_the_pixel_centres_inside_each_window():
    boxes = np.array([[2.4, 0.6, 5.5, 3.5], [-3, -3, 2, 100], [7, 1, 7, 4]], np.float32)
    got = window_pixels(boxes, 6, 8).numpy()
    # x: centres 2.5..4.5 inside [2.4, 5.5) -> columns 2..4; y: centres 0.5 < 0.6 is out, 1.5, 2.5 in.
    np.testing.assert_array_equal(got[0], [1, 2, 3, 5])
    np.testing.assert_array_equal(got[1], [0, 0, 6, 2])  # clipped to the image
    assert got[2, 3] <= got[2, 1]  # zero width: no column
