"""The two-stage SharpMask schedule as one custom loop for every tf.distribute strategy.

The loop drives a `sharpmask_tf.task.StageTask` per stage (its model, optimizer, inputs, replica
train step and validation) through its public methods and owns everything around it: the
strategy (`sharpmask_tf.distribute`), checkpoints and the best model (`sharpmask_tf.checkpoints`),
resumption, stop signals, TensorBoard and metrics.json (TF Model Garden's split of `base_trainer`
from `base_task`).

The loop is a `strategy.run` step inside a `tf.function` (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy, keras-team/keras#20585). Each replica's objective is its examples'
losses summed (the reference's scale, see `task.py`); the optimizer sums gradients over replicas,
so a step is the sum over the global batch for any replica count. The batch is taken from the
iterator outside the step function, so the loop times how long each step waits for its input
(`summaries.InputWait`): TensorBoard's `input_wait_fraction` at every log point and metrics.json's
per stage say how much of the step time went to waiting (near 0 when the input keeps ahead; a
share that grows says the input pipeline is the bottleneck).

About 450 lines, one class: the loop and the bookkeeping every step shares (resume, the step
counter, the checkpoint and validation cadence, the best model, signals); the pieces that stand
alone already live beside it (`checkpoints`, `stop_signals`, `summaries`, `distribute`).

A model directory holds:
    config.json                  the resolved configuration of the latest run
    config_history.json          the earlier ones, when a resumed run changed the configuration
    deepmask/, sharpmask/        tf.train.CheckpointManager checkpoints of each stage (model,
                                 optimizer, step, sampler seed), best/ (the best weights by the
                                 share of validation patches over IoU .7) with best.json, and
                                 skipped/ (checkpoints a resume passed over, kept)
    logs/<stage>/{train,val}/    TensorBoard: losses, learning rate, speed, input wait, IoU
                                 metrics, masks
    deepmask.keras, sharpmask.keras, metrics.json    written when a stage ends

SIGTERM and SIGINT are recorded for the whole of `Trainer.run` and acted on at the next of its
stop points: after each step, after a stage's last validation, after its export and after
metrics.json. There every worker agrees (a collective, as in the step), saves the current step
unless it is saved, and raises `TrainingInterrupted`. Under several workers, `Trainer.run`
returns or raises only once every worker has ended its last collective (`wait_for_workers`):
a worker that left first could strand a peer's share of the last all-reduce.

About 450 lines: `Trainer`'s methods are the loop's steps over one shared state (strategy, model
directory, writers, stop signals); the parts without that state live in `stop_signals.py`,
`summaries.py`, `checkpoints.py` and `task.py`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import keras
import tensorflow as tf
from tqdm.auto import tqdm

from sharpmask_tf.checkpoints import (
    CONFIG_HISTORY_FILE,
    SKIPPED_DIR,
    StageCheckpoints,
    check_model_dir,
    checkpoint_steps,
    has_stage_result,
    write_run_config,
)
from sharpmask_tf.config import Config
from sharpmask_tf.deepmask import dtype_policy_scope
from sharpmask_tf.distribute import cluster_role, resolve_strategy, wait_for_workers
from sharpmask_tf.stop_signals import StopSignals, TrainingInterrupted, sum_over_replicas
from sharpmask_tf.summaries import InputWait, mask_panels, write_train_summaries
from sharpmask_tf.task import STAGES, DatasetFn, StageTask, ValidationFn, stage_model

METRICS_FILE = "metrics.json"
# Patches drawn into TensorBoard at every validation.
IMAGES_TO_LOG = 3


def _check_finite(stage: str, step: int, loss: float, checkpoints: StageCheckpoints) -> None:
    """Raises FloatingPointError for a loss that is not finite, before any save of its step: the
    latest checkpoint stays the last good one. Under mixed precision too: loss scaling skips
    overflowing gradients, not a lost forward."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"{stage}: the loss is {loss} at step {step}; stopped without saving it. "
            f"The last good checkpoint: {checkpoints.latest or 'none yet'}"
        )


class Trainer:
    """Runs the stages of one model directory under one strategy.

    Args:
        config: the configuration.
        model_dir: where checkpoints, logs, config.json, the .keras models and metrics.json go.
        strategy: a tf.distribute strategy.
        make_dataset: `sharpmask_tf.data.make_dataset` or a function of the same signature.
        make_validation_patches: `sharpmask_tf.data.make_validation_patches` or alike.
        progress: show a progress bar (on the chief).
        log: where one-line progress messages go (the chief's only).

    Raises:
        ValueError: if the global batch does not split evenly over the strategy's replicas.
    """

    def __init__(
        self,
        config: Config,
        model_dir: str,
        strategy: tf.distribute.Strategy,
        make_dataset: DatasetFn | None = None,
        make_validation_patches: ValidationFn | None = None,
        progress: bool = True,
        log: Callable[[str], None] = print,
    ):
        replicas = strategy.num_replicas_in_sync
        if config.training.batch_size % replicas:
            raise ValueError(
                f"training.batch_size must be a multiple of the {replicas} replicas. "
                f"Received: batch_size={config.training.batch_size}"
            )
        self.config, self.model_dir, self.strategy = config, model_dir, strategy
        self.make_dataset, self.make_validation_patches = make_dataset, make_validation_patches
        self.progress = progress
        self.is_chief, self.worker = cluster_role(strategy)
        self._log = log
        self._writers: dict[str, dict] = {}
        self._stop = StopSignals()
        self._agree_to_stop: Callable | None = None

    def log(self, message: str) -> None:
        if self.is_chief:
            self._log(message)

    def writers(self, stage: str) -> dict:
        if stage not in self._writers:
            if self.is_chief:
                root = os.path.join(self.model_dir, "logs", stage)
                self._writers[stage] = {
                    k: tf.summary.create_file_writer(os.path.join(root, k)) for k in ("train", "val")
                }
            else:
                self._writers[stage] = {k: tf.summary.create_noop_writer() for k in ("train", "val")}
        return self._writers[stage]

    def check(self, stage: str = "both") -> None:
        """Checks, before any work, that `run(stage)` can start in the model directory.

        Raises:
            ValueError: for a bad stage, a refinement stage of a model without refinement, or a
                model directory of another model configuration.
            FileNotFoundError: for stage "sharpmask" in a model directory without stage 1's result.
        """
        if stage not in (*STAGES, "both"):
            raise ValueError(f"stage must be one of {(*STAGES, 'both')}. Received: stage={stage!r}")
        if stage != "deepmask" and not self.config.model.refinement:
            raise ValueError(
                f"Stage {stage!r} trains the refinement, but model.refinement=false: train stage 'deepmask' only."
            )
        check_model_dir(self.config, self.model_dir)
        if stage == "sharpmask" and not self._has_checkpoints("sharpmask"):
            self._deepmask_result()

    def run(self, stage: str = "both") -> dict[str, Any]:
        """`check(stage)`, then `train`'s work: see there."""
        self.check(stage)
        metrics: dict[str, Any] = {}
        try:
            with self._stop, dtype_policy_scope("mixed_float16" if self.config.training.mixed_precision else "float32"):
                self.write_config()
                deepmask = None
                if stage in ("deepmask", "both"):
                    deepmask, metrics["deepmask"] = self.run_stage("deepmask")
                if stage in ("sharpmask", "both"):
                    _, metrics["sharpmask"] = self.run_stage("sharpmask", init_from=deepmask)
                merged = self.write_metrics(metrics)
                last = list(metrics)[-1]
                if self.stop_agreed(self._stop):
                    raise TrainingInterrupted(last, metrics[last]["step"], self._stop.signum or signal.SIGTERM)
        except TrainingInterrupted:
            wait_for_workers(self.strategy, warn=self._log)
            raise
        wait_for_workers(self.strategy, warn=self._log)
        return merged

    def write_config(self) -> None:
        """Writes config.json (on the chief), after `check`. A different configuration it replaces
        goes to config_history.json, with a warning naming the changed fields."""
        if not self.is_chief:
            return
        changes = write_run_config(self.config, self.model_dir)
        if changes:
            listed = "; ".join(f"{k}: {saved!r} -> {now!r}" for k, (saved, now) in changes.items())
            self.log(
                f"warning: resuming {self.model_dir} with another configuration than its config.json "
                f"(saved -> now: {listed}); config.json now holds this run's, and {CONFIG_HISTORY_FILE} "
                f"the earlier ones, oldest first"
            )

    def stop_agreed(self, stop: StopSignals) -> bool:
        """Whether any worker holds a stop signal: a collective, so every worker calls it at the
        same points (the stop points of the module docstring)."""
        if self._agree_to_stop is None:
            strategy = self.strategy

            @tf.function
            def agree(flag):
                summed = strategy.run(sum_over_replicas, args=(flag,))
                return strategy.reduce(tf.distribute.ReduceOp.MEAN, summed, axis=None)

            self._agree_to_stop = agree
        return float(self._agree_to_stop(tf.constant(float(stop.signum is not None)))) > 0

    def _stop_if_signalled(self, stop: StopSignals, stage: str, checkpoints: StageCheckpoints, step: int) -> None:
        if self.stop_agreed(stop):
            checkpoints.save(step)
            raise TrainingInterrupted(stage, step, stop.signum or signal.SIGTERM)

    def build_task(self, stage: str, init_from: keras.Model | None = None) -> StageTask:
        """The stage's task, built in the strategy's scope."""
        with self.strategy.scope():
            return StageTask(
                self.config,
                stage,
                init_from,
                self.strategy.num_replicas_in_sync,
                self.make_dataset,
                self.make_validation_patches,
                trunk_weights=not self._has_checkpoints(stage),
            )

    def stage_checkpoints(self, task: StageTask) -> StageCheckpoints:
        """The loop state and checkpoints of a task's stage in the model directory."""
        directory = os.path.join(self.model_dir, task.stage)
        write_directory = (
            directory if self.is_chief else os.path.join(self.model_dir, "workers", str(self.worker), task.stage)
        )
        with self.strategy.scope():
            return StageCheckpoints(
                task.stage, task.model, task.optimizer, self.config.data.seed, directory, write_directory
            )

    def train_iterator(self, task: StageTask, seed: int, first_step: int = 0) -> Any:
        """The task's training stream from step `first_step`, distributed over the replicas."""
        return iter(
            self.strategy.distribute_datasets_from_function(lambda ctx: task.build_inputs(seed, ctx, first_step))
        )

    def distributed_train_step(self, task: StageTask, step: tf.Variable) -> Callable:
        """A tf.function (distributed batch, stop flag) -> (log sums over replicas, stop flag's
        mean): `task.train_step` on every replica, then `step` + 1. The flag, summed over the
        replicas, stops every worker at the same step. The batch is taken from the iterator
        outside the function, so the loop can time the wait for it."""
        strategy = self.strategy

        def replica_step(batch, stop):
            return task.train_step(batch), sum_over_replicas(stop)

        @tf.function
        def train_step(batch, stop):
            sums, stop = strategy.run(replica_step, args=(batch, stop))
            step.assign_add(1)
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.MEAN, stop, axis=None),
            )

        return train_step

    def fit_stage(self, task: StageTask, checkpoints: StageCheckpoints, stop: StopSignals) -> dict:
        """Trains a task to its last step (resuming from the newest checkpoint that restores, see
        `StageCheckpoints.resume`), keeps the best weights, loads them into the model and returns
        the stage's metrics.

        Raises:
            FloatingPointError: for a loss that is not finite, before that step is saved.
            TrainingInterrupted: once `stop` holds a signal and the current step is saved.
            UnrestorableCheckpoints: if the stage's checkpoint files are there and none restores.
        """
        step = self._resume(task.stage, checkpoints)
        last_validated = checkpoints.best["step"] if checkpoints.best else -1
        loss_avg, wait = None, InputWait()
        if step < task.num_steps:
            step, loss_avg, last_validated = self._train_steps(task, checkpoints, stop, step, wait, last_validated)
        checkpoints.save(step)
        if last_validated != step:
            self._validate_and_log(task, checkpoints, step)
        self._stop_if_signalled(stop, task.stage, checkpoints, step)
        checkpoints.restore_best()
        best = checkpoints.best
        return {
            "step": step,
            "train_loss": loss_avg,
            "input_wait_fraction": wait.share(),
            "best_step": best["step"],
            **best["metrics"],
        }

    def _resume(self, stage: str, checkpoints: StageCheckpoints) -> int:
        """Restores the stage's newest checkpoint that restores, logs what was skipped or set
        aside, and returns the step to continue from."""
        restored = checkpoints.resume()
        step = int(checkpoints.step.numpy())
        for path, why in checkpoints.skipped.items():
            self.log(f"{stage}: skipped checkpoint {path}: {why}")
        if restored:
            newest = ", the newest checkpoint that restores" if checkpoints.skipped else ""
            self.log(f"{stage}: resumed from {restored} at step {step}{newest}")
        if checkpoints.set_aside:
            names = ", ".join(os.path.basename(p) for p in checkpoints.set_aside)
            where = os.path.join(os.path.dirname(checkpoints.set_aside[0]), SKIPPED_DIR)
            self.log(f"{stage}: moved the checkpoints newer than step {step} ({names}) to {where}, kept")
        return step

    def _train_steps(
        self,
        task: StageTask,
        checkpoints: StageCheckpoints,
        stop: StopSignals,
        step: int,
        wait: InputWait,
        last_validated: int,
    ) -> tuple[int, float, int]:
        """The step loop from `step` to the stage's last: logs, checkpoints and validates on the
        training config's cadence. Returns (step, smoothed loss, last validated step)."""
        t, stage = self.config.training, task.stage
        bar = tqdm(
            total=task.num_steps,
            initial=step,
            desc=stage,
            unit="step",
            disable=not (self.progress and self.is_chief),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        iterator = self.train_iterator(task, checkpoints.stream_seed(), step)
        train_step = self.distributed_train_step(task, checkpoints.step)
        loss_avg, tick, tick_step = None, time.perf_counter(), step
        while step < task.num_steps:
            batch = wait.next(iterator)
            sums, stopping = train_step(batch, tf.constant(float(stop.signum is not None)))
            sums, stopping = [float(x) for x in sums.numpy()], float(stopping)
            wait.step_done()
            step += 1
            _check_finite(stage, step, sums[-1], checkpoints)
            loss_avg = sums[-1] if loss_avg is None else 0.9 * loss_avg + 0.1 * sums[-1]
            if stopping > 0:
                checkpoints.save(step)
                bar.close()
                raise TrainingInterrupted(stage, step, stop.signum or signal.SIGTERM)
            if step % t.log_every == 0 or step == task.num_steps:
                now = time.perf_counter()
                patches_s = (step - tick_step) / max(now - tick, 1e-9) * t.batch_size
                tick, tick_step = now, step
                waited = wait.interval_share()
                bar.set_postfix(loss=f"{loss_avg:.4f}", patches_s=f"{patches_s:.1f}", refresh=False)
                summaries = {"learning_rate": task.learning_rate(), "patches_per_second": patches_s}
                if waited is not None:
                    summaries["input_wait_fraction"] = waited
                write_train_summaries(self.writers(stage)["train"], step, sums, summaries)
            bar.update(1)
            if step % t.checkpoint_every == 0:
                checkpoints.save(step)
            if step % t.validate_every == 0 and step != task.num_steps:
                self._validate_and_log(task, checkpoints, step)
                last_validated = step
        bar.close()
        return step, loss_avg, last_validated

    def _validate_and_log(self, task: StageTask, checkpoints: StageCheckpoints, step: int) -> None:
        metrics, shown = task.validation_step(IMAGES_TO_LOG)
        checkpoints.keep_if_best(metrics, step)
        with self.writers(task.stage)["val"].as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(k, v)
            tf.summary.image(
                "masks",
                mask_panels(shown, self.config.model.context, self.config.model.patch_size),
                max_outputs=IMAGES_TO_LOG,
            )
        self.log(f"{task.stage} step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))

    def run_stage(self, stage: str, init_from: keras.Model | None = None) -> tuple[keras.Model, dict]:
        """Trains one stage (resuming if it has checkpoints), exports `<stage>.keras` with its best
        weights and returns (the model with those weights, the stage's metrics)."""
        if stage == "sharpmask" and init_from is None and not self._has_checkpoints(stage):
            init_from = self._finished_deepmask()
        task = self.build_task(stage, init_from)
        checkpoints = self.stage_checkpoints(task)
        with self._stop as stop:
            metrics = self.fit_stage(task, checkpoints, stop)
            if self.is_chief:
                task.model.save(os.path.join(self.model_dir, f"{stage}.keras"))
            self._stop_if_signalled(stop, stage, checkpoints, metrics["step"])
        return task.model, metrics

    def _has_checkpoints(self, stage: str) -> bool:
        return bool(checkpoint_steps(os.path.join(self.model_dir, stage)))

    def _deepmask_result(self) -> str:
        """The latest best checkpoint of stage 1, which stage 2 starts from."""
        path = os.path.join(self.model_dir, "deepmask", "best")
        if not has_stage_result(self.model_dir, "deepmask"):
            raise FileNotFoundError(
                f"Stage sharpmask starts from stage deepmask's result, and {path} holds none: "
                f"train stage deepmask into this model directory first."
            )
        return tf.train.latest_checkpoint(path)

    def _finished_deepmask(self) -> keras.Model:
        model = stage_model(self.config, "deepmask", trunk_weights=False)
        tf.train.Checkpoint(model=model).restore(self._deepmask_result()).expect_partial()
        return model

    def write_metrics(self, metrics: dict) -> dict:
        """Merges the stages' metrics into metrics.json (on the chief) and returns the whole."""
        path = os.path.join(self.model_dir, METRICS_FILE)
        merged = {}
        if tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(path) as f:
                merged = json.load(f)
        merged.update(metrics)
        if "sharpmask" in merged:
            # The same stage-2 validation patches score DeepMask's coarse masks and SharpMask's.
            merged["deepmask_mean_iou"] = merged["sharpmask"]["coarse_mean_iou"]
            merged["sharpmask_mean_iou"] = merged["sharpmask"]["mean_iou"]
        if self.is_chief:
            with tf.io.gfile.GFile(path, "w") as f:
                json.dump(merged, f, indent=2, sort_keys=True)
        return merged


def train(
    config: Config,
    model_dir: str,
    stage: str = "both",
    strategy: str | tf.distribute.Strategy = "auto",
    make_dataset: DatasetFn | None = None,
    make_validation_patches: ValidationFn | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs the two-stage schedule, resuming from whatever `model_dir` holds.

    Args:
        config: the configuration (training.mixed_precision and training.jit included).
        model_dir: the model directory (see the module docstring for its layout).
        stage: "deepmask", "sharpmask" (from the model directory's stage-1 result) or "both".
        strategy: a strategy or a name for `resolve_strategy`.
        make_dataset: the training data (default `sharpmask_tf.data.make_dataset`).
        make_validation_patches: the validation patches (default
            `sharpmask_tf.data.make_validation_patches`).
        progress: show a tqdm progress bar.
        log: receives one-line messages (validation results, resumption).

    Returns:
        The contents of metrics.json: per stage its step, smoothed training loss, share of step
        time spent waiting for input (`input_wait_fraction`, None if this run made fewer than
        two steps of the stage), best step and validation metrics; with stage 2, also `deepmask_mean_iou` and `sharpmask_mean_iou` on the
        same stage-2 validation patches.

    Raises:
        ValueError: for a bad stage or strategy, a global batch the replicas do not split, or a
            model directory of another model configuration.
        FileNotFoundError: for stage "sharpmask" in a model directory without stage 1's result.
        TrainingInterrupted: after SIGTERM/SIGINT, once the current step is checkpointed.
        UnrestorableCheckpoints: if a stage's checkpoint files are there and none restores.
    """
    if isinstance(strategy, str):
        strategy = resolve_strategy(strategy)
    return Trainer(config, model_dir, strategy, make_dataset, make_validation_patches, progress, log).run(stage)
