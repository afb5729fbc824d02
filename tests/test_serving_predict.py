"""Request checks: image headers read without decoding, against what TensorFlow's decoder makes of
the same bytes, and the limits' own validation. The requests themselves go over gRPC in
test_serving_server.py."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from serving.predict import ImageHeader, RequestLimits, read_image_header


def encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def animation(frames: list[np.ndarray], fmt: str) -> bytes:
    buffer = io.BytesIO()
    first, *rest = [Image.fromarray(f) for f in frames]
    first.save(buffer, format=fmt, save_all=True, append_images=rest)
    return buffer.getvalue()


def png_bomb(side: int) -> bytes:
    """A side x side black greyscale PNG, compressed row by row so it is never whole in memory."""
    compressor, row, chunks = zlib.compressobj(9), bytes(side + 1), []
    for _ in range(side):
        chunks.append(compressor.compress(row))
    chunks.append(compressor.flush())

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(chunks)) + chunk(b"IEND", b"")


def gif_with_frame(screen: tuple[int, int], frame: tuple[int, int]) -> bytes:
    """A GIF whose one frame descriptor is `frame` (width, height) on a `screen` (width, height)."""
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0, 0, 0)
    descriptor = b"\x2c" + struct.pack("<HHHHB", 0, 0, *frame, 0)
    return header + descriptor + b"\x02\x02\x4c\x01\x00" + b"\x3b"


PIXELS = np.random.default_rng(0).integers(0, 256, (13, 29, 3), dtype=np.uint8)
STILL = {
    "jpeg": encode(PIXELS, "JPEG"),
    "progressive-jpeg": encode(PIXELS, "JPEG", progressive=True),
    "png": encode(PIXELS, "PNG"),
    "grey-16-bit-png": encode(PIXELS[..., 0].astype(np.uint16) * 200, "PNG"),
    "rgba-png": encode(np.dstack([PIXELS, PIXELS[..., :1]]), "PNG"),
    "gif": encode(PIXELS, "GIF"),
    "bmp": encode(PIXELS, "BMP"),
    "lossy-webp": encode(PIXELS, "WEBP"),
    "lossless-webp": encode(PIXELS, "WEBP", lossless=True),
    "rgba-webp": encode(np.dstack([PIXELS, PIXELS[..., :1]]), "WEBP"),
    "animated-gif": animation([PIXELS, PIXELS[::-1], PIXELS[:, ::-1]], "GIF"),
}


@pytest.mark.parametrize("name", sorted(STILL))
def test_headers_give_the_size_tensorflow_decodes_to(name):
    header = read_image_header(STILL[name])
    decoded = tf.io.decode_image(STILL[name], expand_animations=True).shape

    frames = decoded[0] if len(decoded) == 4 else 1
    assert (header.height, header.width, header.frames) == (*decoded[-3:-1], frames)


def test_a_bomb_is_measured_from_its_header():
    bomb = png_bomb(16000)

    assert len(bomb) < 1_000_000
    assert read_image_header(bomb) == ImageHeader("PNG", 16000, 16000)


def test_a_gif_frame_larger_than_its_screen_counts_at_its_own_size():
    # giflib allocates each frame's raster before TensorFlow checks it against the screen.
    assert read_image_header(gif_with_frame((10, 10), (30000, 20000))).pixels == 30000 * 20000
    assert read_image_header(gif_with_frame((10, 10), (5, 5))) == ImageHeader("GIF", 10, 10)


def test_bmp_dimensions_are_read_as_the_decoder_reads_them():
    bmp = bytearray(STILL["bmp"])
    bmp[18:26] = struct.pack("<ii", 40000, -30000)  # negative height: rows stored top-down

    assert read_image_header(bytes(bmp)) == ImageHeader("BMP", 30000, 40000)


def test_an_animated_webp_is_refused():
    with pytest.raises(ValueError, match="animated WebP"):
        read_image_header(animation([PIXELS, PIXELS[::-1]], "WEBP"))


@pytest.mark.parametrize(
    "data, detail",
    [
        (b"\x89PNG\r\n\x1a\n not", "Invalid PNG data: no IHDR chunk"),
        (b"\xff\xd8\xff\xe0", "Invalid JPEG data"),
        (b"GIF89a", "Invalid GIF data"),
        (b"BM\x00\x00", "Invalid BMP data"),
        (b"RIFF\x00\x00\x00\x00WEBPVP8 ", "Invalid WebP data"),
    ],
    ids=["png", "jpeg", "gif", "bmp", "webp"],
)
def test_truncated_headers_are_refused_naming_the_format(data, detail):
    with pytest.raises(ValueError, match=detail):
        read_image_header(data)


def test_data_in_no_image_format_is_left_to_the_decoder():
    assert read_image_header(b"not an image") is None


@pytest.mark.parametrize("field", ["max_batch_size", "max_image_pixels"])
@pytest.mark.parametrize("value", [0, -3, 2.5])
def test_limits_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=f"{field} must be a positive integer"):
        RequestLimits(**{field: value})
