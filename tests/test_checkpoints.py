"""A model directory's checkpoints: resuming past broken ones, rotation, config history, best model."""

import json
import os
import shutil

import pytest
import tensorflow as tf
import test_train_fakes as fakes

from sharpmask_tf.checkpoints import (
    CONFIG_HISTORY_FILE,
    SKIPPED_DIR,
    UnrestorableCheckpoints,
    check_model_dir,
    config_changes,
    is_better,
    write_run_config,
)
from sharpmask_tf.config import Config, get_config
from sharpmask_tf.trainer import Trainer, train

DATA = fakes.DATA


def _tiny(*extra):
    return fakes.tiny_config("training.checkpoint_every=1", *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model directory whose stage deepmask holds ckpt-1, ckpt-2 and ckpt-3 (one per step)."""
    model_dir = tmp_path_factory.mktemp("trained") / "m"
    train(_tiny(), str(model_dir), stage="deepmask", progress=False, **DATA)
    assert tf.train.latest_checkpoint(str(model_dir / "deepmask")).endswith("ckpt-3")
    return model_dir


@pytest.fixture
def model_dir(trained, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(trained, copy)
    return copy


def _stage_checkpoints(model_dir, *extra):
    trainer = Trainer(_tiny(*extra), str(model_dir), tf.distribute.get_strategy(), progress=False, **DATA)
    task = trainer.build_task("deepmask")
    return task, trainer.stage_checkpoints(task)


def _files(directory, step):
    return sorted(n for n in os.listdir(directory) if n.startswith(f"ckpt-{step}."))


def _truncate_data(stage_dir, step):
    path = stage_dir / f"ckpt-{step}.data-00000-of-00001"
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _delete_index(stage_dir, step):
    (stage_dir / f"ckpt-{step}.index").unlink()


def _delete_files(stage_dir, step):
    for name in _files(stage_dir, step):
        (stage_dir / name).unlink()


@pytest.mark.parametrize(
    "corrupt, why",
    [
        (_truncate_data, "do not read (IndexError"),
        (_delete_index, ".index file is missing"),
        (_delete_files, "files are missing"),
    ],
)
def test_resume_takes_the_newest_checkpoint_that_restores_and_rotation_keeps_the_rest(model_dir, corrupt, why):
    stage_dir = model_dir / "deepmask"
    corrupt(stage_dir, 3)
    left = _files(stage_dir, 3)
    task, checkpoints = _stage_checkpoints(model_dir)
    assert checkpoints.resume() == str(stage_dir / "ckpt-2")
    assert int(checkpoints.step.numpy()) == 2 and int(task.optimizer.iterations.numpy()) == 2
    assert list(checkpoints.skipped) == [str(stage_dir / "ckpt-3")]
    assert why in checkpoints.skipped[str(stage_dir / "ckpt-3")]
    # What is left of the broken checkpoint is set aside, not deleted; the state file names the rest.
    assert _files(stage_dir, 3) == [] and sorted(os.listdir(stage_dir / SKIPPED_DIR) if left else []) == left
    assert checkpoints.set_aside == ([str(stage_dir / "ckpt-3")] if left else [])
    state = tf.train.get_checkpoint_state(str(stage_dir))
    assert [os.path.basename(p) for p in state.all_model_checkpoint_paths] == ["ckpt-1", "ckpt-2"]
    # Rotation (three kept) deletes only checkpoints older than the ones written after the resume.
    checkpoints.save(3)
    assert _files(stage_dir, 1) and _files(stage_dir, 2) and _files(stage_dir, 3)
    checkpoints.save(4)
    assert not _files(stage_dir, 1) and _files(stage_dir, 2)
    assert sorted(os.listdir(stage_dir / SKIPPED_DIR) if left else []) == left


@pytest.mark.parametrize("state", [b"\xff\xfe\x00 not text", b'model_checkpoint_path: "ckpt-3" {{{', b""])
def test_a_corrupt_state_file_resumes_from_the_newest_checkpoint_files(model_dir, state):
    stage_dir = model_dir / "deepmask"
    (stage_dir / "checkpoint").write_bytes(state)
    _, checkpoints = _stage_checkpoints(model_dir)
    assert checkpoints.resume() == str(stage_dir / "ckpt-3") and int(checkpoints.step.numpy()) == 3
    assert checkpoints.skipped == {} and checkpoints.set_aside == []
    assert tf.train.latest_checkpoint(str(stage_dir)) == str(stage_dir / "ckpt-3")


def test_no_checkpoint_that_restores_raises_naming_each_and_moves_nothing(model_dir):
    stage_dir = model_dir / "deepmask"
    for step in (1, 2, 3):
        _truncate_data(stage_dir, step)
    before = sorted(os.listdir(stage_dir))
    _, checkpoints = _stage_checkpoints(model_dir)
    with pytest.raises(UnrestorableCheckpoints, match="None of the checkpoints") as info:
        checkpoints.resume()
    assert list(info.value.skipped) == [str(stage_dir / f"ckpt-{s}") for s in (3, 2, 1)]
    assert all("IndexError" in why for why in info.value.skipped.values())
    assert sorted(os.listdir(stage_dir)) == before


def _event_steps(log_dir, tag):
    steps = []
    for name in sorted(os.listdir(log_dir)):
        for event in tf.compat.v1.train.summary_iterator(os.path.join(log_dir, name)):
            steps += [event.step for v in event.summary.value if v.tag == tag]
    return sorted(steps)


def test_training_resumes_past_a_deleted_latest_checkpoint_and_records_the_changed_config(model_dir):
    stage_dir = model_dir / "deepmask"
    _delete_files(stage_dir, 3)  # the obvious manual fix for a corrupt latest checkpoint
    lines = []
    metrics = train(
        _tiny("training.stage1_steps=5"), str(model_dir), "deepmask", progress=False, log=lines.append, **DATA
    )
    assert metrics["deepmask"]["step"] == 5
    assert f"deepmask: skipped checkpoint {stage_dir / 'ckpt-3'}: the checkpoint state file names it" in "\n".join(
        lines
    )
    assert f"deepmask: resumed from {stage_dir / 'ckpt-2'} at step 2, the newest checkpoint that restores" in lines
    # Steps 1 and 2 were trained once: the second run started at step 3.
    assert _event_steps(model_dir / "logs" / "deepmask" / "train", "loss") == [1, 2, 3, 3, 4, 5]
    assert tf.train.latest_checkpoint(str(stage_dir)) == str(stage_dir / "ckpt-5")
    # The changed hyper-parameter is warned about and the earlier configuration kept.
    warning = next(line for line in lines if line.startswith("warning:"))
    assert "training.stage1_steps: 3 -> 5" in warning and CONFIG_HISTORY_FILE in warning
    history = json.loads((model_dir / CONFIG_HISTORY_FILE).read_text())
    assert [Config.from_dict(entry["config"]) for entry in history] == [_tiny()]
    assert Config.from_json((model_dir / "config.json").read_text()) == _tiny("training.stage1_steps=5")


def test_write_run_config_keeps_every_earlier_config_oldest_first(tmp_path):
    first, second, third = _tiny(), _tiny("training.batch_size=8"), _tiny("training.learning_rate=0.5")
    assert write_run_config(first, str(tmp_path)) == {}
    assert write_run_config(first, str(tmp_path)) == {}
    assert not (tmp_path / CONFIG_HISTORY_FILE).exists()
    assert write_run_config(second, str(tmp_path)) == {"training.batch_size": (4, 8)}
    assert write_run_config(third, str(tmp_path)) == config_changes(second, third)
    assert set(config_changes(second, third)) == {"training.batch_size", "training.learning_rate"}
    history = json.loads((tmp_path / CONFIG_HISTORY_FILE).read_text())
    assert [Config.from_dict(entry["config"]) for entry in history] == [first, second]
    assert all(entry["replaced_at"].endswith("+00:00") for entry in history)
    assert (tmp_path / "config.json").read_text() == third.to_json()


def test_a_malformed_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"model": {"patch_size": "big"}}')
    with pytest.raises(ValueError, match="config.json is not a valid sharpmask_tf configuration"):
        check_model_dir(get_config("small"), str(tmp_path))


def test_crash_while_writing_leaves_latest_good_checkpoint(model_dir):
    stage_dir = model_dir / "deepmask"
    good = tf.train.latest_checkpoint(str(stage_dir))
    # A writer killed mid-save leaves partial files of the next checkpoint and the old state file:
    # CheckpointManager writes the checkpoint first and only then atomically replaces `checkpoint`.
    (stage_dir / "ckpt-4.index").write_bytes(b"\x00truncated")
    (stage_dir / "ckpt-4.data-00000-of-00001").write_bytes(b"")
    assert tf.train.latest_checkpoint(str(stage_dir)) == good
    task, checkpoints = _stage_checkpoints(model_dir, "training.stage1_steps=5")
    assert checkpoints.restore() and int(checkpoints.step.numpy()) == 3
    assert int(task.optimizer.iterations.numpy()) == 3
    assert list(checkpoints.skipped) == [str(stage_dir / "ckpt-4")]


def test_model_dir_of_another_model_config_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(get_config("small", ["model.head_channels=8"]).to_json())
    with pytest.raises(ValueError, match="head_channels"):
        check_model_dir(get_config("small"), str(tmp_path))
    check_model_dir(get_config("small", ["model.head_channels=8", "training.batch_size=2"]), str(tmp_path))


def test_best_model_breaks_ties_towards_a_working_score_head():
    best = {"iou_over_70": 0.0, "mean_iou": 0.29, "score_accuracy": 0.53}
    assert is_better({"iou_over_70": 0.0, "mean_iou": 0.26, "score_accuracy": 0.77}, best)
    assert not is_better({"iou_over_70": 0.0, "mean_iou": 0.28, "score_accuracy": 0.53}, best)
    assert is_better({"iou_over_70": 0.01, "mean_iou": 0.10, "score_accuracy": 0.50}, best)
    stage2 = {"iou_over_70": 0.0, "mean_iou": 0.30}
    assert is_better({"iou_over_70": 0.0, "mean_iou": 0.31}, stage2)
