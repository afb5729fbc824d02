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

from sharpmask_tf.config import get_config


def _step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_output", help="where the demo writes its results")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="config overrides on top of the small preset",
    )
    parser.add_argument("--eval-images", type=int, default=50, help="val images for average recall")
    parser.add_argument("--eval-proposals", type=int, default=1000, help="proposals per image for average recall")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    config = get_config("small", args.set)

    from sharpmask_tf.data import ensure_dataset
    from sharpmask_tf.data.visualize import write_patch_grid

    _step(f"Data: synthetic COCO-format dataset under {Path(config.data.train_annotations).parents[1]}")
    ensure_dataset(config.data)
    write_patch_grid(config, out / "patches.png")
    print(f"sampled training patches with their labels: {out / 'patches.png'}")

    from sharpmask_tf.trainer import train

    run = out / "run"
    _step(f"Training: stage 1 (DeepMask) then stage 2 (SharpMask refinement) in {run}")
    metrics = train(config, str(run), stage="both")

    from sharpmask_tf.evaluation import evaluate_model
    from sharpmask_tf.inference import ProposalGenerator

    _step(f"Evaluation: class-agnostic COCO average recall on {args.eval_images} synthetic val images")
    sharp = ProposalGenerator.from_saved(run, dataclasses.replace(config.inference, top_n=args.eval_proposals))
    rows = {}
    for name, generator in (
        ("DeepMask", ProposalGenerator(sharp.model, sharp.config, coarse=True)),
        ("SharpMask", sharp),
    ):
        result = evaluate_model(
            generator,
            config.data.val_annotations,
            config.data.val_images,
            max_images=args.eval_images,
            out_dir=out / f"eval_{name.lower()}",
        )
        rows[name] = result
    summary = {
        "per_patch_mean_iou": {"DeepMask": metrics["deepmask_mean_iou"], "SharpMask": metrics["sharpmask_mean_iou"]},
        "average_recall": {
            name: {t: {k: v for k, v in r[t].items() if k != "curve"} for t in ("segm", "bbox")}
            for name, r in rows.items()
        },
        "seconds_per_image": {name: r["seconds_per_image"] for name, r in rows.items()},
    }
    columns = ("AR@10", "AR@100", "AR@1000", "AUC")
    header = " ".join(c.replace("AR@1000", "AR@1k").rjust(6) for c in columns)
    print(f"{'model':<9} | patch mIoU | segm {header} | box  {header} | s/image")
    for name, r in rows.items():
        cells = [" ".join(f"{100 * r[t][c]:6.1f}" for c in columns) for t in ("segm", "bbox")]
        iou = summary["per_patch_mean_iou"][name]
        print(f"{name:<9} | {iou:10.3f} |     {cells[0]} |      {cells[1]} | {r['seconds_per_image']:7.2f}")

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
    summary["served"] = served

    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nDemo finished in {time.time() - start:.0f} s; results in {out}/ (summary.json)")


if __name__ == "__main__":
    main()
