"""Trains DeepMask (stage 1) and SharpMask's refinement (stage 2) into a model directory.

    python training/train.py                       # small preset, synthetic data, runs/small
    python training/train.py --preset sharpmask_resnet50 --model-dir runs/r50 \\
        --train-data coco/annotations/instances_train2017.json:coco/train2017 \\
        --val-data coco/annotations/instances_val2017.json:coco/val2017 \\
        --set training.batch_size=64 --strategy auto --mixed-precision

Rerunning with the same --model-dir resumes from the newest checkpoint that restores (saying which
it skipped and why). Without --preset, a --model-dir holding a config.json (an earlier run's, or a
converted model's from `sharpmask-convert`) is the base configuration that --set and the other
flags override; with --preset, hyper-parameters other than the saved config.json's are warned
about and the earlier config kept in config_history.json. SIGTERM or Ctrl-C, at any point of
training, saves a checkpoint of the current step and exits. Under several workers, set TF_CONFIG
on each.

Exit codes: 0 trained; 1 a stage's checkpoints are there and none restores (or another error);
2 bad arguments or an incompatible --model-dir, before any work; 128+N stopped by signal N after a
save (143 SIGTERM, 130 SIGINT): rerun the same command to resume.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from sharpmask_tf import trainer  # noqa: E402
from sharpmask_tf.checkpoints import UnrestorableCheckpoints  # noqa: E402
from sharpmask_tf.config import CONFIG_FILE, PRESETS, Config, get_config, load_run_config  # noqa: E402
from sharpmask_tf.data import ensure_dataset  # noqa: E402
from sharpmask_tf.distribute import STRATEGIES, resolve_strategy  # noqa: E402

DEFAULT_PRESET = "small"


def _dataset_arg(value: str) -> tuple[str, str]:
    annotations, sep, images = value.partition(".json:")
    if not sep or not images:
        raise argparse.ArgumentTypeError(
            f"expected ANNOTATIONS.json:IMAGE_DIR (a COCO instances file and its image folder). Received: {value!r}"
        )
    return annotations + ".json", images


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="configuration preset (default: the --model-dir's config.json if it has one, else small)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, e.g. training.batch_size=64 (repeatable)",
    )
    p.add_argument(
        "--train-data",
        type=_dataset_arg,
        metavar="ANNOTATIONS.json:IMAGE_DIR",
        help="training split (default: the preset's data.train_*, the synthetic dataset)",
    )
    p.add_argument(
        "--val-data",
        type=_dataset_arg,
        metavar="ANNOTATIONS.json:IMAGE_DIR",
        help="validation split (default: the preset's data.val_*)",
    )
    p.add_argument("--model-dir", help="checkpoints, logs, config.json, .keras models (default: runs/<preset>)")
    p.add_argument(
        "--stage",
        choices=(*trainer.STAGES, "both"),
        help="stage(s) to train (default: both; deepmask when model.refinement is false)",
    )
    p.add_argument(
        "--strategy",
        default="auto",
        choices=STRATEGIES,
        help="auto: several TF_CONFIG workers -> multiworker, local GPUs -> mirrored, else default",
    )
    p.add_argument("--mixed-precision", action="store_true", help="mixed_float16 compute with loss scaling")
    p.add_argument("--jit", action="store_true", help="XLA-compile the training step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def model_dir_of(args: argparse.Namespace) -> str:
    return args.model_dir or os.path.join("runs", args.preset or DEFAULT_PRESET)


def base_config(args: argparse.Namespace) -> tuple[Config, str]:
    """The configuration the flags override, and where it came from: --preset, else the model
    directory's config.json, else the default preset.

    Raises:
        ValueError: naming the config.json when it is not a valid configuration.
    """
    if args.preset is None:
        model_dir = model_dir_of(args)
        saved = load_run_config(model_dir)
        if saved is not None:
            return saved, os.path.join(model_dir, CONFIG_FILE)
    preset = args.preset or DEFAULT_PRESET
    return get_config(preset), f"preset {preset!r}"


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> tuple[Config, str]:
    """The base configuration (`base_config`) with --set, --train-data/--val-data,
    --mixed-precision and --jit applied, and where the base came from; bad values end the program
    with exit code 2."""
    overrides = list(args.overrides)
    for split, value in (("train", args.train_data), ("val", args.val_data)):
        if value is not None:
            overrides += [f"data.{split}_annotations={value[0]}", f"data.{split}_images={value[1]}"]
    if args.mixed_precision:
        overrides.append("training.mixed_precision=true")
    if args.jit:
        overrides.append("training.jit=true")
    try:
        base, source = base_config(args)
        return base.override(overrides), source
    except ValueError as e:
        parser.error(str(e))


def check_data(config: Config, parser: argparse.ArgumentParser) -> None:
    """Generates the synthetic dataset when the config points at its missing default location;
    any other missing dataset or image folder is an argument error."""
    d = config.data
    try:
        ensure_dataset(d)
    except FileNotFoundError as e:
        parser.error(f"{e}. Pass --train-data/--val-data ANNOTATIONS.json:IMAGE_DIR.")
    for split, images in (("train", d.train_images), ("val", d.val_images)):
        if not os.path.isdir(images):
            parser.error(f"the {split} image folder does not exist. Received: {images!r}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    config, source = resolve_config(args, parser)
    stage = args.stage or ("both" if config.model.refinement else "deepmask")
    model_dir = model_dir_of(args)
    strategy = resolve_strategy(args.strategy)
    try:
        run = trainer.Trainer(config, model_dir, strategy, progress=not args.no_progress)
        run.check(stage)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    check_data(config, parser)

    print(
        f"Training stage(s) {stage} of {source} on {strategy.num_replicas_in_sync} replica(s) "
        f"into {os.path.abspath(model_dir)}  (TensorBoard: tensorboard --logdir {model_dir}/logs)",
        flush=True,
    )
    try:
        metrics = run.run(stage)
    except trainer.TrainingInterrupted as e:
        print(f"{e}; rerun the same command to resume.", file=sys.stderr, flush=True)
        return 128 + e.signum
    except UnrestorableCheckpoints as e:
        print(f"train.py: error: {e}", file=sys.stderr, flush=True)
        return 1
    print_summary(model_dir, metrics)
    return 0


def print_summary(model_dir: str, metrics: dict) -> None:
    """What the run wrote and each stage's validation metrics."""
    print(
        f"Done. In {os.path.abspath(model_dir)}: config.json, checkpoints in deepmask/ and sharpmask/, "
        f"TensorBoard logs in logs/, "
        + ", ".join(f"{s}.keras" for s in trainer.STAGES if s in metrics)
        + ", metrics.json"
    )
    for s in trainer.STAGES:
        if s in metrics:
            m = metrics[s]
            waited = m.get("input_wait_fraction")
            print(
                f"  {s}: step {m['step']}, per-patch mean IoU {m['mean_iou']:.3f}, "
                f"median {m['median_iou']:.3f}, IoU>.5 {m['iou_over_50']:.2f}, IoU>.7 {m['iou_over_70']:.2f}"
                + ("" if waited is None else f", {waited:.1%} of step time waiting for input")
            )
    if "sharpmask_mean_iou" in metrics:
        print(
            f"  on the same stage-2 patches: DeepMask mean IoU {metrics['deepmask_mean_iou']:.3f}, "
            f"SharpMask {metrics['sharpmask_mean_iou']:.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
