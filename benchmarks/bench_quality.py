"""The demo's quality against the goal of the issue "An embedded default that visibly works".

    python -m benchmarks.bench_quality                        # one demo run in a fresh clone of HEAD
    python -m benchmarks.bench_quality --runs 3               # three, with mean and spread
    python -m benchmarks.bench_quality --in-place             # in this checkout (its data/ and --out)
    python -m benchmarks.bench_quality --seeds 0 1 2          # one run per training and sampler seed
    python -m benchmarks.bench_quality --set training.stage2_steps=5000   # another recipe
    python -m benchmarks.bench_quality --summary demo_output/summary.json other/summary.json

Each run is `python -m sharpmask_tf.demo` in its own process (the demo's recipe: the small preset,
data generation included when the data is absent). By default each run happens in a fresh `git
clone` of this repository's HEAD under a temporary folder, so it generates the synthetic dataset
itself, as `make demo` on a new checkout does; committed code only. `--summary` trains nothing and
reads the given summary.json files. On one machine the runs of one seed agree to the digit, so
`--seeds` gives the spread of the training itself: run i passes `--set training.seed=S --set
data.seed=S` for the i-th seed S (seed 0 is `make demo`'s run; the synthetic data and the
validation patches, `training.val_seed`, stay the same). `--set SECTION.FIELD=VALUE` (repeatable)
passes config overrides to every run, after the seeds, as `python -m sharpmask_tf.demo --set` does.

Prints a Markdown table: per run, then mean, spread (max - min) and spread relative to the mean,
of SharpMask segm AR@100 and AR@1k, DeepMask segm AR@100, SharpMask per-patch mean IoU and share
over IoU .7, the served first image's top-10 score range (max - min) and the demo's seconds, with
the goal beside each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sharpmask_tf.config import get_config

REPO = Path(__file__).resolve().parents[1]
# Row label, goal, and how to read the value from a summary.json (None when the summary lacks it).
ROWS = (
    ("SharpMask segm AR@100", ">= 30", lambda s: 100 * s["average_recall"]["SharpMask"]["segm"]["AR@100"]),
    ("SharpMask segm AR@1k", ">= 40", lambda s: 100 * s["average_recall"]["SharpMask"]["segm"]["AR@1000"]),
    ("DeepMask segm AR@100", ">= 15", lambda s: 100 * s["average_recall"]["DeepMask"]["segm"]["AR@100"]),
    ("SharpMask per-patch mean IoU", ">= 0.65", lambda s: s["per_patch_mean_iou"]["SharpMask"]),
    ("SharpMask share over IoU .7", ">= 40%", lambda s: 100 * s["per_patch_iou_over_70"]["SharpMask"]),
    ("DeepMask per-patch mean IoU", "-", lambda s: s["per_patch_mean_iou"]["DeepMask"]),
    ("served top-10 score range", "spread", lambda s: float(np.ptp(s["served"]["images"][0]["scores"][:10]))),
    ("demo seconds (no install)", "<= 660", lambda s: s["seconds"]["total"]),
)


def read_row(summary: dict, read) -> float | None:
    """One goal-table value of a summary, or None when the summary predates that key."""
    try:
        return float(read(summary))
    except (KeyError, IndexError):
        return None


def demo_command(out: Path, seed: int | None = None, overrides: tuple[str, ...] | list[str] = ()) -> list[str]:
    """The demo's command line: results under `out`; with `seed`, training and sampling from that
    seed; `overrides` (`SECTION.FIELD=VALUE`) after the seed's."""
    sets = [] if seed is None else [f"training.seed={seed}", f"data.seed={seed}"]
    sets += list(overrides)
    return [sys.executable, "-m", "sharpmask_tf.demo", "--out", str(out), *(a for s in sets for a in ("--set", s))]


def run_demo(
    index: int,
    root: Path,
    in_place: bool,
    timeout_s: float,
    seed: int | None = None,
    overrides: tuple[str, ...] | list[str] = (),
) -> Path:
    """Runs the demo once and returns its summary.json: in this checkout (`--out` under `root`) or
    in a fresh clone of HEAD under `root`; `seed` and `overrides` as `demo_command` takes them."""
    if in_place:
        cwd, out = REPO, root / f"run{index}"
    else:
        cwd = root / f"clone{index}"
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(cwd)], check=True, timeout=120)
        out = cwd / "demo_output"
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    start = time.time()
    subprocess.run(
        demo_command(out, seed, overrides),
        cwd=cwd,
        env=env,
        check=True,
        timeout=timeout_s,
    )
    print(f"run {index}: {time.time() - start:.0f} s wall clock, {out / 'summary.json'}", flush=True)
    return out / "summary.json"


def table(summaries: list[dict], names: list[str] | None = None) -> str:
    """The goal table of the given summaries as Markdown, one column per run (named `names`)."""
    runs = names or [f"run {i + 1}" for i in range(len(summaries))]
    lines = [
        "| | " + " | ".join(runs) + " | mean | spread | spread / mean | goal |",
        "|---" * (len(runs) + 5) + "|",
    ]
    for label, goal, read in ROWS:
        values = [read_row(s, read) for s in summaries]
        cells = ["-" if v is None else f"{v:.3g}" for v in values]
        known = np.array([v for v in values if v is not None])
        if known.size:
            mean, spread = float(known.mean()), float(np.ptp(known))
            relative = f"{100 * spread / abs(mean):.0f}%" if mean else "-"
            stats = [f"{mean:.3g}", f"{spread:.3g}", relative]
        else:
            stats = ["-", "-", "-"]
        lines.append(f"| {label} | " + " | ".join(cells + stats) + f" | {goal} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1, help="demo runs")
    parser.add_argument("--in-place", action="store_true", help="run in this checkout instead of fresh clones")
    parser.add_argument("--root", help="where the clones or runs go (default: a new temporary folder)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per demo run")
    parser.add_argument("--seeds", type=int, nargs="+", help="one run per seed (instead of --runs)")
    parser.add_argument("--summary", nargs="+", help="only print the table of these summary.json files")
    parser.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="config override for every run"
    )
    args = parser.parse_args()
    if args.summary and args.set:
        parser.error(f"--set applies to runs, and --summary runs nothing. Received: --set {' '.join(args.set)}")
    if args.summary:
        paths = [Path(p) for p in args.summary]
    else:
        if args.runs < 1:
            parser.error(f"--runs must be >= 1. Received: --runs {args.runs}")
        if args.seeds and any(s < 0 for s in args.seeds):
            parser.error(f"--seeds must be non-negative. Received: --seeds {args.seeds}")
        try:  # a bad override fails here, not in the first demo after its clone
            get_config("small", args.set)
        except ValueError as e:
            parser.error(str(e))
        seeds = args.seeds or [None] * args.runs
        root = Path(args.root or tempfile.mkdtemp(prefix="bench_quality_"))
        root.mkdir(parents=True, exist_ok=True)
        paths = [run_demo(i + 1, root, args.in_place, args.timeout, seed, args.set) for i, seed in enumerate(seeds)]
    names = [f"seed {s}" for s in args.seeds] if args.seeds and not args.summary else None
    print(table([json.loads(p.read_text()) for p in paths], names))


if __name__ == "__main__":
    main()
