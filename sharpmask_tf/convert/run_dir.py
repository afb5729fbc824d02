"""Converts an authors' model file into a run directory, as training writes one.

`convert_file` reads a `.t7` saved by the reference trainers (DeepMask or SharpMask), the
reference's ImageNet `resnet-50.t7` (the trunk only), or the PyTorch port's `.pth` / `.pth.tar`
DeepMask, and writes `config.json`, the trunk's weights (`backbone.TRUNK_WEIGHTS_FILE`, which
`model.trunk_weights` names) and `deepmask.keras` (plus `sharpmask.keras` for a SharpMask). It
writes into a staging directory beside the target and renames it into place, so a failure
leaves nothing under the target.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import keras
import tensorflow as tf

from sharpmask_tf.backbone import TRUNK_WEIGHTS_FILE
from sharpmask_tf.checkpoints import write_run_config
from sharpmask_tf.config import Config
from sharpmask_tf.convert import build, pytorch, torch7
from sharpmask_tf.sharpmask import build_model, copy_weights

PYTORCH_SUFFIXES = (".pth", ".pth.tar", ".pt")


def _is_pytorch(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(4)
    return path.name.endswith(PYTORCH_SUFFIXES) or head == torch7._ZIP_MAGIC or head[:1] == b"\x80"


def read_conversion(source: str | os.PathLike, trunk_weights: str) -> tuple[build.Conversion, str]:
    """Reads a model file into our config and weights.

    Args:
        source: the file.
        trunk_weights: the trunk weights file the config names (`model.trunk_weights`).

    Returns:
        (conversion, kind): kind is "deepmask", "sharpmask" or "trunk".

    Raises:
        FileNotFoundError: if there is no such file.
        ValueError: if the file is not one of those models, is truncated, or holds a module or
            layout our models cannot express (the error names it).
    """
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"No such model file. Received: source={str(source)!r}")
    if _is_pytorch(path):
        record = pytorch.deepmask_pytorch_record(pytorch.read_state_dict(path), target_size=None)
    else:
        root = torch7.read_torch7(path)
        if not torch7.is_deepmask_file(root):
            return build.convert_trunk(torch7.read_resnet_t7(path, root), trunk_weights), "trunk"
        record = torch7.read_deepmask_t7(path, root)
    kind = "sharpmask" if record.is_sharpmask else "deepmask"
    return build.convert_record(record, trunk_weights), kind


def _write(conversion: build.Conversion, kind: str, staging: Path) -> list[str]:
    config = Config(model=conversion.config)
    write_run_config(config, str(staging))
    written = ["config.json", TRUNK_WEIGHTS_FILE]
    if kind == "trunk":
        build.keras_trunk(conversion).save_weights(staging / TRUNK_WEIGHTS_FILE)
        return written
    model = build.keras_model(conversion)
    model.get_layer("trunk").save_weights(staging / TRUNK_WEIGHTS_FILE)
    if kind == "sharpmask":
        deepmask = build_model(dataclasses.replace(conversion.config, refinement=False), trunk_weights=False)
        copy_weights(model, deepmask)
        model.save(staging / "sharpmask.keras")
        written.append("sharpmask.keras")
    else:
        # Stage 1's result, as the trainer keeps it: stage 2 (--stage sharpmask) starts from it.
        best = tf.train.CheckpointManager(tf.train.Checkpoint(model=model), staging / "deepmask" / "best", 1)
        best.save(checkpoint_number=0)
        written.append("deepmask/best")
        deepmask = model
    deepmask.save(staging / "deepmask.keras")
    written.append("deepmask.keras")
    return written


def convert_file(source: str | os.PathLike, out: str | os.PathLike) -> list[str]:
    """Converts `source` into the run directory `out`, which must not exist yet.

    Returns:
        The names of the files written into `out`.

    Raises:
        FileExistsError: if `out` exists.
        FileNotFoundError, ValueError: as `read_conversion`; `out` is then not created.
    """
    out = Path(out).absolute()
    if out.exists():
        raise FileExistsError(f"The run directory exists; give a new one. Received: out={str(out)!r}")
    conversion, kind = read_conversion(source, str(out / TRUNK_WEIGHTS_FILE))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.converting-", dir=out.parent))
    staging.chmod(0o755)  # mkdtemp's is 0o700; a run directory is an ordinary one
    try:
        written = _write(conversion, kind, staging)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        keras.backend.clear_session()
    return written
