"""The dataset format on disk: the Parquet schema, DatasetInfo, and reading with every check applied.

Pixels are stored as uint8. pyarrow on its own accepts NaN pixels, label 999, ragged rows, a missing
column and flipped bytes (see shared/NOTES), so every read checks schema, shape, label range and the
file's sha256, and pages carry checksums that are verified. metadata.json is parsed strictly by
pipeline.data.metadata; writing lives in pipeline.data.writing. Every failure is a `DataError` naming
the file. Tensors for workers are pipeline.data.shards' business.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.images import decode_rows
from pipeline.data.metadata import METADATA_FILE, SPLITS, parse_metadata
from pipeline.errors import DataError


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
    encoded: bool = False  # rows hold PNG/JPEG/WebP bytes (pipeline.data.images), decoded where read

    def num_rows(self, split: str) -> int:
        return sum(f["num_rows"] for f in self.splits[split])

    def files(self, split: str) -> list[Path]:
        return [self.path / f["name"] for f in self.splits[split]]


def parquet_schema(shape: tuple[int, int, int], num_classes: int, *, encoded: bool = False) -> pa.Schema:
    """Raw images: fixed_size_binary(C*H*W) of uint8 pixels; encoded: binary holding each image's file."""
    c, h, w = shape
    meta = {"advtrain.shape": json.dumps([c, h, w]), "advtrain.num_classes": str(num_classes)}
    if encoded:
        meta["advtrain.image_encoding"] = "encoded"
    image_type = pa.binary() if encoded else pa.binary(c * h * w)
    return pa.schema(
        [pa.field("image", image_type, nullable=False), pa.field("label", pa.int64(), nullable=False)],
        metadata=meta,
    )


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Every label in [0, num_classes), or a DataError naming the first row that is not."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{where}: row {bad[0]} has label {labels[bad[0]]}, outside [0, {num_classes}) ({bad.size} such rows)"
        )


# --------------------------------------------------------------------------- reading


def read_metadata(path: str | Path) -> DatasetInfo:
    """The dataset at `path` as described by its metadata.json, strictly parsed and checked
    (pipeline.data.metadata). Reads no data file: read_file / validate_dataset check those."""
    path = Path(path)
    meta_file = path / METADATA_FILE
    if not meta_file.is_file():
        raise DataError(
            f"{meta_file}: not found. Prepare the data first, e.g. `advtrain data prepare digits --out {path}`"
        )
    meta = parse_metadata(meta_file)
    return DatasetInfo(
        path=path,
        shape=(meta.shape[0], meta.shape[1], meta.shape[2]),
        num_classes=meta.num_classes,
        class_names=tuple(meta.class_names),
        mean=tuple(meta.mean),
        std=tuple(meta.std),
        source=meta.source,
        splits=meta.splits.model_dump(),
        encoded=meta.image_encoding == "encoded",
    )


def read_file(info: DatasetInfo, entry: dict, *, verify_checksum: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """One Parquet file -> (uint8 images (N,C,H,W), int64 labels), every check applied."""
    path = _own_file(info, entry["name"])
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
    return _decode_table(table, info, str(path), expected_rows=entry["num_rows"])


def _own_file(info: DatasetInfo, name: str) -> Path:
    """The file `name` of this dataset; refused when missing or when it resolves (through a symlink)
    outside the dataset folder: another dataset's file must never be read as this one's."""
    path = info.path / name
    if not path.is_file():
        raise DataError(f"{path}: listed in {METADATA_FILE} but missing; prepare the dataset again")
    try:
        real = path.resolve(strict=True)
        inside = real.is_relative_to(info.path.resolve(strict=True))
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
        real, inside = path, False
    if not inside:
        raise DataError(
            f"{path}: resolves to {real}, outside the dataset folder {info.path}; a dataset reads only its own "
            "files: prepare the dataset again instead of linking files in"
        )
    return path


def _decode_table(
    table: pa.Table, info: DatasetInfo, where: str, expected_rows: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A table of this dataset's schema -> (uint8 images (N,C,H,W), int64 labels), every check applied."""
    for column in ("image", "label"):
        if column not in table.column_names:
            raise DataError(f"{where}: required column '{column}' missing (columns: {table.column_names})")
    image_col = table.column("image").combine_chunks()
    label_col = table.column("label").combine_chunks()
    if image_col.null_count or label_col.null_count:
        raise DataError(f"{where}: null values in 'image' or 'label'")
    if not pa.types.is_integer(label_col.type):
        raise DataError(f"{where}: column 'label' must be int64, got {label_col.type}")
    if expected_rows is not None and len(table) != expected_rows:
        raise DataError(f"{where}: {len(table)} rows but {METADATA_FILE} says {expected_rows}")
    if info.encoded and not (pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type)):
        raise DataError(f"{where}: column 'image' must hold encoded image bytes, got {image_col.type}")
    flat = None if info.encoded else image_bytes(image_col, info.shape, where)
    _check_written_for(table.schema, info, where)
    labels = label_col.to_numpy().astype(np.int64)
    check_labels(labels, info.num_classes, where)
    if flat is None:  # decoded last: the cheap checks above name a broken file first
        return decode_rows(image_col.to_pylist(), info.shape, where), labels
    return flat.reshape(len(labels), *info.shape), labels


def image_bytes(image_col: pa.Array, shape: tuple[int, int, int], where: str) -> np.ndarray:
    """The 'image' column as one flat uint8 array; every row must hold exactly C*H*W bytes."""
    row_bytes = shape[0] * shape[1] * shape[2]
    if pa.types.is_fixed_size_binary(image_col.type):
        if image_col.type.byte_width != row_bytes:
            raise DataError(f"{where}: images have {image_col.type.byte_width} bytes, shape {shape} needs {row_bytes}")
        buf = image_col.buffers()[1]
        return np.frombuffer(buf, dtype=np.uint8, count=len(image_col) * row_bytes, offset=image_col.offset * row_bytes)
    if pa.types.is_binary(image_col.type) or pa.types.is_large_binary(image_col.type):
        rows = image_col.to_pylist()
        for i, row in enumerate(rows):
            if len(row) != row_bytes:
                raise DataError(f"{where}: row {i} image has {len(row)} bytes, shape {shape} needs {row_bytes}")
        return np.frombuffer(b"".join(rows), dtype=np.uint8)
    raise DataError(f"{where}: column 'image' must hold bytes, got {image_col.type}")


def _check_written_for(schema: pa.Schema, info: DatasetInfo, where: str) -> None:
    """The shape and class count the writer stamped into the file equal metadata.json's: a row's byte
    count alone cannot tell (1,8,8) from (1,4,16), so an edited shape or num_classes is caught here."""
    stamp = schema.metadata or {}
    try:
        shape = json.loads(stamp[b"advtrain.shape"])
        num_classes = int(stamp[b"advtrain.num_classes"])
    except (KeyError, ValueError, RecursionError):
        raise DataError(
            f"{where}: no valid advtrain.shape / advtrain.num_classes in its Parquet schema, so it was not "
            "written by `advtrain data prepare`; prepare the dataset again"
        ) from None
    encoding = stamp.get(b"advtrain.image_encoding", b"raw").decode("utf-8", "replace")
    if encoding != ("encoded" if info.encoded else "raw"):
        raise DataError(
            f"{where}: written with {encoding} images, but {METADATA_FILE} says "
            f"{'encoded' if info.encoded else 'raw'}; prepare the dataset again"
        )
    if shape != list(info.shape) or num_classes != info.num_classes:
        raise DataError(
            f"{where}: written for shape {shape} and {num_classes} classes, but {METADATA_FILE} says shape "
            f"{list(info.shape)} and {info.num_classes} classes; {METADATA_FILE} was changed after preparation: "
            "prepare the dataset again"
        )


def validate_dataset(path: str | Path) -> DatasetInfo:
    """Read and check every file of every split (the driver does this once before training)."""
    info = read_metadata(path)
    for split in SPLITS:
        for entry in info.splits[split]:
            read_file(info, entry)
    return info
