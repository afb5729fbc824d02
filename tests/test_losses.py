import numpy as np
import pytest
import tensorflow as tf

from sharpmask_tf.losses import iou_summary, joint_loss, mask_iou, mask_loss, resize_logits, score_loss


def _reference_soft_margin(x, y):
    return np.log1p(np.exp(-y * x))


def test_mask_loss_matches_soft_margin_mean_per_example():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 8, 8)).astype(np.float32)
    labels = np.where(rng.random((3, 8, 8)) < 0.5, 1.0, -1.0).astype(np.float32)
    got = mask_loss(tf.constant(logits), tf.constant(labels)).numpy()
    np.testing.assert_allclose(got, _reference_soft_margin(logits, labels).mean(axis=(1, 2)), rtol=1e-5)


def test_mask_loss_upsamples_coarse_logits_bilinearly_to_label_size():
    logits = tf.constant(np.random.default_rng(1).normal(size=(2, 4, 4)).astype(np.float32))
    labels = tf.ones((2, 8, 8))
    up = tf.image.resize(logits[..., None], (8, 8), method="bilinear")[..., 0].numpy()
    np.testing.assert_allclose(
        mask_loss(logits, labels).numpy(), _reference_soft_margin(up, 1.0).mean(axis=(1, 2)), rtol=1e-5
    )
    assert resize_logits(logits, 8).shape == (2, 8, 8)


def test_mask_loss_is_stable_for_large_logits_and_half_precision():
    logits = tf.constant([[[80.0, -80.0], [80.0, -80.0]]], tf.float16)
    labels = tf.ones((1, 2, 2))
    loss = mask_loss(logits, labels).numpy()
    assert loss.dtype == np.float32
    np.testing.assert_allclose(loss, [40.0], rtol=1e-3)


def test_mask_loss_rejects_wrong_ranks():
    with pytest.raises(ValueError, match="Received: logits.shape"):
        mask_loss(tf.zeros((2, 4, 4, 1)), tf.zeros((2, 4, 4)))


def test_joint_loss_weights_score_term_and_masks_per_sample_kind():
    logits_m = tf.zeros((2, 4, 4))
    logits_s = tf.zeros((2, 1))
    batch = {
        "masks": tf.ones((2, 4, 4)),
        "scores": tf.constant([[1.0], [-1.0]]),
        "mask_weight": tf.constant([1.0, 0.0]),
        "score_weight": tf.constant([0.0, 1.0]),
    }
    got = joint_loss(logits_m, logits_s, batch, 1 / 32)
    np.testing.assert_allclose(got["loss"].numpy(), [np.log(2), np.log(2) / 32], rtol=1e-6)
    np.testing.assert_allclose(got["mask"].numpy(), [np.log(2), 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["score"].numpy(), [0.0, np.log(2)], rtol=1e-6)
    np.testing.assert_allclose(joint_loss(logits_m, None, batch, 1 / 32)["loss"].numpy(), [np.log(2), 0.0], atol=1e-7)
    np.testing.assert_allclose(
        score_loss(tf.constant([[2.0]]), tf.constant([[-1.0]])).numpy(), [np.log1p(np.e**2)], rtol=1e-6
    )


def test_mask_iou_thresholds_at_probability_half():
    labels = -np.ones((3, 4, 4), np.float32)
    labels[:, :2] = 1  # 8 object pixels
    logits = -np.ones((3, 4, 4), np.float32)
    logits[0, :2] = 3  # exact
    logits[1, :1] = 3  # half
    np.testing.assert_allclose(mask_iou(logits, labels), [1.0, 0.5, 0.0])
    empty = mask_iou(-np.ones((1, 2, 2)), -np.ones((1, 2, 2)))
    np.testing.assert_allclose(empty, [1.0])
    with pytest.raises(ValueError, match="Received"):
        mask_iou(np.zeros((1, 2, 2)), np.zeros((1, 3, 3)))


def test_iou_summary():
    s = iou_summary(np.array([0.2, 0.6, 0.8, 0.9]))
    assert s == pytest.approx({"mean_iou": 0.625, "median_iou": 0.7, "iou_over_50": 0.75, "iou_over_70": 0.5})
    with pytest.raises(ValueError):
        iou_summary(np.array([]))


def _reference_soft_margin_grad(x, y):
    """Torch's SoftMarginCriterion backward with sizeAverage: -y e^(-yx) / (1 + e^(-yx)) / x.size."""
    return -y * np.exp(-y * x) / (1 + np.exp(-y * x)) / x.size


def test_joint_loss_summed_over_a_batch_of_32_has_the_reference_gradients():
    # TrainerDeepMask.lua: a mask batch's criterion gradient times the batch, a score batch's as is.
    rng = np.random.default_rng(2)
    n, side = 32, 4
    logits_m = tf.constant(rng.normal(size=(n, side, side)).astype(np.float32))
    logits_s = tf.constant(rng.normal(size=(n, 1)).astype(np.float32))
    masks = np.where(rng.random((n, side, side)) < 0.5, 1.0, -1.0).astype(np.float32)
    scores = np.where(rng.random((n, 1)) < 0.5, 1.0, -1.0).astype(np.float32)
    for kind in ("mask", "score"):
        weight = tf.fill([n], 1.0 if kind == "mask" else 0.0)
        batch = {
            "masks": tf.constant(masks),
            "scores": tf.constant(scores),
            "mask_weight": weight,
            "score_weight": 1.0 - weight,
        }
        with tf.GradientTape() as tape:
            tape.watch([logits_m, logits_s])
            loss = tf.reduce_sum(joint_loss(logits_m, logits_s, batch, 1 / 32)["loss"])
        grad_m, grad_s = tape.gradient(loss, [logits_m, logits_s])
        if kind == "mask":
            np.testing.assert_allclose(grad_m, n * _reference_soft_margin_grad(logits_m.numpy(), masks), rtol=1e-5)
            np.testing.assert_allclose(grad_s, 0.0)
        else:
            np.testing.assert_allclose(grad_s, _reference_soft_margin_grad(logits_s.numpy(), scores), rtol=1e-5)
            np.testing.assert_allclose(grad_m, 0.0)
