"""A model directory: its resolved configuration and each stage's checkpoints and best weights.

`config.json` holds the configuration of the latest run into the directory; `config_history.json`
the earlier ones it replaced (`write_run_config`). Each stage of `sharpmask_tf.trainer` keeps, in
`<model_dir>/<stage>/`, tf.train.CheckpointManager checkpoints (`ckpt-<step>.index` and
`.data-*`, the `checkpoint` state file) of the model, optimizer, step and sampler seed, and in
`best/` the best weights by validation with best.json ({"step", "metrics"}).

Resuming (`StageCheckpoints.resume`) takes the newest checkpoint that reads in full and matches
the stage's model, whatever the `checkpoint` state file says: it lists the checkpoint files
themselves, so a deleted or corrupt latest checkpoint, or a corrupt state file, falls back to the
one before. The checkpoints newer than the one taken are moved to `skipped/`, never deleted, and
the state file is rewritten to the ones left, so rotation only ever deletes checkpoints older than
the new ones. A stage directory whose checkpoint files all fail raises `UnrestorableCheckpoints`
rather than training from step 0 over them.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from typing import Any

import keras
import tensorflow as tf

from sharpmask_tf.config import CONFIG_FILE, Config

# The earlier resolved configurations of a model directory, oldest first.
CONFIG_HISTORY_FILE = "config_history.json"
# Where a resume moves the checkpoints newer than the one it took, inside the stage directory.
SKIPPED_DIR = "skipped"
# The files of CheckpointManager's checkpoints (its default prefix "ckpt").
_CHECKPOINT_FILE = re.compile(r"ckpt-(\d+)\.(?:index|data-\d{5}-of-\d{5})")
_CHECKPOINT_PREFIX = re.compile(r"ckpt-(\d+)")
# Read errors that say nothing about the files (the checkpoint may well be intact): resuming
# stops on them instead of passing over the checkpoint.
_TRANSIENT_ERRORS = (
    tf.errors.UnavailableError,
    tf.errors.DeadlineExceededError,
    tf.errors.AbortedError,
    tf.errors.CancelledError,
    tf.errors.ResourceExhaustedError,
)


class UnrestorableCheckpoints(RuntimeError):
    """Raised when a stage directory holds checkpoint files and none of them restores.

    Attributes:
        directory: the stage directory.
        skipped: {checkpoint prefix: why it does not restore}, newest first.
    """

    def __init__(self, directory: str, skipped: dict[str, str]):
        reasons = "; ".join(f"{os.path.basename(p)}: {why}" for p, why in skipped.items())
        super().__init__(
            f"None of the checkpoints in {directory} restores ({reasons}). Move them out of the "
            f"directory to train the stage from step 0, or use another model directory."
        )
        self.directory, self.skipped = directory, skipped


def config_changes(saved: Config, config: Config) -> dict[str, tuple[Any, Any]]:
    """The fields in which `config` differs from `saved`: {"section.field": (saved value, value)}."""
    before, after = saved.to_dict(), config.to_dict()
    return {
        f"{section}.{name}": (value, after[section][name])
        for section, fields in before.items()
        for name, value in fields.items()
        if value != after[section][name]
    }


def _saved_config(model_dir: str) -> Config | None:
    """The model directory's config.json, or None if it has none.

    Raises:
        ValueError: naming the file when it is not a valid configuration.
    """
    path = os.path.join(model_dir, CONFIG_FILE)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        text = f.read()
    try:
        return Config.from_json(text)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path} is not a valid sharpmask_tf configuration: {err}") from err


def check_model_dir(config: Config, model_dir: str) -> None:
    """Checks that a model directory is new or was written with the same model configuration.

    Raises:
        ValueError: naming the differing `model` fields when its config.json disagrees, or the
            file when it is not a valid configuration.
    """
    saved = _saved_config(model_dir)
    if saved is None:
        return
    diff = {k: v for k, v in config_changes(saved, config).items() if k.startswith("model.")}
    if diff:
        raise ValueError(
            f"Model directory {model_dir} holds checkpoints of a different model configuration; "
            f"use a new --model-dir. Differing fields (saved, requested): {diff}"
        )


def write_run_config(config: Config, model_dir: str) -> dict[str, tuple[Any, Any]]:
    """Writes config.json; a different one it replaces is first appended to config_history.json
    as {"replaced_at": UTC time, "config": the earlier resolved configuration}.

    Returns:
        The changes from the replaced config.json (`config_changes`): {} for a new model directory
        or the same configuration.
    """
    saved = _saved_config(model_dir)
    changes = {} if saved is None else config_changes(saved, config)
    tf.io.gfile.makedirs(model_dir)
    if changes:
        path = os.path.join(model_dir, CONFIG_HISTORY_FILE)
        history = []
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                history = json.load(f)
        replaced_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
        history.append({"replaced_at": replaced_at, "config": saved.to_dict()})
        with tf.io.gfile.GFile(path, "w") as f:
            json.dump(history, f, indent=2, sort_keys=True)
    with tf.io.gfile.GFile(os.path.join(model_dir, CONFIG_FILE), "w") as f:
        f.write(config.to_json())
    return changes


def has_stage_result(model_dir: str, stage: str) -> bool:
    """Whether a model directory holds the best weights of a stage."""
    return tf.train.latest_checkpoint(os.path.join(model_dir, stage, "best")) is not None


def checkpoint_steps(directory: str) -> list[int]:
    """The steps of the checkpoints with files (an .index or a data shard) in `directory`, ascending,
    whether or not they restore and whatever the `checkpoint` state file lists."""
    if not tf.io.gfile.isdir(directory):
        return []
    return sorted(
        {int(m.group(1)) for name in tf.io.gfile.listdir(directory) if (m := _CHECKPOINT_FILE.fullmatch(name))}
    )


def _state_steps(directory: str) -> set[int]:
    """The steps the directory's `checkpoint` state file names (none when it does not parse)."""
    try:
        state = tf.train.get_checkpoint_state(directory)
    except ValueError:  # not UTF-8, or no latest checkpoint in it
        return set()
    if state is None:
        return set()
    paths = [state.model_checkpoint_path, *state.all_model_checkpoint_paths]
    return {int(m.group(1)) for p in paths if (m := _CHECKPOINT_PREFIX.fullmatch(os.path.basename(p)))}


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _unreadable(prefix: str) -> str | None:
    """Why a checkpoint does not read in full, or None when every tensor in it reads."""
    if not tf.io.gfile.exists(prefix + ".index"):
        if tf.io.gfile.glob(prefix + ".data-*"):
            return "its .index file is missing"
        return "the checkpoint state file names it but its files are missing"
    try:
        reader = tf.train.load_checkpoint(prefix)
        for name in reader.get_variable_to_dtype_map():
            reader.get_tensor(name)
    except _TRANSIENT_ERRORS:
        raise
    except (tf.errors.OpError, IndexError, ValueError) as err:
        return f"its files do not read ({_first_line(err)})"
    return None


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
        skipped: {checkpoint prefix: why it does not restore} of the checkpoints the last
            `restore` passed over, newest first.
        set_aside: the checkpoints (prefixes before the move) the last `resume` moved to
            `skipped/` of the write directory, newest first.
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
        self.stage, self.directory, self._write_directory = stage, directory, write_directory
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
        # Opened by `resume` (after it has put the state file right) or at the first save.
        self._manager: tf.train.CheckpointManager | None = None
        self._best_checkpoint = tf.train.Checkpoint(model=model)
        self._best_manager = tf.train.CheckpointManager(
            self._best_checkpoint, os.path.join(write_directory, "best"), max_to_keep=1
        )
        self.best = self._read_best()
        self.skipped: dict[str, str] = {}
        self.set_aside: list[str] = []

    def _read_best(self) -> dict | None:
        path = os.path.join(self._best_manager.directory, "best.json")
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    def _checkpoint_manager(self) -> tf.train.CheckpointManager:
        if self._manager is None:
            self._manager = tf.train.CheckpointManager(self._checkpoint, self._write_directory, max_to_keep=3)
        return self._manager

    @property
    def latest(self) -> str | None:
        """The latest checkpoint this process wrote, if any."""
        return self._checkpoint_manager().latest_checkpoint

    def restore(self) -> str | None:
        """Restores the newest of the stage's checkpoints (the chief's, on every worker) that reads
        in full and matches the model and optimizer; `skipped` says why each newer one did not.

        Returns:
            The checkpoint restored, or None when the directory holds no checkpoint files.

        Raises:
            UnrestorableCheckpoints: when it holds checkpoint files and none of them restores.
        """
        self.skipped = {}
        on_disk = checkpoint_steps(self.directory)
        for step in sorted(set(on_disk) | _state_steps(self.directory), reverse=True):
            prefix = os.path.join(self.directory, f"ckpt-{step}")
            why = _unreadable(prefix)
            if why is None:
                try:
                    self._checkpoint.restore(prefix).assert_existing_objects_matched()
                    return prefix
                except (AssertionError, ValueError) as err:
                    why = f"it does not match the stage's model and optimizer ({_first_line(err)})"
            self.skipped[prefix] = why
        if on_disk:
            raise UnrestorableCheckpoints(self.directory, self.skipped)
        return None

    def resume(self) -> str | None:
        """`restore`, a fresh sampler stream from the restored step, and the write directory made
        to hold no checkpoint newer than it (`set_aside`), so that rotation deletes none of them.

        Returns:
            The checkpoint restored, or None (the stage starts at step 0).

        Raises:
            UnrestorableCheckpoints: as `restore`.
        """
        restored = self.restore()
        if restored is not None:
            self._stream_start.assign(self.step)
        self.set_aside = self._set_aside_newer_than(int(self.step.numpy()))
        return restored

    def _set_aside_newer_than(self, step: int) -> list[str]:
        """Moves the write directory's checkpoints newer than `step` to `skipped/`, rewrites its
        state file to the checkpoints left and opens the manager on it; returns the moved ones."""
        directory = self._write_directory
        steps = checkpoint_steps(directory)
        moved = [os.path.join(directory, f"ckpt-{s}") for s in reversed(steps) if s > step]
        if moved:
            skipped = os.path.join(directory, SKIPPED_DIR)
            tf.io.gfile.makedirs(skipped)
            for prefix in moved:
                for path in tf.io.gfile.glob(prefix + ".*"):
                    tf.io.gfile.rename(path, os.path.join(skipped, os.path.basename(path)), overwrite=True)
        kept = [
            prefix
            for s in steps
            if s <= step and tf.io.gfile.exists((prefix := os.path.join(directory, f"ckpt-{s}")) + ".index")
        ]
        state = os.path.join(directory, "checkpoint")
        if kept:
            # The files' times, after a preserved time before them all: CheckpointManager rotates
            # only the checkpoints written after its last preserved one.
            times = [tf.io.gfile.stat(p + ".index").mtime_nsec / 1e9 for p in kept]
            tf.__internal__.train.update_checkpoint_state(
                directory,
                kept[-1],
                kept,
                save_relative_paths=True,
                all_model_checkpoint_timestamps=times,
                last_preserved_timestamp=min(times) - 1.0,
            )
        elif tf.io.gfile.exists(state):
            tf.io.gfile.remove(state)
        self._manager = None
        self._checkpoint_manager()
        return moved

    def stream_seed(self) -> int:
        """The seed of the sampler stream that starts at the current step."""
        return int(self._data_seed.numpy()) + 7919 * int(self._stream_start.numpy())

    def save(self, step: int) -> None:
        """Saves a checkpoint numbered `step`, unless the latest already is."""
        if self.latest is None or not self.latest.endswith(f"-{step}"):
            self._checkpoint_manager().save(checkpoint_number=step)

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
