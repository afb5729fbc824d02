"""Image files Pillow cannot write the usual way: 16-bit PNGs and a decompression bomb, as raw bytes."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")
    )


def png16(array: np.ndarray) -> bytes:
    """A 16-bit PNG of an (H, W) or (H, W, C) uint16 array, C = 1 (gray), 2 (gray + alpha), 3 or 4."""
    array = np.asarray(array, np.uint16)
    channels = 1 if array.ndim == 2 else array.shape[2]
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array.reshape(array.shape[0], -1))
    return _png(array.shape[1], array.shape[0], 16, color_type, rows)


def bomb_png() -> bytes:
    """A valid, all-black 1-bit PNG just over twice Pillow's MAX_IMAGE_PIXELS (about 20 KB on disk)."""
    side = int(np.sqrt(2 * Image.MAX_IMAGE_PIXELS)) + 8
    row = b"\x00" * (1 + (side + 7) // 8)
    return _png(side, side, 1, 0, row * side)
