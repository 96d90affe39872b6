"""The dataset format on disk: schema, metadata, writing, and reading with every check applied.

Pixels are stored as uint8. pyarrow on its own accepts NaN pixels, label 999, ragged rows, a missing
column and flipped bytes (see shared/NOTES), so every read checks schema, shape, label range and the
file's sha256, and pages carry checksums that are verified. Every failure is a `DataError` naming the
file. numpy and pyarrow only: tensors for workers are pipeline.data.shards' business.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import DataError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class DatasetInfo:
    path: Path
    shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    splits: dict[str, list[dict]]

    def num_rows(self, split: str) -> int:
        return sum(f["num_rows"] for f in self.splits[split])

    def files(self, split: str) -> list[Path]:
        return [self.path / f["name"] for f in self.splits[split]]


def _schema(shape: tuple[int, int, int], num_classes: int) -> pa.Schema:
    c, h, w = shape
    meta = {"advtrain.shape": json.dumps([c, h, w]), "advtrain.num_classes": str(num_classes)}
    return pa.schema(
        [pa.field("image", pa.binary(c * h * w), nullable=False), pa.field("label", pa.int64(), nullable=False)],
        metadata=meta,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------- writing


def write_dataset(
    out: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    class_names: list[str] | tuple[str, ...],
    source: str,
    rows_per_file: int = 50_000,
) -> DatasetInfo:
    """Write uint8 images (N,C,H,W) and int labels per split as validated Parquet + metadata.json."""
    out = Path(out)
    shape = _check_splits(out, splits, num_classes=len(class_names), source=source)
    out.mkdir(parents=True, exist_ok=True)
    if (out / METADATA_FILE).exists():
        log.info("overwriting dataset at %s", out)
    schema = _schema(shape, len(class_names))
    files = {
        split: _write_split(out, split, *splits[split], schema=schema, rows_per_file=rows_per_file) for split in SPLITS
    }
    meta = _metadata(splits["train"][0], shape=shape, class_names=class_names, source=source, files=files)
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return read_metadata(out)


def _check_splits(
    out: Path, splits: dict[str, tuple[np.ndarray, np.ndarray]], *, num_classes: int, source: str
) -> tuple[int, int, int]:
    """Every split present and every (images, labels) pair usable; returns the train images' (C,H,W)."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"{out}: splits {missing} missing; a dataset needs {list(SPLITS)}")
    first = splits["train"][0]
    if first.ndim != 4:
        raise DataError(f"{source}: images must be (N,C,H,W), got shape {first.shape}")
    c, h, w = first.shape[1:]
    shape = (int(c), int(h), int(w))
    for split, (images, labels) in splits.items():
        _check_arrays(images, labels, shape=shape, num_classes=num_classes, where=f"{source} [{split}]")
    return shape


def _check_arrays(images: np.ndarray, labels: np.ndarray, *, shape: tuple, num_classes: int, where: str) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 after conversion, got {images.dtype}")
    if tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{where}: image shape {tuple(images.shape[1:])} differs from {tuple(shape)}")
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {num_classes}) ({bad.size} such rows)"
        )


def _write_split(
    out: Path, split: str, images: np.ndarray, labels: np.ndarray, *, schema: pa.Schema, rows_per_file: int
) -> list[dict]:
    """Replace `out/split/part-*.parquet` with these rows; returns the metadata entry of each file."""
    (out / split).mkdir(exist_ok=True)
    for old in (out / split).glob("part-*.parquet"):
        old.unlink()
    entries = []
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    for part, start in enumerate(range(0, max(len(images), 1), rows_per_file)):
        stop = min(start + rows_per_file, len(images))
        name = f"{split}/part-{part:05d}.parquet"
        table = _table(flat[start:stop], labels[start:stop], schema)
        pq.write_table(table, out / name, write_page_checksum=True, compression="zstd")
        entries.append({"name": name, "num_rows": stop - start, "sha256": sha256_file(out / name)})
    return entries


def _table(flat: np.ndarray, labels: np.ndarray, schema: pa.Schema) -> pa.Table:
    """Rows of flattened uint8 images (N, C*H*W) and their labels as one table of `schema`."""
    images = pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat.tobytes())]
    )
    return pa.table({"image": images, "label": pa.array(labels.astype(np.int64), pa.int64())}, schema=schema)


def _metadata(
    train_images: np.ndarray,
    *,
    shape: tuple[int, int, int],
    class_names: list[str] | tuple[str, ...],
    source: str,
    files: dict[str, list[dict]],
) -> dict:
    """The content of metadata.json (key order is part of the file's bytes)."""
    train = train_images.astype(np.float64) / 255.0
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "shape": list(shape),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        # Per-channel statistics of the train split: the model's normalisation layer uses them.
        "mean": [float(v) for v in train.mean(axis=(0, 2, 3))],
        "std": [float(max(v, 1e-3)) for v in train.std(axis=(0, 2, 3))],
        "splits": files,
    }


# --------------------------------------------------------------------------- reading


def read_metadata(path: str | Path) -> DatasetInfo:
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise DataError(
            f"{meta_file}: not found. Prepare the data first, e.g. `advtrain data prepare digits --out {path}`"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{meta_file}: not valid JSON: {err}") from None
    required = ("format_version", "shape", "num_classes", "class_names", "mean", "std", "splits", "source")
    missing = [k for k in required if k not in meta]
    if missing:
        raise DataError(f"{meta_file}: missing fields {missing}")
    if meta["format_version"] != FORMAT_VERSION:
        raise DataError(f"{meta_file}: format_version {meta['format_version']}, this version reads {FORMAT_VERSION}")
    shape = tuple(int(d) for d in meta["shape"])
    if len(shape) != 3 or min(shape) < 1:
        raise DataError(f"{meta_file}: shape must be [C,H,W], got {meta['shape']}")
    for split in SPLITS:
        if split not in meta["splits"] or not meta["splits"][split]:
            raise DataError(f"{meta_file}: split '{split}' has no files")
    return DatasetInfo(
        path=path,
        shape=shape,  # type: ignore[arg-type]
        num_classes=int(meta["num_classes"]),
        class_names=tuple(meta["class_names"]),
        mean=tuple(meta["mean"]),
        std=tuple(meta["std"]),
        source=str(meta["source"]),
        splits=meta["splits"],
    )


def read_file(info: DatasetInfo, entry: dict, *, verify_checksum: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One Parquet file -> (uint8 images (N,C,H,W), int64 labels), every check applied."""
    path = info.path / entry["name"]
    if not path.is_file():
        raise DataError(f"{path}: listed in {METADATA_FILE} but missing")
    if verify_checksum:
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise DataError(
                f"{path}: sha256 {digest[:16]}... does not match {METADATA_FILE} ({entry['sha256'][:16]}...); "
                "the file changed after preparation: prepare the dataset again"
            )
    try:
        table = pq.read_table(path, page_checksum_verification=True)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"{path}: unreadable Parquet ({err})") from None
    return _decode_table(table, info, str(path), expected_rows=entry.get("num_rows"))


def _decode_table(
    table: pa.Table, info: DatasetInfo, where: str, expected_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    for column in ("image", "label"):
        if column not in table.column_names:
            raise DataError(f"{where}: required column '{column}' missing (columns: {table.column_names})")
    c, h, w = info.shape
    image_col = table.column("image").combine_chunks()
    label_col = table.column("label").combine_chunks()
    if image_col.null_count or label_col.null_count:
        raise DataError(f"{where}: null values in 'image' or 'label'")
    if not pa.types.is_integer(label_col.type):
        raise DataError(f"{where}: column 'label' must be int64, got {label_col.type}")
    if expected_rows is not None and len(table) != expected_rows:
        raise DataError(f"{where}: {len(table)} rows but {METADATA_FILE} says {expected_rows}")
    if pa.types.is_fixed_size_binary(image_col.type):
        if image_col.type.byte_width != c * h * w:
            raise DataError(
                f"{where}: images have {image_col.type.byte_width} bytes, shape {info.shape} needs {c * h * w}"
            )
        buf = image_col.buffers()[1]
        flat = np.frombuffer(buf, dtype=np.uint8, count=len(image_col) * c * h * w, offset=image_col.offset * c * h * w)
    elif pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type):
        rows = image_col.to_pylist()
        for i, row in enumerate(rows):
            if len(row) != c * h * w:
                raise DataError(f"{where}: row {i} image has {len(row)} bytes, shape {info.shape} needs {c * h * w}")
        flat = np.frombuffer(b"".join(rows), dtype=np.uint8)
    else:
        raise DataError(f"{where}: column 'image' must hold bytes, got {image_col.type}")
    labels = label_col.to_numpy().astype(np.int64)
    bad = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
    if bad.size:
        raise DataError(f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {info.num_classes})")
    return flat.reshape(len(labels), c, h, w), labels


def validate_dataset(path: str | Path) -> DatasetInfo:
    """Read and check every file of every split (the driver does this once before training)."""
    info = read_metadata(path)
    for split in SPLITS:
        for entry in info.splits[split]:
            read_file(info, entry)
    return info
