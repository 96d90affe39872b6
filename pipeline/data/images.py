"""Encoded images (PNG, JPEG, WebP bytes) as the dataset format keeps them, decoded where they are read.

A large image dataset must not grow 10-50x on disk, so `advtrain data prepare images|parquet` stores each
image's encoded bytes as they came (or re-encoded as PNG when resized) and readers decode them: the driver
when it validates, a worker that holds its shard in memory, a Ray Data task when streaming. Every image is
decoded in full (a truncated file fails here, not mid-training) and checked against the dataset's shape.
Pillow does the decoding; the formats are limited to the three it is asked for.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.data.metadata import MAX_SIDE
from pipeline.errors import DataError

FORMATS = ("PNG", "JPEG", "WEBP")
EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
# Greyscale modes (1 channel); every other mode is read as RGB (palette and alpha images included).
GREY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def open_image(data: bytes, where: str) -> Image.Image:
    """The image in `data`, fully decoded (truncated or corrupt data fails here), its size bounded."""
    if not data:
        raise DataError(f"{where}: empty (0 bytes); remove the file or replace it with the image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            if max(image.size) > MAX_SIDE:
                raise DataError(f"{where}: {image.size[0]}x{image.size[1]} pixels, more than {MAX_SIDE} per side")
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise DataError(
            f"{where}: not a readable {'/'.join(FORMATS)} image ({err}); replace or remove the file"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:  # truncated data, broken chunks, bad headers
        raise DataError(f"{where}: corrupt or truncated image ({err}); replace or remove the file") from None
    return image


def to_array(image: Image.Image, channels: int) -> np.ndarray:
    """uint8 (C,H,W) with C = 1 (greyscale) or 3 (RGB), whatever the stored mode."""
    converted = image.convert("L" if channels == 1 else "RGB")
    array = np.asarray(converted, dtype=np.uint8)
    return array[None] if channels == 1 else np.ascontiguousarray(array.transpose(2, 0, 1))


def decode(data: bytes, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """Encoded bytes -> uint8 (C,H,W) of exactly `shape`, or a DataError naming `where`."""
    image = open_image(data, where)
    c, h, w = shape
    if image.size != (w, h):
        raise DataError(f"{where}: {image.size[0]}x{image.size[1]} pixels, the dataset's images are {w}x{h}")
    return to_array(image, c)


def decode_rows(rows: list, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """Many encoded images -> uint8 (N,C,H,W); a failure names the row."""
    out = np.empty((len(rows), *shape), dtype=np.uint8)
    for i, data in enumerate(rows):
        out[i] = decode(bytes(data) if data is not None else b"", shape, f"{where} row {i}")
    return out


def resized(image: Image.Image, height: int, width: int) -> Image.Image:
    """Scaled so it covers height x width (shorter side to fit, aspect kept), then center-cropped."""
    scale = max(height / image.height, width / image.width)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
