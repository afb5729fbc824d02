"""Pictures of proposals: coloured translucent masks with outlines and scores over the image."""

from __future__ import annotations

import collections
import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def proposal_colors(n: int) -> np.ndarray:
    """n well-separated, saturated colours (golden-angle hues) as (n, 3) uint8."""
    hues = (np.arange(n) * 0.618033988749895) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, 0.85, 1.0) for h in hues]).reshape(n, 3).__mul__(255).astype(np.uint8)


def mask_outline(mask: np.ndarray, border_outside: bool = True) -> np.ndarray:
    """Pixels of a binary mask with a 4-neighbour outside it.

    Args:
        mask: (H, W) bool.
        border_outside: whether beyond the array's border counts as outside the mask (so mask
            pixels on the border are outline) or as continuing the border pixels.

    Returns:
        (H, W) bool.
    """
    padded = np.pad(mask, 1) if border_outside else np.pad(mask, 1, mode="edge")
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def draw_proposals(
    image: np.ndarray,
    masks: np.ndarray,
    scores: np.ndarray | None = None,
    max_draw: int = 10,
    alpha: float = 0.45,
) -> np.ndarray:
    """Draws the first `max_draw` proposals (best first; the best drawn on top).

    Args:
        image: (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) image, uint8 or float in [0, 1].
        masks: (N, H, W) bool masks at image size.
        scores: (N,) scores written beside each mask, or None.
        max_draw: how many proposals to draw.
        alpha: opacity of the mask fill.

    Returns:
        (H, W, 3) uint8 picture.

    Raises:
        ValueError: if the masks' size differs from the image's.
    """
    from PIL import Image, ImageDraw

    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] in (1, 2):
        image = np.repeat(image[..., :1], 3, axis=-1)
    canvas = image[..., :3].astype(np.float32)
    masks = np.asarray(masks, bool)[:max_draw]
    if masks.shape[1:] != canvas.shape[:2]:
        raise ValueError(f"masks must be (N, H, W) at the image's size {canvas.shape[:2]}. Received: {masks.shape}")
    colors = proposal_colors(len(masks))
    for mask, color in zip(masks[::-1], colors[::-1]):
        canvas[mask] = (1 - alpha) * canvas[mask] + alpha * color
        canvas[mask_outline(mask)] = color
    picture = Image.fromarray(canvas.astype(np.uint8))
    if scores is not None:
        draw = ImageDraw.Draw(picture)
        for mask, color, score in zip(masks, colors, scores):
            if mask.any():
                r, c = np.nonzero(mask)
                draw.text(
                    (int(c.min()) + 2, int(r.min()) + 1), f"{float(score):.2f}", fill=tuple(int(v) for v in color)
                )
    return np.asarray(picture)


def save_proposals(
    path: str | os.PathLike, image: np.ndarray, proposals: dict[str, np.ndarray], max_draw: int = 10
) -> None:
    """Writes `draw_proposals` of a `ProposalGenerator.propose` result as a PNG."""
    from PIL import Image

    picture = draw_proposals(image, proposals["masks"], proposals.get("scores"), max_draw)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)


def picture_names(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Distinct PNG names for the pictures of `paths`, in order.

    An image's picture is `<stem>.png` when no other input has its stem, else `<name>.png`
    (`a.jpg.png` beside `a.png.png`); a name that is still taken (the same file name in two
    folders) gets `-2`, `-3`, ... before `.png`, in input order.
    """
    paths = [Path(p) for p in paths]
    stems = collections.Counter(p.stem for p in paths)
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        base = path.stem if stems[path.stem] == 1 else path.name
        name, k = f"{base}.png", 1
        while name in taken:
            k += 1
            name = f"{base}-{k}.png"
        taken.add(name)
        names.append(name)
    return names
