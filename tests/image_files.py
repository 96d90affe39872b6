"""Image datasets as users bring them, generated with Pillow: class folders of PNG and JPEG files, and a
Hugging Face-style Parquet file of encoded images. Each class has its own mean brightness and a bar at its
own position, so a small network learns them within an epoch or two."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

CLASSES = ("circle", "square", "triangle")


def class_image(label: int, rng: np.random.Generator, size: int = 16, rgb: bool = False) -> Image.Image:
    pixels = rng.integers(0, 60, size=(size, size)).astype(np.uint8) + np.uint8(40 * label)
    bar = slice(label * size // 3, (label + 1) * size // 3)
    pixels[:, bar] = 230
    image = Image.fromarray(pixels, mode="L")
    return image.convert("RGB") if rgb else image


def write_image_folder(root: Path, *, per_class: int, size: int = 16, seed: int = 0) -> Path:
    """root/<class>/<i>.png|.jpg: PNG for even i, JPEG (quality 95) for odd i."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = class_image(label, rng, size)
            if i % 2:
                image.save(root / name / f"{i:04d}.jpg", quality=95)
            else:
                image.save(root / name / f"{i:04d}.png")
    return root


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_hf_parquet(folder: Path, *, per_class: int, seed: int = 0) -> Path:
    """train-00000-of-00001.parquet and test-00000-of-00001.parquet as `datasets` writes them: an `img`
    column of {bytes, path} structs and an integer `label` whose class names are in the schema metadata."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    features = {"img": {"_type": "Image"}, "label": {"names": list(CLASSES), "_type": "ClassLabel"}}
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    for split, count in (("train", per_class), ("test", max(2, per_class // 4))):
        labels = [label for label in range(len(CLASSES)) for _ in range(count)]
        images = [{"bytes": encoded(class_image(label, rng)), "path": f"{i}.png"} for i, label in enumerate(labels)]
        table = pa.table({"img": images, "label": pa.array(labels, pa.int64())})
        pq.write_table(table.replace_schema_metadata(metadata), folder / f"{split}-00000-of-00001.parquet")
    return folder
