"""Images from files and arrays: validation, decoding, and RGB in [0, 1] as the models take it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
from PIL import Image

# Area outside the picture, in [0, 1] RGB (SPEC.md section 2).
GREY = 0.5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What Pillow raises for a file it cannot or will not decode; DecompressionBombError (an image
# over twice Image.MAX_IMAGE_PIXELS) derives from none of the others.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def to_rgb(image):
    """An image tensor as float32 RGB in [0, 1].

    Args:
        image: (H, W), (H, W, 1), (H, W, 2), (H, W, 3) or (H, W, 4); uint8 (0..255) or float
            (taken as [0, 1]). Gray is replicated to RGB; alpha composites onto mid grey.

    Returns:
        (H, W, 3) float32.
    """
    image = tf.convert_to_tensor(image)
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    else:
        image = tf.cast(image, tf.float32)
    if image.shape.rank == 2:
        image = image[..., None]
    channels = tf.shape(image)[-1]
    color = tf.cond(channels < 3, lambda: tf.tile(image[..., :1], [1, 1, 3]), lambda: image[..., :3])
    alpha = tf.cond(tf.equal(channels % 2, 0), lambda: image[..., -1:], lambda: tf.ones_like(image[..., :1]))
    return color * alpha + GREY * (1.0 - alpha)


def check_image(image: Any) -> np.ndarray:
    """Validates an image array for `ProposalGenerator.propose`.

    Returns:
        The image as (H, W, C) uint8 or float32, C in 1..4.

    Raises:
        ValueError: if it is empty, not 2-D/3-D, has more than 4 channels, or an unusable dtype.
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
        raise ValueError(f"An image must be (H, W) or (H, W, C) with C in 1..4. Received: shape={image.shape}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"An image must have at least one pixel. Received: shape={image.shape}")
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool or not np.issubdtype(image.dtype, np.number):
        raise ValueError(f"An image must be uint8 or float in [0, 1]. Received: dtype={image.dtype}")
    if np.issubdtype(image.dtype, np.integer):
        raise ValueError(
            f"Integer images must be uint8 (0..255); scale others to float in [0, 1]. Received: dtype={image.dtype}"
        )
    return image.astype(np.float32)


def to_8bit(image: Image.Image) -> Image.Image:
    """A Pillow image with 8 bits per channel, 16-bit grayscale rescaled rather than clipped.

    Pillow already reduces 16-bit RGB(A) and gray-alpha PNGs to their high bytes, but converts
    16-bit grayscale ("I;16*", and "I" as 16-bit values) to "L" by clipping at 255, which makes a
    normally exposed picture white. This keeps the high byte instead, as TensorFlow's
    `decode_png` (the serving path) does. Other modes are returned unchanged.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(values.astype(np.uint8), "L")
    return image


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Reads an image file as an (H, W, C) uint8 array (C = 1, 3 or 4; palettes become RGB(A);
    16-bit channels keep their high byte, `to_8bit`).

    Raises:
        ValueError: if the file cannot be decoded as an image, or is over Pillow's
            decompression-bomb limit (names the file).
    """
    try:
        with Image.open(path) as im:
            im.load()
            im = to_8bit(im)
            if im.mode in ("L", "RGB", "RGBA"):
                converted = im
            elif im.mode in ("LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                converted = im.convert("RGBA")
            elif im.mode in ("F", "1"):
                converted = im.convert("L")
            else:
                converted = im.convert("RGB")
            array = np.asarray(converted, dtype=np.uint8)
    except DECODE_ERRORS as err:
        raise ValueError(f"Cannot read an image from {str(path)!r}: {err}") from err
    return array[..., None] if array.ndim == 2 else array


def list_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files named by `inputs`: files as given, folders expanded to their image files.

    Raises:
        FileNotFoundError: if an input does not exist.
    """
    files = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"No such image file or folder. Received: {str(path)!r}")
    return files
