"""Proposal quality: COCO average recall (class-agnostic) and per-patch mask IoU (SPEC.md section 5).

Average recall is pycocotools' `COCOeval` with `params.useCats = 0`: every ground-truth object
of any category may be recalled by any proposal. AR@k is the recall averaged over IoU thresholds
.5:.05:.95 when each image keeps its k best proposals. AR@1/10/100/1000 and AR small/medium/large
at 100 come from `COCOeval.accumulate`; the curve over 1..1000 proposals counts the same
`COCOeval.evaluate` matches per prefix of each image's ranked proposals (which is what
`accumulate` does for its recall, minus the precision bookkeeping that makes 1000 operating
points impractically slow there); the tests check the two agree. AUC is the curve's mean.

Ground truth goes through the training loader's validation (`sharpmask_tf.data.coco.CocoDataset`)
before anything is evaluated or inferred: a record pycocotools would hang or crash on (an RLE
whose counts overrun the image, a polygon of two points, an `iscrowd` of "no") is a counted skip,
or a `DatasetError` with `on_bad_annotation="error"`. Evaluation is class-agnostic by
construction: every ground-truth object and every proposal is given category 1, so neither the
categories list nor the category ids change the result. The COCO formats themselves (results
entries, ground truth, checked results) are `sharpmask_tf.coco_format`'s.

This file is over 400 lines because it holds one concept whole: how good proposals are, as the
paper measures it (average recall, its curve, the run over a split, its table, plot and CLI) and
as training validates it (per-patch IoU, the one function the trainer also calls).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sharpmask_tf.coco_format import checked_results, class_agnostic, coco_results, ground_truth
from sharpmask_tf.config import ON_BAD_ANNOTATION, Config, load_run_config
from sharpmask_tf.data.coco import DatasetError
from sharpmask_tf.losses import iou_summary, mask_iou, resize_logits

logger = logging.getLogger(__name__)

MAX_DETS = (1, 10, 100, 1000)
CURVE_MAX = 1000
IOU_TYPES = ("segm", "bbox")
AREAS = ("all", "small", "medium", "large")


def proposal_count_warnings(proposals_per_image: int) -> list[str]:
    """Warnings for evaluating fewer proposals per image than the largest reported count.

    Args:
        proposals_per_image: the most proposals any image had.

    Returns:
        [] when there were at least max(MAX_DETS); else one message saying which numbers repeat
        the value at that count.
    """
    if proposals_per_image >= MAX_DETS[-1]:
        return []
    return [
        f"Only {proposals_per_image} proposals per image were evaluated: AR@{MAX_DETS[-1]} and the recall curve "
        f"past {proposals_per_image} are recall at {proposals_per_image} proposals (evaluate with "
        f"top_n={MAX_DETS[-1]} for the reported counts)."
    ]


def average_recall(
    annotations: str | os.PathLike | dict | Any,
    results: str | os.PathLike | list[dict],
    iou_type: str = "segm",
    image_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Class-agnostic COCO average recall of proposals.

    Args:
        annotations: ground truth: a COCO annotations JSON path, its parsed dict, a COCO object
            or a `CocoDataset`, validated by `ground_truth` (bad records are skipped).
        results: COCO results (a JSON path or a list of {"image_id", "segmentation" and/or
            "bbox", "score"} dicts); category ids are ignored, results on images not evaluated
            are dropped.
        iou_type: "segm" (masks) or "bbox" (boxes).
        image_ids: images to evaluate; all images of `annotations` if None. Images without
            ground-truth objects do not change recall.

    Returns:
        {"AR@1", "AR@10", "AR@100", "AR@1000", "AR_small@100", "AR_medium@100", "AR_large@100",
        "AUC", "curve" (list of AR at 1..1000 proposals per image), "num_objects",
        "max_proposals" (the most results of any image)}. With no results every value is 0.0;
        with no ground-truth objects recall is undefined and every value is NaN.

    Raises:
        ValueError: for an unknown iou_type, or a result lacking the evaluated field or that
            could not be evaluated safely.
        DatasetError: if `annotations` is not a COCO instances file.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}. Received: iou_type={iou_type!r}")
    dataset = ground_truth(annotations)
    ids = sorted(dataset.image_ids) if image_ids is None else sorted(int(i) for i in image_ids)
    gt = class_agnostic(dataset, ids)
    ids = sorted(gt.getImgIds())
    if not isinstance(results, list):
        results = json.loads(Path(results).read_text())
    results = checked_results(results, iou_type, gt)
    counts = collections.Counter(r["image_id"] for r in results)
    num_objects = len(gt.getAnnIds(imgIds=ids, iscrowd=False))
    extra = {"num_objects": num_objects, "max_proposals": max(counts.values(), default=0)}
    if num_objects == 0 or not results:
        # No objects: recall is undefined; no results: nothing is recalled.
        value = float("nan") if num_objects == 0 else 0.0
        return {**_table(lambda *_: value), "AUC": value, "curve": [value] * CURVE_MAX, **extra}
    evaluator = _evaluated(gt, results, iou_type, ids)
    recall = evaluator.eval["recall"]  # (T, K=1, A, M)

    def ar(area: str, max_dets: int) -> float:
        r = recall[:, 0, AREAS.index(area), MAX_DETS.index(max_dets)]
        r = r[r > -1]
        return float(r.mean()) if r.size else float("nan")

    curve = recall_curve(evaluator)
    return {**_table(ar), "AUC": float(np.mean(curve)), "curve": curve.tolist(), **extra}


def _evaluated(gt, results: list[dict], iou_type: str, image_ids: list[int]):
    """pycocotools' class-agnostic COCOeval of checked results on `image_ids`, after `evaluate`
    and `accumulate` (their printing silenced)."""
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(results), iou_type)
        evaluator.params.useCats = 0
        evaluator.params.imgIds = image_ids
        evaluator.params.maxDets = list(MAX_DETS)
        evaluator.evaluate()
        evaluator.accumulate()
    return evaluator


def _table(ar) -> dict[str, float]:
    table = {f"AR@{m}": ar("all", m) for m in MAX_DETS}
    table.update({f"AR_{area}@100": ar(area, 100) for area in AREAS[1:]})
    return table


def recall_curve(evaluator, max_dets: int = CURVE_MAX) -> np.ndarray:
    """Average recall at 1..max_dets proposals per image, from an evaluated COCOeval.

    Counts, for each k, the ground-truth objects (area range "all", not ignored) matched at each
    IoU threshold by one of the k best proposals of their image, exactly as
    `COCOeval.accumulate` computes recall, for every k at once.

    Args:
        evaluator: a `COCOeval` after `evaluate()`, with useCats=0 and maxDets[-1] >= max_dets.

    Returns:
        (max_dets,) float64.
    """
    params = evaluator.params
    area_all = [tuple(a) for a in params.areaRng].index(tuple(params.areaRng[0]))
    num_images = len(params.imgIds)
    num_thresholds = len(params.iouThrs)
    hits = np.zeros((num_thresholds, max_dets), np.int64)
    num_gt = 0
    for i in range(num_images):
        e = evaluator.evalImgs[area_all * num_images + i]
        if e is None:
            continue
        num_gt += int(np.count_nonzero(e["gtIgnore"] == 0))
        order = np.argsort(-np.asarray(e["dtScores"]), kind="mergesort")[:max_dets]
        matched = (e["dtMatches"][:, order] > 0) & ~e["dtIgnore"][:, order]
        hits[:, : matched.shape[1]] += matched
    if num_gt == 0:
        return np.full(max_dets, np.nan)
    return (np.cumsum(hits, axis=1) / num_gt).mean(axis=0)


def plot_recall(curves: dict[str, Sequence[float]], path: str | os.PathLike, title: str = "") -> None:
    """Writes a PNG of average recall against the number of proposals (log scale).

    Args:
        curves: {label: AR at 1..len proposals}.
        path: the PNG to write.
        title: the plot's title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    for label, curve in curves.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{label} (AUC {np.mean(curve):.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("proposals per image")
    ax.set_ylabel("average recall (IoU .5:.95)")
    ax.set_ylim(0, 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def evaluate_model(
    generator,
    annotations_json: str | os.PathLike,
    images_dir: str | os.PathLike,
    max_images: int | None = None,
    out_dir: str | os.PathLike | None = None,
    on_bad_annotation: str = "skip",
) -> dict[str, Any]:
    """Runs a proposal generator over a COCO-format split and measures its average recall.

    The ground truth is validated (`ground_truth`, image headers included) before any
    inference. An image that passes the header check but then fails to decode is skipped and
    counted as well (or raises with `on_bad_annotation="error"`); skipped images and their
    objects are not evaluated.

    Args:
        generator: the `sharpmask_tf.inference.ProposalGenerator` to evaluate, as the caller
            configured it (its `config.top_n` proposals per image; AR@1000 needs 1000, and
            fewer is reported in "warnings"); it must paste full masks (`full_masks=True`).
        annotations_json: the split's COCO annotations.
        images_dir: the folder holding the split's `file_name`s.
        max_images: evaluate the first this many valid images by id (all if None).
        out_dir: if given, writes results.json, metrics.json and recall.png there.
        on_bad_annotation: "skip" (count bad records and images) or "error" (raise at the first).

    Returns:
        {"segm": average_recall dict, "bbox": average_recall dict, "num_images" (evaluated),
        "seconds_per_image", "top_n", "skipped" (bad records and images by reason), "warnings"
        (fewer proposals than AR@1000 needs)}; the curves are left out of metrics.json.

    Raises:
        ValueError: if the generator does not paste full masks, or for an unknown
            on_bad_annotation.
        DatasetError: for annotations that are not a COCO instances file, or the first bad
            record or image with `on_bad_annotation="error"`.
    """
    _check_options(generator, on_bad_annotation)
    dataset = ground_truth(annotations_json, images_dir, on_bad_annotation)
    skipped = collections.Counter(dataset.skipped)
    image_ids = sorted(dataset.image_ids)[:max_images]
    results, evaluated, seconds = _propose_all(
        generator, dataset, image_ids, skipped, on_bad_annotation, annotations_json
    )
    metrics = {
        **{t: average_recall(dataset, results, t, evaluated) for t in IOU_TYPES},
        "num_images": len(evaluated),
        "seconds_per_image": seconds / max(len(evaluated), 1),
        "top_n": generator.config.top_n,
        "skipped": dict(skipped),
        "warnings": _logged(proposal_count_warnings(generator.config.top_n)),
    }
    if out_dir is not None:
        write_outputs(out_dir, metrics, results, title=Path(annotations_json).name)
    return metrics


def _check_options(generator, on_bad_annotation: str) -> None:
    if not generator.full_masks:
        raise ValueError(
            "Mask average recall needs the masks at image size: build the ProposalGenerator with "
            "full_masks=True. Received: full_masks=False"
        )
    if on_bad_annotation not in ON_BAD_ANNOTATION:
        raise ValueError(
            f"on_bad_annotation must be one of {ON_BAD_ANNOTATION}. Received: on_bad_annotation={on_bad_annotation!r}"
        )


def _propose_all(generator, dataset, image_ids, skipped: collections.Counter, on_bad_annotation: str, source):
    """COCO results of the generator's proposals on each image of `image_ids` that decodes
    (the others counted in `skipped`, or the first raising with on_bad_annotation="error"); `source`
    names the annotations in messages.

    Returns:
        (results, the ids of the images evaluated, seconds spent proposing).
    """
    from sharpmask_tf.images import load_image

    results, evaluated, seconds = [], [], 0.0
    for image_id in image_ids:
        try:
            image = load_image(dataset.image_path(image_id))
        except ValueError as err:
            if on_bad_annotation == "error":
                raise DatasetError(f"Image {image_id} of {source} does not decode: {err}") from err
            logger.warning("Skipping image %s of %s: %s", image_id, source, err)
            skipped["image file undecodable"] += 1
            continue
        start = time.perf_counter()
        proposals = generator.propose(image)
        seconds += time.perf_counter() - start
        results.extend(coco_results(proposals, image_id))
        evaluated.append(image_id)
    return results, evaluated, seconds


def _logged(warnings: list[str]) -> list[str]:
    for message in warnings:
        logger.warning(message)
    return warnings


def write_outputs(
    out_dir: str | os.PathLike, metrics: dict[str, Any], results: list[dict] | None = None, title: str = ""
) -> None:
    """Writes an evaluation's metrics.json (without the curves), recall.png and, if given, the
    results.json it was measured on into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if results is not None:
        (out / "results.json").write_text(json.dumps(results))
    (out / "metrics.json").write_text(json.dumps(_without_curves(metrics), indent=2))
    plot_recall({t: metrics[t]["curve"] for t in IOU_TYPES}, out / "recall.png", title=title)


def _without_curves(metrics: dict[str, Any]) -> dict[str, Any]:
    return {
        k: ({kk: vv for kk, vv in v.items() if kk != "curve"} if isinstance(v, dict) else v) for k, v in metrics.items()
    }


def output_ious(outputs: dict[str, Any], labels: np.ndarray, coarse: bool = False) -> np.ndarray:
    """Per-patch IoU of one batch of model outputs (masks at probability .5) against their labels.

    Args:
        outputs: a DeepMask or SharpMask output dict: "masks" (B, h, w) logits and, from SharpMask,
            "coarse_masks".
        labels: (B, L, L) +1/-1 labels; logits of another side are resized bilinearly to L.
        coarse: score SharpMask's coarse masks instead of the refined ones (DeepMask's "masks"
            otherwise).

    Returns:
        (B,) IoUs (`sharpmask_tf.losses.mask_iou`: both empty counts as 1).
    """
    logits = outputs["coarse_masks" if coarse and "coarse_masks" in outputs else "masks"]
    labels = np.asarray(labels)
    return mask_iou(resize_logits(logits, labels.shape[1]).numpy(), labels)


def patch_ious(model, batches: Iterable[dict[str, np.ndarray]], coarse: bool = False) -> np.ndarray:
    """Per-patch IoU of a model's masks (probability .5) on held-out mask samples.

    Args:
        model: a DeepMask or SharpMask model.
        batches: dicts with "images" (B, S, S, 3) patches and "masks" (B, L, L) +1/-1 labels
            (for instance `sharpmask_tf.data.pipeline.make_validation_patches`).
        coarse: score SharpMask's coarse masks instead of the refined ones.

    Returns:
        (N,) IoUs over all patches (`output_ious` of each batch).
    """
    ious = [
        output_ious(model.predict_on_batch(np.asarray(batch["images"], np.float32)), batch["masks"], coarse)
        for batch in batches
    ]
    return np.concatenate(ious) if ious else np.zeros([0])


def evaluate_patches(model, batches: Iterable[dict[str, np.ndarray]], coarse: bool = False) -> dict[str, float]:
    """Mean and median per-patch IoU and the shares of patches over IoU .5 and .7.

    Returns:
        {"mean_iou", "median_iou", "iou_over_50", "iou_over_70", "num_patches"}.
    """
    ious = patch_ious(model, batches, coarse)
    return {**iou_summary(ious), "num_patches": int(ious.size)}


def format_table(metrics: dict[str, Any]) -> str:
    """The AR table (percent, like the paper) of an `evaluate_model` or `average_recall` result."""
    rows = [m for m in IOU_TYPES if m in metrics] or [None]
    keys = ["AR@10", "AR@100", "AR@1000", "AR_small@100", "AR_medium@100", "AR_large@100", "AUC"]
    lines = ["| type | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for row in rows:
        m = metrics if row is None else metrics[row]
        lines.append(f"| {row or ''} | " + " | ".join(f"{100 * m[k]:.1f}" for k in keys) + " |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sharpmask_tf.evaluation",
        description="Class-agnostic COCO average recall of object proposals (masks and boxes).",
    )
    parser.add_argument("--annotations", required=True, help="COCO annotations JSON of the split")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a .keras file or training run directory: run the proposals")
    source.add_argument("--results", help="an existing COCO results JSON (from sharpmask_tf.inference)")
    parser.add_argument("--images", help="image folder of the split (with --model)")
    parser.add_argument("--max-images", type=int, help="evaluate the first N images by id")
    parser.add_argument(
        "--top-n",
        type=int,
        help=f"proposals per image (default {MAX_DETS[-1]}, the largest reported count, unless --set inference.top_n=...)",
    )
    parser.add_argument(
        "--on-bad-annotation",
        choices=ON_BAD_ANNOTATION,
        default="skip",
        help="bad ground-truth records and images: skip and count them (default), or stop at the first",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config overrides of the model's config.json (or the defaults), e.g. inference.max_side=800 (with --model)",
    )
    parser.add_argument("--out", help="folder for results.json, metrics.json and recall.png")
    return parser


def _model_metrics(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--model: the model's proposals on the split, `max(MAX_DETS)` of them per image unless
    --top-n or --set inference.top_n says otherwise."""
    if not args.images:
        parser.error("--model needs --images")
    top_n_set = any(item.partition("=")[0].strip() == "inference.top_n" for item in args.set)
    top_n = args.top_n if args.top_n is not None or top_n_set else MAX_DETS[-1]
    overrides = [*args.set, *([f"inference.top_n={top_n}"] if top_n is not None else [])]
    try:
        config = (load_run_config(args.model) or Config()).override(overrides)
    except ValueError as err:
        parser.error(str(err))
    from sharpmask_tf.inference import ProposalGenerator

    generator = ProposalGenerator.from_saved(args.model, config.inference)
    return evaluate_model(generator, args.annotations, args.images, args.max_images, args.out, args.on_bad_annotation)


def _results_metrics(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """--results: the average recall of an existing results file."""
    if args.set:
        parser.error("--set configures the proposals of --model; it has no effect on --results")
    dataset = ground_truth(args.annotations, on_bad_annotation=args.on_bad_annotation)
    ids = sorted(dataset.image_ids)[: args.max_images]
    metrics = {t: average_recall(dataset, args.results, t, ids) for t in IOU_TYPES}
    metrics["skipped"] = dict(dataset.skipped)
    metrics["warnings"] = _logged(proposal_count_warnings(metrics["segm"]["max_proposals"]))
    if args.out:
        write_outputs(args.out, metrics)
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: average recall of a model over a COCO split, or of a results JSON."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        metrics = (_model_metrics if args.model else _results_metrics)(args, parser)
    except DatasetError as err:
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(format_table(metrics))
    extra = {k: v for k, v in metrics.items() if k not in IOU_TYPES}
    if extra:
        print(json.dumps(extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
