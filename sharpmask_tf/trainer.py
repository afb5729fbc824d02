"""The two-stage SharpMask schedule as one custom loop for every tf.distribute strategy.

Stage 1 ("deepmask") trains DeepMask's trunk and head C on the joint mask + score loss with SGD,
momentum and L2 weight decay under the reference's step schedule. Stage 2 ("sharpmask") builds
SharpMask, copies stage 1's best weights in and trains only the refinement (horizontal nets S1..S4
and the vertical path M1, R1..R4) with plain SGD; the trunk and head C run outside the gradient
tape, so the backward pass never enters them.

The loop is a `strategy.run` step inside a `tf.function` (Keras 3's `fit` fails under
MultiWorkerMirroredStrategy, keras-team/keras#20585). Each replica's loss is its per-example
losses summed and divided by the global batch; the optimizer sums gradients over replicas.

A model directory holds:
    config.json                  the resolved configuration
    deepmask/, sharpmask/        tf.train.CheckpointManager checkpoints of each stage (model,
                                 optimizer, step, sampler seed) and best/ (the best weights by
                                 the share of validation patches over IoU .7) with best.json
    logs/<stage>/{train,val}/    TensorBoard: losses, learning rate, speed, IoU metrics, masks
    deepmask.keras, sharpmask.keras, metrics.json    written when a stage ends
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from sharpmask_tf.config import Config
from sharpmask_tf.losses import iou_summary, joint_loss, mask_iou, resize_logits
from sharpmask_tf.sharpmask import build_model, copy_weights

STAGES = ("deepmask", "sharpmask")
STRATEGIES = ("auto", "default", "mirrored", "multiworker")
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"
# Patches drawn into TensorBoard at every validation.
IMAGES_TO_LOG = 3
# Validation forward passes run in chunks of this many patches.
VALIDATION_CHUNK = 64

DatasetFn = Callable[..., tf.data.Dataset]
ValidationFn = Callable[..., dict]


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


def resolve_strategy(name: str = "auto") -> tf.distribute.Strategy:
    """Picks a tf.distribute strategy. Call it before any other TensorFlow work in the process
    (MultiWorkerMirroredStrategy needs that).

    Args:
        name: "auto" (MultiWorkerMirroredStrategy when TF_CONFIG names several workers,
            MirroredStrategy over all local GPUs when there are any, else the default strategy),
            "default", "mirrored" (all local GPUs, or the CPU) or "multiworker" (from TF_CONFIG).

    Returns:
        The strategy.
    """
    if name not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}. Received: strategy={name!r}")
    if name == "auto":
        workers = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {}).get("worker", [])
        if len(workers) > 1:
            name = "multiworker"
        elif tf.config.list_physical_devices("GPU"):
            name = "mirrored"
        else:
            name = "default"
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def learning_rate_schedule(config: Config, stage: str) -> keras.optimizers.schedules.LearningRateSchedule | float:
    """The learning rate of a stage: stage 1 steps down from `training.learning_rate` through
    `lr_decay_rates` at the fractions `lr_decay_at` of `stage1_steps` (the reference's
    1e-3 -> 5e-4 -> 1e-4 at 50% and 80%); stage 2 is constant."""
    t = config.training
    if stage == "sharpmask":
        return t.stage2_learning_rate
    boundaries = [max(1, round(f * t.stage1_steps)) for f in t.lr_decay_at]
    for i in range(1, len(boundaries)):
        boundaries[i] = max(boundaries[i], boundaries[i - 1] + 1)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [t.learning_rate, *t.lr_decay_rates])


def stage_model(config: Config, stage: str, trunk_weights: bool = True) -> keras.Model:
    """DeepMask for stage 1, SharpMask for stage 2, from the config's model section. Only stage 1
    loads `model.trunk_weights`, and only with `trunk_weights` (False: its weights come from a
    checkpoint); stage 2's come from stage 1 or from its own checkpoints."""
    refinement = stage == "sharpmask"
    return build_model(dataclasses.replace(config.model, refinement=refinement), trunk_weights and not refinement)


def refinement_split(model: keras.Model) -> tuple[keras.Model, keras.Model]:
    """Splits a SharpMask model where stage 2's gradients stop.

    Returns:
        (frozen, refinement): `frozen` maps images to [object vector (B, object_dim), trunk taps
        conv1..conv4], that is the trunk and head C up to the object vector; `refinement` maps that
        list to the refined (B, P, P) mask logits through the horizontal nets and the vertical
        path. Both share the model's layers and weights.
    """
    taps = model.get_layer("skip")._inbound_nodes[0].arguments.args[0]
    features = [model.get_layer("head_object").output, *(taps[k] for k in ("conv1", "conv2", "conv3", "conv4"))]
    frozen = keras.Model(model.inputs, features, name="frozen_trunk_and_head")
    refinement = keras.Model(features, model.output["masks"], name="refinement")
    return frozen, refinement


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


def _cluster_role(strategy: tf.distribute.Strategy) -> tuple[bool, int]:
    """(is_chief, worker index) of this process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True, 0
    task_type, task_id = resolver.task_type, int(resolver.task_id or 0)
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    return task_type == "chief" or (task_type == "worker" and task_id == 0 and not has_chief), task_id


class _StopSignals:
    """Records SIGTERM/SIGINT instead of dying, so the loop can checkpoint and stop."""

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class _Stage:
    """One stage's model, optimizer, checkpoints, step function and validation."""

    def __init__(
        self,
        trainer: Trainer,
        stage: str,
        init_from: keras.Model | None,
    ):
        self.trainer, self.stage = trainer, stage
        config, strategy = trainer.config, trainer.strategy
        t = config.training
        self.total_steps = t.stage1_steps if stage == "deepmask" else t.stage2_steps
        self.dir = os.path.join(trainer.model_dir, stage)
        keras.utils.set_random_seed(t.seed)
        with strategy.scope():
            self.model = stage_model(config, stage, trunk_weights=tf.train.latest_checkpoint(self.dir) is None)
            if init_from is not None:
                copy_weights(init_from, self.model)
            if stage == "deepmask":
                self.frozen, self.trained = None, self.model
                optimizer = keras.optimizers.SGD(learning_rate_schedule(config, stage), momentum=t.momentum)
                self.weight_decay = t.weight_decay
            else:
                self.frozen, self.trained = refinement_split(self.model)
                optimizer = keras.optimizers.SGD(t.stage2_learning_rate)
                self.weight_decay = 0.0
            if t.mixed_precision:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
            self.optimizer = optimizer
            self.variables = self.trained.trainable_variables
            self.optimizer.build(self.variables)
            self.step = tf.Variable(
                0, dtype=tf.int64, trainable=False, name="step", aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA
            )
            # The sampler stream is a pure function of (data seed, the step it started at); a
            # resumed run starts a fresh, reproducible stream at the restored step.
            self.data_seed = tf.Variable(
                config.data.seed,
                dtype=tf.int64,
                trainable=False,
                name="data_seed",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
            self.stream_start = tf.Variable(
                0,
                dtype=tf.int64,
                trainable=False,
                name="stream_start",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA,
            )
        self.checkpoint = tf.train.Checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            step=self.step,
            data_seed=self.data_seed,
            stream_start=self.stream_start,
        )
        write_dir = (
            self.dir if trainer.is_chief else os.path.join(trainer.model_dir, "workers", str(trainer.worker), stage)
        )
        self.manager = tf.train.CheckpointManager(self.checkpoint, write_dir, max_to_keep=3)
        self.best_checkpoint = tf.train.Checkpoint(model=self.model)
        self.best_manager = tf.train.CheckpointManager(
            self.best_checkpoint, os.path.join(write_dir, "best"), max_to_keep=1
        )
        self.best = self._read_best()
        self._train_step = self._make_train_step()
        self._predict = tf.function(lambda x: self.model(x, training=False))

    def _read_best(self) -> dict | None:
        path = os.path.join(self.best_manager.directory, "best.json")
        if not tf.io.gfile.exists(path):
            return None
        with tf.io.gfile.GFile(path) as f:
            return json.load(f)

    def restore(self) -> bool:
        """Restores the stage's latest checkpoint (the chief's, on every worker), if any."""
        latest = tf.train.latest_checkpoint(self.dir)
        if latest is None:
            return False
        self.checkpoint.restore(latest).assert_existing_objects_matched()
        return True

    def restore_best(self) -> None:
        """Loads the best weights kept by validation into the model."""
        latest = self.best_manager.latest_checkpoint
        if latest is None:
            raise FileNotFoundError(f"No best checkpoint of stage {self.stage} in {self.best_manager.directory}")
        self.best_checkpoint.restore(latest).expect_partial()

    def _make_train_step(self):
        config, strategy = self.trainer.config, self.trainer.strategy
        t = config.training
        global_batch, replicas = t.batch_size, strategy.num_replicas_in_sync
        stage1 = self.stage == "deepmask"

        def gradients(batch):
            features = None if stage1 else self.frozen(batch["images"], training=False)
            with tf.GradientTape() as tape:
                if stage1:
                    out = self.model(batch["images"], training=True)
                    losses = joint_loss(out["masks"], out["scores"], batch, t.score_weight)
                else:
                    losses = joint_loss(self.trained(features, training=True), None, batch, 0.0)
                loss = tf.reduce_sum(losses["loss"]) / global_batch
                if self.weight_decay:
                    # L2 weight decay, as the reference's optim.sgd weightDecay: wd * w joins the
                    # gradient before momentum. Divided by the replicas, whose gradients are summed.
                    l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in self.variables])
                    loss += 0.5 * self.weight_decay * l2 / replicas
                scaled = self.optimizer.scale_loss(loss)
            # Sums for the logs: mask loss, mask samples, score loss, score samples, objective.
            sums = tf.stack(
                [
                    tf.reduce_sum(losses["mask"]),
                    tf.reduce_sum(batch["mask_weight"]),
                    tf.reduce_sum(losses["score"]),
                    tf.reduce_sum(batch["score_weight"]),
                    tf.reduce_sum(losses["loss"]) / global_batch,
                ]
            )
            return sums, tape.gradient(scaled, self.variables)

        # Not a nested tf.function without XLA: the synchronised BatchNorm of a trunk trained from
        # scratch all-reduces inside the forward pass, which MirroredStrategy refuses there.
        if t.jit:
            if stage1 and not config.model.pretrained_trunk and replicas > 1:
                raise ValueError(
                    "training.jit compiles the forward pass, where the synchronised BatchNorm of a trunk "
                    f"trained from scratch cannot all-reduce across the {replicas} replicas. Set "
                    "training.jit=false or model.trunk_weights. Received: training.jit=true, model.trunk_weights=None"
                )
            gradients = tf.function(gradients, jit_compile=True)

        def replica_step(batch, stop):
            sums, grads = gradients(batch)
            self.optimizer.apply(grads, self.variables)
            # tf.identity places the flag on this replica's device, which all_reduce needs.
            stop = tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.SUM, tf.identity(stop))
            return sums, stop

        @tf.function
        def train_step(iterator, stop):
            sums, stop = strategy.run(replica_step, args=(next(iterator), stop))
            self.step.assign_add(1)
            return (
                strategy.reduce(tf.distribute.ReduceOp.SUM, sums, axis=None),
                strategy.reduce(tf.distribute.ReduceOp.MEAN, stop, axis=None),
            )

        return train_step

    def learning_rate(self) -> float:
        lr = self.optimizer.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def _dataset(self):
        trainer, seed = self.trainer, int(self.data_seed.numpy()) + 7919 * int(self.stream_start.numpy())
        stage_number = STAGES.index(self.stage) + 1

        def dataset_fn(input_context):
            return trainer.make_dataset(
                trainer.config, split="train", stage=stage_number, input_context=input_context, seed=seed, repeat=True
            )

        return iter(trainer.strategy.distribute_datasets_from_function(dataset_fn))

    def validate(self) -> tuple[dict, dict[str, np.ndarray]]:
        """Per-patch IoU metrics on the validation patches (and score accuracy in stage 1).

        Returns:
            (metrics, images): metrics as floats; images: the logits used, for TensorBoard.
        """
        val = self.trainer.validation_data(self.stage)
        out = self._predict_all(val["images"])
        labels = val["masks"]
        side = labels.shape[1]
        if self.stage == "deepmask":
            logits = resize_logits(out["masks"], side).numpy()
            metrics = iou_summary(mask_iou(logits, labels))
            scores = self._predict_all(val["score_images"])["scores"]
            metrics["score_accuracy"] = float(np.mean((scores > 0) == (val["score_labels"] > 0)))
        else:
            logits = out["masks"]
            metrics = iou_summary(mask_iou(logits, labels))
            coarse = iou_summary(mask_iou(resize_logits(out["coarse_masks"], side).numpy(), labels))
            metrics.update({f"coarse_{k}": v for k, v in coarse.items()})
        return metrics, {
            "images": val["images"][:IMAGES_TO_LOG],
            "labels": labels[:IMAGES_TO_LOG],
            "logits": logits[:IMAGES_TO_LOG],
        }

    def _predict_all(self, images: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [self._predict(images[i : i + VALIDATION_CHUNK]) for i in range(0, len(images), VALIDATION_CHUNK)]
        return {k: np.concatenate([c[k].numpy() for c in chunks]) for k in chunks[0]}

    def _is_better(self, metrics: dict) -> bool:
        """Best by the share of patches over IoU .7; ties (common early, when the share is 0) go
        to mean IoU plus, in stage 1, score accuracy: a DeepMask whose score head has collapsed
        to a constant ranks proposals at random, however good its masks."""
        if self.best is None:
            return True
        key = lambda m: (m["iou_over_70"], m["mean_iou"] + m.get("score_accuracy", 0.0))  # noqa: E731
        return key(metrics) > key(self.best["metrics"])

    def _keep_if_best(self, metrics: dict, step: int) -> None:
        if not self._is_better(metrics):
            return
        self.best_manager.save(checkpoint_number=step)
        self.best = {"step": step, "metrics": metrics}
        with tf.io.gfile.GFile(os.path.join(self.best_manager.directory, "best.json"), "w") as f:
            json.dump(self.best, f, indent=2)

    def run(self, stop: _StopSignals) -> dict:
        """Trains to the stage's last step (resuming from a checkpoint), keeps the best weights,
        loads them into the model and returns the stage's metrics."""
        trainer, t = self.trainer, self.trainer.config.training
        if self.restore():
            self.stream_start.assign(self.step)
            trainer.log(
                f"{self.stage}: resumed from {self.manager.latest_checkpoint or self.dir} at step "
                f"{int(self.step.numpy())}"
            )
        step = int(self.step.numpy())
        writers = trainer.writers(self.stage)
        patches = trainer.config.training.batch_size
        last_validated = self.best["step"] if self.best else -1
        bar = tqdm(
            total=self.total_steps,
            initial=step,
            desc=self.stage,
            unit="step",
            disable=not (trainer.progress and trainer.is_chief),
            dynamic_ncols=True,
            mininterval=1.0,
        )
        loss_avg, tick, tick_step = None, time.perf_counter(), step
        if step < self.total_steps:
            iterator = self._dataset()
        while step < self.total_steps:
            sums, stopping = self._train_step(iterator, tf.constant(float(stop.signum is not None)))
            step += 1
            mask_sum, masks, score_sum, scores, loss = (float(x) for x in sums.numpy())
            if not math.isfinite(loss) and not t.mixed_precision:
                raise FloatingPointError(f"{self.stage}: the loss is {loss} at step {step}")
            loss_avg = loss if loss_avg is None else 0.9 * loss_avg + 0.1 * loss
            if float(stopping) > 0:
                self.manager.save(checkpoint_number=step)
                bar.close()
                raise TrainingInterrupted(self.stage, step, stop.signum or signal.SIGTERM)
            if step % t.log_every == 0 or step == self.total_steps:
                now = time.perf_counter()
                rate = (step - tick_step) / max(now - tick, 1e-9)
                tick, tick_step = now, step
                bar.set_postfix(loss=f"{loss_avg:.4f}", patches_s=f"{rate * patches:.1f}", refresh=False)
                with writers["train"].as_default(step=step):
                    tf.summary.scalar("loss", loss)
                    if masks:
                        tf.summary.scalar("mask_loss", mask_sum / masks)
                    if scores:
                        tf.summary.scalar("score_loss", score_sum / scores)
                    tf.summary.scalar("learning_rate", self.learning_rate())
                    tf.summary.scalar("patches_per_second", rate * patches)
            bar.update(1)
            if step % t.checkpoint_every == 0:
                self.manager.save(checkpoint_number=step)
            if step % t.validate_every == 0 and step != self.total_steps:
                self._validate_and_log(step, writers["val"])
                last_validated = step
        bar.close()
        if self.manager.latest_checkpoint is None or not self.manager.latest_checkpoint.endswith(f"-{step}"):
            self.manager.save(checkpoint_number=step)
        if last_validated != step:
            self._validate_and_log(step, writers["val"])
        self.restore_best()
        return {"step": step, "train_loss": loss_avg, "best_step": self.best["step"], **self.best["metrics"]}

    def _validate_and_log(self, step: int, writer) -> None:
        metrics, shown = self.validate()
        self._keep_if_best(metrics, step)
        with writer.as_default(step=step):
            for k, v in metrics.items():
                tf.summary.scalar(k, v)
            tf.summary.image(
                "masks",
                _mask_panels(shown, self.trainer.config.model.context, self.trainer.config.model.patch_size),
                max_outputs=IMAGES_TO_LOG,
            )
        self.trainer.log(f"{self.stage} step {step}: " + ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))


def _mask_panels(shown: dict[str, np.ndarray], context: int, patch_size: int) -> np.ndarray:
    """(N, L, 3L, 3) images: the patch's central window, the label and the predicted probability."""
    side = shown["labels"].shape[1]
    window = shown["images"][:, context : context + patch_size, context : context + patch_size]
    window = tf.image.resize(window, (side, side)).numpy()
    label = np.repeat((shown["labels"][..., None] > 0).astype(np.float32), 3, axis=-1)
    prob = np.repeat(1 / (1 + np.exp(-shown["logits"][..., None])), 3, axis=-1)
    return np.clip(np.concatenate([window, label, prob], axis=2), 0, 1)


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
        if make_dataset is None or make_validation_patches is None:
            from sharpmask_tf import data

            make_dataset = make_dataset or data.make_dataset
            make_validation_patches = make_validation_patches or data.make_validation_patches
        replicas = strategy.num_replicas_in_sync
        if config.training.batch_size % replicas:
            raise ValueError(
                f"training.batch_size must be a multiple of the {replicas} replicas. "
                f"Received: batch_size={config.training.batch_size}"
            )
        self.config, self.model_dir, self.strategy = config, model_dir, strategy
        self.make_dataset, self.make_validation_patches = make_dataset, make_validation_patches
        self.progress = progress
        self.is_chief, self.worker = _cluster_role(strategy)
        self._log = log
        self._validation: dict[str, dict] = {}
        self._writers: dict[str, dict] = {}

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

    def validation_data(self, stage: str) -> dict[str, np.ndarray]:
        """The fixed validation set of a stage: mask patches and, in stage 1, score patches."""
        if stage not in self._validation:
            t, stage_number = self.config.training, STAGES.index(stage) + 1
            val = dict(self.make_validation_patches(self.config, t.val_patches, stage_number, t.seed))
            if stage == "deepmask":
                score_config = self.config.override(["data.score_frequency=1.0"])
                batch = min(t.val_patches, VALIDATION_CHUNK)
                batches = list(
                    self.make_dataset(
                        score_config, split="val", stage=1, batch_size=batch, seed=t.seed, repeat=True
                    ).take(math.ceil(t.val_patches / batch))
                )
                val["score_images"] = np.concatenate([b["images"].numpy() for b in batches])[: t.val_patches]
                val["score_labels"] = np.concatenate([b["scores"].numpy() for b in batches])[: t.val_patches]
            self._validation[stage] = val
        return self._validation[stage]

    def write_config(self) -> None:
        check_model_dir(self.config, self.model_dir)
        if self.is_chief:
            tf.io.gfile.makedirs(self.model_dir)
            with tf.io.gfile.GFile(os.path.join(self.model_dir, CONFIG_FILE), "w") as f:
                f.write(self.config.to_json())

    def run_stage(self, stage: str, init_from: keras.Model | None = None) -> tuple[keras.Model, dict]:
        """Trains one stage (resuming if it has checkpoints), exports `<stage>.keras` with its best
        weights and returns (the model with those weights, the stage's metrics)."""
        if (
            stage == "sharpmask"
            and init_from is None
            and tf.train.latest_checkpoint(os.path.join(self.model_dir, stage)) is None
        ):
            init_from = self._finished_deepmask()
        runner = _Stage(self, stage, init_from)
        with _StopSignals() as stop:
            metrics = runner.run(stop)
        if self.is_chief:
            runner.model.save(os.path.join(self.model_dir, f"{stage}.keras"))
        return runner.model, metrics

    def _finished_deepmask(self) -> keras.Model:
        path = os.path.join(self.model_dir, "deepmask", "best")
        if not has_stage_result(self.model_dir, "deepmask"):
            raise FileNotFoundError(
                f"Stage sharpmask starts from stage deepmask's result, and {path} holds none: "
                f"train stage deepmask into this model directory first."
            )
        model = stage_model(self.config, "deepmask", trunk_weights=False)
        tf.train.Checkpoint(model=model).restore(tf.train.latest_checkpoint(path)).expect_partial()
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


@contextlib.contextmanager
def _dtype_policy(mixed_precision: bool):
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16" if mixed_precision else "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


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
        The contents of metrics.json: per stage its step, smoothed training loss, best step and
        validation metrics; with stage 2, also `deepmask_mean_iou` and `sharpmask_mean_iou` on the
        same stage-2 validation patches.

    Raises:
        ValueError: for a bad stage or a model directory of another model configuration.
        TrainingInterrupted: after SIGTERM/SIGINT, once the current step is checkpointed.
    """
    if stage not in (*STAGES, "both"):
        raise ValueError(f"stage must be one of {(*STAGES, 'both')}. Received: stage={stage!r}")
    if stage != "deepmask" and not config.model.refinement:
        raise ValueError(
            f"Stage {stage!r} trains the refinement, but model.refinement is false: train stage 'deepmask' only."
        )
    if isinstance(strategy, str):
        strategy = resolve_strategy(strategy)
    trainer = Trainer(config, model_dir, strategy, make_dataset, make_validation_patches, progress, log)
    trainer.write_config()
    metrics: dict[str, Any] = {}
    with _dtype_policy(config.training.mixed_precision):
        deepmask = None
        if stage in ("deepmask", "both"):
            deepmask, metrics["deepmask"] = trainer.run_stage("deepmask")
        if stage in ("sharpmask", "both"):
            _, metrics["sharpmask"] = trainer.run_stage("sharpmask", init_from=deepmask)
    return trainer.write_metrics(metrics)
