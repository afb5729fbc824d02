"""The training loop: distribution equivalence, stage-2 freezing, resumption, signals, mixed precision."""

import json
import os
import shutil
import signal

import keras
import numpy as np
import pytest
import tensorflow as tf
import test_train_fakes as fakes
from strategies import two_cpus

from sharpmask_tf import summaries
from sharpmask_tf.config import get_config
from sharpmask_tf.stop_signals import StopSignals
from sharpmask_tf.task import stage_model
from sharpmask_tf.trainer import Trainer, TrainingInterrupted, train

DATA = fakes.DATA


def _tiny(*extra):
    return fakes.tiny_config("training.stage2_steps=2", "training.checkpoint_every=100", *extra)


def _weights(model):
    return {v.path: v.numpy() for v in model.weights}


def _pooled_dataset(
    config, split="train", stage=1, batch_size=None, input_context=None, seed=None, repeat=True, first_step=0
):
    """Examples from one fixed pool in one order, batched per replica: replica r of a global batch
    gets examples [r*b, (r+1)*b), so one device and two replicas see the same global batches."""
    pool = fakes._batch(config, split, stage, 64, tf.constant([7, 0], tf.int64), 0.5)
    batch = config.training.batch_size if batch_size is None else batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(batch)
    return tf.data.Dataset.from_tensor_slices(pool).repeat().batch(batch)


def test_each_training_stream_starts_at_the_step_it_resumes_from(tmp_path):
    """The trainer hands make_dataset the step its stream starts at, which data.mask_only_steps
    counts against, so a resumed stage 1 neither repeats nor skips its mask-only steps."""
    first_steps = []

    def recording(config, split="train", stage=1, first_step=0, **kwargs):
        if split == "train" and stage == 1:
            first_steps.append(first_step)
        return fakes.make_dataset(config, split, stage, first_step=first_step, **kwargs)

    data = dict(make_dataset=recording, make_validation_patches=fakes.make_validation_patches)
    train(_tiny("training.stage1_steps=2"), str(tmp_path), stage="deepmask", progress=False, **data)
    train(_tiny("training.stage1_steps=5"), str(tmp_path), stage="deepmask", progress=False, **data)
    assert first_steps == [0, 2]


def test_mirrored_two_devices_equal_one_device(tmp_path):
    # SGD: Adam divides each gradient by its own running magnitude, so the last-bit differences of
    # a two-replica sum become whole steps on weights whose gradients are near zero.
    # Windows cut after the horizontal nets: with the small preset's cut before them (a8b9543) and
    # reflect padding, one channel of the two biases of R1's sum (refine1_skip_conv3/bias and
    # refine1_vertical_conv1/bias, one gradient) differs by 2.2e-6 between the two runs, over this
    # test's tolerance; zero padding or the cut after do not (README, Limits).
    config = _tiny("model.dropout=0.0", "training.optimizer=sgd", "model.skip_crop=after")
    data = dict(make_dataset=_pooled_dataset, make_validation_patches=fakes.make_validation_patches)
    single = train(config, str(tmp_path / "one"), strategy="default", progress=False, **data)
    mirrored_strategy = two_cpus()
    assert mirrored_strategy.num_replicas_in_sync == 2
    mirrored = train(config, str(tmp_path / "two"), strategy=mirrored_strategy, progress=False, **data)
    assert mirrored["deepmask"]["train_loss"] == pytest.approx(single["deepmask"]["train_loss"], rel=1e-4)
    for name in ("deepmask.keras", "sharpmask.keras"):
        a = _weights(keras.saving.load_model(tmp_path / "one" / name))
        b = _weights(keras.saving.load_model(tmp_path / "two" / name))
        assert a.keys() == b.keys()
        initial = _weights(stage_model(config, name.split(".")[0]))
        moved = [k for k in a if not np.allclose(a[k], initial[k])]
        assert moved, "training changed no weight"
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One `_tiny()` run of both stages, its metrics and model directory, for the tests that only read
    them (a test that writes there works on a copy)."""
    model_dir = tmp_path_factory.mktemp("tiny_run")
    return train(_tiny(), str(model_dir), progress=False, **DATA), model_dir


def test_stage2_changes_no_trunk_or_head_weight(tiny_run):
    _, model_dir = tiny_run
    deepmask = keras.saving.load_model(model_dir / "deepmask.keras")
    sharpmask = keras.saving.load_model(model_dir / "sharpmask.keras")
    before = _weights(deepmask)
    after = _weights(sharpmask)
    shared = before.keys() & after.keys()
    assert any(k.startswith("conv4_block1") for k in shared) and "head_object/kernel" in shared
    for k in shared:
        np.testing.assert_array_equal(before[k], after[k], err_msg=k)
    refinement = [k for k in after if k.startswith("refine")]
    fresh = _weights(stage_model(_tiny(), "sharpmask"))
    assert any(not np.array_equal(after[k], fresh[k]) for k in refinement)


def _event_scalars(log_dir, tag):
    values = []
    for name in sorted(os.listdir(log_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            for v in event.summary.value:
                if v.tag == tag:
                    values.append((event.step, float(tf.make_ndarray(v.tensor))))
    return [v for _, v in sorted(values)]


def test_training_writes_model_dir_and_resumes_without_retraining(tiny_run, tmp_path):
    metrics, model_dir = tiny_run
    shutil.copytree(model_dir, tmp_path, dirs_exist_ok=True)
    for name in ("config.json", "deepmask.keras", "sharpmask.keras", "metrics.json"):
        assert (tmp_path / name).exists(), name
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics
    assert metrics["sharpmask_mean_iou"] == metrics["sharpmask"]["mean_iou"]
    assert len(_event_scalars(tmp_path / "logs" / "deepmask" / "train", "loss")) == 3
    assert _event_scalars(tmp_path / "logs" / "sharpmask" / "val", "mean_iou")
    before = _weights(keras.saving.load_model(tmp_path / "sharpmask.keras"))
    again = train(_tiny(), str(tmp_path), progress=False, **DATA)
    assert again["deepmask"]["step"] == 3 and again["sharpmask"]["step"] == 2
    after = _weights(keras.saving.load_model(tmp_path / "sharpmask.keras"))
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_stop_signal_checkpoints_current_step(tmp_path):
    trainer = Trainer(
        _tiny("training.stage1_steps=50"), str(tmp_path), tf.distribute.get_strategy(), progress=False, **DATA
    )
    task = trainer.build_task("deepmask")
    stop = StopSignals()
    stop.signum = 15  # as if SIGTERM arrived during the first step
    with pytest.raises(TrainingInterrupted) as info:
        trainer.fit_stage(task, trainer.stage_checkpoints(task), stop)
    assert info.value.step == 1
    assert tf.train.latest_checkpoint(str(tmp_path / "deepmask")).endswith("ckpt-1")


def test_a_signal_during_the_last_validation_stops_the_run_before_stage_2(tmp_path):
    def signalled_validation(*args):
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal, delivered while the stage validates
        return fakes.make_validation_patches(*args)

    handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as info:
        train(
            _tiny(),
            str(tmp_path),
            progress=False,
            make_dataset=fakes.make_dataset,
            make_validation_patches=signalled_validation,
        )
    assert (info.value.stage, info.value.step, info.value.signum) == ("deepmask", 3, signal.SIGTERM)
    assert tf.train.latest_checkpoint(str(tmp_path / "deepmask")).endswith("ckpt-3")
    assert not (tmp_path / "sharpmask").exists() and not (tmp_path / "deepmask.keras").exists()
    assert signal.getsignal(signal.SIGTERM) is handler


def test_mixed_precision_trains_float16_with_float32_weights(tmp_path):
    metrics = train(_tiny("training.mixed_precision=true"), str(tmp_path), progress=False, **DATA)
    assert np.isfinite(metrics["deepmask"]["train_loss"]) and np.isfinite(metrics["sharpmask"]["train_loss"])
    assert keras.config.dtype_policy().name == "float32"
    model = keras.saving.load_model(tmp_path / "sharpmask.keras")
    assert model.get_layer("head_object").compute_dtype == "float16"
    assert all(v.dtype == "float32" for v in model.weights)


def test_jit_compiled_step_matches_plain_step(tmp_path):
    config = _tiny("model.dropout=0.0", "training.stage2_steps=1")
    data = dict(make_dataset=_pooled_dataset, make_validation_patches=fakes.make_validation_patches)
    plain = train(config, str(tmp_path / "plain"), progress=False, **data)
    jit = train(
        _tiny("model.dropout=0.0", "training.stage2_steps=1", "training.jit=true"),
        str(tmp_path / "jit"),
        progress=False,
        **data,
    )
    assert jit["deepmask"]["train_loss"] == pytest.approx(plain["deepmask"]["train_loss"], rel=1e-3)
    assert jit["sharpmask"]["train_loss"] == pytest.approx(plain["sharpmask"]["train_loss"], rel=1e-3)


@pytest.mark.slow
def test_loss_decreases_on_synthetic_dataset(tmp_path):
    config = fakes.synthetic_config(
        tmp_path / "data",
        40,
        8,
        1,
        [
            # A short, fast schedule with the paper's 1/32 score weight, so 80 steps show the mask loss fall
            # (the preset's own rates are tuned for thousands of steps): 0.2 / 0.1 / 0.02 as batch-mean
            # rates, divided by the batch of 16 for the summed objective.
            "training.optimizer=sgd",
            "training.stage1_steps=80",
            "training.epoch_steps=8",
            "training.learning_rate=0.0125",
            "training.lr_decay_rates=[0.00625,0.00125]",
            "training.lr_decay_epochs=[5,8]",
            "training.score_weight=0.03125",
            "training.log_every=1",
            "training.validate_every=1000",
            "training.val_patches=16",
        ],
    )
    train(config, str(tmp_path / "m"), stage="deepmask", progress=False)
    losses = _event_scalars(tmp_path / "m" / "logs" / "deepmask" / "train", "mask_loss")
    assert len(losses) > 20
    assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10])


@pytest.mark.slow
def test_the_small_recipe_learns_masks_on_synthetic_data(tmp_path):
    # The small preset's own optimizer and rates, shortened: the mask loss falls and the stage's
    # validation IoU beats the trivial all-object mask's on the same validation patches.
    from sharpmask_tf.data import generate_dataset, make_validation_patches
    from sharpmask_tf.losses import mask_iou

    paths = generate_dataset(str(tmp_path / "data"), num_train=40, num_val=8, seed=1)
    config = get_config(
        "small",
        [
            f"data.train_annotations={paths['train']}",
            f"data.train_images={tmp_path / 'data' / 'train'}",
            f"data.val_annotations={paths['val']}",
            f"data.val_images={tmp_path / 'data' / 'val'}",
            "training.stage1_steps=200",
            "training.log_every=1",
            "training.validate_every=200",
            "training.val_patches=64",
        ],
    )
    t = config.training
    labels = make_validation_patches(config, t.val_patches, 1, t.val_seed)["masks"]
    all_object = mask_iou(np.ones(labels.shape, np.float32), labels).mean()
    metrics = train(config, str(tmp_path / "m"), stage="deepmask", progress=False)
    losses = _event_scalars(tmp_path / "m" / "logs" / "deepmask" / "train", "mask_loss")
    assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])
    assert metrics["deepmask"]["mean_iou"] > all_object


def _failing_dataset(bad_from):
    """The fake stream, with NaN images and sample weights from batch `bad_from` on (a lost
    forward pass). NaN images alone need not reach the loss: on some CPUs (the AVX-512 host's
    oneDNN) a max pool turns NaN into -3.4e38, and the small trunk's loss then stayed finite."""

    def make_dataset(config, split="train", stage=1, **kwargs):
        batches = fakes.make_dataset(config, split, stage, **kwargs).enumerate()

        def poison(i, batch):
            factor = tf.where(i >= bad_from, np.nan, 1.0)
            return {**batch, **{key: batch[key] * factor for key in ("images", "mask_weight", "score_weight")}}

        return batches.map(poison)

    return make_dataset


@pytest.mark.parametrize("mixed_precision", [False, True])
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, mixed_precision):
    config = _tiny(
        "training.stage1_steps=10",
        "training.checkpoint_every=2",
        f"training.mixed_precision={str(mixed_precision).lower()}",
    )
    data = dict(make_dataset=_failing_dataset(5), make_validation_patches=fakes.make_validation_patches)
    with pytest.raises(FloatingPointError, match=r"at step 6; stopped without saving it.*ckpt-4"):
        train(config, str(tmp_path), stage="deepmask", progress=False, **data)
    latest = tf.train.latest_checkpoint(str(tmp_path / "deepmask"))
    assert latest.endswith("ckpt-4")
    reader = tf.train.load_checkpoint(latest)
    weights = [n for n, _ in tf.train.list_variables(latest) if n.startswith("model/")]
    assert weights and all(np.isfinite(reader.get_tensor(n)).all() for n in weights)


def test_every_global_batch_is_one_kind_on_two_replicas(tmp_path):
    config = fakes.synthetic_config(
        tmp_path / "data", 6, 2, 0, ["training.batch_size=4", "data.mask_only_steps=0"], val=False
    )
    strategy = two_cpus()
    trainer = Trainer(config, str(tmp_path / "m"), strategy, progress=False)
    task = trainer.build_task("deepmask")
    iterator = trainer.train_iterator(task, seed=5)
    kinds = []
    for _ in range(16):
        shares = strategy.experimental_local_results(next(iterator)["score_weight"])
        per_replica = {tuple(s.numpy()) for s in shares}
        assert len(per_replica) == 1, per_replica
        kinds.append(per_replica.pop())
    assert set(kinds) == {(0.0, 0.0), (1.0, 1.0)}


def test_input_wait_share_is_in_metrics_json_and_tensorboard(tmp_path):
    # One log point per stage (its last step), so TensorBoard's share covers the same steps as
    # metrics.json's: every step but the first.
    metrics = train(_tiny("training.log_every=100"), str(tmp_path), progress=False, **DATA)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for stage in ("deepmask", "sharpmask"):
        share = saved[stage]["input_wait_fraction"]
        assert share == metrics[stage]["input_wait_fraction"]
        assert 0.0 <= share <= 1.0
        logged = _event_scalars(tmp_path / "logs" / stage / "train", "input_wait_fraction")
        assert logged == [pytest.approx(share, rel=1e-6)]


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_input_wait_counts_time_in_next_over_whole_steps_after_the_first(monkeypatch):
    clock = _FakeClock()
    monkeypatch.setattr(summaries.time, "perf_counter", clock)

    def batches(waits):
        for w in waits:
            clock.now += w
            yield w

    wait = summaries.InputWait()
    iterator = batches([10.0, 3.0, 1.0, 0.0])
    assert wait.share() is None
    for compute in (5.0, 1.0, 3.0):
        wait.next(iterator)
        clock.now += compute
        wait.step_done()
    # The first step (10 s waiting, 5 s computing) is left out: (3 + 1) / (3 + 1 + 1 + 3).
    assert wait.share() == pytest.approx(0.5)
    assert wait.interval_share() == pytest.approx(0.5)
    assert wait.interval_share() is None
    wait.next(iterator)
    clock.now += 2.0
    wait.step_done()
    assert wait.interval_share() == pytest.approx(0.0)
    assert wait.share() == pytest.approx(4 / 10)
