"""A picture of the sampler's output, to check it by eye.

    python -m sharpmask_tf.data.visualize --preset small --out patches.png

The top rows are mask samples: the label, a translucent cyan with a yellow outline over the
central window (framed in white); the bottom rows are score samples framed green (positive) or red (negative).
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageDraw

from sharpmask_tf.config import get_config
from sharpmask_tf.data.pipeline import load_split
from sharpmask_tf.data.sampler import PatchSampler
from sharpmask_tf.data.synthetic import ensure_dataset
from sharpmask_tf.visualize import mask_outline

LABEL_RGB = np.array([0.0, 1.0, 1.0], np.float32)
LABEL_ALPHA = 0.45
OUTLINE_RGB = np.array([1.0, 1.0, 0.0], np.float32)
POSITIVE_RGB, NEGATIVE_RGB = (40, 220, 40), (230, 30, 30)


def overlay_label(image: np.ndarray, label: np.ndarray, context: int) -> np.ndarray:
    """Tints the label's object pixels over the central window of a patch and outlines them.

    Args:
        image: (S, S, 3) float32 in [0, 1].
        label: (L, L) float32 in {+1, -1} covering the central S - 2*context pixels.
        context: context pixels on each side.

    Returns:
        The tinted (S, S, 3) float32 image.
    """
    window = image.shape[0] - 2 * context
    rows = (np.arange(window) * label.shape[0]) // window
    inside = label[rows[:, None], rows[None, :]] > 0
    tinted = image.copy()
    central = tinted[context : context + window, context : context + window]
    central[inside] = (1 - LABEL_ALPHA) * central[inside] + LABEL_ALPHA * LABEL_RGB
    central[mask_outline(inside, border_outside=False)] = OUTLINE_RGB
    return tinted


def patch_grid(
    mask_batch: dict[str, np.ndarray], score_batch: dict[str, np.ndarray], context: int, columns: int, zoom: int
) -> Image.Image:
    """Lays out mask samples then score samples, `columns` per row, each zoomed `zoom` times."""
    size = mask_batch["images"].shape[1] * zoom
    gap = 4
    tiles = []
    for image, label in zip(mask_batch["images"], mask_batch["masks"]):
        tile = Image.fromarray((overlay_label(image, label, context) * 255 + 0.5).astype(np.uint8))
        tile = tile.resize((size, size), Image.NEAREST)
        ImageDraw.Draw(tile).rectangle(
            [context * zoom, context * zoom, size - context * zoom - 1, size - context * zoom - 1], outline="white"
        )
        tiles.append(tile)
    for image, score in zip(score_batch["images"], score_batch["scores"][:, 0]):
        tile = Image.fromarray((image * 255 + 0.5).astype(np.uint8)).resize((size, size), Image.NEAREST)
        ImageDraw.Draw(tile).rectangle(
            [0, 0, size - 1, size - 1], outline=POSITIVE_RGB if score > 0 else NEGATIVE_RGB, width=max(3, zoom * 2)
        )
        tiles.append(tile)
    rows = -(-len(tiles) // columns)
    grid = Image.new("RGB", (columns * (size + gap) + gap, rows * (size + gap) + gap), (255, 255, 255))
    for i, tile in enumerate(tiles):
        grid.paste(tile, (gap + (i % columns) * (size + gap), gap + (i // columns) * (size + gap)))
    return grid


def write_patch_grid(
    config,
    out: str,
    split: str = "train",
    stage: int = 1,
    count: int = 16,
    columns: int = 8,
    zoom: int = 0,
    seed: int = 0,
) -> None:
    """Samples `count` mask and `count` score patches from a split and writes their grid as a PNG.

    A zoom of 0 picks 2 for patches under 128 px, else 1.
    """
    ensure_dataset(config.data)
    sampler = PatchSampler.from_config(load_split(config, split), config, stage)
    rng = np.random.default_rng(seed)
    mask_batch, _ = sampler.sample_batch(rng, "mask", count)
    score_batch, _ = sampler.sample_batch(rng, "score", count)
    zoom = zoom or (2 if sampler.input_size < 128 else 1)
    patch_grid(mask_batch, score_batch, config.model.context, columns, zoom).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", help="config preset")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, section.field=value")
    parser.add_argument("--out", default="patches.png", help="output PNG")
    parser.add_argument("--split", default="train", choices=("train", "val"))
    parser.add_argument("--stage", type=int, default=1, choices=(1, 2), help="label size of stage 1 or 2")
    parser.add_argument("--count", type=int, default=16, help="mask samples and score samples, each")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--zoom", type=int, default=0, help="tile zoom; 0 picks 2 for patches under 128 px")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = get_config(args.preset, args.set)
    write_patch_grid(config, args.out, args.split, args.stage, args.count, args.columns, args.zoom, args.seed)
    print(f"Wrote {args.out}: {args.count} mask samples (cyan labels), {args.count} score samples (green/red)")


if __name__ == "__main__":
    main()
