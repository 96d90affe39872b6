"""Image datasets: a folder of class folders (`advtrain data prepare images`) and Hugging Face-style Parquet
(`advtrain data prepare parquet`), written in the encoded layout (pipeline.data.images): each image's
PNG/JPEG/WebP bytes are kept as they came, or re-encoded as PNG when `size` resizes them.

Every image is decoded in full before anything is written, and every problem is named by file (or file
and row): an undecodable or truncated image, a zero-byte file, an empty class folder, a file that is not
an image, mixed sizes without `size`. Splits: train/ val/ test/ subfolders (or Parquet files whose names
say train/validation/test) are kept; what is missing is carved from train, stratified by class.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.format import DataError, DatasetInfo
from pipeline.data.images import EXTENSIONS, GREY_MODES, open_image, png_bytes, resized, to_array
from pipeline.data.metadata import MAX_CLASSES, SPLITS
from pipeline.data.writing import write_encoded_dataset

# An item: (the image's bytes, its label, where it came from for messages).
Item = tuple[bytes, int, str]
SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "valid": "val", "test": "test"}


def prepare_images(
    source: str | Path,
    out: str | Path,
    *,
    size: tuple[int, int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetInfo:
    """A folder with one subfolder of images per class (or train/, val/, test/ folders of class folders)."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a folder; give a folder with one subfolder of images per class")
    split_dirs = {SPLIT_NAMES[d.name]: d for d in _subfolders(source) if d.name in SPLIT_NAMES}
    roots = split_dirs if "train" in split_dirs else {"train": source}
    class_names = sorted({d.name for root in roots.values() for d in _subfolders(root)})
    if len(class_names) < 2:
        raise DataError(
            f"{source}: {len(class_names)} class folder(s); a classifier needs at least 2: put each class's images "
            "in its own subfolder (e.g. cats/, dogs/)"
        )
    items = {split: list(_folder_items(root, class_names)) for split, root in roots.items()}
    return _prepare(
        items,
        out,
        class_names=class_names,
        source=f"images:{source}",
        size=size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _folder_items(root: Path, class_names: list[str]) -> Iterable[Item]:
    for label, name in enumerate(class_names):
        folder = root / name
        files = sorted(f for f in folder.iterdir() if not f.name.startswith(".")) if folder.is_dir() else []
        if not files:
            raise DataError(f"{folder}: empty class folder (or missing); add its images or remove the folder")
        for file in files:
            if not file.is_file() or file.suffix.lower() not in EXTENSIONS:
                raise DataError(
                    f"{file}: not an image file advtrain reads ({', '.join(EXTENSIONS)}); move it out of the "
                    "class folder"
                )
            yield file.read_bytes(), label, str(file)


def prepare_parquet(
    source: str | Path,
    out: str | Path,
    *,
    image_column: str = "image",
    label_column: str = "label",
    size: tuple[int, int] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> DatasetInfo:
    """Hugging Face-style Parquet: an image column of encoded bytes or {bytes, path} structs and a label column
    (integers, with class names from the file's Hugging Face metadata when present, or strings)."""
    source = Path(source)
    files = sorted(source.rglob("*.parquet")) if source.is_dir() else [source]
    if not files or not all(f.is_file() for f in files):
        raise DataError(f"{source}: no Parquet file there; give a .parquet file or a folder of them")
    raw: dict[str, list[tuple[bytes, object, str]]] = {}
    names: list[str] | None = None
    for file in files:
        split = next((SPLIT_NAMES[p] for p in _name_parts(file, source) if p in SPLIT_NAMES), "train")
        rows, file_names = _parquet_rows(file, image_column, label_column)
        raw.setdefault(split, []).extend(rows)
        names = names or file_names
    class_names, items = _labelled(raw, names, where=str(source))
    return _prepare(
        items,
        out,
        class_names=class_names,
        source=f"parquet:{source}",
        size=size,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


def _name_parts(file: Path, source: Path) -> list[str]:
    """train-00000-of-00001.parquet, data/test-*.parquet, validation/...: the words that may name a split."""
    relative = file.relative_to(source) if source.is_dir() else Path(file.name)
    words = [w for part in relative.parts for w in part.replace(".", "-").replace("_", "-").split("-")]
    return [w.lower() for w in words]


def _parquet_rows(file: Path, image_column: str, label_column: str) -> tuple[list, list[str] | None]:
    try:
        table = pq.read_table(file, columns=[image_column, label_column])
    except (OSError, pa.ArrowException) as err:
        raise DataError(
            f"{file}: cannot read columns {image_column!r} and {label_column!r} ({str(err).splitlines()[0]}); "
            "name them with --image-column and --label-column"
        ) from None
    images = table.column(image_column).combine_chunks()
    if pa.types.is_struct(images.type):
        if images.type.get_field_index("bytes") < 0:
            raise DataError(f"{file}: column {image_column!r} is a struct without 'bytes' ({images.type})")
        images = images.field("bytes")
    if not (pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type)):
        raise DataError(f"{file}: column {image_column!r} holds {images.type}, not encoded image bytes")
    labels = table.column(label_column).to_pylist()
    pairs = enumerate(zip(images.to_pylist(), labels, strict=True))
    rows = [(data or b"", label, f"{file} row {i}") for i, (data, label) in pairs]
    return rows, _hf_class_names(table.schema, label_column)


def _hf_class_names(schema: pa.Schema, label_column: str) -> list[str] | None:
    """ClassLabel names from the `huggingface` schema metadata that `datasets` writes, if any."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}"))
        feature = info["info"]["features"][label_column]
        names = feature.get("names")
        return [str(n) for n in names] if isinstance(names, list) else None
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _labelled(raw: dict[str, list], names: list[str] | None, *, where: str) -> tuple[list[str], dict[str, list[Item]]]:
    """Labels as class indices: integers as they are (names from the metadata, else 0..max), strings sorted."""
    values = [label for rows in raw.values() for _, label, _ in rows]
    if all(type(v) is int for v in values):
        top = max(values)
        if min(values) < 0 or top >= MAX_CLASSES:
            raise DataError(f"{where}: labels must lie in [0, {MAX_CLASSES}), found {min(values)}..{top}")
        class_names = names if names and len(names) > top else [str(c) for c in range(top + 1)]
        index = {c: c for c in range(len(class_names))}
    elif all(isinstance(v, str) and v for v in values):
        class_names = sorted(set(values))
        index = {name: i for i, name in enumerate(class_names)}
    else:
        bad = next(v for v in values if not (type(v) is int or (isinstance(v, str) and v)))
        raise DataError(f"{where}: label {bad!r}; labels must be all integers or all non-empty strings")
    return class_names, {s: [(b, index[label], w) for b, label, w in rows] for s, rows in raw.items()}


# --------------------------------------------------------------------------- shared by both sources


def _prepare(
    items: dict[str, list[Item]],
    out: str | Path,
    *,
    class_names: list[str],
    source: str,
    size: tuple[int, int] | None,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> DatasetInfo:
    if size is not None and not (1 <= size[0] <= 4096 and 1 <= size[1] <= 4096):
        raise DataError(f"--size {size[0]} {size[1]}: height and width from 1 to 4096")
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        if not 0 < fraction < 1:
            raise DataError(f"--{name}-fraction {fraction}: a fraction between 0 and 1 (e.g. 0.1)")
    checked = {split: _checked(rows, size) for split, rows in items.items()}
    shapes = {(h, w) for rows in checked.values() for _, _, _, h, w, _ in rows}
    if len(shapes) > 1:
        first = next(iter(checked.values()))[0]
        odd = next(r for rows in checked.values() for r in rows if (r[3], r[4]) != (first[3], first[4]))
        raise DataError(
            f"{odd[2]}: {odd[4]}x{odd[3]} pixels, but {first[2]} is {first[4]}x{first[3]}; images differ in size: "
            "pass --size H W to resize and center-crop them all"
        )
    (height, width), grey = shapes.pop(), all(r[5] for rows in checked.values() for r in rows)
    shape = (1 if grey else 3, height, width)
    splits = _carved(
        {s: ([r[0] for r in rows], np.array([r[1] for r in rows], np.int64)) for s, rows in checked.items()},
        val_fraction,
        test_fraction,
        seed,
        where=source,
    )
    mean, std = _channel_stats(splits["train"][0], shape)
    return write_encoded_dataset(out, splits, shape=shape, class_names=class_names, source=source, mean=mean, std=std)


def _checked(rows: list[Item], size: tuple[int, int] | None) -> list[tuple[bytes, int, str, int, int, bool]]:
    """Each image decoded in full: (bytes to store, label, where, height, width, is greyscale)."""
    out = []
    for data, label, where in rows:
        image = open_image(data, where)
        grey = image.mode in GREY_MODES
        if size is not None:
            image = resized(image.convert("L" if grey else "RGB"), *size)
            data = png_bytes(image)
        out.append((data, label, where, image.height, image.width, grey))
    return out


def _carved(splits: dict, val_fraction: float, test_fraction: float, seed: int, *, where: str) -> dict:
    """train/val/test: missing splits carved from train, stratified by class (deterministic)."""
    from pipeline.data.sources import _split_off

    if "train" not in splits:
        raise DataError(f"{where}: no training images (a train split, or images outside val/test folders/files)")
    images = np.empty(len(splits["train"][0]), dtype=object)  # one bytes object per row
    images[:] = splits["train"][0]
    train = (images, splits["train"][1])
    for split, fraction in (("test", test_fraction), ("val", val_fraction)):
        if split not in splits:
            train, carved = _split_off(*train, fraction, seed + len(splits))
            if len(carved[1]) == 0 or len(train[1]) == 0:
                raise DataError(
                    f"{where}: {len(train[1]) + len(carved[1])} training images leave none for the {split} split at "
                    f"fraction {fraction:g}; add images or a {split}/ folder"
                )
            splits[split] = carved
    splits["train"] = train
    return {s: (list(splits[s][0]), np.asarray(splits[s][1], np.int64)) for s in SPLITS}


def _channel_stats(images: list[bytes], shape: tuple[int, int, int]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the train split in [0,1], accumulated image by image (bounded memory)."""
    total = np.zeros(shape[0])
    squares = np.zeros(shape[0])
    for i, data in enumerate(images):
        pixels = to_array(open_image(data, f"train image {i}"), shape[0]).astype(np.float64) / 255.0
        total += pixels.sum(axis=(1, 2))
        squares += (pixels**2).sum(axis=(1, 2))
    count = len(images) * shape[1] * shape[2]
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 0.0))
    return [float(v) for v in mean], [float(v) for v in std]
