"""The tf.data input pipeline over `PatchSampler`, and the fixed validation patches."""

from __future__ import annotations

import functools
import os

import numpy as np
import tensorflow as tf

from sharpmask_tf.config import Config
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.sampler import PatchSampler

SPLITS = ("train", "val")
BATCH_KEYS = ("images", "masks", "scores", "mask_weight", "score_weight")
# Seed-stream tags, so the validation patches never repeat a training batch's draws.
_TRAIN_STREAM, _VALIDATION_STREAM = 0, 1


@functools.lru_cache(maxsize=8)
def _load(annotation_file: str, image_dir: str, on_bad_annotation: str, modified: float) -> CocoDataset:
    del modified  # part of the cache key only: a rewritten file is loaded again
    return CocoDataset(annotation_file, image_dir, on_bad_annotation=on_bad_annotation)


def load_split(config: Config, split: str) -> CocoDataset:
    """The validated `CocoDataset` of a split, loaded once per process and files.

    Raises:
        ValueError: for a split other than "train" or "val".
        DatasetError: for a missing or malformed dataset.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}. Received: split={split!r}")
    d = config.data
    annotations, images = (
        (d.train_annotations, d.train_images) if split == "train" else (d.val_annotations, d.val_images)
    )
    modified = os.path.getmtime(annotations) if os.path.isfile(annotations) else -1.0
    return _load(annotations, images, d.on_bad_annotation, modified)


def make_dataset(
    config: Config,
    split: str = "train",
    stage: int = 1,
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    seed: int | None = None,
    repeat: bool = True,
) -> tf.data.Dataset:
    """Batches of training patches, sampled fresh for every batch (SPEC.md section 3).

    In stage 1 each batch is all score samples with probability `data.score_frequency`, else all
    mask samples; stage 2 batches are mask samples. Batch i of input pipeline p is a pure function of
    (seed, p, stage, i), so the stream is deterministic and every pipeline's stream is distinct.
    Batches are sampled in parallel (`data.num_parallel_calls`) and prefetched.

    Args:
        config: the configuration.
        split: "train" (data.train_*) or "val" (data.val_*).
        stage: 1 (mask and score batches, labels `data.label_size`) or 2 (mask batches, labels
            `model.patch_size`).
        batch_size: global batch size; None is `training.batch_size`. With an `input_context`,
            batches hold its per-replica share.
        input_context: from `tf.distribute.Strategy.distribute_datasets_from_function`; selects
            this pipeline's stream.
        seed: stream seed; None is `data.seed`.
        repeat: True for an endless stream; False for one epoch of about as many patches as the
            split has sampleable objects, split across input pipelines (at least one batch each).

    Returns:
        A dataset of dicts: `images` (B, S, S, 3) float32 RGB in [0, 1] with S = model.input_size;
        `masks` (B, L, L) float32 in {+1, -1}; `scores` (B, 1) float32 in {+1, -1};
        `mask_weight` and `score_weight` (B,) float32.

    Raises:
        ValueError: for a bad split, stage or batch size.
        DatasetError: for a missing or malformed dataset.
    """
    sampler = PatchSampler.from_config(load_split(config, split), config, stage)
    global_batch = config.training.batch_size if batch_size is None else batch_size
    if global_batch < 1:
        raise ValueError(f"batch_size must be positive. Received: batch_size={batch_size!r}")
    pipeline, pipelines, batch = 0, 1, global_batch
    if input_context is not None:
        pipeline, pipelines = input_context.input_pipeline_id, input_context.num_input_pipelines
        batch = input_context.get_per_replica_batch_size(global_batch)
    seed = config.data.seed if seed is None else seed
    score_frequency = config.data.score_frequency if stage == 1 else 0.0

    def draw(index: np.ndarray) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, _TRAIN_STREAM, pipeline, stage, int(index)])
        kind = "score" if rng.random() < score_frequency else "mask"
        arrays, _ = sampler.sample_batch(rng, kind, batch)
        return [arrays[k] for k in BATCH_KEYS]

    size, label = sampler.input_size, sampler.label_size
    shapes = {
        "images": (batch, size, size, 3),
        "masks": (batch, label, label),
        "scores": (batch, 1),
        "mask_weight": (batch,),
        "score_weight": (batch,),
    }

    def to_batch(index: tf.Tensor) -> dict[str, tf.Tensor]:
        tensors = tf.numpy_function(draw, [index], [tf.float32] * len(BATCH_KEYS), stateful=False)
        return {k: tf.ensure_shape(t, shapes[k]) for k, t in zip(BATCH_KEYS, tensors)}

    if repeat:
        indices = tf.data.Dataset.range(np.iinfo(np.int64).max)
    else:
        indices = tf.data.Dataset.range(max(1, len(sampler.positives) // (batch * pipelines)))
    parallel = tf.data.AUTOTUNE if config.data.num_parallel_calls == -1 else config.data.num_parallel_calls
    dataset = indices.map(to_batch, num_parallel_calls=parallel, deterministic=True)
    return dataset.prefetch(tf.data.AUTOTUNE)


def make_validation_patches(config: Config, num_patches: int, stage: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed set of jittered mask samples from the val split, for per-patch IoU.

    Args:
        config: the configuration.
        num_patches: number of patches.
        stage: 1 (labels `data.label_size`) or 2 (labels `model.patch_size`).
        seed: the set's seed; the same seed gives the same patches.

    Returns:
        The keys and shapes of a `make_dataset` batch of mask samples, as NumPy arrays with
        num_patches rows.

    Raises:
        ValueError: for a non-positive num_patches or a bad stage.
        DatasetError: for a missing or malformed val split.
    """
    if num_patches < 1:
        raise ValueError(f"num_patches must be positive. Received: num_patches={num_patches!r}")
    sampler = PatchSampler.from_config(load_split(config, "val"), config, stage)
    rng = np.random.default_rng([seed, _VALIDATION_STREAM, stage])
    arrays, _ = sampler.sample_batch(rng, "mask", num_patches)
    return arrays
