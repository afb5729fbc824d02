"""Configuration: frozen dataclasses, named presets, JSON round trip and overrides.

Every number of the method lives here (see SPEC.md). The reference Torch release's option name
stands beside ours where it had one.

This file is over 400 lines because it is one validated schema: each section's fields, their
checks (`__post_init__`), the presets made of them and the JSON / `--set` round trip that reads
them back change together, and one file keeps each field, its default and its check in one place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PADDING_MODES = ("reflect", "symmetric", "zero")
UPSAMPLING_MODES = ("bilinear", "nearest")
# The refinement's vertical nets: the paper's one linear 3x3 conv per module (Fig. 7b), or
# SharpMask.lua's two (3x3 n -> n, ReLU, 3x3 n -> n/2).
REFINEMENT_LAYOUTS = ("paper", "reference")
ON_BAD_ANNOTATION = ("error", "skip")
# Trunk flavours (sharpmask_tf.backbone.FLAVOURS): each fixes the ResNet-50 layout, the input
# transform and the weights format of one family of pretrained weights.
TRUNK_FLAVOURS = ("keras", "torch", "reference", "deepmask_pytorch")
# Where SharpMask cuts a patch's window out of the skip path: after the horizontal nets (they run
# on whole maps, so full-image inference shares them across windows) or before them (SharpMask.lua's
# training net, whose nets then pad at the window's edge).
SKIP_CROPS = ("after", "before")

# The trunk's four feature taps and their strides, finest first (conv1 .. conv4 of ResNet).
TAP_STRIDES = {"conv1": 2, "conv2": 4, "conv3": 8, "conv4": 16}
# The trunk's total stride, that of its deepest tap: windows and the head step by it.
TRUNK_STRIDE = TAP_STRIDES["conv4"]
# The resolved configuration a training run (or a conversion) writes beside its models.
CONFIG_FILE = "config.json"
# A served model's name: a directory under the export base path and a URL path segment of TF
# Serving's REST API, so no '/', no '..' and no hidden staging names.
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _fail(section: str, name: str, value: Any, why: str) -> None:
    raise ValueError(f"{section}.{name} {why}. Received: {name}={value!r}")


def refine_channels(refine_k: int) -> tuple[int, ...]:
    """Mask channels entering R1..R4 and leaving R4: k, k/2, k/4, k/8, k/16.

    Raises:
        ValueError: if refine_k is not a positive multiple of 16.
    """
    modules = len(TAP_STRIDES)  # one refinement module per tap, each halving the channels
    if refine_k < 2**modules or refine_k % 2**modules:
        _fail("model", "refine_k", refine_k, f"must be a positive multiple of {2**modules}")
    return tuple(refine_k // 2**i for i in range(modules + 1))


@dataclass(frozen=True)
class ModelConfig:
    """The network: ResNet trunk, head C and the refinement modules."""

    patch_size: int = 160  # iSz: side of the window the mask covers
    context: int = 16  # extra context on every side; the network sees patch_size + 2*context
    trunk_blocks: tuple[int, int, int] = (3, 4, 6)  # residual blocks in conv2_x, conv3_x, conv4_x
    trunk_width: int = 64  # conv1 filters; every stage scales from it as in ResNet-50
    padding: str = "reflect"  # padding of every 3x3/7x7 trunk conv: reflect | symmetric | zero
    # keras: Keras ResNet50's layout | torch: torchvision's ResNet-50's | reference: the authors'
    # resnet-50.t7 | deepmask_pytorch: the PyTorch port's (see backbone.FLAVOURS)
    trunk_flavour: str = "keras"
    # None (from scratch); keras flavour: "imagenet" or a Keras ResNet50 weights file (.h5);
    # torch flavour: a torchvision ResNet-50 state-dict file (.pth); reference / deepmask_pytorch:
    # the trunk.weights.h5 that `python -m sharpmask_tf.convert` writes
    trunk_weights: str | None = None
    head_channels: int = 128  # the "F128" 1x1 reduction of conv4 features
    object_dim: int = 512  # the object vector
    mask_size: int = 56  # oSz: coarse mask logits side
    score_hidden: int = 1024  # hidden units of the score branch
    dropout: float = 0.5  # score branch dropout
    # factor on the score loss's gradient entering the object vector (head and trunk); 1 is the
    # paper's joint training, 0 the score branch alone on the features the masks shape
    score_gradient: float = 1.0
    refinement: bool = True  # SharpMask (True) or DeepMask only (False)
    refine_k: int = 32  # k: mask channels entering R1, halved by every module
    refine_skip_hidden: int = 64  # horizontal nets' first conv width (R1..R3)
    refine_skip_hidden_last: int = 32  # horizontal net's first conv width at the finest stage (R4)
    upsampling: str = "bilinear"  # refinement upsampling; the reference used nearest
    refinement_layout: str = "paper"  # vertical nets: paper (one linear conv) | reference (SharpMask.lua's two)
    skip_crop: str = "after"  # window cut after the horizontal nets | before them (SharpMask.lua's patch net)

    def __post_init__(self) -> None:
        s = "model"
        if self.patch_size <= 0 or self.patch_size % TRUNK_STRIDE:
            _fail(s, "patch_size", self.patch_size, f"must be a positive multiple of {TRUNK_STRIDE}")
        if self.context < 0 or self.context % TRUNK_STRIDE:
            _fail(s, "context", self.context, f"must be a non-negative multiple of {TRUNK_STRIDE}")
        if len(self.trunk_blocks) != 3 or any(int(b) < 1 for b in self.trunk_blocks):
            _fail(s, "trunk_blocks", self.trunk_blocks, "must be three positive block counts")
        if self.trunk_width < 1:
            _fail(s, "trunk_width", self.trunk_width, "must be positive")
        if not 0.0 <= self.score_gradient <= 1.0:
            _fail(s, "score_gradient", self.score_gradient, "must be in [0, 1]")
        if self.padding not in PADDING_MODES:
            _fail(s, "padding", self.padding, f"must be one of {PADDING_MODES}")
        if self.trunk_flavour not in TRUNK_FLAVOURS:
            _fail(s, "trunk_flavour", self.trunk_flavour, f"must be one of {TRUNK_FLAVOURS}")
        if self.trunk_weights == "imagenet" and self.trunk_flavour != "keras":
            _fail(
                s,
                "trunk_weights",
                self.trunk_weights,
                f"downloads Keras' ResNet50 weights, which need model.trunk_flavour='keras' (it is "
                f"{self.trunk_flavour!r}; give the path of a torchvision ResNet-50 .pth file instead)",
            )
        if self.trunk_weights == "":
            _fail(s, "trunk_weights", self.trunk_weights, "must be null, 'imagenet' or a weights file's path")
        for name in ("head_channels", "object_dim", "mask_size", "score_hidden"):
            if getattr(self, name) < 1:
                _fail(s, name, getattr(self, name), "must be positive")
        if not 0.0 <= self.dropout < 1.0:
            _fail(s, "dropout", self.dropout, "must be in [0, 1)")
        refine_channels(self.refine_k)
        for name in ("refine_skip_hidden", "refine_skip_hidden_last"):
            if getattr(self, name) < 1:
                _fail(s, name, getattr(self, name), "must be positive")
        if self.upsampling not in UPSAMPLING_MODES:
            _fail(s, "upsampling", self.upsampling, f"must be one of {UPSAMPLING_MODES}")
        if self.refinement_layout not in REFINEMENT_LAYOUTS:
            _fail(s, "refinement_layout", self.refinement_layout, f"must be one of {REFINEMENT_LAYOUTS}")
        if self.skip_crop not in SKIP_CROPS:
            _fail(s, "skip_crop", self.skip_crop, f"must be one of {SKIP_CROPS}")
        object.__setattr__(self, "trunk_blocks", tuple(int(b) for b in self.trunk_blocks))

    @property
    def input_size(self) -> int:
        """Side of the context-padded patch the network sees (192 for the paper)."""
        return self.patch_size + 2 * self.context

    @property
    def pretrained_trunk(self) -> bool:
        """Whether the trunk starts from pretrained weights: then its BatchNorm is frozen, as the
        paper's, and its input is what the weights were trained on; a trunk trained from scratch
        normalises with batch statistics in stage 1 and takes ImageNet mean/std RGB."""
        return self.trunk_weights is not None

    @property
    def feature_size(self) -> int:
        """Side of the conv4 features over the window (10 for the paper)."""
        return self.patch_size // TRUNK_STRIDE

    @property
    def refine_channels(self) -> tuple[int, ...]:
        """Mask channels entering R1..R4 and leaving R4: k, k/2, k/4, k/8, k/16."""
        return refine_channels(self.refine_k)


@dataclass(frozen=True)
class DataConfig:
    """Datasets and the patch sampler (SPEC.md section 3)."""

    train_annotations: str = "data/synthetic/annotations/instances_train.json"
    train_images: str = "data/synthetic/train"
    val_annotations: str = "data/synthetic/annotations/instances_val.json"
    val_images: str = "data/synthetic/val"
    label_size: int = 112  # gSz: stage-1 label side; stage 2 uses the patch size
    object_fraction: float = 128 / 224  # canonical object longest side / patch_size
    scale_jitter: float = 0.25  # scale: log2 range of positive scale jitter
    shift_jitter: float = 16.0  # shift: max centre jitter of positives, in px
    negative_shift: float = 32.0  # negatives are at least this far (px) from every object ...
    negative_scale: float = 1.0  # ... or this far in log2 scale from its canonical size
    score_frequency: float = 0.5  # hfreq: probability that a stage-1 batch is score samples
    mask_only_steps: int = 0  # stage 1's first steps are all mask batches; 0 alternates from the start
    flip_probability: float = 0.5  # horizontal flip
    min_area: float = 100.0  # objects smaller than this (px^2) are not sampled
    min_side: float = 5.0  # objects whose box side is under this are not sampled
    on_bad_annotation: str = "skip"  # "error" raises; "skip" counts, logs and drops
    num_parallel_calls: int = -1  # tf.data parallelism; -1 is AUTOTUNE
    patches_per_image: int = 1  # windows cut per decoded image; 1 is the paper's (README, Data)
    spread_patches: bool = False  # an image's windows go to consecutive batches, not one (README, Data)
    seed: int = 0  # sampler seed

    def __post_init__(self) -> None:
        s = "data"
        if self.label_size < 1:
            _fail(s, "label_size", self.label_size, "must be positive")
        if not 0.0 < self.object_fraction <= 1.0:
            _fail(s, "object_fraction", self.object_fraction, "must be in (0, 1]")
        for name in ("scale_jitter", "shift_jitter", "negative_shift", "negative_scale"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be non-negative")
        for name in ("score_frequency", "flip_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                _fail(s, name, getattr(self, name), "must be a probability in [0, 1]")
        if self.on_bad_annotation not in ON_BAD_ANNOTATION:
            _fail(s, "on_bad_annotation", self.on_bad_annotation, f"must be one of {ON_BAD_ANNOTATION}")
        if self.num_parallel_calls == 0 or self.num_parallel_calls < -1:
            _fail(s, "num_parallel_calls", self.num_parallel_calls, "must be -1 (AUTOTUNE) or positive")
        if self.patches_per_image < 1:
            _fail(s, "patches_per_image", self.patches_per_image, "must be positive")
        if self.mask_only_steps < 0:
            _fail(s, "mask_only_steps", self.mask_only_steps, "must be non-negative")


# The optimizers a stage can train with.
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class TrainingConfig:
    """The two-stage schedule (SPEC.md section 3), in the reference's `train.lua` options.

    The objective is the paper's sum over the global batch: each mask sample adds its mean
    per-pixel loss, each score sample `score_weight` times its score loss. At the reference's
    batch of 32 and weight 1/32 that is exactly its objective (mask gradients multiplied by the
    batch, score loss averaged over the batch), so its learning rates apply unchanged; with
    another global batch the same rates keep each sample's step.
    """

    batch_size: int = 32  # batch: global batch, split across replicas
    epoch_steps: int = 4000  # maxload: batches per epoch, the unit of the lr steps below
    stage1_steps: int = 300 * 4000  # maxepoch x maxload: DeepMask steps
    stage2_steps: int = 300 * 4000  # maxepoch x maxload: refinement steps (train.lua's default)
    learning_rate: float = 1e-3  # updateScheduler's first regime (lr=0 selects the schedule)
    lr_decay_rates: tuple[float, ...] = (5e-4, 1e-4)  # its later regimes: 1e-3 -> 5e-4 -> 1e-4 ...
    lr_decay_epochs: tuple[float, ...] = (50, 120)  # ... after these epochs (regimes 1-50, 51-120, 121-)
    optimizer: str = "sgd"  # "sgd": the reference's optim.sgd (momentum in stage 1); "adam": Adam in both stages
    momentum: float = 0.9  # momentum (stage 1, SGD)
    weight_decay: float = 5e-4  # wd: L2 decay joining the gradient before momentum (stage 1)
    score_weight: float = 1 / 32  # the paper's lambda; the reference's 1/batch of a batch mean
    stage2_learning_rate: float = 1e-3  # TrainerSharpMask's first regime; plain SGD, refinement only
    stage2_lr_decay_rates: tuple[float, ...] = (5e-4, 1e-4)  # its later regimes ...
    stage2_lr_decay_epochs: tuple[float, ...] = (50, 80)  # ... after these epochs (1-50, 51-80, 81-)
    checkpoint_every: int = 500  # steps between checkpoints
    validate_every: int = 1000  # steps between validations
    val_patches: int = 256  # held-out jittered patches per validation
    val_seed: int = 0  # their seed, apart from `seed`: runs of every seed are scored on the same patches
    log_every: int = 50  # steps between TensorBoard scalars
    mixed_precision: bool = False  # mixed_float16 compute, float32 variables
    jit: bool = False  # XLA-compile the train step
    seed: int = 0  # seed

    def __post_init__(self) -> None:
        s = "training"
        for name in ("batch_size", "epoch_steps", "checkpoint_every", "validate_every", "val_patches", "log_every"):
            if getattr(self, name) < 1:
                _fail(s, name, getattr(self, name), "must be positive")
        for name in ("stage1_steps", "stage2_steps"):
            if getattr(self, name) < 0:
                _fail(s, name, getattr(self, name), "must be non-negative")
        for name in ("learning_rate", "stage2_learning_rate"):
            if getattr(self, name) <= 0:
                _fail(s, name, getattr(self, name), "must be positive")
        for rates, epochs in (
            ("lr_decay_rates", "lr_decay_epochs"),
            ("stage2_lr_decay_rates", "stage2_lr_decay_epochs"),
        ):
            if len(getattr(self, rates)) != len(getattr(self, epochs)):
                _fail(s, epochs, getattr(self, epochs), f"must have one epoch per {rates} entry")
            at = list(getattr(self, epochs))
            if any(b <= a for a, b in zip(at, at[1:])) or any(e <= 0 for e in at):
                _fail(s, epochs, getattr(self, epochs), "must be increasing positive epochs")
            if any(r <= 0 for r in getattr(self, rates)):
                _fail(s, rates, getattr(self, rates), "must be positive")
            object.__setattr__(self, rates, tuple(float(r) for r in getattr(self, rates)))
            object.__setattr__(self, epochs, tuple(float(e) for e in getattr(self, epochs)))
        if self.optimizer not in OPTIMIZERS:
            _fail(s, "optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        if not 0 <= self.momentum < 1:
            _fail(s, "momentum", self.momentum, "must be in [0, 1)")
        if self.weight_decay < 0 or self.score_weight < 0:
            _fail(s, "weight_decay", (self.weight_decay, self.score_weight), "and score_weight must be >= 0")


# Dtypes full-image inference can run its per-scale network in (None: the model's own).
COMPUTE_DTYPES = (None, "bfloat16", "float16")


@dataclass(frozen=True)
class InferenceConfig:
    """Full-image proposals (SPEC.md section 4)."""

    scale_min: float = -2.5  # log2 of the smallest pyramid scale
    scale_max: float = 0.5  # log2 of the largest pyramid scale
    scale_step: float = 0.5  # log2 step between scales
    top_n: int = 500  # proposals kept
    mask_threshold: float = 0.2  # binarisation threshold on mask probability
    max_side: int = 1024  # images are downscaled so their longest side is at most this
    nms_threshold: float | None = None  # mask-IoU NMS threshold; None (the paper) is off
    crop_size: int = 56  # side of the fixed-size mask crops returned beside boxes
    compute_dtype: str | None = None  # None: the model's dtype; "bfloat16"/"float16": the per-scale network's

    def __post_init__(self) -> None:
        s = "inference"
        if self.scale_step <= 0:
            _fail(s, "scale_step", self.scale_step, "must be positive")
        if self.scale_max < self.scale_min:
            _fail(s, "scale_max", self.scale_max, f"must be >= scale_min={self.scale_min}")
        for name in ("top_n", "max_side", "crop_size"):
            if getattr(self, name) < 1:
                _fail(s, name, getattr(self, name), "must be positive")
        if not 0.0 < self.mask_threshold < 1.0:
            _fail(s, "mask_threshold", self.mask_threshold, "must be in (0, 1)")
        if self.nms_threshold is not None and not 0.0 < self.nms_threshold <= 1.0:
            _fail(s, "nms_threshold", self.nms_threshold, "must be None or in (0, 1]")
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail(s, "compute_dtype", self.compute_dtype, f"must be one of {COMPUTE_DTYPES}")

    @property
    def scales(self) -> tuple[float, ...]:
        """The pyramid's scale factors, smallest first."""
        n = int(math.floor((self.scale_max - self.scale_min) / self.scale_step + 1e-6)) + 1
        return tuple(2.0 ** (self.scale_min + i * self.scale_step) for i in range(n))


@dataclass(frozen=True)
class ExportConfig:
    """SavedModel export for TensorFlow Serving."""

    model_name: str = "sharpmask"  # the <model_name> directory under the base path
    base_path: str = "exports"  # <base_path>/<model_name>/<version>/
    version: int = 0  # 0 picks the next free version number
    top_n: int = 100  # proposals returned per image by the serving signature
    warmup_requests: int = 1  # requests written to assets.extra/tf_serving_warmup_requests

    def __post_init__(self) -> None:
        s = "export"
        if not isinstance(self.model_name, str) or not MODEL_NAME_PATTERN.fullmatch(self.model_name):
            _fail(
                s,
                "model_name",
                self.model_name,
                "must be letters, digits, '.', '_' or '-', starting with a letter or digit",
            )
        if self.version < 0:
            _fail(s, "version", self.version, "must be >= 0")
        if self.top_n < 1:
            _fail(s, "top_n", self.top_n, "must be positive")
        if self.warmup_requests < 0:
            _fail(s, "warmup_requests", self.warmup_requests, "must be >= 0")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "inference": InferenceConfig,
    "export": ExportConfig,
}


@dataclass(frozen=True)
class Config:
    """The whole configuration, one frozen section per concern."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        unknown = set(d) - set(SECTIONS)
        if unknown:
            raise ValueError(f"Unknown config sections {sorted(unknown)}; expected {list(SECTIONS)}")
        sections = {}
        for name, section_cls in SECTIONS.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in dataclasses.fields(section_cls)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"Unknown fields in config section '{name}': {sorted(bad)}")
            hints = typing.get_type_hints(section_cls)
            sections[name] = section_cls(**{k: _coerce(hints[k], v, f"{name}.{k}") for k, v in values.items()})
        return cls(**sections)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return cls.from_dict(json.loads(text))

    def override(self, assignments: list[str] | tuple[str, ...]) -> Config:
        """Returns a copy with `section.field=value` assignments applied (values parsed as JSON,
        else taken as strings)."""
        d = self.to_dict()
        for item in assignments:
            key, sep, raw = item.partition("=")
            section, dot, name = key.strip().partition(".")
            if not sep or not dot:
                raise ValueError(f"An override must look like section.field=value. Received: {item!r}")
            if section not in SECTIONS:
                raise ValueError(f"Unknown config section {section!r} in override. Received: {item!r}")
            if name not in d[section]:
                raise ValueError(f"Unknown field {name!r} in config section {section!r}. Received: {item!r}")
            try:
                value = json.loads(raw)
            except json.JSONDecodeError:
                value = raw
            d[section][name] = value
        return Config.from_dict(d)


def load_run_config(path: str | os.PathLike) -> Config | None:
    """The `config.json` inside a run directory, or beside a `.keras` file; None if there is none.

    Raises:
        ValueError: naming the file when it is not a valid configuration.
    """
    path = Path(path)
    config_json = (path if path.is_dir() else path.parent) / CONFIG_FILE
    if not config_json.is_file():
        return None
    try:
        return Config.from_json(config_json.read_text())
    except (ValueError, TypeError) as err:
        raise ValueError(f"{config_json} is not a valid sharpmask_tf configuration: {err}") from err


def _coerce(hint: Any, value: Any, where: str) -> Any:
    """Turns a JSON value into the field's declared type, or raises a ValueError naming it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} must be a list. Received: {where.split('.')[-1]}={value!r}")
        elem = args[0]
        return tuple(_coerce(elem, v, where) for v in value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false. Received: {where.split('.')[-1]}={value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ValueError(f"{where} must be an integer. Received: {where.split('.')[-1]}={value!r}")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where} must be a number. Received: {where.split('.')[-1]}={value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string. Received: {where.split('.')[-1]}={value!r}")
        return value
    return value


def _small() -> Config:
    """The CPU preset: the same four taps and strides as ResNet-50 with one block per stage,
    a quarter of the width, a 64 px window (96 px patches) and a narrow head."""
    return Config(
        model=ModelConfig(
            patch_size=64,
            context=16,
            trunk_blocks=(1, 1, 1),
            trunk_width=16,
            head_channels=32,
            object_dim=128,
            mask_size=32,
            score_hidden=128,
            # k = 128 (2026-12-02): at 16 (and the paper's 32) the modules' last maps carry 1 and 2
            # channels, and the refined masks were about as blurred as labels rebuilt from an
            # eighth of their side (validation patch IoU 0.581 against that oracle's 0.539; a
            # quarter's gives 0.796). Stage 2 alone, 1000 steps from the same stage 1 (128
            # validation patches, mean IoU / share over IoU .7): k=16 0.581 / 42%, 32 0.576 / 43%,
            # 64 0.601 / 51%, 128 0.629 / 55%, 256 0.641 / 59% (0.643 / 58% with skip widths
            # 128 / 64). A stage-2 step at 128 takes 2.2 times one at 16 (bench_train: 170 against
            # 367 patches/s; 1.5-1.7 times in the demo's loop), at 256 1.4-2 times one at 128. A
            # wider trunk (24) gave 0.546, training the trunk too in stage 2 0.567, a 3000-step
            # stage 2 at k=16 0.587. The horizontal nets' first convs: 64 (R1..R3) and 32 (R4).
            refine_k=128,
            refine_skip_hidden=64,
            refine_skip_hidden_last=32,
            # The windows are cut before the horizontal nets in training (2026-12-02, evening), as
            # SharpMask.lua's patch net cuts them; full-image inference runs the nets on whole
            # maps either way. Stage 2 alone from the seed-0 stage 1 (512 validation patches):
            # mean IoU 0.563 / 0.603 at steps 500 / 1000 against 0.564 / 0.605 cut after them,
            # in about three quarters of the time (1000 steps in about 195 s against 255 s).
            skip_crop="before",
            # The score's gradient enters the shared object vector and trunk at a tenth
            # (2026-12-01): at the paper's full gradient the score fought the masks for the
            # trunk (1000 mixed steps: training mask loss 0.227 against 0.185 with the score's
            # gradient stopped there). With 0.1 stage 1 reached patch IoU 0.414 and scored 90.6% of
            # the validation objects positive against 0.346 / 86.7% at 1.0 (README: before 6f87dd1
            # that was all "score accuracy" measured), and DeepMask segm AR@100 17.3 against 11.7
            # on the demo's 30 images; with 0 only 61% (AR@100 15.8).
            score_gradient=0.1,
        ),
        # The first 1000 of stage 1's steps are mask batches only (2026-12-01): interleaved with
        # score batches from the start, the coarse masks barely learned (training mask loss 0.227
        # at steps 800-1000 against 0.167 with mask batches only; README, Results).
        data=DataConfig(label_size=48, shift_jitter=6.4, negative_shift=12.8, mask_only_steps=1000),
        training=TrainingConfig(
            # Adam in both stages (2026-12-01, measured on the synthetic data, 50 val images; the
            # README's "Results (the demo's run)" has the table). With SGD at the summed objective's
            # rates (the batch-mean rates 0.02 / 0.01 / 0.002 divided by the batch of 16) the score
            # did not learn: 52% accuracy after 1000 steps, 55% after 3000, every served score 0.50,
            # and the top-N windows taken in index order along the images' top borders. Adam at
            # 1e-3 reached 75% after 1000 steps (SGD: 52%) and a patch IoU of 0.29 after 500 (SGD:
            # 0.16 after 500, 0.23 after 1000), 84% after 2000; at 3e-4 it learned more slowly
            # (77% / 0.28). With 3000 + 3000 steps (rates 1e-3 -> 3e-4 -> 1e-4 after 70% and 90%
            # of stage 1, stage 2 1e-3 -> 3e-4 after 2500 steps) the whole demo reached score
            # accuracy 87%, patch IoU 0.33 coarse / 0.53 refined, SharpMask segm AR@100 19.2 (SGD:
            # 2.9). The stage-1 model kept is step 3000's (after both decays, 87% score accuracy;
            # it ties step 1500's share over IoU .7). A 2000-step stage 1 kept step 1500's (77%):
            # with a 2500-step stage 2 after it, DeepMask AR@100 fell to 5.8 and SharpMask's to
            # 15.6 on the same 50 images. At refine_k=16 stage 2 stopped at 1000 steps at 1e-3:
            # with the score gradient at 0.1, a 2000-step stage 2 (1e-3, then 3e-4 after step
            # 1500) kept step 1000's model (validation share over IoU .7 0.438 against 0.422 at
            # 1500 and 2000), and the 1000 steps after it cost `make demo` about 2 of its 15
            # minutes. With refine_k=128
            # stage 2 goes on learning: 2000 steps, 3e-4 after step 1500, reached validation mean
            # IoU 0.629 / 0.654 / 0.651 at steps 1000 / 1500 / 2000 (share over .7 56% / 54% / 57%,
            # step 2000's kept), about 100 s more of `make demo` on 2 cores (2026-12-02).
            # 2500 + 1500 steps (2026-12-02, evening): on the AVX2 host at 81.5 GFLOP/s (float32
            # matmul; 110 the day before) the 3000 + 2000-step recipe's `make demo` took 1151 s
            # with installation (stage 1 341 s, stage 2 509 s, evaluation 143 s), over the 15
            # minutes. The decays keep their places in the shorter stages (70% and 90% of stage
            # 1, 75% of stage 2). Stage 2 is step-limited: from the seed-0 stage 1 an earlier
            # decay (3e-4 after 1000, 1e-4 after 1600) ended at 0.617 against the preset's
            # 0.626, 2e-3 at 0.607, a batch of 8 at 0.598 (512 validation patches).
            optimizer="adam",
            batch_size=16,
            epoch_steps=100,
            stage1_steps=2500,
            stage2_steps=1500,
            learning_rate=1e-3,
            lr_decay_rates=(3e-4, 1e-4),
            lr_decay_epochs=(18, 23),
            score_weight=1.0,
            stage2_learning_rate=1e-3,
            stage2_lr_decay_rates=(3e-4,),
            stage2_lr_decay_epochs=(11,),
            checkpoint_every=250,
            validate_every=500,
            # 512 validation patches (2026-12-02): on 128 the set alone moved a model's refined
            # mean IoU by 0.035 (seed 0's network: 0.664 on its 128, 0.627 and 0.631 on two sets
            # of 1024), more than the seeds' networks differ on one set (0.606-0.638 on 1024).
            val_patches=512,
            log_every=20,
        ),
        # Masks binarised at probability .35 (the paper: .2), chosen on 20 train images with the
        # recipe's trained network (2026-12-01): SharpMask segm AR@100 / AR@1k 22.9 / 26.9 at .2,
        # 25.8 / 29.5 at .3, 26.8 / 30.6 at .35, 27.2 / 30.4 at .4, 24.1 / 26.5 at .5; DeepMask's
        # were 16.0 / 19.4 at .2 and 16.0 / 19.0 at .35.
        inference=InferenceConfig(top_n=100, max_side=512, crop_size=32, mask_threshold=0.35),
        export=ExportConfig(top_n=50),
    )


PRESETS = {
    # ImageNet-pretrained trunks, as the paper's.
    "sharpmask_resnet50": lambda: Config(model=ModelConfig(refinement=True, trunk_weights="imagenet")),
    "deepmask_resnet50": lambda: Config(model=ModelConfig(refinement=False, trunk_weights="imagenet")),
    "small": _small,
}


def get_config(preset: str = "sharpmask_resnet50", overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Returns a named preset with `section.field=value` overrides applied.

    Raises:
        ValueError: for an unknown preset or a bad override.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown preset. Expected one of {sorted(PRESETS)}. Received: preset={preset!r}")
    return PRESETS[preset]().override(list(overrides))
