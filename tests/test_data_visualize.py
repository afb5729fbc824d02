import numpy as np

from sharpmask_tf.data.visualize import LABEL_RGB, OUTLINE_RGB, overlay_label, patch_grid


def test_overlay_tints_only_the_labelled_pixels_of_the_central_window():
    image = np.full((12, 12, 3), 0.2, np.float32)
    label = -np.ones((4, 4), np.float32)
    label[1:3, 1:3] = 1  # covers central-window pixels 2..5 (two per label pixel), image pixels 4..7
    tinted = overlay_label(image, label, context=2)
    changed = np.any(tinted != image, axis=-1)
    expected = np.zeros((12, 12), bool)
    expected[4:8, 4:8] = True
    np.testing.assert_array_equal(changed, expected)
    np.testing.assert_array_equal(tinted[4, 4], OUTLINE_RGB)  # the object's border is outlined
    assert np.all(tinted[5, 5] != OUTLINE_RGB) and tinted[5, 5, 2] > image[5, 5, 2]  # interior tinted toward cyan
    assert LABEL_RGB[2] == 1


def test_grid_frames_score_samples_by_label():
    images = np.full((2, 8, 8, 3), 0.5, np.float32)
    masks = -np.ones((2, 4, 4), np.float32)
    mask_batch = {"images": images, "masks": masks}
    score_batch = {"images": images, "scores": np.array([[1.0], [-1.0]], np.float32)}
    grid = np.asarray(patch_grid(mask_batch, score_batch, context=2, columns=4, zoom=1))
    gap, size = 4, 8
    positive_corner = grid[gap, gap + 2 * (size + gap)]
    negative_corner = grid[gap, gap + 3 * (size + gap)]
    assert positive_corner[1] > 200 and positive_corner[0] < 100
    assert negative_corner[0] > 200 and negative_corner[1] < 100
