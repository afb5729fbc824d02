"""Stop signals for the training loop: SIGTERM and SIGINT recorded instead of dying, agreed on by
every replica, and the exception that ends a run after the current step is saved."""

from __future__ import annotations

import signal
import threading

import tensorflow as tf


class TrainingInterrupted(Exception):
    """Raised after SIGTERM/SIGINT stopped training and a checkpoint of the current step was saved.

    Attributes:
        stage: the stage that was running.
        step: the step saved.
        signum: the signal received.
    """

    def __init__(self, stage: str, step: int, signum: int):
        super().__init__(f"{signal.Signals(signum).name} received: stage {stage} saved at step {step}")
        self.stage, self.step, self.signum = stage, step, signum


class StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop.

    Re-entrant: the outermost `with` clears the record and installs the handlers, and restores the
    previous ones on leaving.
    """

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}
        self._depth = 0

    def __enter__(self):
        if self._depth == 0:
            self.signum = None
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    self._previous[sig] = signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def _handle(self, signum, frame):
        if self.signum is None:  # the first signal decides the exit code
            self.signum = signum

    def __exit__(self, *exc):
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = {}


def sum_over_replicas(flag: tf.Tensor) -> tf.Tensor:
    """A replica's stop flag summed over every replica of every worker."""
    # tf.identity places the flag on this replica's device, which all_reduce needs.
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(flag))
