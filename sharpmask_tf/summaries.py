"""What the training loop reports about its steps: TensorBoard's training scalars and mask
panels, and the share of step time spent waiting for input."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import tensorflow as tf


def mask_panels(shown: dict[str, np.ndarray], context: int, patch_size: int) -> np.ndarray:
    """(N, L, 3L, 3) images: the patch's central window, the label and the predicted probability."""
    side = shown["labels"].shape[1]
    window = shown["images"][:, context : context + patch_size, context : context + patch_size]
    window = tf.image.resize(window, (side, side)).numpy()
    label = np.repeat((shown["labels"][..., None] > 0).astype(np.float32), 3, axis=-1)
    prob = np.repeat(1 / (1 + np.exp(-shown["logits"][..., None])), 3, axis=-1)
    return np.clip(np.concatenate([window, label, prob], axis=2), 0, 1)


def write_train_summaries(writer, step: int, sums: list[float], scalars: dict[str, float]) -> None:
    """The training scalars of a log point: the losses from a step's log sums (mask sum, masks,
    score sum, scores, loss) and the named `scalars`."""
    mask_sum, masks, score_sum, scores, loss = sums
    with writer.as_default(step=step):
        tf.summary.scalar("loss", loss)
        if masks:
            tf.summary.scalar("mask_loss", mask_sum / masks)
        if scores:
            tf.summary.scalar("score_loss", score_sum / scores)
        for name, value in scalars.items():
            tf.summary.scalar(name, value)


class InputWait:
    """The share of training-step time spent waiting for input: the time `next()` on the training
    iterator blocks over the time from that call to the end of the step (its losses read back),
    summed over steps. The first step after the iterator is made is left out: it starts the input
    pipeline and traces the step function, which says nothing about the steady state.

    Use `next` in place of the builtin for the step's batch and `step_done` once its results are
    read.
    """

    def __init__(self) -> None:
        self.steps = 0
        self._total = [0.0, 0.0]  # (waiting, whole steps), seconds, after the first step
        self._interval = [0.0, 0.0]  # the same since the last `interval_share`
        self._start = self._waiting = 0.0

    def next(self, iterator: Any) -> Any:
        """`next(iterator)`, timed: the start of a step."""
        self._start = time.perf_counter()
        batch = next(iterator)
        self._waiting = time.perf_counter() - self._start
        return batch

    def step_done(self) -> None:
        """Counts the step begun by the last `next`."""
        self.steps += 1
        if self.steps > 1:
            whole = time.perf_counter() - self._start
            for counts in (self._total, self._interval):
                counts[0] += self._waiting
                counts[1] += whole

    def share(self) -> float | None:
        """The share over every step but the first; None before the second step."""
        return self._total[0] / self._total[1] if self._total[1] > 0 else None

    def interval_share(self) -> float | None:
        """The share over the steps since the last call (the first step left out), then resets."""
        waiting, whole = self._interval
        self._interval = [0.0, 0.0]
        return waiting / whole if whole > 0 else None
