"""SavedModel export for TensorFlow Serving: `<base_path>/<model_name>/<version>/`.

The exported graph does everything: it decodes the images, builds the pyramid, runs the network
and ranks, so a client sends file bytes and gets fixed-size proposals back.

    python -m serving.export --model runs/small --base-path exports --model-name sharpmask
    python -m serving.export --model runs/x/sharpmask.keras --set export.top_n=200 --version 3

In three layers, as TF Model Garden's export: `ProposalExportModule` (the tf.Module behind the
signatures), `export_model` (the library function that writes a version) and `main` (the flags).

Signatures (N = export.top_n, M = inference.crop_size, B = images in the request):

- `serving_default`: `images` (B,) string, encoded JPEG/PNG/GIF/BMP bytes; the images of one
  request may differ in size.
- `serving_images`: `images` (B, H, W, 3) uint8 pixels.

Both return, proposals best first and padded to N rows per image (padding rows are zero):

- `scores` (B, N) float32 objectness probabilities;
- `boxes` (B, N, 4) float32 tight boxes (x0, y0, x1, y1) in image pixels, x1/y1 exclusive, of each
  mask crop binarised at inference.mask_threshold;
- `masks` (B, N, M, M) float32 mask probabilities (not binarised) over `window_boxes`;
- `window_boxes` (B, N, 4) float32, the image-pixel window each mask crop covers (it may extend
  beyond the image): resample a crop onto it and threshold to paste it, as `paste_masks` does;
- `num_proposals` (B,) int32, the valid rows of each image.

The version directory also holds `assets.extra/sharpmask_export.json` (the resolved config, the
pyramid scales, the mask threshold, the signatures) and `assets.extra/tf_serving_warmup_requests`
(TF Serving's warm-up PredictionLog records). A version is written to a hidden staging directory
beside it and renamed into place, so a server never sees it half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from serving.protocol import (
    ASSETS_EXTRA,
    INPUT_KEY,
    METADATA_FILE,
    OUTPUT_KEYS,
    SIGNATURE_BYTES,
    SIGNATURE_PIXELS,
    WARMUP_FILE,
    version_number,
)
from sharpmask_tf.config import Config, ExportConfig, get_config, load_run_config
from sharpmask_tf.inference import ProposalGenerator
from sharpmask_tf.sharpmask import is_sharpmask

# Side of the grey JPEG each warm-up request sends.
WARMUP_IMAGE_SIDE = 128

# ----------------------------------------------------------------------------- the export module


class ProposalExportModule(tf.Module):
    """The exported object: one image's proposal function behind two batched signatures.

    Only the variables the signatures read are tracked, so the SavedModel holds no weights the
    graph does not use (a ProposalGenerator keeps the model's unfolded trunk beside its folded
    copy).

    Args:
        propose: `ProposalGenerator.propose_tensors` of a generator built with full_masks=False.
        top_n: the generator's top_n, the proposals every image gets.
        crop_size: the generator's mask crop side.
    """

    def __init__(self, propose: Callable[[tf.Tensor], dict[str, tf.Tensor]], top_n: int, crop_size: int):
        super().__init__(name="sharpmask_serving")
        self._propose = propose
        self._output_spec = {
            "boxes": tf.TensorSpec([top_n, 4], tf.float32),
            "scores": tf.TensorSpec([top_n], tf.float32),
            "masks": tf.TensorSpec([top_n, crop_size, crop_size], tf.float32),
            "window_boxes": tf.TensorSpec([top_n, 4], tf.float32),
            "num_proposals": tf.TensorSpec([], tf.int32),
        }
        used = {id(v): v for fn in self.signatures().values() for v in fn.graph.variables}
        self.serving_variables = list(used.values())

    def _one(self, image) -> dict[str, tf.Tensor]:
        out = self._propose(image)
        out["masks"] = out.pop("mask_crops")
        return {key: out[key] for key in OUTPUT_KEYS}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    def from_bytes(self, images):
        tf.debugging.assert_positive(
            tf.size(images), message="images must hold at least one encoded image; received an empty batch"
        )

        def one(data):
            # channels=0 keeps gray and alpha so they are treated as the numpy API treats them
            # (alpha composited onto mid grey); expand_animations=False takes a GIF's first frame.
            return self._one(tf.io.decode_image(data, channels=0, expand_animations=False))

        return tf.map_fn(one, images, fn_output_signature=self._output_spec)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8, name=INPUT_KEY)])
    def from_pixels(self, images):
        shape = tf.shape(images)
        tf.debugging.assert_positive(shape[0], message="images must hold at least one image; received an empty batch")
        tf.debugging.assert_positive(shape[1:3], message="images must be at least 1x1 pixels")
        return tf.map_fn(self._one, images, fn_output_signature=self._output_spec)

    def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
        """The SavedModel signatures, by name."""
        return {
            SIGNATURE_BYTES: self.from_bytes.get_concrete_function(),
            SIGNATURE_PIXELS: self.from_pixels.get_concrete_function(),
        }


# ----------------------------------------------------------------------------- the library


def export_model(
    model_or_path: keras.Model | str | os.PathLike,
    config: Config,
    base_path: str | os.PathLike | None = None,
    model_name: str | None = None,
    version: int | None = None,
    *,
    coarse: bool = False,
    overwrite: bool = False,
) -> Path:
    """Exports a DeepMask/SharpMask model as a TF Serving SavedModel version.

    Args:
        model_or_path: a model from `sharpmask_tf.sharpmask.build_model`, or a `.keras` file or
            training run directory (as `ProposalGenerator.from_saved` takes).
        config: the settings; `config.inference` shapes the pipeline (its top_n is replaced by
            `config.export.top_n`), `config.export` names the destination.
        base_path: overrides `config.export.base_path`.
        model_name: overrides `config.export.model_name`.
        version: overrides `config.export.version`; 0 takes the highest existing version + 1.
        coarse: serve DeepMask's coarse masks from a SharpMask model.
        overwrite: replace an existing version directory instead of failing. The old version
            disappears for a moment; a server that already loaded that number keeps serving
            the old one (TF Serving does not reload a version number either).

    Returns:
        The version directory, `<base_path>/<model_name>/<version>`.

    Raises:
        FileExistsError: if the version directory exists and `overwrite` is False.
        ValueError: for an invalid base path, name or version (config validation).
    """
    overrides = {
        "base_path": None if base_path is None else str(base_path),
        "model_name": model_name,
        "version": version,
    }
    export = dataclasses.replace(config.export, **{k: v for k, v in overrides.items() if v is not None})
    export, target = _version_dir(export, overwrite)
    config = dataclasses.replace(config, export=export)

    inference = dataclasses.replace(config.inference, top_n=export.top_n)
    if isinstance(model_or_path, keras.Model):
        generator = ProposalGenerator(model_or_path, inference, coarse=coarse, full_masks=False)
        source = model_or_path.name
    else:
        generator = ProposalGenerator.from_saved(model_or_path, inference, coarse=coarse, full_masks=False)
        source = str(model_or_path)
    module = ProposalExportModule(generator.propose_tensors, inference.top_n, inference.crop_size)
    _write_version(module, export_metadata(config, generator, source), export, target, overwrite)
    return target


def _version_dir(export: ExportConfig, overwrite: bool) -> tuple[ExportConfig, Path]:
    """The export settings with version 0 resolved to the next free number, and the version
    directory they name (its parent created).

    Raises:
        FileExistsError: if the version directory exists and `overwrite` is False.
    """
    model_dir = Path(export.base_path) / export.model_name
    model_dir.mkdir(parents=True, exist_ok=True)
    if export.version == 0:
        existing = [version_number(p.name) for p in model_dir.iterdir() if p.is_dir()]
        export = dataclasses.replace(export, version=max(filter(None, existing), default=0) + 1)
    target = model_dir / str(export.version)
    if target.exists() and not overwrite:
        raise FileExistsError(
            f"Version {export.version} of {export.model_name} exists; pass overwrite=True (--overwrite) or "
            f"another version. Received: {str(target)!r}"
        )
    return export, target


def _write_version(
    module: ProposalExportModule, metadata: dict, export: ExportConfig, target: Path, overwrite: bool
) -> None:
    """Saves the module with its assets.extra files to a hidden staging directory beside
    `target`, then renames it into place, so a server never sees a half-written version."""
    staging = target.parent / f".tmp-{export.version}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        tf.saved_model.save(module, str(staging), signatures=module.signatures())
        extra = staging / ASSETS_EXTRA
        extra.mkdir()
        (extra / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
        write_warmup_requests(extra / WARMUP_FILE, export.model_name, export.warmup_requests)
        _move_into_place(staging, target, overwrite)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staging: Path, target: Path, overwrite: bool) -> None:
    """Renames the finished staging directory to the version directory (atomic on one filesystem)."""
    old = None
    if target.exists() and overwrite:
        old = target.with_name(f".old-{target.name}-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError as err:
        # Another export took the version between our check and the rename (rename refuses a
        # non-empty target directory). A replaced version goes back if its place is still free.
        if old is not None and not target.exists():
            os.rename(old, target)
        raise FileExistsError(
            f"Could not rename the export to {str(target)!r} (did another export take that version?): {err}"
        ) from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_metadata(config: Config, generator: ProposalGenerator, source: str) -> dict:
    """What `assets.extra/sharpmask_export.json` records: the resolved config, the pipeline's
    numbers as the graph uses them, and the signatures."""
    kind = "sharpmask" if generator.refine else "deepmask"
    if generator.coarse and is_sharpmask(generator.model):
        kind = "sharpmask (coarse DeepMask masks)"
    cfg = generator.config
    return {
        "config": config.to_dict(),
        "model": {"kind": kind, "source": source, "patch_size": generator.patch_size, "context": generator.context},
        "proposals": {
            "top_n": cfg.top_n,
            "scales": [float(s) for s in generator.scales],
            "max_side": cfg.max_side,
            "mask_threshold": cfg.mask_threshold,
            "crop_size": cfg.crop_size,
            "nms_threshold": cfg.nms_threshold,
        },
        "signatures": {
            SIGNATURE_BYTES: {"inputs": {INPUT_KEY: "(B,) string: encoded JPEG/PNG/GIF/BMP"}},
            SIGNATURE_PIXELS: {"inputs": {INPUT_KEY: "(B, H, W, 3) uint8"}},
            "outputs": {
                "boxes": "(B, N, 4) float32 tight boxes x0, y0, x1, y1 (exclusive) of the thresholded crops",
                "scores": "(B, N) float32 objectness probabilities, best first",
                "masks": "(B, N, M, M) float32 mask probabilities over window_boxes",
                "window_boxes": "(B, N, 4) float32 windows the mask crops cover, image pixels",
                "num_proposals": "(B,) int32 valid rows; the rest are zero padding",
            },
        },
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
        "exported_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def warmup_jpeg(side: int = WARMUP_IMAGE_SIDE) -> bytes:
    """A side x side mid-grey JPEG."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_warmup_requests(path: str | os.PathLike, model_name: str, count: int) -> None:
    """Writes TF Serving's SavedModel warm-up file: `count` PredictionLog records, each a Predict
    request of `serving_default` on a one-image grey JPEG batch. No file when count is 0."""
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    if count == 0:
        return
    request = predict_pb2.PredictRequest(
        model_spec=model_pb2.ModelSpec(name=model_name, signature_name=SIGNATURE_BYTES)
    )
    request.inputs[INPUT_KEY].CopyFrom(tf.make_tensor_proto([warmup_jpeg()], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(str(path)) as writer:
        for _ in range(count):
            writer.write(log.SerializeToString())


# ----------------------------------------------------------------------------- the CLI


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a .keras file or a training run directory")
    parser.add_argument("--base-path", help="exports root (default: export.base_path)")
    parser.add_argument("--model-name", help="served model name (default: export.model_name)")
    parser.add_argument("--version", type=int, help="version number; 0 is the next free one (default)")
    parser.add_argument(
        "--preset", default="sharpmask_resnet50", help="base config when the model has no config.json beside it"
    )
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config overrides")
    parser.add_argument("--coarse", action="store_true", help="serve DeepMask's coarse masks from a SharpMask")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version directory")
    args = parser.parse_args(argv)
    try:
        config = (load_run_config(args.model) or get_config(args.preset)).override(args.set)
    except ValueError as err:
        parser.error(str(err))
    try:
        path = export_model(
            args.model,
            config,
            args.base_path,
            args.model_name,
            args.version,
            coarse=args.coarse,
            overwrite=args.overwrite,
        )
    except (FileExistsError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
