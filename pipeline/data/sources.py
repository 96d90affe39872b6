"""Dataset sources, one registry: SOURCES maps the name `advtrain data prepare NAME` takes to a SourceSpec.

Each source turns its own files into the project's format (pipeline.data.writing.write_dataset): uint8
(N,C,H,W) images, int64 labels, train/val/test. Adding a source = a `prepare_*` function + one entry
in SOURCES + a test; the CLI offers every entry. The files themselves are parsed by
pipeline.data.readers; here they are checked as a whole (images and labels pair up, the validation
split fits) before write_dataset writes anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.data.format import DataError, DatasetInfo, check_labels
from pipeline.data.image_sources import prepare_images, prepare_parquet
from pipeline.data.metadata import MAX_CLASSES
from pipeline.data.readers import read_cifar_batch, read_idx, read_npz
from pipeline.data.writing import write_dataset

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


def _pair(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    """One label per image: a count mismatch is refused, never truncated to the shorter."""
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels; one label per image")


def _carve_val(
    train: tuple[np.ndarray, np.ndarray], fraction: float, *, seed: int, where: str, fix: str
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The stratified train/val split of `train`, refused unless both parts keep at least one image."""
    rest, val = _split_off(*train, fraction, seed)
    if len(val[1]) == 0 or len(rest[1]) == 0:
        raise DataError(
            f"{where}: {len(train[1])} training images leave {len(rest[1])} for training and {len(val[1])} for "
            f"validation (fraction {fraction:.3g}); {fix}"
        )
    return rest, val


def _val_fraction(num_train: int, val_size: int, where: str) -> float:
    if not 0 < val_size < num_train:
        raise DataError(
            f"{where}: {num_train} training images, but the validation split takes {val_size} and training "
            "needs the rest; pass the complete files or a val_size between 1 and the number of training images"
        )
    return val_size / num_train


# --------------------------------------------------------------------------- Fashion-MNIST (IDX files)


def _find(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise DataError(f"{source}: missing {stem}(.gz); expected the four Fashion-MNIST IDX files there")


def _idx_split(source: Path, prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """`prefix`-images / `prefix`-labels -> (uint8 (N,1,H,W), int64 labels), counts and labels checked."""
    images_file = _find(source, f"{prefix}-images-idx3-ubyte")
    labels_file = _find(source, f"{prefix}-labels-idx1-ubyte")
    images = read_idx(images_file, ndim=3)[:, None]
    labels = read_idx(labels_file, ndim=1).astype(np.int64)
    _pair(images, labels, f"{images_file} / {labels_file.name}")
    check_labels(labels, len(FASHION_MNIST_CLASSES), str(labels_file))
    return images, labels


def prepare_fashion_mnist(source: str | Path, out: str | Path, *, val_size: int = 5000, seed: int = 0) -> DatasetInfo:
    """Fashion-MNIST (or MNIST) IDX files in `source` -> 28x28 grey; val split carved from train."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(
            f"{source}: not a folder. Debian's package dataset-fashion-mnist puts the IDX files in "
            "/usr/share/datasets/fashion-mnist"
        )
    x_train, y_train = _idx_split(source, "train")
    test = _idx_split(source, "t10k")
    where = f"{source} (train-*-ubyte)"
    fraction = _val_fraction(len(y_train), val_size, where)
    train, val = _carve_val((x_train, y_train), fraction, seed=seed, where=where, fix="pass a larger val_size")
    return write_dataset(
        out,
        {"train": train, "val": val, "test": test},
        class_names=FASHION_MNIST_CLASSES,
        source=f"fashion-mnist:{source}",
    )


# --------------------------------------------------------------------------- CIFAR-10 (python batches)


def prepare_cifar10(source: str | Path, out: str | Path, *, val_size: int = 5000, seed: int = 0) -> DatasetInfo:
    """CIFAR-10's python batches (the extracted cifar-10-batches-py folder) -> 3x32x32; val carved from train."""
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a folder; pass the extracted cifar-10-batches-py folder")
    num_classes = len(CIFAR10_CLASSES)
    parts = [read_cifar_batch(source / name, num_classes=num_classes) for name in CIFAR10_TRAIN_BATCHES]
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    test = read_cifar_batch(source / "test_batch", num_classes=num_classes)
    where = f"{source} (data_batch_1..5)"
    fraction = _val_fraction(len(y_train), val_size, where)
    train, val = _carve_val((x_train, y_train), fraction, seed=seed, where=where, fix="pass a larger val_size")
    return write_dataset(
        out, {"train": train, "val": val, "test": test}, class_names=CIFAR10_CLASSES, source=f"cifar10:{source}"
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


def _npz_split(arrays: dict[str, np.ndarray], split: str, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """x_SPLIT / y_SPLIT -> (uint8 (N,C,H,W), int64 labels); shapes, dtypes and counts checked."""
    where = f"{source} [{split}]"
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim not in (3, 4) or 0 in x.shape:
        raise DataError(f"{where}: x_{split} must be a non-empty (N,H,W), (N,C,H,W) or (N,H,W,C) array, got {x.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{where}: y_{split} must be one label per image, shape (N,), got {y.shape}")
    _pair(x, y, f"{where}: x_{split} / y_{split}")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    if y.max() >= MAX_CLASSES:  # before 0..max becomes a list of class names
        raise DataError(f"{where}: label {y.max()} is beyond the {MAX_CLASSES} classes a dataset may have")
    return _nchw(_to_uint8(x, where), where), y.astype(np.int64)


def _npz_class_names(arrays: dict[str, np.ndarray], source: Path, labels: list[np.ndarray]) -> list[str]:
    """The archive's `class_names` (a 1-D str or int array), else 0..max label."""
    if "class_names" not in arrays:
        return [str(c) for c in range(int(max(y.max() for y in labels)) + 1)]
    names = arrays["class_names"]
    if names.ndim != 1 or names.dtype.kind not in "Uiu":
        raise DataError(
            f"{source}: class_names must be a 1-D str array (np.array([...], dtype=str)), "
            f"got {names.dtype} {names.shape}"
        )
    return [str(c) for c in names.tolist()]


def prepare_npz(source: str | Path, out: str | Path, *, val_fraction: float = 0.1, seed: int = 0) -> DatasetInfo:
    """A generic .npz: x_train/y_train/x_test/y_test (optional x_val/y_val, class_names).

    Images may be uint8 in [0,255] or floats in [0,1]; layout (N,H,W), (N,C,H,W) or (N,H,W,C).
    """
    source = Path(source)
    arrays = read_npz(source)
    needed = ["x_train", "y_train", "x_test", "y_test"]
    if "x_val" in arrays or "y_val" in arrays:
        needed += ["x_val", "y_val"]
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise DataError(f"{source}: missing arrays {missing}; found {sorted(arrays)}; needs {needed}")
    train, test = _npz_split(arrays, "train", source), _npz_split(arrays, "test", source)
    if "x_val" in arrays:
        val = _npz_split(arrays, "val", source)
    else:
        fix = "add x_val/y_val arrays or more training images"
        train, val = _carve_val(train, val_fraction, seed=seed, where=f"{source} [train]", fix=fix)
    class_names = _npz_class_names(arrays, source, [train[1], val[1], test[1]])
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
    # The `advtrain data prepare` options this source takes besides --source/--out/--seed (keyword names).
    options: tuple[str, ...] = ()


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
    "images": SourceSpec(
        prepare_images,
        about="one folder of PNG/JPEG/WebP images per class",
        needs="DIR (class folders, or train/ val/ test/ folders of class folders)",
        options=("size", "val_fraction", "test_fraction"),
    ),
    "parquet": SourceSpec(
        prepare_parquet,
        about="Hugging Face-style Parquet of encoded images",
        needs="FILE.parquet or DIR of them (split from file names: train, validation, test)",
        options=("image_column", "label_column", "size", "val_fraction", "test_fraction"),
    ),
}
