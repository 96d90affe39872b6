"""Readers of the files a source provides: IDX (Fashion-MNIST), CIFAR-10 python batches, .npz.

These files come from outside the project, so each reader expects the worst: truncated or corrupt
files, headers that lie about their size, pickles that would run code. Every failure is a `DataError`
naming the file and what to do; no pickle ever gets to call anything but numpy's array rebuilders,
and .npz files are read with allow_pickle=False. Everything is loaded eagerly, so a corrupt member
fails here, before anything is written.
"""

from __future__ import annotations

import gzip
import math
import pickle
import struct
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipeline.data.format import check_labels
from pipeline.errors import DataError

# Fashion-MNIST's largest file is 47 MB unpacked; this only stops a gzip bomb from filling memory.
MAX_IDX_BYTES = 2**30
# Reading a damaged pickle or .npz raises whatever its parser meets: pickle's opcodes, zipfile, zlib,
# numpy's header parser (ast, tokenize) raise a dozen types, SyntaxError and MemoryError (a header
# claiming a huge array) among them. Only the parse call sits inside those `try`s, so there any
# Exception means a damaged file, not a bug here: they catch Exception on purpose.


# --------------------------------------------------------------------------- IDX


def read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX file (optionally .gz) of `ndim` dimensions, header checked against its size."""
    raw = _idx_bytes(path)
    header = 4 + 4 * ndim
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
        raise DataError(f"{path}: not an unsigned-byte IDX file (bad magic number)")
    if raw[3] != ndim:
        what = "images (N,H,W)" if ndim == 3 else "labels (N,)"
        raise DataError(f"{path}: IDX file of {raw[3]} dimensions where {what} belong; check the file names")
    if len(raw) < header:
        raise DataError(f"{path}: truncated inside its IDX header ({len(raw)} bytes); download the file again")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    # math.prod on Python ints: np.prod of four uint32 dimensions can overflow and wrap.
    if len(raw) - header != math.prod(dims):
        raise DataError(
            f"{path}: header says {dims} ({math.prod(dims)} bytes) but has {len(raw) - header}: "
            "the file is truncated or corrupt; download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_bytes(path: Path) -> bytes:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read(MAX_IDX_BYTES + 1)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(
            f"{path}: cannot read IDX file ({err}); it is truncated or corrupt: download it again"
        ) from None
    if len(raw) > MAX_IDX_BYTES:
        raise DataError(f"{path}: more than {MAX_IDX_BYTES} bytes unpacked, not an IDX file of this dataset")
    return raw


# --------------------------------------------------------------------------- CIFAR-10 python batches


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
            ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol 2
        }
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise DataError(
                f"refusing to load {module}.{name}: a CIFAR-10 batch holds only numpy arrays and lists, so this "
                "pickle is not one and is not run; use the batches of the official cifar-10-python.tar.gz"
            )
        return super().find_class(module, name)


def read_cifar_batch(path: Path, *, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One python batch -> (uint8 images (N,3,32,32), int64 labels in [0, num_classes))."""
    if not path.is_file():
        raise DataError(
            f"{path}: missing. --source must be the extracted 'cifar-10-batches-py' folder "
            f"(data_batch_1..5 and test_batch)"
        )
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels'")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: b'data' must be uint8 of shape (N, 3072), got {got}")
    labels = _cifar_labels(batch[b"labels"], path)
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(labels)} labels; the batch is damaged")
    check_labels(labels, num_classes, str(path))
    return data.reshape(-1, 3, 32, 32), labels


def _unpickle(path: Path) -> object:
    try:
        with path.open("rb") as f:
            return _ArraysOnlyUnpickler(f, encoding="bytes").load()
    except DataError as err:  # a refused callable: say which file
        raise DataError(f"{path}: {err}") from None
    except Exception as err:  # a damaged file (see the note at the top)
        raise DataError(
            f"{path}: not a CIFAR-10 python batch, truncated or corrupt ({type(err).__name__}: {err}); "
            "extract cifar-10-python.tar.gz again"
        ) from None


def _cifar_labels(raw: object, path: Path) -> np.ndarray:
    """b'labels' -> int64; the official batches hold a list of ints (numpy integer scalars are fine too)."""
    values = raw.tolist() if isinstance(raw, np.ndarray) and raw.ndim == 1 else raw
    if not isinstance(values, list) or not all(
        isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values
    ):
        raise DataError(f"{path}: b'labels' must be a list of integers, got {type(raw).__name__} of other values")
    if values and not -(2**63) <= int(min(values)) <= int(max(values)) < 2**63:
        raise DataError(f"{path}: b'labels' holds integers too large to be labels")
    return np.array([int(v) for v in values], dtype=np.int64)


# --------------------------------------------------------------------------- .npz


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of a .npz archive, read now with allow_pickle=False (np.load alone is lazy)."""
    if not path.is_file():
        raise DataError(f"{path}: no such .npz file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as err:
        if "pickle" not in str(err):
            raise DataError(f"{path}: not a readable .npz ({err})") from None
        raise DataError(
            f"{path}: not a .npz archive; numpy would read it as a pickle, and pickles are refused because "
            "loading one can run code. Save the arrays with np.savez"
        ) from None
    except Exception as err:  # a damaged file (see the note at the top)
        raise DataError(f"{path}: not a readable .npz, truncated or corrupt ({type(err).__name__}: {err})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: holds one .npy array, not a .npz archive of named arrays; save with np.savez")
    with loaded as npz:
        return {key: _npz_member(npz, key, path) for key in npz.files}


def _npz_member(npz: np.lib.npyio.NpzFile, key: str, path: Path) -> np.ndarray:
    try:
        array = npz[key]
    except ValueError as err:
        if "allow_pickle" not in str(err):
            raise DataError(f"{path}: array '{key}' is unreadable ({err}); write the .npz again") from None
        raise DataError(
            f"{path}: array '{key}' is an object array, stored as a pickle; object arrays/pickles are refused "
            "because loading one can run code. Save numbers as numeric arrays and names as a str array"
        ) from None
    except Exception as err:  # a damaged file (see the note at the top)
        raise DataError(
            f"{path}: array '{key}' is truncated or corrupt ({type(err).__name__}: {err}); write the .npz again"
        ) from None
    if not isinstance(array, np.ndarray):
        raise DataError(f"{path}: member '{key}' is not a .npy array; write the .npz with np.savez")
    return array
