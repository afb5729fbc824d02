"""The per-stage task: the stage-2 trainable split, the schedule, the stage-number boundary to the
data module, the replica train step and the validation step."""

import numpy as np
import pytest
import tensorflow as tf
import test_train_fakes as fakes

from sharpmask_tf.config import get_config
from sharpmask_tf.evaluation import evaluate_patches
from sharpmask_tf.losses import joint_loss
from sharpmask_tf.sharpmask import refinement_split
from sharpmask_tf.task import StageTask, learning_rate_schedule, stage_model

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


def test_learning_rate_schedule_scales_reference_steps_to_run_length():
    config = get_config("small", ["training.stage1_steps=100", "training.lr_decay_at=[0.5,0.8]"])
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
