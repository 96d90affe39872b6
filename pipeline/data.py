"""The project's Parquet dataset format: preparation, validation and per-worker tensors.

A prepared dataset is a folder::

    metadata.json            shape (C,H,W), num_classes, class names, channel mean/std, source,
                             and per split the files with their row counts and sha256
    train/part-00000.parquet columns image: fixed_size_binary(C*H*W) of uint8 pixels, label: int64
    val/...  test/...

Pixels are stored as uint8 and handed to workers as float32 in [0,1] (pixel space: normalisation is
the model's first layer). pyarrow on its own accepts NaN pixels, label 999, ragged rows, a missing
column and flipped bytes (see shared/NOTES), so every read checks schema, shape, label range and the
file's sha256, and pages carry checksums that are verified. Every failure is a `DataError` naming the
file. This module never imports ray: the Ray Data path lives in pipeline.orchestrate.train.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
METADATA_FILE = "metadata.json"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


class DataError(ValueError):
    """Data that cannot be used; the message names the file (and row) and what is wrong."""


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
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        raise DataError(f"{out}: splits {missing} missing; a dataset needs {list(SPLITS)}")
    first = splits["train"][0]
    if first.ndim != 4:
        raise DataError(f"{source}: images must be (N,C,H,W), got shape {first.shape}")
    shape = tuple(int(d) for d in first.shape[1:])
    num_classes = len(class_names)
    for split, (images, labels) in splits.items():
        _check_arrays(images, labels, shape=shape, num_classes=num_classes, where=f"{source} [{split}]")
    out.mkdir(parents=True, exist_ok=True)
    if (out / METADATA_FILE).exists():
        log.info("overwriting dataset at %s", out)
    schema = _schema(shape, num_classes)
    files: dict[str, list[dict]] = {}
    for split in SPLITS:
        images, labels = splits[split]
        (out / split).mkdir(exist_ok=True)
        for old in (out / split).glob("part-*.parquet"):
            old.unlink()
        files[split] = []
        flat = np.ascontiguousarray(images.reshape(len(images), -1))
        for part, start in enumerate(range(0, max(len(images), 1), rows_per_file)):
            stop = min(start + rows_per_file, len(images))
            name = f"{split}/part-{part:05d}.parquet"
            table = pa.table(
                {
                    "image": pa.FixedSizeBinaryArray.from_buffers(
                        pa.binary(flat.shape[1]), stop - start, [None, pa.py_buffer(flat[start:stop].tobytes())]
                    ),
                    "label": pa.array(labels[start:stop].astype(np.int64), pa.int64()),
                },
                schema=schema,
            )
            pq.write_table(table, out / name, write_page_checksum=True, compression="zstd")
            files[split].append({"name": name, "num_rows": stop - start, "sha256": sha256_file(out / name)})
    train = splits["train"][0].astype(np.float64) / 255.0
    meta = {
        "format_version": FORMAT_VERSION,
        "source": source,
        "shape": list(shape),
        "num_classes": num_classes,
        "class_names": list(class_names),
        # Per-channel statistics of the train split: the model's normalisation layer uses them.
        "mean": [float(v) for v in train.mean(axis=(0, 2, 3))],
        "std": [float(max(v, 1e-3)) for v in train.std(axis=(0, 2, 3))],
        "splits": files,
    }
    (out / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return read_metadata(out)


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


def _to_uint8(images: np.ndarray, where: str) -> np.ndarray:
    """uint8 as is; floats must be finite and in [0,1] (scaled to 0..255)."""
    if images.dtype == np.uint8:
        return images
    if np.issubdtype(images.dtype, np.floating):
        finite = np.isfinite(images)
        if not finite.all():
            row = int(np.flatnonzero(~finite.reshape(len(images), -1).all(axis=1))[0])
            raise DataError(f"{where}: row {row} has non-finite pixel values (NaN or inf)")
        lo, hi = float(images.min()), float(images.max())
        if lo < 0.0 or hi > 1.0:
            raise DataError(f"{where}: float pixels must lie in [0,1], found [{lo}, {hi}]")
        return np.rint(images * 255.0).astype(np.uint8)
    if np.issubdtype(images.dtype, np.integer):
        lo, hi = int(images.min()), int(images.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{where}: integer pixels must lie in [0,255], found [{lo}, {hi}]")
        return images.astype(np.uint8)
    raise DataError(f"{where}: unsupported pixel dtype {images.dtype}")


def _split_off(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Stratified split: `fraction` of each class goes to the second part (deterministic)."""
    rng = np.random.default_rng(seed)
    second = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        second.append(idx[: round(len(idx) * fraction)])
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.concatenate(second)] = True
    first_idx, second_idx = np.flatnonzero(~mask), np.flatnonzero(mask)
    rng.shuffle(first_idx)
    rng.shuffle(second_idx)
    return (images[first_idx], labels[first_idx]), (images[second_idx], labels[second_idx])


def prepare_digits(out: str | Path, *, seed: int = 0) -> DatasetInfo:
    """scikit-learn's bundled 8x8 digits (1797 images, no download): 70/10/20 train/val/test."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to 0..255 so the stored format is the same for every source.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    labels = bunch.target.astype(np.int64)
    rest, test = _split_off(images, labels, 0.2, seed)
    train, val = _split_off(*rest, 0.125, seed + 1)
    return write_dataset(
        out,
        {"train": train, "val": val, "test": test},
        class_names=[str(d) for d in range(10)],
        source="sklearn.datasets.load_digits",
    )


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read IDX file: {err}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} ({int(np.prod(dims))} bytes) but has {data.size}")
    return data.reshape(dims)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).exists():
            return source / name
    raise DataError(f"{source}: missing {stem}(.gz); expected the four Fashion-MNIST IDX files there")


def prepare_fashion_mnist(source: str | Path, out: str | Path, *, val_size: int = 5000, seed: int = 0) -> DatasetInfo:
    """Fashion-MNIST (or MNIST) IDX files in `source` -> 28x28 grey; val split carved from train."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source}: not a folder. Debian's package dataset-fashion-mnist puts the IDX files in "
            "/usr/share/datasets/fashion-mnist"
        )
    x_train = _read_idx(_find(source, "train-images-idx3-ubyte"))[:, None]
    y_train = _read_idx(_find(source, "train-labels-idx1-ubyte")).astype(np.int64)
    x_test = _read_idx(_find(source, "t10k-images-idx3-ubyte"))[:, None]
    y_test = _read_idx(_find(source, "t10k-labels-idx1-ubyte")).astype(np.int64)
    train, val = _split_off(x_train, y_train, val_size / len(y_train), seed)
    return write_dataset(
        out,
        {"train": train, "val": val, "test": (x_test, y_test)},
        class_names=FASHION_MNIST_CLASSES,
        source=f"fashion-mnist:{source}",
    )


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """The CIFAR-10 "python version" batches are pickles of {b'data': uint8 array, b'labels': [...]}.
    A pickle can name any callable; this one resolves only what rebuilding numpy arrays needs, so a
    tampered batch file fails instead of running code."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(f"refusing to load {module}.{name} from a CIFAR-10 batch: it holds only arrays and lists")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(
            f"{path}: missing. --source must be the extracted 'cifar-10-batches-py' folder "
            f"(data_batch_1..5 and test_batch)"
        )
    try:
        with path.open("rb") as f:
            batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise DataError(f"{path}: not a CIFAR-10 python batch ({err})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}")
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels")
    return data.reshape(-1, 3, 32, 32), labels


def prepare_cifar10(source: str | Path, out: str | Path, *, val_size: int = 5000, seed: int = 0) -> DatasetInfo:
    """CIFAR-10's python batches (the extracted cifar-10-batches-py folder) -> 3x32x32; val carved from train."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a folder; pass the extracted cifar-10-batches-py folder")
    parts = [_read_cifar_batch(source / name) for name in CIFAR10_TRAIN_BATCHES]
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    x_test, y_test = _read_cifar_batch(source / "test_batch")
    train, val = _split_off(x_train, y_train, val_size / len(y_train), seed)
    return write_dataset(
        out,
        {"train": train, "val": val, "test": (x_test, y_test)},
        class_names=CIFAR10_CLASSES,
        source=f"cifar10:{source}",
    )


def _nchw(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        if images.shape[1] in (1, 3):
            return images
        if images.shape[-1] in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    raise DataError(f"{where}: images must be (N,H,W), (N,C,H,W) or (N,H,W,C) with C in 1/3, got {images.shape}")


def prepare_npz(source: str | Path, out: str | Path, *, val_fraction: float = 0.1, seed: int = 0) -> DatasetInfo:
    """A generic .npz: x_train/y_train/x_test/y_test (optional x_val/y_val, class_names).

    Images may be uint8 in [0,255] or floats in [0,1]; layout (N,H,W), (N,C,H,W) or (N,H,W,C).
    """
    source = Path(source)
    if not source.is_file():
        raise DataError(f"{source}: no such .npz file")
    try:
        npz = np.load(source, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: not a readable .npz ({err})") from None
    needed = ["x_train", "y_train", "x_test", "y_test"]
    missing = [k for k in needed if k not in npz.files]
    if missing:
        raise DataError(f"{source}: missing arrays {missing}; found {npz.files}; needs {needed}")

    def arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
        where = f"{source} [{split}]"
        x = _nchw(_to_uint8(npz[f"x_{split}"], where), where)
        y = npz[f"y_{split}"].reshape(-1)
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{where}: labels must be integers, got {y.dtype}")
        return x, y.astype(np.int64)

    train, test = arrays("train"), arrays("test")
    if "x_val" in npz.files:
        val = arrays("val")
    else:
        train, val = _split_off(*train, val_fraction, seed)
    if "class_names" in npz.files:
        class_names = [str(c) for c in npz["class_names"]]
    else:
        class_names = [str(c) for c in range(int(max(train[1].max(), test[1].max())) + 1)]
    return write_dataset(
        out, {"train": train, "val": val, "test": test}, class_names=class_names, source=f"npz:{source}"
    )


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


def load_split(
    path: str | Path, split: str, *, max_examples: int = 0, verify_checksum: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: x float32 (N,C,H,W) in [0,1], y int64 (N,). Validates every file."""
    info = read_metadata(path)
    if split not in info.splits:
        raise DataError(f"{info.path}: no split '{split}' (have {list(info.splits)})")
    images, labels = [], []
    count = 0
    for entry in info.splits[split]:
        x, y = read_file(info, entry, verify_checksum=verify_checksum)
        images.append(x)
        labels.append(y)
        count += len(y)
        if max_examples and count >= max_examples:
            break
    x = np.concatenate(images)
    y = np.concatenate(labels)
    if max_examples:
        x, y = x[:max_examples], y[:max_examples]
    return to_float(x), torch.from_numpy(y)


def to_float(images: np.ndarray) -> torch.Tensor:
    """uint8 pixels -> float32 in [0,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)


def decode_batch(
    images: np.ndarray, labels: np.ndarray, shape: tuple[int, int, int], num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A Ray Data batch (object array of bytes, labels) -> checked float tensors in [0,1]."""
    c, h, w = shape
    flat = np.frombuffer(b"".join(bytes(b) for b in images), dtype=np.uint8)
    if flat.size != len(images) * c * h * w:
        raise DataError(f"streamed batch: images do not all have shape {shape}")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"streamed batch: label outside [0, {num_classes})")
    return to_float(flat.reshape(len(labels), c, h, w)), torch.from_numpy(labels)


def validate_dataset(path: str | Path) -> DatasetInfo:
    """Read and check every file of every split (the driver does this once before training)."""
    info = read_metadata(path)
    for split in SPLITS:
        for entry in info.splits[split]:
            read_file(info, entry)
    return info


def train_bytes_as_float(info: DatasetInfo) -> int:
    c, h, w = info.shape
    return info.num_rows("train") * c * h * w * 4


def shard_indices(num_examples: int, *, rank: int, world_size: int, epoch: int, seed: int) -> torch.Tensor:
    """This rank's example indices for one epoch, like DistributedSampler.

    One permutation per epoch shared by all ranks (same seed), strided by rank; every rank gets the same
    count (the remainder is dropped) so all ranks run the same number of steps and DDP cannot hang.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(num_examples, generator=generator)
    per_rank = num_examples // world_size
    return order[rank::world_size][:per_rank]
