"""In-memory stand-ins for sharpmask_tf.data's make_dataset / make_validation_patches, with the
same signatures and batch structure: a disc on noise, its mask as the label. Batch i of pipeline p
is a pure function of (seed, split, stage, p, i)."""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from sharpmask_tf.config import Config, get_config

# A few steps of the small preset on tiny batches: what every training test starts from.
TINY = [
    "training.batch_size=4",
    "training.stage1_steps=3",
    "training.validate_every=100",
    "training.log_every=1",
    "training.val_patches=8",
]


def _batch(config: Config, split: str, stage: int, batch: int, seed: tf.Tensor, kind_coin: float):
    size, patch, context = config.model.input_size, config.model.patch_size, config.model.context
    label = config.data.label_size if stage == 1 else patch
    coin = tf.random.stateless_uniform([], seed)
    score_batch = coin < kind_coin
    u = tf.random.stateless_uniform([batch, 6], seed + 1)
    positive = tf.logical_or(tf.logical_not(score_batch), u[:, 5] < 0.5)
    radius = patch * (0.2 + 0.15 * u[:, 0])
    cx = size / 2 + patch * 0.1 * (u[:, 1] - 0.5)
    cy = size / 2 + patch * 0.1 * (u[:, 2] - 0.5)
    # Negatives: the disc sits in a corner, small.
    radius = tf.where(positive, radius, patch * 0.08)
    cx = tf.where(positive, cx, context + 4.0)
    cy = tf.where(positive, cy, context + 4.0)
    grid = tf.range(size, dtype=tf.float32) + 0.5
    inside = (grid[None, None, :] - cx[:, None, None]) ** 2 + (grid[None, :, None] - cy[:, None, None]) ** 2
    inside = tf.cast(inside < radius[:, None, None] ** 2, tf.float32)
    noise = tf.random.stateless_uniform([batch, size, size, 3], seed + 2) * 0.5
    colour = 0.5 + 0.5 * u[:, 3:6][:, None, None, :]
    images = noise * (1 - inside[..., None]) + colour * inside[..., None]
    window = inside[:, context : context + patch, context : context + patch, None]
    masks = tf.image.resize(window, (label, label), method="area")[..., 0]
    masks = tf.where(masks > 0.5, 1.0, -1.0)
    kind = tf.cast(score_batch, tf.float32)
    return {
        "images": images,
        "masks": masks,
        "scores": tf.where(positive, 1.0, -1.0)[:, None],
        "mask_weight": tf.fill([batch], 1.0 - kind),
        "score_weight": tf.fill([batch], kind),
    }


def make_dataset(
    config, split="train", stage=1, batch_size=None, input_context=None, seed=None, repeat=True, first_step=0
):
    global_batch = config.training.batch_size if batch_size is None else batch_size
    pipeline, batch = 0, global_batch
    if input_context is not None:
        pipeline = input_context.input_pipeline_id
        batch = input_context.get_per_replica_batch_size(global_batch)
    seed = config.data.seed if seed is None else seed
    kind_coin = config.data.score_frequency if stage == 1 else 0.0
    base = tf.constant([seed * 131 + stage * 7 + (split == "val") * 3, pipeline], tf.int64)
    count = np.iinfo(np.int64).max if repeat else 4
    return (
        tf.data.Dataset.range(count)
        .map(lambda i: _batch(config, split, stage, batch, base * 1000 + i * 10, kind_coin))
        .prefetch(2)
    )


def make_validation_patches(config, num_patches, stage, seed):
    base = tf.constant([seed * 131 + stage * 7 + 5, 99], tf.int64)
    return {k: v.numpy() for k, v in _batch(config, "val", stage, num_patches, base, 0.0).items()}


# The trainer's data keyword arguments with these stand-ins.
DATA = dict(make_dataset=make_dataset, make_validation_patches=make_validation_patches)


def tiny_config(*overrides: str) -> Config:
    """The small preset with `TINY`'s schedule, then `overrides`."""
    return get_config("small", [*TINY, *overrides])


def synthetic_config(folder, num_train: int, num_val: int, seed: int, overrides=(), val: bool = True) -> Config:
    """The small preset on a synthetic COCO-format dataset generated in `folder`: its train split
    (and its val split if `val`), then `overrides`."""
    from sharpmask_tf.data import generate_dataset

    paths = generate_dataset(str(folder), num_train=num_train, num_val=num_val, seed=seed)
    splits = ("train", "val") if val else ("train",)
    data = [
        f"data.{s}_{key}={value}" for s in splits for key, value in (("annotations", paths[s]), ("images", folder / s))
    ]
    return get_config("small", [*data, *overrides])


def test_fake_batches_have_the_pipeline_structure(tmp_path):
    from sharpmask_tf.data import make_dataset as real_make_dataset

    config = synthetic_config(tmp_path, 4, 2, 0, ["training.batch_size=4"], val=False)
    for stage in (1, 2):
        real = next(iter(real_make_dataset(config, stage=stage)))
        fake = next(iter(make_dataset(config, stage=stage)))
        assert real.keys() == fake.keys()
        for k in real:
            assert (real[k].shape, real[k].dtype) == (fake[k].shape, fake[k].dtype), k
