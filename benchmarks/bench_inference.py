"""Full-image proposal speed: seconds per 640x480 image, GFLOP, GFLOP/s against matmul, peak RSS.

Run from the repository root: `python -m benchmarks.bench_inference` (about 10 minutes on 2
cores). Every configuration runs in its own process so peak RSS (resource.getrusage) is its own;
each process also measures the float32 matmul rate, so the two rates share the machine's state.
Configurations run in interleaved rounds, DeepMask and SharpMask one after the other, so their
time ratio is taken within a round.
Models are the ResNet-50 presets with random weights (speed does not depend on the weights).

FLOP count: multiply-adds x 2 of every Conv2D and MatMul in the frozen graph of one scale
(trunk, head as convolutions, score branch, skip features), summed over the pyramid, plus the
mask stage for the N kept windows (DeepMask's mask layer, or SharpMask's vertical path), counted
on the model's own layers: the generator's border recomputations are extra work, not counted.
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
    # name: (ProposalGenerator keyword arguments, config overrides)
    "default": ({}, []),
    "xla": ({"jit_compile": True}, []),
    "unfolded_bn": ({"fold_bn": False}, []),  # not in the default list: --variants default,unfolded_bn
    "plain_refine": ({"phase_refine": False}, []),  # not in the default list either
    "bfloat16": ({}, ["inference.compute_dtype=bfloat16"]),  # its matmul reference is a bfloat16 matmul
    "no_full_masks": ({"full_masks": False}, []),
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
    """The pipeline's Conv2D/MatMul GFLOP for one height x width image, counted on the model's
    own layers (the generator's faster copies recompute some borders; that is not counted)."""
    import dataclasses

    import tensorflow as tf

    from sharpmask_tf.inference import ProposalGenerator
    from sharpmask_tf.pyramid import padded_size, scaled_size

    plain = ProposalGenerator(
        generator.model,
        dataclasses.replace(generator.config, compute_dtype=None),
        coarse=not generator.refine,
        fold_bn=False,
        phase_refine=False,
    )

    p = generator.patch_size
    cap = min(1.0, generator.config.max_side / max(height, width))
    flops = 0.0
    for s in generator.scales:
        hp = int(padded_size(scaled_size(height, cap * s), p))
        wp = int(padded_size(scaled_size(width, cap * s), p))
        level = tf.function(plain._level_features)
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

    options, overrides = VARIANTS[variant]
    config = get_config(preset, [f"inference.top_n={top_n}", *overrides])
    tf.keras.utils.set_random_seed(0)
    model = build_model(config, trunk_weights=False)  # timing only: no ImageNet download
    generator = ProposalGenerator(model, config.inference, **options)
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
    matmul = matmul_gflops(dtype=config.inference.compute_dtype or "float32")
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="timed runs per process (median)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="processes per configuration, run in interleaved rounds so DeepMask and SharpMask "
        "share the machine's state; the table gives the round with the median time",
    )
    parser.add_argument("--top-n", type=int, default=500)
    parser.add_argument("--variants", default="default,no_full_masks,bfloat16")
    parser.add_argument("--models", default="deepmask_resnet50,sharpmask_resnet50")
    parser.add_argument("--one", nargs=2, metavar=("PRESET", "VARIANT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write every round's rows to this JSON file")
    return parser


def run_rounds(presets: list[str], variants: list[str], rounds: int, runs: int, top_n: int) -> dict:
    """Every configuration in its own process (`--one`), in interleaved rounds.

    Returns:
        {(model, variant): [one `run_one` row per round]}.

    Raises:
        RuntimeError: with the process's error output, if one fails.
    """
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows = {(p.split("_")[0], v): [] for v in variants for p in presets}
    for r in range(rounds):
        for variant in variants:
            for preset in presets:
                cmd = [sys.executable, "-m", "benchmarks.bench_inference", "--one", preset, variant]
                cmd += ["--runs", str(runs), "--top-n", str(top_n)]
                done = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env)
                if done.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                rows[row["model"], variant].append(row)
                print(f"  round {r + 1}: {preset} {variant}: {row['seconds']:.2f} s", file=sys.stderr, flush=True)
    return rows


def print_table(rounds: dict) -> None:
    """The Markdown table: each configuration's median round and the range over rounds."""
    header = (
        "model",
        "variant",
        "s/image",
        "range",
        "cpu s",
        "GFLOP",
        "GFLOP/s",
        "matmul GFLOP/s",
        "% matmul",
        "% range",
        "peak RSS GB",
        "load avg",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for (model, variant), rows in rounds.items():
        r = sorted(rows, key=lambda row: row["seconds"])[len(rows) // 2]
        seconds = [row["seconds"] for row in rows]
        shares = [100 * row["share_of_matmul"] for row in rows]
        print(
            f"| {model} | {variant} | {r['seconds']:.2f} | {min(seconds):.2f}-{max(seconds):.2f} | "
            f"{r['cpu_seconds']:.2f} | {r['gflop']:.0f} | {r['gflops']:.0f} | {r['matmul_gflops']:.0f} | "
            f"{100 * r['share_of_matmul']:.0f}% | {min(shares):.0f}-{max(shares):.0f}% | "
            f"{max(row['peak_rss_gb'] for row in rows):.2f} | {r['load_average']:.1f} |"
        )


def print_ratios(rounds: dict, variants: list[str]) -> None:
    """SharpMask's time over DeepMask's, within each round, per variant that has both."""
    for variant in variants:
        if ("sharpmask", variant) in rounds and ("deepmask", variant) in rounds:
            ratios = sorted(
                s["seconds"] / d["seconds"] for s, d in zip(rounds["sharpmask", variant], rounds["deepmask", variant])
            )
            print(
                f"SharpMask / DeepMask time ({variant}), per round: median {ratios[len(ratios) // 2]:.2f}x, "
                f"range {ratios[0]:.2f}-{ratios[-1]:.2f}x"
            )


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.one:
        print(json.dumps(run_one(*args.one, runs=args.runs, top_n=args.top_n)))
        return 0
    variants, presets = args.variants.split(","), args.models.split(",")
    try:
        rounds = run_rounds(presets, variants, args.rounds, args.runs, args.top_n)
    except RuntimeError as err:
        print(err, file=sys.stderr)
        return 1
    print(
        f"640x480 image, 7 scales 2^-2.5..2^0.5, N={args.top_n}, {args.rounds} rounds of one process per "
        f"configuration, median of {args.runs} runs each, {os.cpu_count()} CPU cores\n"
    )
    print_table(rounds)
    print_ratios(rounds, variants)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([row for rows in rounds.values() for row in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
