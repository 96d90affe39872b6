"""Writing a dataset, all or nothing: every array checked first, then Parquet files and metadata.json
written into a staging folder beside `out` and moved in only when complete.

A failed write (bad input, a full disk) leaves `out` as it was: absent, or the dataset it held, byte
for byte. `out` must be new, empty, or hold a dataset; a regular file or a folder of other files is
refused rather than overwritten.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.format import DatasetInfo, check_labels, parquet_schema, read_metadata, sha256_file
from pipeline.data.metadata import FORMAT_VERSION, MAX_ROW_BYTES, METADATA_FILE, SPLITS, class_names_problem
from pipeline.errors import DataError

log = logging.getLogger(__name__)


def write_dataset(
    out: str | Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    class_names: list[str] | tuple[str, ...],
    source: str,
    rows_per_file: int = 50_000,
) -> DatasetInfo:
    """Write uint8 images (N,C,H,W) and int labels per split as validated Parquet + metadata.json.

    All or nothing: every array is checked before anything is written; the dataset is written into a
    staging folder beside `out` and moved in only when complete, so a failure leaves `out` as it was
    (absent, or the dataset it held, byte for byte). `out` must be new, empty or hold a dataset.
    """
    out = Path(out)
    _check_out(out)
    shape = _check_splits(splits, class_names=class_names, source=source)
    return _staged(
        out,
        lambda folder: _write_into(
            folder, splits, shape=shape, class_names=class_names, source=source, rows_per_file=rows_per_file
        ),
    )


def write_encoded_dataset(
    out: str | Path,
    splits: dict[str, tuple[list[bytes], np.ndarray]],
    *,
    shape: tuple[int, int, int],
    class_names: list[str] | tuple[str, ...],
    source: str,
    mean: list[float],
    std: list[float],
    bytes_per_file: int = 256 * 2**20,
) -> DatasetInfo:
    """Write encoded images (PNG/JPEG/WebP bytes, each already decoded and checked against `shape` by the
    caller) and labels per split, with the train split's channel `mean`/`std`; all or nothing, like
    write_dataset. Files are cut at about `bytes_per_file` of images, so none grows without bound."""
    out = Path(out)
    _check_out(out)
    problem = class_names_problem(list(class_names), len(class_names))
    if problem:
        raise DataError(f"{source}: {problem}")
    for split in SPLITS:
        images, labels = splits.get(split, ([], np.zeros(0, np.int64)))
        if len(images) == 0:
            raise DataError(f"{source} [{split}]: no images; every split needs at least one")
        if len(images) != len(labels):
            raise DataError(f"{source} [{split}]: {len(images)} images but {len(labels)} labels")
        check_labels(np.asarray(labels), len(class_names), f"{source} [{split}]")
    schema = parquet_schema(shape, len(class_names), encoded=True)

    def fill(folder: Path) -> None:
        files = {}
        for split in SPLITS:
            images, labels = splits[split]
            average = max(1, sum(len(b) for b in images) // len(images))
            rows = max(1, min(50_000, bytes_per_file // average))
            parts = [
                (pa.array(images[i : i + rows], pa.binary()), np.asarray(labels[i : i + rows], np.int64))
                for i in range(0, len(images), rows)
            ]
            files[split] = _write_parts(folder, split, parts, schema)
        meta = _metadata_record(shape, class_names, source, mean, std, files)
        (folder / METADATA_FILE).write_text(json.dumps({**meta, "image_encoding": "encoded"}, indent=2) + "\n")

    return _staged(out, fill)


def _staged(out: Path, fill) -> DatasetInfo:
    """`fill(folder)` writes a complete dataset into a staging folder beside `out`, which is checked and
    moved in; any failure leaves `out` as it was."""
    # Beside `out` (where a symlinked `out` really is), so moving the result in is a rename, not a copy.
    target = out.resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new-"))
    except OSError as err:
        raise _write_error(out, err) from None
    try:
        fill(staging)
        read_metadata(staging)  # the record just written passes every check a reader applies
        _move_into(staging, out)
    except OSError as err:
        raise _write_error(out, err) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return read_metadata(out)


def _write_error(out: Path, err: OSError) -> DataError:
    return DataError(
        f"{out}: cannot write the dataset there ({err.strerror or err}); nothing was changed. Check the "
        "folder's permissions and free space, or choose another --out"
    )


def _check_out(out: Path) -> None:
    """`out` is new, an empty folder, or a folder holding a dataset (which is replaced); else refused."""
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a folder; choose a new folder for the dataset (--out)")
    if out.is_dir() and not (out / METADATA_FILE).is_file() and any(out.iterdir()):
        raise DataError(
            f"{out}: holds files but no {METADATA_FILE}, so it is not a dataset and is left alone; "
            "prepare into a new or empty folder (--out)"
        )


def _check_splits(
    splits: dict[str, tuple[np.ndarray, np.ndarray]], *, class_names: list[str] | tuple[str, ...], source: str
) -> tuple[int, int, int]:
    """Every split present, non-empty and usable, and the class names too; returns the images' (C,H,W)."""
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"{source}: splits {missing} missing; a dataset needs {list(SPLITS)}")
    problem = class_names_problem(list(class_names), len(class_names))
    if problem:
        raise DataError(f"{source}: {problem}")
    first = splits["train"][0]
    if first.ndim != 4 or min(first.shape[1:]) < 1 or int(np.prod(first.shape[1:])) > MAX_ROW_BYTES:
        raise DataError(f"{source}: images must be (N,C,H,W) with C,H,W >= 1, got shape {first.shape}")
    shape = (int(first.shape[1]), int(first.shape[2]), int(first.shape[3]))
    for split in SPLITS:
        images, labels = splits[split]
        _check_arrays(images, labels, shape=shape, num_classes=len(class_names), where=f"{source} [{split}]")
    return shape


def _check_arrays(images: np.ndarray, labels: np.ndarray, *, shape: tuple, num_classes: int, where: str) -> None:
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8 after conversion, got {images.dtype}")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(shape):
        raise DataError(f"{where}: image shape {tuple(images.shape[1:])} differs from {tuple(shape)}")
    if len(images) == 0:
        raise DataError(f"{where}: no images; every split needs at least one")
    if labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but labels of shape {labels.shape}; one label per image")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    check_labels(labels, num_classes, where)


def _write_into(
    folder: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    shape: tuple[int, int, int],
    class_names: list[str] | tuple[str, ...],
    source: str,
    rows_per_file: int,
) -> None:
    """A complete dataset in the empty `folder`: Parquet files per split, then metadata.json."""
    schema = parquet_schema(shape, len(class_names))
    files = {
        split: _write_split(folder, split, *splits[split], schema=schema, rows_per_file=rows_per_file)
        for split in SPLITS
    }
    meta = _metadata(splits["train"][0], shape=shape, class_names=class_names, source=source, files=files)
    (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def _write_split(
    out: Path, split: str, images: np.ndarray, labels: np.ndarray, *, schema: pa.Schema, rows_per_file: int
) -> list[dict]:
    """Write `out/split/part-*.parquet` with these raw rows; returns the metadata entry of each file."""
    flat = np.ascontiguousarray(images.reshape(len(images), -1))
    parts = [
        (_fixed_rows(flat[start : start + rows_per_file]), labels[start : start + rows_per_file])
        for start in range(0, len(images), rows_per_file)
    ]
    return _write_parts(out, split, parts, schema)


def _write_parts(out: Path, split: str, parts: list[tuple[pa.Array, np.ndarray]], schema: pa.Schema) -> list[dict]:
    """One Parquet file per (image column, labels) part in `out/split/`; their metadata entries."""
    (out / split).mkdir()
    entries = []
    for part, (images, labels) in enumerate(parts):
        name = f"{split}/part-{part:05d}.parquet"
        table = pa.table({"image": images, "label": pa.array(labels.astype(np.int64), pa.int64())}, schema=schema)
        pq.write_table(table, out / name, write_page_checksum=True, compression="zstd")
        entries.append({"name": name, "num_rows": len(labels), "sha256": sha256_file(out / name)})
    return entries


def _fixed_rows(flat: np.ndarray) -> pa.Array:
    """Rows of flattened uint8 images (N, C*H*W) as one fixed_size_binary column."""
    return pa.FixedSizeBinaryArray.from_buffers(
        pa.binary(flat.shape[1]), len(flat), [None, pa.py_buffer(flat.tobytes())]
    )


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
    # Per-channel statistics of the train split: the model's normalisation layer uses them.
    mean = [float(v) for v in train.mean(axis=(0, 2, 3))]
    std = [float(v) for v in train.std(axis=(0, 2, 3))]
    return _metadata_record(shape, class_names, source, mean, std, files)


def _metadata_record(
    shape: tuple[int, int, int],
    class_names: list[str] | tuple[str, ...],
    source: str,
    mean: list[float],
    std: list[float],
    files: dict[str, list[dict]],
) -> dict:
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "shape": list(shape),
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "mean": mean,
        "std": [max(v, 1e-3) for v in std],
        "splits": files,
    }


def _move_into(staging: Path, out: Path) -> None:
    """Put the complete dataset in `staging` at `out`: one rename when `out` is new, else a swap of
    metadata.json and the split folders (other files in `out` stay), undone if a rename fails."""
    if not out.exists():
        staging.rename(out)
        return
    log.info("replacing the dataset at %s", out)
    old = Path(tempfile.mkdtemp(dir=staging.parent, prefix=f"{staging.name}.old-"))
    moved: list[str] = []
    placed: list[str] = []
    try:
        # metadata.json leaves first and arrives last: it never lists files that are not there.
        for piece in (METADATA_FILE, *SPLITS):
            if os.path.lexists(out / piece):
                (out / piece).rename(old / piece)
                moved.append(piece)
        for piece in (*SPLITS, METADATA_FILE):
            (staging / piece).rename(out / piece)
            placed.append(piece)
    except OSError:
        for piece in placed:
            (out / piece).rename(staging / piece)
        for piece in moved:
            (old / piece).rename(out / piece)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)
