"""The per-stage task: the stage-2 trainable split, the schedule, the stage-number boundary to the
data module, the replica train step and the validation step."""

import keras
import numpy as np
import pytest
import tensorflow as tf
import test_train_fakes as fakes
from data_testing import config_for, crowded_dataset
from strategies import two_cpus

from sharpmask_tf.config import get_config
from sharpmask_tf.deepmask import dtype_policy_scope
from sharpmask_tf.evaluation import evaluate_patches
from sharpmask_tf.losses import joint_loss
from sharpmask_tf.sharpmask import refinement_split
from sharpmask_tf.task import STAGES, StageTask, agree_on_finite, learning_rate_schedule, stage_model

TINY = ["training.batch_size=4", "training.val_patches=8"]
DATA = dict(make_dataset=fakes.make_dataset, make_validation_patches=fakes.make_validation_patches)


def _tiny(*extra):
    return get_config("small", TINY + list(extra))


def test_only_refinement_weights_get_gradients():
    config = _tiny()
    model = stage_model(config, "sharpmask")
    frozen, refinement = refinement_split(model)
    trained = {v.path for v in refinement.trainable_variables}
    assert trained == {v.path for v in model.trainable_variables if v.path.startswith("refine")}
    assert trained.isdisjoint(v.path for v in frozen.weights)
    batch = fakes._batch(config, "train", 2, 2, tf.constant([1, 2], tf.int64), 0.0)
    features = frozen(batch["images"])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(joint_loss(refinement(features), None, batch, 0.0)["loss"])
    grads = tape.gradient(loss, model.trainable_variables)
    for v, g in zip(model.trainable_variables, grads):
        assert (g is not None) == (v.path in trained), v.path


def test_learning_rate_schedule_steps_down_after_reference_epochs():
    config = get_config(
        "small",
        [
            "training.stage1_steps=100",
            "training.epoch_steps=1",
            "training.lr_decay_epochs=[50,80]",
            "training.stage2_lr_decay_rates=[]",
            "training.stage2_lr_decay_epochs=[]",
        ],
    )
    lr = learning_rate_schedule(config, "deepmask")
    t = config.training
    assert float(lr(0)) == pytest.approx(t.learning_rate)
    assert float(lr(51)) == pytest.approx(t.lr_decay_rates[0])
    assert float(lr(81)) == pytest.approx(t.lr_decay_rates[1])
    assert learning_rate_schedule(config, "sharpmask") == t.stage2_learning_rate


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="stage='refine'"):
        StageTask(_tiny(), "refine", **DATA)


def test_data_module_gets_stage_numbers():
    calls = []

    def make_dataset(config, split="train", stage=1, **kwargs):
        calls.append(("dataset", split, stage))
        return fakes.make_dataset(config, split, stage, **kwargs)

    def make_validation_patches(config, num_patches, stage, seed):
        calls.append(("validation", "val", stage))
        return fakes.make_validation_patches(config, num_patches, stage, seed)

    for name in ("deepmask", "sharpmask"):
        task = StageTask(_tiny(), name, make_dataset=make_dataset, make_validation_patches=make_validation_patches)
        task.build_inputs(seed=3)
        task.validation_data()
    assert calls == [
        ("dataset", "train", 1),
        ("validation", "val", 1),
        ("dataset", "val", 1),
        ("dataset", "train", 2),
        ("validation", "val", 2),
    ]


def _weights(variables):
    return {v.path: v.numpy() for v in variables}


def test_stage2_train_step_moves_only_the_refinement():
    config = _tiny()
    task = StageTask(config, "sharpmask", **DATA)
    assert {v.path for v in task.trainable_variables} == {
        v.path for v in task.model.trainable_variables if v.path.startswith("refine")
    }
    before = _weights(task.model.weights)
    batch = next(iter(task.build_inputs(seed=1)))
    sums = task.train_step(batch).numpy()
    after = _weights(task.model.weights)
    trained = {v.path for v in task.trainable_variables}
    for k in before:
        if k not in trained:
            np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert any(not np.array_equal(before[k], after[k]) for k in trained)
    # Stage 2 batches are all mask samples: the sums count them and no score sample.
    assert sums[1] == config.training.batch_size and sums[3] == 0
    assert int(task.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("stage", ["deepmask", "sharpmask"])
def test_validation_step_scores_patches_as_evaluate_patches(stage):
    task = StageTask(_tiny(), stage, **DATA)
    metrics, shown = task.validation_step(num_shown=2)
    val = task.validation_data()
    batches = [{"images": val["images"], "masks": val["masks"]}]
    expected = evaluate_patches(task.model, batches)
    for k in ("mean_iou", "median_iou", "iou_over_50", "iou_over_70"):
        assert metrics[k] == pytest.approx(expected[k]), k
    if stage == "sharpmask":
        coarse = evaluate_patches(task.model, batches, coarse=True)
        assert metrics["coarse_mean_iou"] == pytest.approx(coarse["mean_iou"])
    else:
        assert 0.0 <= metrics["score_accuracy"] <= 1.0
    side = val["masks"].shape[1]
    assert shown["images"].shape[0] == shown["labels"].shape[0] == 2
    assert shown["logits"].shape == (2, side, side)


def test_stage1_validation_scores_objects_and_background_despite_a_mask_only_start(tmp_path, monkeypatch):
    """The score validation set is score samples, positives and negatives, however many of
    training's first steps are mask batches (the small preset's data.mask_only_steps)."""
    monkeypatch.setenv("SHARPMASK_TF_CACHE", str(tmp_path / "cache"))
    config = config_for(*crowded_dataset(str(tmp_path)), "data.mask_only_steps=1000", "training.val_patches=32")
    labels = StageTask(config, "deepmask").validation_data()["score_labels"]
    assert labels.shape == (32, 1)
    assert set(np.unique(labels).tolist()) == {-1.0, 1.0}


def test_validation_patches_follow_val_seed_not_the_training_seed(tmp_path, monkeypatch):
    """Runs of different training and sampler seeds are scored on the same validation patches
    (mask and score ones), so that their figures compare the training; training.val_seed draws
    another set."""
    monkeypatch.setenv("SHARPMASK_TF_CACHE", str(tmp_path / "cache"))
    files = crowded_dataset(str(tmp_path))

    def validation(*overrides):
        return StageTask(config_for(*files, "training.val_patches=8", *overrides), "deepmask").validation_data()

    base = validation()
    other_seeds = validation("training.seed=5", "data.seed=5")
    other_set = validation("training.val_seed=5")
    for key in ("images", "masks", "score_images", "score_labels"):
        np.testing.assert_array_equal(other_seeds[key], base[key], err_msg=key)
    assert not np.array_equal(other_set["images"], base["images"])
    assert not np.array_equal(other_set["score_images"], base["score_images"])


def _reference_learning_rate(step, stage):
    """The reference's `updateScheduler` regimes at a 0-based step of its 4000-batch epochs."""
    epoch = step // 4000 + 1
    regimes = (
        [(1, 50, 1e-3), (51, 120, 5e-4), (121, 1e8, 1e-4)]
        if stage == "deepmask"
        else [(1, 50, 1e-3), (51, 80, 5e-4), (81, 1e8, 1e-4)]
    )
    return next(lr for first, last, lr in regimes if first <= epoch <= last)


@pytest.mark.parametrize("preset", ["sharpmask_resnet50", "deepmask_resnet50"])
def test_resnet50_presets_train_on_the_reference_schedule(preset):
    t = get_config(preset).training
    assert (t.batch_size, t.epoch_steps, t.stage1_steps) == (32, 4000, 300 * 4000)
    assert (t.momentum, t.weight_decay, t.score_weight) == (0.9, 5e-4, 1 / 32)
    stages = ["deepmask", "sharpmask"] if preset == "sharpmask_resnet50" else ["deepmask"]
    for stage in stages:
        lr = learning_rate_schedule(get_config(preset), stage)
        edges = [e * 4000 + d for e in (50, 80, 120) for d in (-1, 0)]
        for step in [0, 1, *edges, 300 * 4000 - 1]:
            assert float(lr(step)) == pytest.approx(_reference_learning_rate(step, stage)), (stage, step)


def test_stage2_is_plain_sgd_on_its_schedule():
    config = _tiny(
        "training.optimizer=sgd", "training.stage2_lr_decay_rates=[0.0005]", "training.stage2_lr_decay_epochs=[1]"
    )
    task = StageTask(config, "sharpmask", **DATA)
    assert task.optimizer.momentum == 0
    assert task.learning_rate() == pytest.approx(config.training.stage2_learning_rate)
    task.optimizer.iterations.assign(config.training.epoch_steps)
    assert task.learning_rate() == pytest.approx(5e-4)


@pytest.mark.parametrize("stage", STAGES)
def test_adam_trains_either_stage_on_its_schedule(stage):
    config = _tiny("training.optimizer=adam", "training.lr_decay_rates=[0.0005]", "training.lr_decay_epochs=[1]")
    task = StageTask(config, stage, **DATA)
    assert isinstance(task.optimizer, keras.optimizers.Adam)
    first = config.training.learning_rate if stage == "deepmask" else config.training.stage2_learning_rate
    assert task.learning_rate() == pytest.approx(first)
    if stage == "deepmask":
        task.optimizer.iterations.assign(config.training.epoch_steps)
        assert task.learning_rate() == pytest.approx(5e-4)


def _known_patches(config, n):
    """n patches with both kinds of sample weight, so one step exercises both loss terms."""
    batch = fakes._batch(config, "train", 1, n, tf.constant([3, 1], tf.int64), 0.0)
    alternate = tf.constant([1.0, 0.0] * (n // 2))
    return {**batch, "mask_weight": alternate, "score_weight": 1.0 - alternate}


def _hand_gradients(config, model, batch):
    """The gradients of the paper's summed objective with respect to the two output biases, from
    the model's outputs: d softplus(-y x) / dx = -y sigmoid(-y x)."""
    out = model(batch["images"], training=True)
    n = len(batch["images"])
    x, y = out["masks"].numpy().reshape(n, -1), batch["masks"].numpy().reshape(n, -1)
    pixels = x.shape[1]
    sigmoid = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    mask_grad = (batch["mask_weight"].numpy()[:, None] * -y * sigmoid(-y * x) / pixels).sum(axis=0)
    s, ys = out["scores"].numpy()[:, 0], batch["scores"].numpy()[:, 0]
    score_grad = config.training.score_weight * (batch["score_weight"].numpy() * -ys * sigmoid(-ys * s)).sum()
    return mask_grad, np.array([score_grad])


@pytest.mark.parametrize("replicas", [1, 2])
def test_train_step_takes_the_reference_step_for_the_global_batch(replicas):
    # Labels at the mask's own side (no resampling), no momentum, no decay: one SGD step moves each
    # output bias by -lr times the hand-computed gradient of the summed objective.
    config = _tiny(
        "model.dropout=0.0",
        "data.label_size=32",
        "training.optimizer=sgd",
        "training.momentum=0.0",
        "training.weight_decay=0.0",
        "training.learning_rate=0.5",
        "training.score_weight=0.25",
    )
    batch = _known_patches(config, config.training.batch_size)
    if replicas == 1:
        strategy = tf.distribute.get_strategy()
    else:
        strategy = two_cpus()
    with strategy.scope():
        task = StageTask(config, "deepmask", num_replicas=replicas, **DATA)
    mask_grad, score_grad = _hand_gradients(config, task.model, batch)
    biases = {name: task.model.get_layer(name).bias for name in ("mask_logits", "score_logits")}
    before = {name: b.numpy() for name, b in biases.items()}
    share = config.training.batch_size // replicas
    shards = strategy.experimental_distribute_values_from_function(
        lambda ctx: {
            k: v[ctx.replica_id_in_sync_group * share : (ctx.replica_id_in_sync_group + 1) * share]
            for k, v in batch.items()
        }
    )
    tf.function(lambda b: strategy.run(task.train_step, args=(b,)))(shards)
    lr = config.training.learning_rate
    np.testing.assert_allclose(
        biases["mask_logits"].numpy() - before["mask_logits"], -lr * mask_grad, rtol=1e-4, atol=1e-8
    )
    np.testing.assert_allclose(
        biases["score_logits"].numpy() - before["score_logits"], -lr * score_grad, rtol=1e-4, atol=1e-8
    )


def test_mixed_precision_skips_a_step_that_overflows_on_one_replica():
    # Replica 0's share carries no loss (finite, zero gradients); replica 1's overflows float16 at a
    # huge loss scale. The first replica's check alone would apply the summed, non-finite gradients.
    config = _tiny("training.mixed_precision=true", "model.dropout=0.0")
    strategy = two_cpus()
    with dtype_policy_scope("mixed_float16"), strategy.scope():
        task = StageTask(config, "deepmask", num_replicas=2, **DATA)
    batch = _known_patches(config, config.training.batch_size)
    share = config.training.batch_size // 2
    quiet = {"mask_weight": tf.zeros([share]), "score_weight": tf.zeros([share])}

    def replica_share(ctx):
        r = ctx.replica_id_in_sync_group
        part = {k: v[r * share : (r + 1) * share] for k, v in batch.items()}
        return {**part, **quiet} if r == 0 else part

    task.optimizer.dynamic_scale.assign(2.0**40)
    before = _weights(task.trainable_variables)
    shards = strategy.experimental_distribute_values_from_function(replica_share)
    sums = tf.function(lambda b: strategy.run(task.train_step, args=(b,)))(shards)
    assert all(np.isfinite(s.numpy()).all() for s in strategy.experimental_local_results(sums))
    after = _weights(task.trainable_variables)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    assert float(task.optimizer.dynamic_scale.numpy()) == 2.0**39


def test_agree_on_finite_keeps_finite_gradients_and_poisons_others():
    finite = [tf.ones([2]), None, tf.zeros([3, 1])]
    kept = agree_on_finite(finite)
    assert kept[1] is None and all(np.array_equal(a, b) for a, b in zip(kept[::2], finite[::2]))
    poisoned = agree_on_finite([tf.constant([1.0, np.inf]), None, tf.zeros([3, 1])])
    assert poisoned[1] is None and all(np.isnan(g.numpy()).all() for g in poisoned[::2])
