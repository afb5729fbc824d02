"""Full-image object proposals from a trained DeepMask or SharpMask (SPEC.md section 4).

The pipeline, for an image of any size:

1. The image is turned into RGB in [0, 1] (`sharpmask_tf.images.to_rgb`: grayscale is
   replicated, alpha is composited onto mid grey) and every pyramid scale s is applied to it
   together with the `max_side` cap c: the scaled image has round(H*c*s) x round(W*c*s) pixels.
2. Each scaled image is padded by patch_size/2 px of grey (0.5) on the top and left, and by
   patch_size/2 plus up to 15 px on the bottom and right so its sides are multiples of 16
   (`sharpmask_tf.pyramid`).
3. The trunk runs over the whole padded image; head C runs as convolutions: the 1x1 reduction,
   the fs x fs linear layer as an fs x fs valid convolution (fs = patch_size/16), the score branch
   as 1x1 convolutions. Score-map position (row, col) of a scale is the window whose top-left
   corner is (16*row, 16*col) in the padded image (see `sharpmask_tf.pyramid.window_boxes`).
4. All positions of all scales are ranked by score together; the top N are kept.
5. Their masks are computed in one batch: DeepMask's coarse head, or SharpMask's vertical path
   over windows cut out of skip features computed once per scale.
6. Each mask (a probability map over its window of patch_size/s image px) is resampled
   bilinearly onto the image pixels inside its window and binarised at `mask_threshold`
   (`sharpmask_tf.masks`).

Coordinates are image pixels of the input image, x to the right, y down, pixel (i, j) covering
[j, j+1) x [i, i+1); boxes are (x0, y0, x1, y1) with exclusive x1, y1.

`ProposalGenerator.propose_tensors` is graph-mode TensorFlow on a dynamic image size with
fixed-size outputs, so a SavedModel signature can wrap it whole; `ProposalGenerator.propose` is
the numpy API.

This file is a little over 400 lines: `ProposalGenerator` (its graph in named steps) and the thin
CLI that `python -m sharpmask_tf.inference` runs; the geometry, mask operations, BatchNorm folding
and COCO results format it uses are their own modules (pyramid, masks, fold, coco_format).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from sharpmask_tf.coco_format import coco_results, image_ids_by_name, image_map_path
from sharpmask_tf.config import COMPUTE_DTYPES, TRUNK_STRIDE, Config, InferenceConfig, load_run_config
from sharpmask_tf.deepmask import HEAD_OBJECT, HEAD_REDUCE, MASK_LOGITS, SCORE_HIDDEN, SCORE_LOGITS
from sharpmask_tf.fast_refine import fast_refine
from sharpmask_tf.fold import fold_batch_norm
from sharpmask_tf.images import check_image, list_images, load_image, to_rgb
from sharpmask_tf.masks import crop_boxes, mask_nms, paste_masks_and_boxes, resize_masks
from sharpmask_tf.pyramid import gather_windows, scale_and_pad, score_map_size, top_positions, window_boxes
from sharpmask_tf.sharpmask import REFINE_NET, REFINE_STRIDES, REFINE_TAPS, SKIP_NET, is_sharpmask, model_geometry

# The skip nets' outputs, skip1 (coarsest) first: one per refinement module.
SKIP_NAMES = tuple(f"skip{i}" for i in range(1, len(REFINE_TAPS) + 1))


class ProposalGenerator(tf.Module):
    """Object proposals over whole images from a DeepMask or SharpMask model.

    Example:
        ```python
        generator = ProposalGenerator.from_saved("runs/x")  # or ProposalGenerator(model, config)
        out = generator.propose(image)  # numpy dict, see `propose`
        ```

    Args:
        model: a model from `sharpmask_tf.sharpmask.build_model` (trained).
        config: inference settings; `InferenceConfig()` if None. Its `compute_dtype` runs the
            per-scale network (trunk, the object vectors' convolution, skip features) in that
            dtype: "bfloat16" (its convolutions about 2x faster on CPUs with AVX-512 BF16) or
            "float16" (for GPUs); None computes in the model's own dtype. Scores, masks and
            everything after the ranking stay float32. Needs `fold_bn`.
        coarse: use DeepMask's coarse masks even if the model has the refinement.
        full_masks: also paste masks at image size ("masks"); crops and boxes are always given.
        jit_compile: XLA-compile the per-scale network (trunk, head, skip features).
        fold_bn: run copies of the trunk with BatchNorm folded into the convolutions and of
            SharpMask's skip nets without padded copies of their inputs (`fold_batch_norm`;
            faster, same outputs up to float rounding). The copies do not follow later weight
            changes of `model`: build a new generator after changing them.
        phase_refine: run SharpMask's vertical path as `sharpmask_tf.fast_refine` (sub-pixel
            convolutions instead of upsample, pad and convolve; same logits up to float
            rounding, about 3x faster). Also a copy of the weights, like `fold_bn`.
    """

    def __init__(
        self,
        model: keras.Model,
        config: InferenceConfig | None = None,
        coarse: bool = False,
        full_masks: bool = True,
        jit_compile: bool = False,
        fold_bn: bool = True,
        phase_refine: bool = True,
    ):
        super().__init__(name="proposal_generator")
        self.model = model
        self.config = config or InferenceConfig()
        self.patch_size, self.context = model_geometry(model)
        self.coarse = coarse
        self.refine = not coarse and is_sharpmask(model)
        self.full_masks = full_masks
        self.scales = self.config.scales
        self._normalize = model.get_layer("normalize")
        compute_dtype = self.config.compute_dtype
        if compute_dtype and not fold_bn:
            raise ValueError("compute_dtype runs an inference copy of the trunk: it needs fold_bn=True.")
        trunk = model.get_layer("trunk")
        self._trunk = fold_batch_norm(trunk, compute_dtype) if fold_bn else trunk
        self._head_reduce = model.get_layer(HEAD_REDUCE)
        self._head_object = model.get_layer(HEAD_OBJECT)
        self._score_hidden = model.get_layer(SCORE_HIDDEN)
        self._score_logits = model.get_layer(SCORE_LOGITS)
        self._mask_logits = None if self.refine else model.get_layer(MASK_LOGITS)
        self._skip = self._refine_net = None
        if self.refine:
            skip = model.get_layer(SKIP_NET)
            self._skip = fold_batch_norm(skip, compute_dtype) if fold_bn else skip
            refine = model.get_layer(REFINE_NET)
            self._refine_net = fast_refine(refine) if phase_refine else refine
        self._level = tf.function(self._level_features, jit_compile=jit_compile, reduce_retracing=True)
        self._propose = tf.function(self.propose_tensors, reduce_retracing=True)

    @classmethod
    def from_saved(cls, path: str | os.PathLike, config: InferenceConfig | None = None, **kwargs):
        """Loads a generator from a `.keras` file or a training run directory.

        A directory must hold `sharpmask.keras` or `deepmask.keras` (SharpMask preferred); the
        inference settings come from `config`, else the run's `config.json` beside the model
        (`sharpmask_tf.config.load_run_config`), else defaults.

        Raises:
            FileNotFoundError: if no model file is found.
        """
        import sharpmask_tf.layers  # noqa: F401  (registers the custom layers)

        path = Path(path)
        if path.is_dir():
            candidates = [path / "sharpmask.keras", path / "deepmask.keras"]
            found = [p for p in candidates if p.is_file()]
            if not found:
                raise FileNotFoundError(
                    f"No sharpmask.keras or deepmask.keras in the model directory. Received: path={str(path)!r}"
                )
            model_path = found[0]
        elif path.is_file():
            model_path = path
        else:
            raise FileNotFoundError(f"No such model file or directory. Received: path={str(path)!r}")
        if config is None:
            run = load_run_config(model_path)
            config = run.inference if run else None
        model = keras.saving.load_model(model_path, compile=False)
        return cls(model, config, **kwargs)

    def _level_features(self, padded):
        """Network over one padded scaled image (1, Hp, Wp, 3): score logits (Ho, Wo), object
        vectors (Ho, Wo, D) and, for SharpMask, skip features {skip_i: (Hp/t_i, Wp/t_i, c_i)}."""
        compute_dtype = self.config.compute_dtype
        normalized = self._normalize(padded)
        if compute_dtype:
            normalized = tf.cast(normalized, compute_dtype)
        taps = self._trunk(normalized)
        reduced = self._head_reduce(taps["conv4"])
        fs = self.patch_size // TRUNK_STRIDE
        kernel = tf.reshape(self._head_object.kernel, [fs, fs, reduced.shape[-1], -1])
        if compute_dtype:
            reduced = tf.cast(reduced, compute_dtype)
        objects = tf.nn.conv2d(reduced, tf.cast(kernel, reduced.dtype), 1, "VALID")
        objects = tf.nn.bias_add(tf.cast(objects, self._head_object.bias.dtype), self._head_object.bias)
        scores = self._score_logits(self._score_hidden(objects))[0, :, :, 0]
        skips = {}
        if self.refine:
            skips = {k: tf.cast(v[0], tf.float32) for k, v in self._skip({t: taps[t] for t in REFINE_TAPS}).items()}
        return scores, objects[0], skips

    def propose_tensors(self, image) -> dict[str, tf.Tensor]:
        """Proposals for one image, as graph-mode TensorFlow (wrap in `tf.function` to export).

        Args:
            image: (H, W, C) with C in 1..4, or (H, W); uint8 or float in [0, 1]. H, W >= 1.

        Returns:
            A dict of tensors, proposals sorted by decreasing score, padded to N = top_n rows:
            "scores" (N,) float32 probabilities (0 for padding rows);
            "boxes" (N, 4) float32 tight boxes (x0, y0, x1, y1) of the binarised masks in image
              pixels, x1/y1 exclusive, (0, 0, 0, 0) for empty masks and padding;
            "window_boxes" (N, 4) float32, the windows (patch_size/scale image px) the masks cover;
            "mask_crops" (N, crop_size, crop_size) float32 mask probabilities over window_boxes;
            "scales" (N,) float32, the scale of each proposal relative to the input image
              (pyramid scale times the max_side cap);
            "masks" (N, H, W) bool, the binarised masks at image size (if full_masks);
            "num_proposals" () int32, the number of valid rows.
        """
        cfg = self.config
        rgb = to_rgb(image)
        height, width = tf.shape(rgb)[0], tf.shape(rgb)[1]
        cap = tf.minimum(1.0, cfg.max_side / tf.cast(tf.maximum(height, width), tf.float32))
        levels = self._pyramid(rgb, cap)
        scores, index, level, rows, cols = top_positions(levels["scores"], levels["sizes"], cfg.top_n)
        windows = window_boxes(
            rows, cols, tf.gather(levels["scale_y"], level), tf.gather(levels["scale_x"], level), self.patch_size
        )
        logits = self._window_mask_logits(levels, index, level, rows, cols)
        probabilities = tf.sigmoid(tf.cast(logits, tf.float32))
        top = dict(
            zip(
                ("probabilities", "windows", "scores", "level"),
                _pad_rows(cfg.top_n, probabilities, windows, scores, level),
            )
        )
        return self._outputs(top, tf.shape(index)[0], height, width, cap)

    def _pyramid(self, rgb, cap) -> dict:
        """The network over every scale of the pyramid, as the maps of all scales, flattened
        row-major and concatenated: "scores" (P,) logits, "objects" (P, D) object vectors,
        "sizes" (L, 2) score-map sizes, "scale_y" and "scale_x" (L,) (scaled / image side) and,
        for SharpMask, "skips": {skip_i: (map (Q_i, c_i), offsets (L,), widths (L,))}, each
        scale's first index into the map and its width."""
        height, width = tf.shape(rgb)[0], tf.shape(rgb)[1]
        scores, objects, sizes, scale_y, scale_x = [], [], [], [], []
        skip_maps, skip_widths = {}, {}
        for s in self.scales:
            padded, (hs, ws) = scale_and_pad(rgb, cap * s, self.patch_size)
            level_scores, level_objects, skips = self._level(padded[None])
            scores.append(tf.reshape(level_scores, [-1]))
            objects.append(tf.reshape(level_objects, [-1, level_objects.shape[-1]]))
            sizes.append(score_map_size(tf.shape(padded)[:2], self.patch_size))
            scale_y.append(tf.cast(hs, tf.float32) / tf.cast(height, tf.float32))
            scale_x.append(tf.cast(ws, tf.float32) / tf.cast(width, tf.float32))
            for name, feature in skips.items():
                skip_maps.setdefault(name, []).append(tf.reshape(feature, [-1, feature.shape[-1]]))
                skip_widths.setdefault(name, []).append(tf.shape(feature)[1])
        skip_windows = {}
        for name, maps in skip_maps.items():
            counts = tf.stack([tf.shape(f)[0] for f in maps])
            offsets = tf.concat([[0], tf.cumsum(counts)[:-1]], axis=0)
            skip_windows[name] = (tf.concat(maps, axis=0), offsets, tf.stack(skip_widths[name]))
        return {
            "scores": tf.concat(scores, axis=0),
            "objects": tf.concat(objects, axis=0),
            "sizes": tf.stack(sizes),
            "scale_y": tf.stack(scale_y),
            "scale_x": tf.stack(scale_x),
            "skips": skip_windows,
        }

    def _window_mask_logits(self, levels: dict, index, level, rows, cols):
        """Mask logits (k, M, M) of the ranked windows (flat `index` into the maps of `levels`,
        at `level`, `rows`, `cols`): DeepMask's coarse head, or SharpMask's vertical path over
        the windows cut out of every scale's skip features."""
        top_objects = tf.gather(levels["objects"], index)
        if not self.refine:
            side = round(math.sqrt(self._mask_logits.units))
            return tf.reshape(self._mask_logits(top_objects), [-1, side, side])
        window_skips = []
        for name, stride in zip(SKIP_NAMES, REFINE_STRIDES):
            flat, offsets, widths = levels["skips"][name]
            cells = TRUNK_STRIDE // stride  # skip cells per score-map step
            level_widths = tf.gather(widths, level)
            top_left = tf.gather(offsets, level) + rows * cells * level_widths + cols * cells
            window_skips.append(gather_windows(flat, top_left, level_widths, self.patch_size // stride))
        return self._refine_net([top_objects, *window_skips])

    def _outputs(self, top: dict, count, height, width, cap) -> dict[str, tf.Tensor]:
        """The dict of `propose_tensors` from the `count` ranked proposals in `top` (padded to
        top_n rows): pasted masks and their boxes, the optional mask NMS, mask crops."""
        cfg = self.config
        masks = boxes = None
        if self.full_masks or cfg.nms_threshold is not None:
            masks, boxes = paste_masks_and_boxes(
                top["probabilities"], top["windows"], height, width, cfg.mask_threshold
            )
        if cfg.nms_threshold is not None:
            order, count = mask_nms(masks, cfg.nms_threshold, count)
            top = {k: tf.gather(v, order) for k, v in top.items()}
            masks, boxes = tf.gather(masks, order), tf.gather(boxes, order)
        valid = tf.range(cfg.top_n) < count
        if cfg.nms_threshold is not None:  # suppressed rows now follow the kept ones; padding is empty already
            masks = masks & valid[:, None, None]
            boxes = tf.where(valid[:, None], boxes, 0.0)
        crops = resize_masks(top["probabilities"], cfg.crop_size)
        out = {
            "scores": tf.where(valid, tf.sigmoid(top["scores"]), 0.0),
            "window_boxes": tf.where(valid[:, None], top["windows"], 0.0),
            "mask_crops": crops * tf.cast(valid, tf.float32)[:, None, None],
            "scales": tf.where(valid, tf.gather(tf.constant(self.scales, tf.float32), top["level"]) * cap, 0.0),
            "num_proposals": tf.cast(count, tf.int32),
        }
        if self.full_masks:
            out["masks"] = masks
            out["boxes"] = boxes
        else:
            out["boxes"] = crop_boxes(crops, out["window_boxes"], height, width, cfg.mask_threshold)
        return out

    def propose(self, image: np.ndarray) -> dict[str, np.ndarray]:
        """Proposals for one image, as numpy.

        Args:
            image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array, uint8 or float in [0, 1].

        Returns:
            The dict of `propose_tensors`, as numpy arrays trimmed to the `num_proposals` valid
            rows (so "masks" is (n, H, W) bool), plus "num_proposals" as an int.

        Raises:
            ValueError: for an empty image, more than 4 channels, or a dtype that is neither
                uint8 nor float.
        """
        out = {k: v.numpy() for k, v in self._propose(tf.convert_to_tensor(check_image(image))).items()}
        n = int(out.pop("num_proposals"))
        out = {k: v[:n] for k, v in out.items()}
        out["num_proposals"] = n
        return out


def _pad_rows(n: int, *tensors):
    """Pads every tensor's first axis with zeros to n rows."""
    out = []
    for t in tensors:
        pad = [[0, n - tf.shape(t)[0]]] + [[0, 0]] * (t.shape.rank - 1)
        out.append(tf.ensure_shape(tf.pad(t, pad), [n, *t.shape[1:]]))
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharpmask_tf.inference",
        description="Object proposals for images, written as COCO results JSON.",
    )
    parser.add_argument("--model", required=True, help="a .keras file or a training run directory")
    parser.add_argument("inputs", nargs="+", help="image files or folders of images")
    parser.add_argument(
        "--out", required=True, help="results JSON path; the image map goes beside it (<stem>.images.json)"
    )
    parser.add_argument("--annotations", help="COCO annotations JSON: image ids are matched by file name")
    parser.add_argument("--visualize", metavar="DIR", help="write a PNG per image with the top proposals")
    parser.add_argument("--draw", type=int, default=10, help="proposals drawn per picture (default 10)")
    parser.add_argument("--coarse", action="store_true", help="DeepMask's coarse masks from a SharpMask model")
    parser.add_argument(
        "--compute-dtype",
        choices=[d for d in COMPUTE_DTYPES if d],
        help="sets inference.compute_dtype: run the per-scale network in this dtype "
        "(bfloat16: about 2x faster on CPUs with AVX-512 BF16)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="inference.FIELD=VALUE", help="inference config overrides"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: proposals for images or folders, written as COCO results JSON, an image map
    (`image_map_path`: the id, file and size of every image, and its picture) and PNG pictures."""
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = [*args.set] + ([f"inference.compute_dtype={args.compute_dtype}"] if args.compute_dtype else [])
    try:
        run = load_run_config(args.model)
        config = Config(inference=run.inference if run else InferenceConfig()).override(overrides).inference
        ids_by_name = image_ids_by_name(args.annotations) if args.annotations else {}
        files = list_images(args.inputs)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    generator = ProposalGenerator.from_saved(args.model, config, coarse=args.coarse)
    start = time.perf_counter()
    results, images, failed = _propose_files(generator, files, ids_by_name, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results))
    image_map_path(args.out).write_text(json.dumps({"images": images}, indent=1))
    done = len(files) - len(failed)
    seconds = time.perf_counter() - start
    print(f"{done} images, {len(results)} proposals -> {args.out} ({seconds:.1f} s); {len(failed)} skipped")
    return 1 if failed and not done else 0


def _propose_files(generator: ProposalGenerator, files: list[Path], ids_by_name: dict[str, int], args):
    """The CLI's proposals for each image file (ids from `ids_by_name`, else 1, 2, ... in order),
    with pictures if args.visualize; a file without an id of its own, or that does not decode,
    is skipped with a message.

    Returns:
        (COCO results, image map records, the paths skipped).
    """
    from sharpmask_tf.visualize import picture_names, save_proposals

    pictures = picture_names(files)
    results, images, failed = [], [], []
    used: dict[int, Path] = {}
    for index, path in enumerate(files):
        image_id = ids_by_name.get(path.name) if ids_by_name else index + 1
        try:
            if image_id is None or image_id in used:
                raise ValueError(
                    f"not in {args.annotations}" if image_id is None else f"image id {image_id} is {used[image_id]}'s"
                )
            image = load_image(path)
        except ValueError as err:
            print(f"skipping {path}: {err}", file=sys.stderr)
            failed.append(str(path))
            continue
        used[image_id] = path
        proposals = generator.propose(image)
        results.extend(coco_results(proposals, image_id))
        record = {"id": image_id, "file_name": str(path), "height": image.shape[0], "width": image.shape[1]}
        if args.visualize:
            save_proposals(Path(args.visualize) / pictures[index], image, proposals, max_draw=args.draw)
            record["picture"] = pictures[index]
        images.append(record)
    return results, images, failed


if __name__ == "__main__":
    sys.exit(main())
