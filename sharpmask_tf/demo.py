"""`make demo`: the project's main job on the embedded default, end to end.

Generates the synthetic COCO-format dataset (if absent), trains the small preset's DeepMask and
SharpMask stages, evaluates both on the val split (per-patch IoU and COCO average recall), exports
the SharpMask for TensorFlow Serving, serves it with the local gRPC server, queries it with the
client and draws the served proposals. Everything goes under `--out` (default demo_output/).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from sharpmask_tf.config import Config, get_config

# The two masks of the one trained network, in the order they are evaluated and reported.
MODELS = ("DeepMask", "SharpMask")
# The average-recall columns of the printed table.
COLUMNS = ("AR@10", "AR@100", "AR@1000", "AUC")


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="where the demo writes its results")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config overrides on top of the small preset",
    )
    parser.add_argument("--eval-images", type=int, default=20, help="val images for average recall")
    parser.add_argument("--eval-proposals", type=int, default=1000, help="proposals per image for average recall")
    return parser.parse_args(argv)


def prepare_data(config: Config, out: Path) -> None:
    """Generates the synthetic dataset where the config expects it (unless it is there) and draws
    a grid of sampled training patches with their labels to `out/patches.png`."""
    from sharpmask_tf.data import ensure_dataset
    from sharpmask_tf.data.visualize import write_patch_grid

    _step(f"Data: synthetic COCO-format dataset under {Path(config.data.train_annotations).parents[1]}")
    ensure_dataset(config.data)
    write_patch_grid(config, out / "patches.png")
    print(f"sampled training patches with their labels: {out / 'patches.png'}")


def train_stages(config: Config, run: Path) -> dict[str, Any]:
    """Trains stage 1 (DeepMask) then stage 2 (SharpMask refinement) in `run`; returns metrics.json."""
    from sharpmask_tf.trainer import train

    _step(f"Training: stage 1 (DeepMask) then stage 2 (SharpMask refinement) in {run}")
    return train(config, str(run), stage="both")


def evaluate_masks(config: Config, run: Path, out: Path, num_images: int, num_proposals: int) -> dict[str, dict]:
    """COCO average recall of the trained network's coarse (DeepMask) and refined (SharpMask)
    masks on the first `num_images` val images, `num_proposals` proposals each; each model's
    curves and results go to `out/eval_<model>/`."""
    from sharpmask_tf.evaluation import evaluate_model
    from sharpmask_tf.inference import ProposalGenerator

    _step(f"Evaluation: class-agnostic COCO average recall on {num_images} synthetic val images")
    sharp = ProposalGenerator.from_saved(run, dataclasses.replace(config.inference, top_n=num_proposals))
    generators = {"DeepMask": ProposalGenerator(sharp.model, sharp.config, coarse=True), "SharpMask": sharp}
    return {
        name: evaluate_model(
            generators[name],
            config.data.val_annotations,
            config.data.val_images,
            max_images=num_images,
            out_dir=out / f"eval_{name.lower()}",
        )
        for name in MODELS
    }


def summarize(metrics: dict[str, Any], rows: dict[str, dict]) -> dict[str, Any]:
    """summary.json's contents: per-patch IoU of both masks on stage 2's validation patches, their
    average recall (curves left out) and inference seconds per image."""
    stage2 = metrics["sharpmask"]
    return {
        "per_patch_mean_iou": {"DeepMask": metrics["deepmask_mean_iou"], "SharpMask": metrics["sharpmask_mean_iou"]},
        "per_patch_iou_over_70": {"DeepMask": stage2["coarse_iou_over_70"], "SharpMask": stage2["iou_over_70"]},
        "score_accuracy": metrics["deepmask"]["score_accuracy"],
        "average_recall": {
            name: {t: {k: v for k, v in r[t].items() if k != "curve"} for t in ("segm", "bbox")}
            for name, r in rows.items()
        },
        "seconds_per_image": {name: r["seconds_per_image"] for name, r in rows.items()},
    }


def print_table(summary: dict[str, Any]) -> None:
    """Prints per-patch mean IoU, segm and box average recall and seconds per image by model."""
    header = " ".join(c.replace("AR@1000", "AR@1k").rjust(6) for c in COLUMNS)
    print(f"{'model':<9} | patch mIoU | segm {header} | box  {header} | s/image")
    for name in MODELS:
        recall = summary["average_recall"][name]
        cells = [" ".join(f"{100 * recall[t][c]:6.1f}" for c in COLUMNS) for t in ("segm", "bbox")]
        iou, seconds = summary["per_patch_mean_iou"][name], summary["seconds_per_image"][name]
        print(f"{name:<9} | {iou:10.3f} |     {cells[0]} |      {cells[1]} | {seconds:7.2f}")


def export_and_serve(config: Config, run: Path, out: Path) -> dict[str, Any]:
    """Exports the SharpMask as a TF Serving version under `out/exports`, serves it with the local
    gRPC server, queries it with the first three val images and draws the answers to
    `out/proposals.png`; returns `serving.demo_query.serve_and_query`'s record."""
    from serving.demo_query import serve_and_query
    from serving.export import export_model

    exports = out / "exports"
    _step(f"Export: a TensorFlow Serving SavedModel version under {exports / config.export.model_name}")
    version_dir = export_model(run, config, base_path=exports, version=0)
    print(f"exported {version_dir} (signatures serving_default on encoded images, serving_images on uint8)")

    _step("Serving: the local gRPC server (TF Serving's PredictionService), queried with the client")
    val_images = sorted(Path(config.data.val_images).glob("*.jpg"))[:3]
    served = serve_and_query(exports, config.export.model_name, val_images, out / "proposals.png")
    for image in served["images"]:
        best = ", ".join(f"{s:.2f}" for s in image["scores"][:5])
        print(f"{Path(image['path']).name}: {image['num_proposals']} proposals, best scores {best}")
    print(f"served version {served['version']} at {served['target']}; picture of the proposals: {served['out_png']}")
    return served


def main(argv: list[str] | None = None) -> None:
    args = _parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = get_config("small", args.set)
    seconds: dict[str, float] = {}
    start = last = time.time()

    def lap(name: str) -> None:
        nonlocal last
        seconds[name] = time.time() - last
        last = time.time()

    prepare_data(config, out)
    lap("data")
    metrics = train_stages(config, out / "run")
    lap("training")
    rows = evaluate_masks(config, out / "run", out, args.eval_images, args.eval_proposals)
    lap("evaluation")
    summary = summarize(metrics, rows)
    print_table(summary)
    summary["served"] = export_and_serve(config, out / "run", out)
    lap("export_and_serving")
    summary["seconds"] = {**seconds, "total": time.time() - start}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDemo finished in {time.time() - start:.0f} s; results in {out}/ (summary.json)")


if __name__ == "__main__":
    main()
