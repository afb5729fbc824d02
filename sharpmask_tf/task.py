"""One training stage as a single-replica task: its model, optimizer, inputs, losses, train step and
validation step (the split of TF Model Garden's `base_task.Task` from its trainer).

Stage 1 ("deepmask") trains DeepMask's trunk and head C on the joint mask + score loss with SGD,
momentum and L2 weight decay under the reference's step schedule. Stage 2 ("sharpmask") builds
SharpMask, copies stage 1's best weights in and trains only the refinement (horizontal nets S1..S4
and the vertical path M1, R1..R4) with plain SGD; the trunk and head C run outside the gradient
tape, so the backward pass never enters them. `training.optimizer="adam"` trains both stages with
Adam instead (the small preset's choice: `build_optimizer`).

A task never touches checkpoints, summaries or signals: `sharpmask_tf.trainer` drives it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

from sharpmask_tf.config import Config
from sharpmask_tf.evaluation import output_ious
from sharpmask_tf.losses import iou_summary, joint_loss, resize_logits
from sharpmask_tf.sharpmask import build_model, copy_weights, refinement_split

# The stages by name, in training order. `sharpmask_tf.data` numbers them 1 and 2: `StageTask`
# converts, and nothing else does.
STAGES = ("deepmask", "sharpmask")
# Validation forward passes run in chunks of this many patches.
VALIDATION_CHUNK = 64

DatasetFn = Callable[..., tf.data.Dataset]
ValidationFn = Callable[..., dict]


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}. Received: stage={stage!r}")


def learning_rate_schedule(config: Config, stage: str) -> keras.optimizers.schedules.LearningRateSchedule | float:
    """The learning rate of a stage as the reference's `updateScheduler` regimes, in its epochs of
    `training.epoch_steps` steps: stage 1 starts at `learning_rate` and takes `lr_decay_rates` after
    the epochs `lr_decay_epochs` (1e-3, then 5e-4 after epoch 50, 1e-4 after epoch 120); stage 2
    likewise from `stage2_learning_rate` (1e-3 / 5e-4 / 1e-4 after epochs 50 and 80). A stage
    without decay gets its rate as a float.

    Raises:
        ValueError: for an unknown stage.
    """
    _check_stage(stage)
    t = config.training
    if stage == "deepmask":
        first, rates, epochs = t.learning_rate, t.lr_decay_rates, t.lr_decay_epochs
    else:
        first, rates, epochs = t.stage2_learning_rate, t.stage2_lr_decay_rates, t.stage2_lr_decay_epochs
    if not rates:
        return first
    # Epoch e's last step (0-based) is e * epoch_steps - 1; the next rate applies after it.
    boundaries = [max(0, round(e * t.epoch_steps) - 1) for e in epochs]
    for i in range(1, len(boundaries)):
        boundaries[i] = max(boundaries[i], boundaries[i - 1] + 1)
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, [first, *rates])


def build_optimizer(config: Config, stage: str) -> keras.optimizers.Optimizer:
    """The stage's optimizer under `learning_rate_schedule`: with `training.optimizer="sgd"` the
    reference's SGD (momentum in stage 1, plain in stage 2), with "adam" Adam in both stages.

    Raises:
        ValueError: for an unknown stage.
    """
    schedule = learning_rate_schedule(config, stage)
    t = config.training
    if t.optimizer == "adam":
        return keras.optimizers.Adam(schedule)
    return keras.optimizers.SGD(schedule, momentum=t.momentum if stage == "deepmask" else 0.0)


def agree_on_finite(grads: list[tf.Tensor | None]) -> list[tf.Tensor | None]:
    """One replica's gradients, made non-finite when any replica's are, so that every replica's
    `keras.optimizers.LossScaleOptimizer` skips the same steps.

    Under MirroredStrategy the optimizer takes its finite check from the first replica's
    gradients before they are summed: an overflow on another replica would be summed into the
    weights. Called in a replica context; outside one, or with one replica, it only checks.

    Args:
        grads: this replica's gradients (None for variables without one).

    Returns:
        `grads` unchanged when every replica's are finite, else all NaN.
    """
    present = [g for g in grads if g is not None]
    finite = tf.reduce_all(tf.stack([tf.reduce_all(tf.math.is_finite(g)) for g in present]))
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        # tf.identity places the flag on this replica's device, which all_reduce needs.
        overflowed = tf.identity(1.0 - tf.cast(finite, tf.float32))
        finite = context.all_reduce(tf.distribute.ReduceOp.SUM, overflowed) == 0
    agreed = iter(
        tf.cond(finite, lambda: present, lambda: [tf.fill(tf.shape(g), tf.constant(np.nan, g.dtype)) for g in present])
    )
    return [None if g is None else next(agreed) for g in grads]


def stage_model(config: Config, stage: str, trunk_weights: bool = True) -> keras.Model:
    """DeepMask for stage 1, SharpMask for stage 2, from the config's model section. Only stage 1
    loads `model.trunk_weights`, and only with `trunk_weights` (False: its weights come from a
    checkpoint); stage 2's come from stage 1 or from its own checkpoints."""
    refinement = stage == "sharpmask"
    return build_model(dataclasses.replace(config.model, refinement=refinement), trunk_weights and not refinement)


class StageTask:
    """One stage's model, optimizer, inputs, replica train step and validation.

    Build it inside the strategy's scope: its model and optimizer variables are created here.

    Args:
        config: the configuration.
        stage: "deepmask" or "sharpmask".
        init_from: a model whose weights are copied in by layer name (stage 1's result in stage 2).
        num_replicas: the replicas that share each global batch.
        make_dataset: `sharpmask_tf.data.make_dataset` or a function of the same signature.
        make_validation_patches: `sharpmask_tf.data.make_validation_patches` or alike.
        trunk_weights: load `model.trunk_weights` in stage 1 (False when a checkpoint will
            provide every weight: nothing is downloaded).

    Attributes:
        config: as given.
        stage: as given.
        model: the stage's model.
        optimizer: its optimizer, built for `trainable_variables`.
        trainable_variables: what the stage trains (the refinement only, in stage 2).
        num_steps: the stage's length in steps.
    """

    def __init__(
        self,
        config: Config,
        stage: str,
        init_from: keras.Model | None = None,
        num_replicas: int = 1,
        make_dataset: DatasetFn | None = None,
        make_validation_patches: ValidationFn | None = None,
        trunk_weights: bool = True,
    ):
        _check_stage(stage)
        if make_dataset is None or make_validation_patches is None:
            from sharpmask_tf import data

            make_dataset = make_dataset or data.make_dataset
            make_validation_patches = make_validation_patches or data.make_validation_patches
        self.config, self.stage, self.num_replicas = config, stage, num_replicas
        self._make_dataset, self._make_validation_patches = make_dataset, make_validation_patches
        self._data_stage = STAGES.index(stage) + 1
        t = config.training
        self.num_steps = t.stage1_steps if stage == "deepmask" else t.stage2_steps
        keras.utils.set_random_seed(t.seed)
        self.model = stage_model(config, stage, trunk_weights)
        if init_from is not None:
            copy_weights(init_from, self.model)
        if stage == "deepmask":
            self._frozen, self._trained = None, self.model
            self._weight_decay = t.weight_decay
        else:
            self._frozen, self._trained = refinement_split(self.model)
            self._weight_decay = 0.0
        optimizer = build_optimizer(config, stage)
        if t.mixed_precision:
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        self.trainable_variables = self._trained.trainable_variables
        self.optimizer.build(self.trainable_variables)
        self._gradients = self._loss_sums_and_gradients
        # Not a nested tf.function without XLA: the synchronised BatchNorm of a trunk trained from
        # scratch all-reduces inside the forward pass, which MirroredStrategy refuses there.
        if t.jit:
            if stage == "deepmask" and not config.model.pretrained_trunk and num_replicas > 1:
                raise ValueError(
                    "training.jit compiles the forward pass, where the synchronised BatchNorm of a trunk "
                    f"trained from scratch cannot all-reduce across the {num_replicas} replicas. Set "
                    "training.jit=false or model.trunk_weights. Received: training.jit=true, model.trunk_weights=None"
                )
            self._gradients = tf.function(self._loss_sums_and_gradients, jit_compile=True)
        self._predict = tf.function(lambda x: self.model(x, training=False))
        self._validation: dict[str, np.ndarray] | None = None

    def build_inputs(
        self, seed: int, input_context: tf.distribute.InputContext | None = None, first_step: int = 0
    ) -> tf.data.Dataset:
        """The stage's endless training stream (per input pipeline under `input_context`), its
        first batch for training step `first_step`."""
        return self._make_dataset(
            self.config,
            split="train",
            stage=self._data_stage,
            input_context=input_context,
            seed=seed,
            repeat=True,
            first_step=first_step,
        )

    def _loss_sums_and_gradients(self, batch: dict[str, tf.Tensor]) -> tuple[tf.Tensor, list[tf.Tensor]]:
        t = self.config.training
        features = None if self._frozen is None else self._frozen(batch["images"], training=False)
        with tf.GradientTape() as tape:
            if features is None:
                out = self.model(batch["images"], training=True)
                losses = joint_loss(out["masks"], out["scores"], batch, t.score_weight)
            else:
                losses = joint_loss(self._trained(features, training=True), None, batch, 0.0)
            # The paper's objective, summed over the batch as the reference's `gradOutputs:mul(batch)`
            # does: each replica sums its examples and the optimizer sums the replicas' gradients,
            # so the step is the global batch's sum whatever the replica count.
            loss = tf.reduce_sum(losses["loss"])
            if self._weight_decay:
                # L2 weight decay, as the reference's optim.sgd weightDecay: wd * w joins the
                # gradient before momentum. Divided by the replicas, whose gradients are summed.
                l2 = tf.add_n([tf.reduce_sum(tf.square(tf.cast(v, tf.float32))) for v in self.trainable_variables])
                loss += 0.5 * self._weight_decay * l2 / self.num_replicas
            scaled = self.optimizer.scale_loss(loss)
        sums = tf.stack(
            [
                tf.reduce_sum(losses["mask"]),
                tf.reduce_sum(batch["mask_weight"]),
                tf.reduce_sum(losses["score"]),
                tf.reduce_sum(batch["score_weight"]),
                tf.reduce_sum(losses["loss"]) / t.batch_size,
            ]
        )
        return sums, tape.gradient(scaled, self.trainable_variables)

    def train_step(self, batch: dict[str, tf.Tensor]) -> tf.Tensor:
        """One replica's step on its share of a global batch: forward, backward, optimizer update.

        Under mixed precision every replica skips the update when any replica's gradients are not
        finite (see `agree_on_finite`).

        Returns:
            (5,) sums for the logs, to be summed over replicas: mask loss, mask samples, score
            loss, score samples and this replica's share of the objective's mean per example
            (weight decay left out).
        """
        sums, grads = self._gradients(batch)
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            grads = agree_on_finite(grads)
        self.optimizer.apply(grads, self.trainable_variables)
        return sums

    def learning_rate(self) -> float:
        """The optimizer's current learning rate."""
        lr = self.optimizer.learning_rate
        return float(lr.numpy() if hasattr(lr, "numpy") else lr)

    def validation_data(self) -> dict[str, np.ndarray]:
        """The stage's fixed validation set: mask patches and, in stage 1, score patches."""
        if self._validation is None:
            t = self.config.training
            val = dict(self._make_validation_patches(self.config, t.val_patches, self._data_stage, t.val_seed))
            if self.stage == "deepmask":
                # Every batch a score batch, from the first on: training's mask-only start
                # (data.mask_only_steps) would make the first ones mask batches, all positives.
                score_config = self.config.override(["data.score_frequency=1.0", "data.mask_only_steps=0"])
                batch = min(t.val_patches, VALIDATION_CHUNK)
                batches = list(
                    self._make_dataset(
                        score_config,
                        split="val",
                        stage=self._data_stage,
                        batch_size=batch,
                        seed=t.val_seed,
                        repeat=True,
                    ).take(math.ceil(t.val_patches / batch))
                )
                val["score_images"] = np.concatenate([b["images"].numpy() for b in batches])[: t.val_patches]
                val["score_labels"] = np.concatenate([b["scores"].numpy() for b in batches])[: t.val_patches]
            self._validation = val
        return self._validation

    def validation_step(self, num_shown: int = 0) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Per-patch IoU metrics on the validation patches (and score accuracy in stage 1); in
        stage 2 also the coarse masks' metrics as `coarse_*`.

        Args:
            num_shown: how many patches to return for display.

        Returns:
            (metrics, shown): metrics as floats; shown: the first `num_shown` "images", "labels"
            and "logits" (at the labels' side).
        """
        val = self.validation_data()
        out = self._predict_all(val["images"])
        labels = val["masks"]
        metrics = iou_summary(output_ious(out, labels))
        if self.stage == "deepmask":
            scores = self._predict_all(val["score_images"])["scores"]
            metrics["score_accuracy"] = float(np.mean((scores > 0) == (val["score_labels"] > 0)))
        else:
            coarse = iou_summary(output_ious(out, labels, coarse=True))
            metrics.update({f"coarse_{k}": v for k, v in coarse.items()})
        return metrics, {
            "images": val["images"][:num_shown],
            "labels": labels[:num_shown],
            "logits": resize_logits(out["masks"][:num_shown], labels.shape[1]).numpy(),
        }

    def _predict_all(self, images: np.ndarray) -> dict[str, np.ndarray]:
        chunks = [self._predict(images[i : i + VALIDATION_CHUNK]) for i in range(0, len(images), VALIDATION_CHUNK)]
        return {k: np.concatenate([c[k].numpy() for c in chunks]) for k in chunks[0]}
