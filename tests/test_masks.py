"""Mask post-processing: pasting against a pixel-by-pixel reference, resizing, boxes, IoU and NMS."""

import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.masks import greedy_nms, mask_boxes, mask_iou_matrix, paste_masks, paste_masks_and_boxes, resize_masks


def test_paste_masks_fills_exactly_the_window():
    ones = np.ones((3, 8, 8), np.float32)
    boxes = np.array([[2, 3, 10, 7], [-5, -5, 4.5, 2.2], [0, 0, 0, 0]], np.float32)  # last: padding row
    masks = paste_masks(ones, boxes, 9, 12, 0.2).numpy()
    ys, xs = np.mgrid[0:9, 0:12] + 0.5
    for m, (x0, y0, x1, y1) in zip(masks[:2], boxes[:2]):
        np.testing.assert_array_equal(m, (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1))
    assert not masks[2].any()


def test_paste_masks_keeps_the_mask_shape():
    left = np.zeros((1, 4, 4), np.float32)
    left[0, :, :2] = 1.0  # left half of the window
    masks = paste_masks(left, np.array([[0, 0, 40, 40]], np.float32), 40, 40, 0.5).numpy()[0]
    # Bilinear between the mask pixel centres at x = 15 and 25 crosses .5 at x = 20.
    assert masks[:, :20].all() and not masks[:, 20:].any()


def bilinear_paste_reference(probabilities, boxes, height, width, threshold):
    """paste_masks' definition, pixel by pixel in numpy: bilinear at the pixel centre, clamped to
    the mask's edge inside the window, nothing outside it."""
    out = np.zeros((len(boxes), height, width), bool)
    for n, (prob, (x0, y0, x1, y1)) in enumerate(zip(probabilities, boxes)):
        m = prob.shape[0]
        for i in range(height):
            for j in range(width):
                cy, cx = i + 0.5, j + 0.5
                if not (x0 <= cx < x1 and y0 <= cy < y1):
                    continue
                ky = np.clip((cy - y0) / (y1 - y0) * m - 0.5, 0, m - 1)
                kx = np.clip((cx - x0) / (x1 - x0) * m - 0.5, 0, m - 1)
                a, b = int(min(ky, m - 2)), int(min(kx, m - 2))
                ty, tx = ky - a, kx - b
                value = (
                    (1 - ty) * (1 - tx) * prob[a, b]
                    + (1 - ty) * tx * prob[a, b + 1]
                    + ty * (1 - tx) * prob[a + 1, b]
                    + ty * tx * prob[a + 1, b + 1]
                )
                out[n, i, j] = value >= threshold
    return out


@pytest.mark.parametrize("m", [7, 120])  # a matmul along y, and a blend of two rows
@pytest.mark.parametrize("blob", [False, True])  # masks above the threshold everywhere, or in a blob
def test_paste_masks_matches_bilinear_resampling_at_pixel_centres(m, blob):
    rng = np.random.default_rng(3)
    probabilities = rng.uniform(0, 1, (7, m, m)).astype(np.float32)
    if blob:  # a compact mask, at the pipeline's threshold, and one below it everywhere
        k = np.arange(m)
        inside = (np.abs(k - 0.3 * m)[:, None] < 0.2 * m) & (np.abs(k - 0.6 * m)[None] < 0.25 * m)
        probabilities = np.where(inside, 0.9 + 0.1 * probabilities, 0.1 * probabilities).astype(np.float32)
        probabilities[6] = 0.1  # below the threshold everywhere
    boxes = np.array(
        [
            [3.3, 2.7, 17.9, 13.1],  # inside, upsampled
            [-6.5, -4.2, 9.0, 8.5],  # over the top-left corner
            [20.2, 9.6, 40.0, 30.0],  # over the bottom-right corner
            [5.1, 4.4, 8.2, 7.3],  # smaller than the mask: downsampled
            [30.0, 30.0, 50.0, 50.0],  # outside the image
            [0, 0, 0, 0],  # padding row
            [3.3, 2.7, 17.9, 13.1],  # inside
        ],
        np.float32,
    )
    threshold = 0.2 if blob else 0.5
    masks, tight = paste_masks_and_boxes(probabilities, boxes, 17, 23, threshold)
    want = bilinear_paste_reference(probabilities, boxes, 17, 23, threshold)
    # Float rounding may flip a pixel whose value is within 1e-6 of the threshold; none is here.
    np.testing.assert_array_equal(masks.numpy(), want)
    np.testing.assert_array_equal(tight.numpy(), mask_boxes(want).numpy())
    pasted = want.any(axis=(1, 2))
    np.testing.assert_array_equal(pasted[[0, 1, 3, 4, 5, 6]], [True, True, True, False, False, not blob])


@pytest.mark.parametrize("m, size", [(160, 56), (56, 56), (20, 32), (7, 3)])
def test_resize_masks_equals_the_antialiased_resize(m, size):
    masks = np.random.default_rng(m).uniform(0, 1, (3, m, m)).astype(np.float32)
    want = tf.image.resize(masks[..., None], [size, size], method="bilinear", antialias=True)[..., 0]
    np.testing.assert_allclose(resize_masks(masks, size), want, atol=1e-5)


def test_mask_boxes_are_tight_and_exclusive():
    masks = np.zeros((2, 6, 7), bool)
    masks[0, 1:4, 2:6] = True
    boxes = mask_boxes(masks).numpy()
    np.testing.assert_array_equal(boxes, [[2, 1, 6, 4], [0, 0, 0, 0]])


def test_greedy_nms_keeps_the_best_of_each_overlapping_group():
    masks = np.zeros((4, 10, 10), bool)
    masks[0, :5, :5] = True
    masks[1, :5, :4] = True  # IoU .8 with 0
    masks[2, 5:, 5:] = True
    masks[3, 5:, 6:] = True  # IoU .8 with 2
    iou = mask_iou_matrix(masks).numpy()
    np.testing.assert_allclose(iou[0, 1], 0.8)
    np.testing.assert_array_equal(greedy_nms(iou, 0.5).numpy(), [True, False, True, False])
    np.testing.assert_array_equal(greedy_nms(iou, 0.9).numpy(), [True] * 4)
