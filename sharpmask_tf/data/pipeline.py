"""The tf.data input pipeline: `PatchSampler` windows cut by `render`; the fixed validation patches."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from sharpmask_tf.config import Config, DataConfig, InferenceConfig, ModelConfig
from sharpmask_tf.data.coco import CocoDataset
from sharpmask_tf.data.packed import PackedSplit, load_packed
from sharpmask_tf.data.render import PatchPlanner, render
from sharpmask_tf.data.sampler import PatchSampler

SPLITS = ("train", "val")
BATCH_KEYS = ("images", "masks", "scores", "mask_weight", "score_weight")
# A batch's rendering plan (`PatchPlanner.plan`) and its sample weights: shapes after the group
# axis, as functions of (patches per image K, label side L).
_PLAN_SHAPES = {
    "image": lambda k, label: (),
    "decoder": lambda k, label: (),
    "crop": lambda k, label: (4,),
    "height": lambda k, label: (),
    "affine": lambda k, label: (k, 4),
    "inside": lambda k, label: (k, 4),
    "label_rows": lambda k, label: (k, label),
    "label_cols": lambda k, label: (k, label),
    "rle": lambda k, label: (k,),
    "scores": lambda k, label: (k, 1),
    "mask_weight": lambda k, label: (k,),
    "score_weight": lambda k, label: (k,),
}
_PLAN_TYPES = {
    "image": tf.int32,
    "decoder": tf.int32,
    "crop": tf.int32,
    "height": tf.int64,
    "inside": tf.int32,
    "label_rows": tf.int64,
    "label_cols": tf.int64,
    "rle": tf.string,
}
# Seed-stream tags, so the validation patches never repeat a training batch's draws.
_TRAIN_STREAM, _VALIDATION_STREAM, _KIND_STREAM = 0, 1, 2


@functools.lru_cache(maxsize=8)
def _load(annotation_file: str, image_dir: str, on_bad_annotation: str, version: tuple) -> CocoDataset:
    del version  # part of the cache key only: a rewritten file or changed folder is loaded again
    return CocoDataset(annotation_file, image_dir, on_bad_annotation=on_bad_annotation)


def _version(path: str) -> tuple[int, int]:
    """What changes when a file is rewritten or a folder's entries change: (mtime ns, size)."""
    try:
        stat = os.stat(path)
    except OSError:
        return (-1, -1)
    return (stat.st_mtime_ns, stat.st_size)


def load_split(config: Config, split: str) -> CocoDataset:
    """The validated `CocoDataset` of a split, loaded once per process and files: loaded again
    when the annotation file is rewritten or the image folder gains, loses or renames a file.

    Raises:
        ValueError: for a split other than "train" or "val".
        DatasetError: for a missing or malformed dataset.
    """
    annotations, images = _split_files(config, split)
    return _load(annotations, images, config.data.on_bad_annotation, (_version(annotations), _version(images)))


@functools.lru_cache(maxsize=4)  # a COCO-train-sized split holds ~0.4 GB
def _load_packed(annotation_file: str, image_dir: str, on_bad_annotation: str, version: tuple) -> PackedSplit:
    del version  # part of the cache key only, as in _load
    return load_packed(annotation_file, image_dir, on_bad_annotation)


def _split_files(config: Config, split: str) -> tuple[str, str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}. Received: split={split!r}")
    d = config.data
    return (d.train_annotations, d.train_images) if split == "train" else (d.val_annotations, d.val_images)


def load_packed_split(config: Config, split: str) -> PackedSplit:
    """The `PackedSplit` of a split, once per process and files (see `load_split`), from the disk
    cache of `packed.load_packed` when that is current.

    Raises:
        ValueError: for a split other than "train" or "val".
        DatasetError: for a missing or malformed dataset.
    """
    annotations, images = _split_files(config, split)
    version = (_version(annotations), _version(images))
    return _load_packed(annotations, images, config.data.on_bad_annotation, version)


@functools.lru_cache(maxsize=8)
def patch_planner(dataset: PackedSplit, data: DataConfig, model: ModelConfig, inference: InferenceConfig, stage: int):
    """One sampler and planner per dataset and sampling config: indexing a COCO-sized split
    takes seconds, and the planner remembers which images it has checked."""
    config = Config(model=model, data=data, inference=inference)
    return PatchPlanner(PatchSampler.from_config(dataset, config, stage))


def draw_plan(planner: PatchPlanner, rng: np.random.Generator, kind: str, batch: int, k: int) -> dict[str, np.ndarray]:
    """One batch's windows as a rendering plan plus their scores and weights, (G, K, ...) arrays."""
    windows = planner.sampler.draw_windows(rng, kind, batch, k, planner.usable)
    plan = planner.plan(windows, k, with_labels=kind == "mask")
    scores = np.array([1.0 if w.annotation_id is not None else -1.0 for w in windows], np.float32)
    plan["scores"] = scores.reshape(batch // k, k, 1)
    plan["mask_weight"] = np.full((batch // k, k), kind == "mask", np.float32)
    plan["score_weight"] = np.full((batch // k, k), kind == "score", np.float32)
    return plan


def _render(groups: tf.data.Dataset, planner: PatchPlanner, parallel: int, groups_per_batch: int) -> tf.data.Dataset:
    """Planned groups to batches of `groups_per_batch` groups' patches with their scores and
    weights: each group's image decoded once, `parallel` groups at a time (`render.render`)."""
    size, label = planner.sampler.input_size, planner.sampler.label_size
    keep = ("scores", "mask_weight", "score_weight")
    return render(groups, tf.constant(planner.paths), size, label, groups_per_batch, parallel, keep)


def _spread_batches(
    planner: PatchPlanner,
    share: _Share,
    seed: int,
    stage: int,
    score_frequency: float,
    k: int,
    mask_only: int,
    parallel: int,
) -> tf.data.Dataset:
    """The endless stream of `make_dataset` with `data.spread_patches`: the k windows of each
    decoded image go to k consecutive steps' batches of their kind.

    Each kind has its own stream of rounds. A round draws local_replicas * batch groups of k
    windows (one image each) and deals them out as k steps' worth of batches: step j of the round
    takes every group's j-th window, replica r the groups [r * batch, (r + 1) * batch). So every
    batch, and every step's batches together, hold one window per group, each group drawn on its
    own as each window is with one window per image. The batch kinds follow `_kind` step by step,
    as without spreading.
    """
    replicas, batch, label = share.local_replicas, share.batch, planner.sampler.label_size
    groups = replicas * batch

    def kind_stream(kind: str, tag: int) -> tf.data.Dataset:
        def draw(index: np.ndarray) -> dict[str, np.ndarray]:
            rng = np.random.default_rng([seed, _TRAIN_STREAM, share.pipeline, stage, tag, int(index)])
            return draw_plan(planner, rng, kind, groups * k, k)

        plans = tf.data.Dataset.counter().map(
            _plan_function(draw, groups * k, k, label), num_parallel_calls=parallel, deterministic=True
        )

        def deal(round_: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
            # (replicas * batch * k, ...) group by group -> (k * replicas, batch, ...) step by step.
            def one(x: tf.Tensor) -> tf.Tensor:
                x = tf.reshape(x, (replicas, batch, k, *x.shape[1:]))
                x = tf.transpose(x, (2, 0, 1, *range(3, len(x.shape))))
                return tf.reshape(x, (k * replicas, batch, *x.shape[3:]))

            return {key: one(value) for key, value in round_.items()}

        rounds = _render(plans.unbatch(), planner, parallel, groups)
        return rounds.map(deal).unbatch()

    def choice(index: tf.Tensor) -> tf.Tensor:
        def pick(i: np.ndarray) -> np.ndarray:
            kind = _kind(seed, stage, int(i) // replicas, score_frequency, mask_only)
            return np.int64(kind == "score")

        return tf.ensure_shape(tf.numpy_function(pick, [index], tf.int64, stateful=False), ())

    streams = [kind_stream("mask", 0)]
    if score_frequency > 0:
        streams.append(kind_stream("score", 1))
    choices = tf.data.Dataset.counter().map(choice)
    return tf.data.Dataset.choose_from_datasets(streams, choices)


class _Share(NamedTuple):
    """An input pipeline's part of the global batches."""

    pipeline: int  # this pipeline's id
    pipelines: int  # input pipelines in all
    batch: int  # the batch this pipeline makes (a replica's)
    local_replicas: int  # replicas this pipeline feeds, in turn


def _share(global_batch: int, input_context: tf.distribute.InputContext | None, patches_per_image: int) -> _Share:
    if global_batch < 1:
        raise ValueError(f"batch_size must be positive. Received: batch_size={global_batch!r}")
    share = _Share(0, 1, global_batch, 1)
    if input_context is not None:
        pipelines = input_context.num_input_pipelines
        share = _Share(
            input_context.input_pipeline_id,
            pipelines,
            input_context.get_per_replica_batch_size(global_batch),
            input_context.num_replicas_in_sync // pipelines,
        )
    if patches_per_image < 1 or share.batch % patches_per_image:
        raise ValueError(
            "The batch must be a positive multiple of patches_per_image. "
            f"Received: batch={share.batch!r}, patches_per_image={patches_per_image!r}"
        )
    return share


def _plans(
    planner: PatchPlanner, share: _Share, seed: int, stage: int, score_frequency: float, k: int, mask_only: int
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """The map from a batch index to its rendering plan (`draw_plan`), as a tf.data function; the
    stream's first `mask_only` steps are mask batches."""

    def draw(index: np.ndarray) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([seed, _TRAIN_STREAM, share.pipeline, stage, int(index)])
        kind = _kind(seed, stage, int(index) // share.local_replicas, score_frequency, mask_only)
        return draw_plan(planner, rng, kind, share.batch, k)

    return _plan_function(draw, share.batch, k, planner.sampler.label_size)


def _kind(seed: int, stage: int, step: int, score_frequency: float, mask_only: int) -> str:
    """The kind of a stream's global step, the same on every replica: a pipeline hands its
    batches to its local replicas in turn, so its batch i belongs to step i // local replicas."""
    coin = np.random.default_rng([seed, _KIND_STREAM, stage, step]).random()
    return "score" if coin < score_frequency and step >= mask_only else "mask"


def _plan_function(
    draw: Callable[[np.ndarray], dict[str, np.ndarray]], windows: int, k: int, label: int
) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """`draw` (a batch index to the `draw_plan` plan of `windows` windows in groups of k) as a
    tf.data function."""
    shapes = {key: (windows // k, *shape(k, label)) for key, shape in _PLAN_SHAPES.items()}
    types = [_PLAN_TYPES.get(key, tf.float32) for key in _PLAN_SHAPES]

    def arrays(index: np.ndarray) -> list[np.ndarray]:
        plan = draw(index)
        return [plan[key] for key in _PLAN_SHAPES]

    def to_plan(index: tf.Tensor) -> dict[str, tf.Tensor]:
        tensors = tf.numpy_function(arrays, [index], types, stateful=False)
        return {key: tf.ensure_shape(t, shapes[key]) for key, t in zip(_PLAN_SHAPES, tensors)}

    return to_plan


def make_dataset(
    config: Config,
    split: str = "train",
    stage: int = 1,
    batch_size: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    seed: int | None = None,
    repeat: bool = True,
    patches_per_image: int | None = None,
    first_step: int = 0,
) -> tf.data.Dataset:
    """Batches of training patches, sampled fresh for every batch (SPEC.md section 3).

    In stage 1 each global batch is all score samples with probability `data.score_frequency`,
    else all mask samples, on every replica alike, except that training steps before
    `data.mask_only_steps` are all mask samples; stage 2 batches are mask samples. Batch i of
    input pipeline p is a pure function of (seed, p, stage, i), so the stream is deterministic and
    every pipeline's stream is distinct.
    The windows are drawn in Python (`PatchSampler.draw_windows`, cheap); the images are decoded
    by TensorFlow ops and the patches cut by OpenCV and labelled in NumPy (`render.render`),
    `data.num_parallel_calls` images (and batches) at a time on every core, and prefetched. The trainer records how long its steps wait for
    this stream (`summaries.InputWait`).

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
        patches_per_image: windows cut from each decoded image (see `PatchSampler.draw_windows`:
            each window's distribution is unchanged, windows of one image are dependent); None is
            `data.patches_per_image`, 1 the paper's sampling. The (per-replica) batch must be a
            multiple of it. With `data.spread_patches` (and `repeat`) an image's windows go to
            that many consecutive steps' batches of their kind instead of one batch, so that a
            batch holds one window per group as with 1 (`_spread_batches`); batch i is then a
            pure function of (seed, p, stage, i) too.
        first_step: the training step of the stream's first global batch (a resumed stage's
            step), against which `data.mask_only_steps` counts.

    Returns:
        A dataset of dicts: `images` (B, S, S, 3) float32 RGB in [0, 1] with S = model.input_size;
        `masks` (B, L, L) float32 in {+1, -1}; `scores` (B, 1) float32 in {+1, -1};
        `mask_weight` and `score_weight` (B,) float32.

    Raises:
        ValueError: for a bad split, stage, batch size or patches_per_image.
        DatasetError: for a missing or malformed dataset.
    """
    planner = patch_planner(load_packed_split(config, split), config.data, config.model, config.inference, stage)
    k = config.data.patches_per_image if patches_per_image is None else patches_per_image
    share = _share(config.training.batch_size if batch_size is None else batch_size, input_context, k)
    seed = config.data.seed if seed is None else seed
    mask_only = max(0, config.data.mask_only_steps - first_step)
    frequency = config.data.score_frequency if stage == 1 else 0.0
    parallel = tf.data.AUTOTUNE if config.data.num_parallel_calls == -1 else config.data.num_parallel_calls
    if repeat and config.data.spread_patches and k > 1:
        dataset = _spread_batches(planner, share, seed, stage, frequency, k, mask_only, parallel)
        return dataset.apply(tf.data.experimental.assert_cardinality(tf.data.INFINITE_CARDINALITY)).prefetch(
            tf.data.AUTOTUNE
        )
    to_plan = _plans(planner, share, seed, stage, frequency, k, mask_only)
    if repeat:
        count, indices = tf.data.INFINITE_CARDINALITY, tf.data.Dataset.counter()
    else:
        count = max(1, len(planner.sampler.positives) // (share.batch * share.pipelines))
        indices = tf.data.Dataset.range(count)
    groups = indices.map(to_plan, num_parallel_calls=parallel, deterministic=True).unbatch()
    dataset = _render(groups, planner, parallel, share.batch // k)
    return dataset.apply(tf.data.experimental.assert_cardinality(count)).prefetch(tf.data.AUTOTUNE)


def make_validation_patches(config: Config, num_patches: int, stage: int, seed: int) -> dict[str, np.ndarray]:
    """A fixed set of jittered mask samples from the val split, for per-patch IoU, cut as
    `make_dataset` cuts them.

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
    planner = patch_planner(load_packed_split(config, "val"), config.data, config.model, config.inference, stage)
    plan = draw_plan(planner, np.random.default_rng([seed, _VALIDATION_STREAM, stage]), "mask", num_patches, 1)
    patches = _render(tf.data.Dataset.from_tensor_slices(plan), planner, tf.data.AUTOTUNE, num_patches)
    return {key: value.numpy() for key, value in patches.get_single_element().items()}
