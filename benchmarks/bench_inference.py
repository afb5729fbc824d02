"""Full-image proposal speed: seconds per 640x480 image, GFLOP, GFLOP/s against matmul, peak RSS.

Run from the repository root: `python -m benchmarks.bench_inference` (about 3 minutes on 2
cores). Every configuration runs in its own process so peak RSS (resource.getrusage) is its own;
each process also measures the float32 matmul rate, so the two rates share the machine's state.
Models are the ResNet-50 presets with random weights (speed does not depend on the weights).

FLOP count: multiply-adds x 2 of every Conv2D and MatMul in the frozen graph of one scale
(trunk, head as convolutions, score branch, skip features), summed over the pyramid, plus the
mask stage for the N kept windows (DeepMask's mask layer, or SharpMask's vertical path).
Resizing, padding, elementwise ops and pasting masks are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from benchmarks.common import matmul_gflops

VARIANTS = {
    # name: ProposalGenerator keyword arguments
    "default": {},
    "xla": {"jit_compile": True},
    "unfolded_bn": {"fold_bn": False},  # not in the default list: --variants default,unfolded_bn
    "plain_refine": {"phase_refine": False},  # not in the default list either
    "bfloat16": {"compute_dtype": "bfloat16"},  # its matmul reference is a bfloat16 matmul
    "no_full_masks": {"full_masks": False},
}


def _graph_flops(concrete) -> float:
    """Conv2D and MatMul FLOPs of a concrete function with static shapes (frozen to inline calls)."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2

    flops = 0.0
    for op in convert_variables_to_constants_v2(concrete).graph.get_operations():
        if op.type == "Conv2D":
            kernel = op.inputs[1].shape
            flops += 2.0 * np.prod(op.outputs[0].shape.as_list()) * kernel[0] * kernel[1] * kernel[2]
        elif op.type in ("MatMul", "BatchMatMulV2"):
            inner = (
                op.inputs[0].shape[-2]
                if op.get_attr("transpose_a" if op.type == "MatMul" else "adj_x")
                else op.inputs[0].shape[-1]
            )
            flops += 2.0 * np.prod(op.outputs[0].shape.as_list()) * inner
    return flops


def pipeline_gflops(generator, height: int, width: int) -> float:
    """The pipeline's Conv2D/MatMul GFLOP for one height x width image."""
    import tensorflow as tf

    from sharpmask_tf.inference import padded_size, scaled_size

    p = generator.patch_size
    cap = min(1.0, generator.config.max_side / max(height, width))
    flops = 0.0
    for s in generator.scales:
        hp = int(padded_size(scaled_size(height, cap * s), p))
        wp = int(padded_size(scaled_size(width, cap * s), p))
        level = tf.function(generator._level_features)
        flops += _graph_flops(level.get_concrete_function(tf.TensorSpec([1, hp, wp, 3])))
    n = generator.config.top_n
    model = generator.model
    object_dim = model.get_layer("head_object").units
    if generator.refine:
        refine = model.get_layer("refine")
        specs = [tf.TensorSpec([n, *t.shape[1:]]) for t in refine.inputs]
        flops += _graph_flops(tf.function(lambda *xs: refine(list(xs))).get_concrete_function(*specs))
    else:
        flops += 2.0 * n * object_dim * model.get_layer("mask_logits").units
    return flops / 1e9


def run_one(preset: str, variant: str, runs: int, top_n: int) -> dict:
    """Times one configuration in this process; returns its row."""
    import tensorflow as tf

    from sharpmask_tf.config import get_config
    from sharpmask_tf.inference import ProposalGenerator
    from sharpmask_tf.sharpmask import build_model

    config = get_config(preset, [f"inference.top_n={top_n}"])
    tf.keras.utils.set_random_seed(0)
    model = build_model(config)
    generator = ProposalGenerator(model, config.inference, **VARIANTS[variant])
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    start = time.perf_counter()
    out = generator.propose(image)
    first = time.perf_counter() - start
    wall, cpu = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        out = generator.propose(image)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # before counting FLOPs
    matmul = matmul_gflops(dtype=VARIANTS[variant].get("compute_dtype") or "float32")
    gflop = pipeline_gflops(generator, 480, 640)
    seconds = float(np.median(wall))
    return {
        "model": preset.split("_")[0],
        "variant": variant,
        "seconds": seconds,
        "cpu_seconds": float(np.median(cpu)),
        "first_call_s": first,
        "gflop": gflop,
        "gflops": gflop / seconds,
        "matmul_gflops": matmul,
        "share_of_matmul": gflop / seconds / matmul,
        "peak_rss_gb": peak_rss,
        "load_average": os.getloadavg()[0],
        "proposals": int(out["num_proposals"]),
        "runs": runs,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per configuration (median)")
    parser.add_argument("--top-n", type=int, default=500)
    parser.add_argument("--variants", default="default,no_full_masks,bfloat16")
    parser.add_argument("--models", default="deepmask_resnet50,sharpmask_resnet50")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, runs=args.runs, top_n=args.top_n)))
        return 0
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows = []
    for variant in args.variants.split(","):
        for preset in args.models.split(","):
            cmd = [
                sys.executable,
                "-m",
                "benchmarks.bench_inference",
                "--one",
                preset,
                variant,
                "--runs",
                str(args.runs),
                "--top-n",
                str(args.top_n),
            ]
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
            if done.returncode:
                print(done.stderr[-2000:], file=sys.stderr)
                return done.returncode
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"  {preset} {variant}: {rows[-1]['seconds']:.2f} s", file=sys.stderr, flush=True)
    print(
        f"640x480 image, 7 scales 2^-2.5..2^0.5, N={args.top_n}, median of {args.runs} runs, "
        f"{os.cpu_count()} CPU cores\n"
    )
    header = (
        "model",
        "variant",
        "s/image",
        "cpu s",
        "GFLOP",
        "GFLOP/s",
        "matmul GFLOP/s",
        "% matmul",
        "peak RSS GB",
        "load avg",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print(
            f"| {r['model']} | {r['variant']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['gflop']:.0f} | "
            f"{r['gflops']:.0f} | {r['matmul_gflops']:.0f} | {100 * r['share_of_matmul']:.0f}% | {r['peak_rss_gb']:.2f} | "
            f"{r['load_average']:.1f} |"
        )
    by = {(r["model"], r["variant"]): r for r in rows}
    for variant in args.variants.split(","):
        if ("sharpmask", variant) in by and ("deepmask", variant) in by:
            ratio = by["sharpmask", variant]["seconds"] / by["deepmask", variant]["seconds"]
            print(f"SharpMask / DeepMask time ({variant}): {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
