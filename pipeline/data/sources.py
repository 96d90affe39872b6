"""Dataset sources, one registry: SOURCES maps the name `advtrain data prepare NAME` takes to a SourceSpec.

Each source turns its own files into the project's format (pipeline.data.format.write_dataset): uint8
(N,C,H,W) images, int64 labels, train/val/test. Adding a source = a `prepare_*` function + one entry
in SOURCES + a test; the CLI offers every entry.
"""

from __future__ import annotations

import gzip
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.data.format import DataError, DatasetInfo, write_dataset

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
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]


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


# --------------------------------------------------------------------------- digits


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


# --------------------------------------------------------------------------- Fashion-MNIST (IDX files)


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


# --------------------------------------------------------------------------- CIFAR-10 (python batches)


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


# --------------------------------------------------------------------------- generic .npz


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


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class SourceSpec:
    """One registered source. `prepare(source, out, *, seed)` writes the dataset at `out` from `source`
    (a Path, or None where `needs` is empty); `about` is the phrase the CLI's help shows; `needs` is what
    `--source` must name, as the CLI asks for it ("" when the source reads no files: digits)."""

    prepare: Callable[..., DatasetInfo]
    about: str
    needs: str = ""


def _prepare_digits_ignoring_source(source: Path | None, out: str | Path, *, seed: int = 0) -> DatasetInfo:
    """prepare_digits with the registry's signature: the digits ship with scikit-learn, so no --source."""
    return prepare_digits(out, seed=seed)


SOURCES: dict[str, SourceSpec] = {
    "digits": SourceSpec(_prepare_digits_ignoring_source, about="bundled with scikit-learn"),
    "fashion-mnist": SourceSpec(
        prepare_fashion_mnist, about="IDX files", needs="DIR (e.g. /usr/share/datasets/fashion-mnist)"
    ),
    "cifar10": SourceSpec(
        prepare_cifar10, about="python batches", needs="DIR (the extracted cifar-10-batches-py folder)"
    ),
    "npz": SourceSpec(prepare_npz, about="x_train, y_train, x_test, y_test arrays", needs="FILE.npz"),
}
