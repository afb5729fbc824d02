"""`make demo`: the project's main job on the embedded default, end to end."""

from __future__ import annotations

import argparse
import time

import numpy as np

from sharpmask_tf.config import get_config
from sharpmask_tf.sharpmask import build_model


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.time()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_output", help="where the demo writes its results")
    args = parser.parse_args(argv)
    start = _step("Models: the paper's ResNet-50 SharpMask and DeepMask, and the small CPU preset")
    for preset in ("sharpmask_resnet50", "deepmask_resnet50", "small"):
        config = get_config(preset)
        model = build_model(config)
        size = config.model.input_size
        patch = np.random.default_rng(0).random((1, size, size, 3)).astype("float32")
        out = model.predict(patch, verbose=0)
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in sorted(out.items()))
        print(f"{preset:>20}: {model.count_params() / 1e6:6.2f}M parameters, {size}px patch -> {shapes}")
    print(f"\nDemo finished in {time.time() - start:.0f} s; outputs under {args.out}/")


if __name__ == "__main__":
    main()
