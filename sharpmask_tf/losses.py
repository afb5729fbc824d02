"""Training losses and per-patch mask metrics, as pure functions (SPEC.md section 3).

Labels are +1 (object) / -1 (background), as in the reference's soft-margin criteria. Every loss
returns one value per example, so the caller decides how to reduce (training sums them over the
global batch, the reference's scale: `sharpmask_tf.task`).
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf


def resize_logits(logits: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes mask logits bilinearly to a square side.

    Args:
        logits: (B, h, w) mask logits.
        size: the output side.

    Returns:
        (B, size, size) float32 logits; the input itself (cast) when it already has that size.
    """
    logits = tf.cast(logits, tf.float32)
    if logits.shape[1] == size and logits.shape[2] == size:
        return logits
    return tf.image.resize(logits[..., None], (size, size), method="bilinear")[..., 0]


def soft_margin(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """The logistic (soft-margin) loss log(1 + exp(-y x)), elementwise.

    Args:
        logits: float tensor of any shape.
        labels: +1/-1 labels of the same shape.

    Returns:
        A float32 tensor of the inputs' shape.
    """
    return tf.math.softplus(-tf.cast(labels, tf.float32) * tf.cast(logits, tf.float32))


def mask_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Per-pixel logistic loss, the logits upsampled bilinearly to the label's side first.

    Args:
        logits: (B, h, w) mask logits (56x56 coarse DeepMask masks or refined masks).
        labels: (B, L, L) +1/-1 labels.

    Returns:
        (B,) the mean loss over each example's L*L pixels.
    """
    if labels.shape.rank != 3 or logits.shape.rank != 3:
        raise ValueError(
            f"mask_loss takes (B, h, w) logits and (B, L, L) labels. "
            f"Received: logits.shape={logits.shape}, labels.shape={labels.shape}"
        )
    upsampled = resize_logits(logits, int(labels.shape[1]))
    return tf.reduce_mean(soft_margin(upsampled, labels), axis=[1, 2])


def score_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Logistic loss of objectness scores.

    Args:
        logits: (B, 1) score logits.
        labels: (B, 1) +1/-1 labels.

    Returns:
        (B,) the loss of each example.
    """
    return tf.reshape(soft_margin(logits, labels), [-1])


def joint_loss(
    mask_logits: tf.Tensor,
    score_logits: tf.Tensor | None,
    batch: dict[str, tf.Tensor],
    score_weight: float,
) -> dict[str, tf.Tensor]:
    """DeepMask's joint objective per example: mask loss on mask samples plus `score_weight`
    times the score loss on score samples (stage 2 passes score_logits=None: masks only).

    Args:
        mask_logits: (B, h, w) mask logits.
        score_logits: (B, 1) score logits, or None to leave the score term out.
        batch: a data batch with "masks" (B, L, L), "scores" (B, 1), "mask_weight" (B,) and
            "score_weight" (B,).
        score_weight: the score term's weight against the mask term (1/32 in the paper).

    Returns:
        (B,) float32 tensors: "loss" the objective, "mask" the mask loss times mask_weight and
        "score" the (unweighted by score_weight) score loss times the sample's score_weight.
        Summed over a batch of N and divided by N, "loss" is the mean mask loss of a mask batch,
        or score_weight times the mean score loss of a score batch.
    """
    mask = batch["mask_weight"] * mask_loss(mask_logits, batch["masks"])
    if score_logits is None:
        return {"loss": mask, "mask": mask, "score": tf.zeros_like(mask)}
    score = batch["score_weight"] * score_loss(score_logits, batch["scores"])
    return {"loss": mask + score_weight * score, "mask": mask, "score": score}


def mask_iou(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-patch IoU of masks thresholded at probability .5 (logit 0) against +1/-1 labels.

    Args:
        logits: (B, L, L) mask logits at the labels' resolution.
        labels: (B, L, L) +1/-1 labels.

    Returns:
        (B,) float64 IoU; a patch whose prediction and label are both empty counts as 1.
    """
    logits, labels = np.asarray(logits), np.asarray(labels)
    if logits.shape != labels.shape:
        raise ValueError(f"mask_iou needs logits and labels of one shape. Received: {logits.shape} and {labels.shape}")
    pred, truth = logits > 0, labels > 0
    inter = np.logical_and(pred, truth).sum(axis=(1, 2))
    union = np.logical_or(pred, truth).sum(axis=(1, 2))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def iou_summary(ious: np.ndarray) -> dict[str, float]:
    """Mean and median per-patch IoU and the shares of patches over IoU .5 and .7.

    Args:
        ious: (N,) per-patch IoUs, N >= 1.

    Returns:
        {"mean_iou", "median_iou", "iou_over_50", "iou_over_70"} as floats.
    """
    ious = np.asarray(ious, dtype=np.float64)
    if ious.ndim != 1 or ious.size == 0:
        raise ValueError(f"iou_summary needs a non-empty vector of IoUs. Received: shape={ious.shape}")
    return {
        "mean_iou": float(ious.mean()),
        "median_iou": float(np.median(ious)),
        "iou_over_50": float((ious > 0.5).mean()),
        "iou_over_70": float((ious > 0.7).mean()),
    }
