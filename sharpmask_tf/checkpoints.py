"""A model directory's stage checkpoints: the latest few with the loop state, and the best weights.

Each stage of `sharpmask_tf.trainer` keeps, in `<model_dir>/<stage>/`, tf.train.CheckpointManager
checkpoints of the model, optimizer, step and sampler seed, and in `best/` the best weights by
validation with best.json ({"step", "metrics"}).
"""

from __future__ import annotations

import dataclasses
import json
import os

import keras
import tensorflow as tf

from sharpmask_tf.config import CONFIG_FILE, Config


def check_model_dir(config: Config, model_dir: str) -> None:
    """Checks that a model directory is new or was written with the same model configuration.

    Raises:
        ValueError: naming the differing `model` fields when its config.json disagrees.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path) as f:
        saved = Config.from_json(f.read())
    diff = {
        k: (v, getattr(config.model, k))
        for k, v in dataclasses.asdict(saved.model).items()
        if v != getattr(config.model, k)
    }
    if diff:
        raise ValueError(
            f"Model directory {model_dir} holds checkpoints of a different model configuration; "
            f"use a new --model-dir. Differing fields (saved, requested): {diff}"
        )


def has_stage_result(model_dir: str, stage: str) -> bool:
    """Whether a model directory holds the best weights of a stage."""
    return tf.train.latest_checkpoint(os.path.join(model_dir, stage, "best")) is not None


class StageCheckpoints:
    """A stage's loop state (its step and sampler stream) with its latest checkpoints and best weights.

    Create it inside the strategy's scope: its variables are created here.

    Args:
        stage: the stage's name, for messages.
        model: the stage's model.
        optimizer: its optimizer.
        data_seed: the sampler's seed (`data.seed`); a restored checkpoint's own value wins.
        directory: where the stage's checkpoints are read (the chief's).
        write_directory: where this process writes them (the chief's own or a worker's).

    Attributes:
        step: the steps trained, a tf.Variable.
        directory: as given.
        best: {"step", "metrics"} of the best weights kept, or None.
    """

    def __init__(
        self,
        stage: str,
        model: keras.Model,
        optimizer: keras.optimizers.Optimizer,
        data_seed: int,
        directory: str,
        write_directory: str,
    ):
        self.stage, self.directory = stage, directory
        first_replica = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step", aggregation=first_replica)
        # The sampler stream is a pure function of (data seed, the step it started at); a
        # resumed run starts a fresh, reproducible stream at the restored step.
        self._data_seed = tf.Variable(
            data_seed, dtype=tf.int64, trainable=False, name="data_seed", aggregation=first_replica
        )
        self._stream_start = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="stream_start", aggregation=first_replica
        )
        self._checkpoint = tf.train.Checkpoint(
            model=model,
            optimizer=optimizer,
            step=self.step,
            data_seed=self._data_seed,
            stream_start=self._stream_start,
        )
        self._manager = tf.train.CheckpointManager(self._checkpoint, write_directory, max_to_keep=3)
        self._best_checkpoint = tf.train.Checkpoint(model=model)
        self._best_manager = tf.train.CheckpointManager(
            self._best_checkpoint, os.path.join(write_directory, "best"), max_to_keep=1
        )
        self.best = self._read_best()

    def _read_best(self) -> dict | None:
        path = os.path.join(self._best_manager.directory, "best.json")
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    @property
    def latest(self) -> str | None:
        """The latest checkpoint this process wrote, if any."""
        return self._manager.latest_checkpoint

    def restore(self) -> bool:
        """Restores the stage's latest checkpoint (the chief's, on every worker), if any."""
        latest = tf.train.latest_checkpoint(self.directory)
        if latest is None:
            return False
        self._checkpoint.restore(latest).assert_existing_objects_matched()
        return True

    def resume(self) -> bool:
        """`restore`, and a fresh sampler stream from the restored step."""
        if not self.restore():
            return False
        self._stream_start.assign(self.step)
        return True

    def stream_seed(self) -> int:
        """The seed of the sampler stream that starts at the current step."""
        return int(self._data_seed.numpy()) + 7919 * int(self._stream_start.numpy())

    def save(self, step: int) -> None:
        """Saves a checkpoint numbered `step`, unless the latest already is."""
        if self.latest is None or not self.latest.endswith(f"-{step}"):
            self._manager.save(checkpoint_number=step)

    def keep_if_best(self, metrics: dict[str, float], step: int) -> None:
        """Keeps the model's weights and best.json when `metrics` beat the best so far."""
        if not is_better(metrics, self.best and self.best["metrics"]):
            return
        self._best_manager.save(checkpoint_number=step)
        self.best = {"step": step, "metrics": metrics}
        with tf.io.gfile.GFile(os.path.join(self._best_manager.directory, "best.json"), "w") as f:
            json.dump(self.best, f, indent=2)

    def restore_best(self) -> None:
        """Loads the best weights kept by validation into the model."""
        latest = self._best_manager.latest_checkpoint
        if latest is None:
            raise FileNotFoundError(f"No best checkpoint of stage {self.stage} in {self._best_manager.directory}")
        self._best_checkpoint.restore(latest).expect_partial()


def is_better(metrics: dict[str, float], best: dict[str, float] | None) -> bool:
    """Whether validation metrics beat the best ones (None: there are none yet).

    Best by the share of patches over IoU .7; ties (common early, when the share is 0) go to mean
    IoU plus, in stage 1, score accuracy: a DeepMask whose score head has collapsed to a constant
    ranks proposals at random, however good its masks.
    """
    if best is None:
        return True
    key = lambda m: (m["iou_over_70"], m["mean_iou"] + m.get("score_accuracy", 0.0))  # noqa: E731
    return key(metrics) > key(best)
