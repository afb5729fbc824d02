"""python -m sharpmask_tf.convert SOURCE --out RUN_DIR (console script `sharpmask-convert`).

Converts the authors' released models into a run directory that `sharpmask_tf.inference`,
`sharpmask_tf.evaluation` and `serving.export` take with `--model RUN_DIR`:

  SOURCE  a .t7 saved by the reference trainers (deepmask/models/{deepmask,sharpmask}/model.t7),
          the reference's ImageNet resnet-50.t7 (the trunk only, to train from), or the PyTorch
          port's DeepMask.pth.tar.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sharpmask_tf.convert.run_dir import convert_file


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sharpmask-convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("source", help="model.t7, resnet-50.t7 or DeepMask.pth.tar")
    p.add_argument("--out", required=True, help="the run directory to write (must not exist)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = convert_file(args.source, args.out)
    except (FileNotFoundError, FileExistsError, ValueError, ImportError) as err:
        print(f"sharpmask-convert: {err}", file=sys.stderr)
        return 2
    print(f"{args.source} -> {args.out}: {', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
