"""Untrusted image files: the one decoder (a PNG or JPEG path -> (32, 32, 3) uint8 pixels, within
bounds) and the one walk budget, shared by image-folder sources (cifarflow.data.image_folder) and
`cifarflow predict`.

Bounds, cheapest first: a file larger than an image within data.max_image_pixels can be is refused
unread (its size from fstat), a PNG of more than data.max_image_chunks chunks is refused from its
chunk headers (a count that stops at the bound, before any decoder runs: Pillow spends ~10 us on each,
so millions of empty chunks cost it minutes), an image over data.max_image_pixels is refused from its
header before a pixel is decoded (Pillow's bomb check at open, then ours), and only the PNG and JPEG
decoders may run whatever a file's bytes claim to be. Every failure is an InputError naming the file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from cifarflow.errors import InputError
from cifarflow.openfile import open_regular
from cifarflow.pixels import HEIGHT, WIDTH

log = logging.getLogger(__name__)
EXTENSIONS = frozenset({".png", ".jpg", ".jpeg"})
FORMATS = ("PNG", "JPEG")  # the only decoders Pillow may pick, whatever the bytes claim to be
IMAGE_SLACK = 1 << 20  # metadata, palettes, poor compression: bytes an image file may hold beyond its pixels
BYTES_PER_PIXEL = 4  # RGBA, uncompressed: no PNG or JPEG within the pixel cap needs more
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_CHUNK_OVERHEAD = 12  # length (4), type (4) and CRC (4) around each chunk's data


def max_image_bytes(max_pixels: int) -> int:
    """The largest file a PNG/JPEG within `max_pixels` can be: BYTES_PER_PIXEL a pixel plus IMAGE_SLACK."""
    return max_pixels * BYTES_PER_PIXEL + IMAGE_SLACK


def check_image_bytes(path: Path | str, size: int, max_pixels: int) -> None:
    """InputError naming `path` and the param if `size` bytes is more than an image may be."""
    cap = max_image_bytes(max_pixels)
    if size > cap:
        raise InputError(
            f"{path}: {size:,} bytes, over the {cap:,} bytes an image within "
            f"data.max_image_pixels={max_pixels} may have (4 bytes a pixel + 1 MiB); refused unread"
        )


def count_png_chunks(f: BinaryIO, path: Path | str, max_chunks: int) -> None:
    """InputError naming `path` and the param if the PNG open in `f` has more than `max_chunks` chunks,
    counted from their headers alone (seeking past their data) and stopping at the bound; a file that is
    not a PNG is left to the decoders. `f` is left at its start."""
    if f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
        size, at, count = os.fstat(f.fileno()).st_size, len(PNG_SIGNATURE), 0
        while at + 8 <= size:
            count += 1
            if count > max_chunks:
                raise InputError(
                    f"{path}: a PNG of more than {max_chunks:,} chunks, over data.max_image_chunks={max_chunks}; "
                    "refused before decoding"
                )
            f.seek(at)
            header = f.read(8)
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"IEND":
                break
            at += PNG_CHUNK_OVERHEAD + length
    f.seek(0)


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels`, and its warning (over the limit, under
    twice it) made an error, for the duration; both are process-wide, so both are restored after."""
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


# Pillow modes read as they are: 8-bit grey or colour (alpha, if any, is dropped: the colour as stored),
# palettes looked up, JPEG's YCbCr by the JFIF formula, 16-bit grey scaled to 8 bits (v / 257, rounded:
# 65535 -> 255). Refused, as that file's error: CMYK (a faithful conversion needs the colour profile),
# 32-bit integer and float pixels (no defined range), and anything else.
SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
TO_RGB = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "YCbCr", "RGBX")
REFUSED = {
    "CMYK": "CMYK pixels need the image's colour profile to become RGB faithfully; save it as RGB",
    "I": "32-bit integer pixels have no defined range; save it as 8- or 16-bit",
    "F": "floating-point pixels have no defined range; save it as 8- or 16-bit",
}


def to_rgb(image: Image.Image, path: Path | str) -> Image.Image:
    """`image` as 8-bit RGB with the pixel values it holds (module comment above), or an InputError
    naming `path` and the mode when it cannot be converted faithfully."""
    mode = image.mode
    if mode in SIXTEEN_BIT:
        grey = np.asarray(image, dtype=np.uint32)  # 0..65535
        return Image.fromarray(((grey * 2 + 257) // 514).astype(np.uint8)).convert("RGB")  # round(v / 257)
    if mode in TO_RGB:
        return image.convert("RGB")
    reason = REFUSED.get(mode, f"its pixel mode {mode!r} is not one this project reads (8-bit, palette or 16-bit grey)")
    raise InputError(f"{path}: {reason}")


def decode(path: Path, max_pixels: int, *, resize: bool, max_chunks: int) -> np.ndarray:
    """The image at `path` as (32, 32, 3) uint8. Another size is resized with a warning (`resize`,
    predict's case) or refused (image-folder sources, which must be CIFAR-sized). Call it inside
    `pixel_limit(max_pixels)`, entered once by the caller: it sets process-wide state, which threads
    decoding at once must not each set and restore."""
    try:
        with open_regular(path) as f:
            check_image_bytes(path, os.fstat(f.fileno()).st_size, max_pixels)  # before Pillow reads a byte
            count_png_chunks(f, path, max_chunks)
            with Image.open(f, formats=FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise InputError(
                        f"{path}: image is {width}x{height}, over data.max_image_pixels={max_pixels} "
                        "(raise it in params.yaml if the image is genuine)"
                    )
                if (width, height) != (WIDTH, HEIGHT) and not resize:
                    raise InputError(f"{path}: image is {width}x{height}, expected {WIDTH}x{HEIGHT}")
                rgb = to_rgb(image, path)
        if rgb.size != (WIDTH, HEIGHT):
            log.warning("%s: %dx%d, resized to %dx%d", path, *rgb.size, WIDTH, HEIGHT)
            rgb = rgb.resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        return np.asarray(rgb, dtype=np.uint8)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(
            f"{path}: image over data.max_image_pixels={max_pixels}, refused before decoding (raise "
            "it in params.yaml if the image is genuine)"
        ) from None
    except Exception as exc:  # whatever a decoder raises on hostile bytes is this file's error, not the batch's
        raise InputError(f"{path}: not a readable image ({exc.__class__.__name__})") from None


class Budget:
    """Paths given and folder entries listed, counted against `limit` (data.max_members), so a walk of
    `/` or of a folder of millions of files stops there instead of at the end of memory."""

    def __init__(self, limit: int) -> None:
        self.limit, self.count = limit, 0

    @property
    def exceeded(self) -> bool:
        return self.count > self.limit

    def take(self) -> bool:
        """Count one more; False once that is over the limit."""
        self.count += 1
        return not self.exceeded

    def message(self, where: Path | str) -> str:
        return (
            f"{where}: more than {self.limit:,} files and folders, over data.max_members={self.limit}; stopped there, "
            "the rest is not read (raise it if this is genuine, or pass fewer or smaller folders)"
        )
