"""Hostile and broken data input: every case is a DataError naming the file and the key or value, and
nothing recorded changes (a failed prepare leaves --out as it was, byte for byte).

All bad files are written here by code (np.savez, pickle.dump of crafted objects, struct-packed IDX
headers); none is stored in the repository.
"""

import builtins
import copy
import gzip
import hashlib
import io
import json
import os
import pathlib
import pickle
import random
import struct
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import random_splits

from pipeline.data import (
    CIFAR10_TRAIN_BATCHES,
    DataError,
    load_split,
    prepare_cifar10,
    prepare_fashion_mnist,
    prepare_npz,
    read_metadata,
    sha256_file,
    validate_dataset,
    write_dataset,
)

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def dataset(tmp_path):
    """A valid dataset of 40 rows per split, 15 rows per file (3 files per split), classes a-d."""
    path = tmp_path / "ds"
    write_dataset(path, random_splits(), class_names=list("abcd"), source="test", rows_per_file=15)
    return path


def _tree(root):
    """Every file under `root` (hidden ones too) with its sha256, and every folder: what 'unchanged' means."""
    return {
        str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


def _meta(path):
    return json.loads((path / "metadata.json").read_text())


def _write_meta(path, meta):
    (path / "metadata.json").write_text(json.dumps(meta))


def _edit(path, change):
    """Apply `change(meta)` to the dataset's metadata.json, as a hand edit would."""
    meta = _meta(path)
    change(meta)
    _write_meta(path, meta)


def _set(keys, value):
    def change(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return change


def _delete(keys):
    def change(meta):
        node = meta
        for key in keys[:-1]:
            node = node[key]
        del node[keys[-1]]

    return change


def _refused(call, *fragments):
    """`call()` raises DataError whose message holds every fragment; returns the message."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def _npz(path, n=30, shape=(8, 8), classes=3, **overrides):
    """A valid .npz source (uint8 images), with any array replaced or added by `overrides`."""
    rng = np.random.default_rng(5)
    arrays = {
        "x_train": rng.integers(0, 256, (n, *shape), dtype=np.uint8),
        "y_train": np.arange(n) % classes,
        "x_test": rng.integers(0, 256, (10, *shape), dtype=np.uint8),
        "y_test": np.arange(10) % classes,
    }
    arrays.update(overrides)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _write_idx(path, array, *, ndim=None, gz=True):
    ndim = array.ndim if ndim is None else ndim
    header = struct.pack(">BBBB", 0, 0, 8, ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _fashion_source(folder, n=100):
    rng = np.random.default_rng(2)
    folder.mkdir()
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    _write_idx(folder / "train-images-idx3-ubyte.gz", images)
    _write_idx(folder / "train-labels-idx1-ubyte.gz", labels)
    _write_idx(folder / "t10k-images-idx3-ubyte.gz", images[:20])
    _write_idx(folder / "t10k-labels-idx1-ubyte.gz", labels[:20])
    return folder


def _write_cifar_batch(path, batch, protocol=pickle.DEFAULT_PROTOCOL):
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def _cifar_source(folder, n=20):
    rng = np.random.default_rng(3)
    folder.mkdir()
    for name in [*CIFAR10_TRAIN_BATCHES, "test_batch"]:
        images = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _write_cifar_batch(
            folder / name, {b"batch_label": b"x", b"data": images, b"labels": [i % 10 for i in range(n)]}
        )
    return folder


# --------------------------------------------------------------------------- lying metadata


class TestLyingMetadata:
    """metadata.json is parsed strictly: types, missing and unknown keys, and what the values claim."""

    @pytest.mark.parametrize(
        ("keys", "value", "named"),
        [
            (["num_classes"], None, "key 'num_classes': input should be a valid integer (got None)"),
            (["num_classes"], "4", "key 'num_classes': input should be a valid integer (got '4')"),
            (["num_classes"], 4.0, "key 'num_classes'"),
            (["num_classes"], True, "key 'num_classes'"),
            (["shape"], ["1", 8, 8], "key 'shape[0]'"),
            (["shape"], [1, 8], "key 'shape'"),
            (["shape"], [1, 8, 8, 1], "key 'shape'"),
            (["shape"], [0, 8, 8], "key 'shape[0]'"),
            (["shape"], [1, -8, 8], "key 'shape[1]'"),
            (["shape"], [1, 8, 10**40], "key 'shape[2]'"),
            (["mean"], "0.5", "key 'mean'"),
            (["class_names"], None, "key 'class_names'"),
            (["class_names"], ["a", "b", 3, "d"], "key 'class_names[2]'"),
            (["source"], 7, "key 'source'"),
            (["splits"], None, "key 'splits' must be a JSON object"),
            (["splits", "train"], None, "key 'splits.train'"),
            (["splits", "train", 0, "num_rows"], "15", "key 'splits.train[0].num_rows'"),
            (["splits", "train", 0, "sha256"], None, "key 'splits.train[0].sha256'"),
            (["splits", "train", 0, "sha256"], "abc", "key 'splits.train[0].sha256'"),
            (["splits", "val", 1, "name"], 5, "key 'splits.val[1].name'"),
        ],
    )
    def test_wrong_types_name_the_key(self, dataset, keys, value, named):
        _edit(dataset, _set(keys, value))
        _refused(lambda: read_metadata(dataset), str(dataset / "metadata.json"), named, "prepare the dataset again")

    @pytest.mark.parametrize(
        ("keys", "named"),
        [
            (["splits", "train", 0, "sha256"], "key 'splits.train[0].sha256' is missing"),
            (["std"], "key 'std' is missing"),
            (["splits", "test"], "key 'splits.test' is missing"),
            (["format_version"], "key 'format_version' is missing"),
        ],
    )
    def test_missing_key_is_named(self, dataset, keys, named):
        _edit(dataset, _delete(keys))
        _refused(lambda: read_metadata(dataset), "metadata.json", named)

    def test_unknown_key_is_refused(self, dataset):
        _edit(dataset, _set(["label_offset"], 1))
        _refused(lambda: read_metadata(dataset), "key 'label_offset' is not part of the format", "num_classes")
        _edit(dataset, _delete(["label_offset"]))
        _edit(dataset, _set(["splits", "val", 0, "path"], "/elsewhere"))
        _refused(lambda: read_metadata(dataset), "key 'splits.val[0].path' is not part of the format", "sha256")

    @pytest.mark.parametrize("version", [2, 0, "1", None])
    def test_format_version_is_checked(self, dataset, version):
        _edit(dataset, _set(["format_version"], version))
        _refused(lambda: read_metadata(dataset), "metadata.json", "format_version")

    def test_num_classes_must_match_class_names(self, dataset):
        _edit(dataset, _set(["num_classes"], 1000))
        _refused(lambda: read_metadata(dataset), "'class_names' has 4 names but 'num_classes' is 1000")

    def test_one_class_and_duplicate_names_are_refused(self, dataset):
        _edit(dataset, lambda m: m.update(num_classes=1, class_names=["a"]))
        _refused(lambda: read_metadata(dataset), "key 'num_classes'", "greater than or equal to 2")
        _edit(dataset, lambda m: m.update(num_classes=4, class_names=["a", "b", "b", "d"]))
        _refused(lambda: read_metadata(dataset), "'class_names' must be distinct")

    @pytest.mark.parametrize(
        ("key", "value", "named"),
        [
            ("mean", [0.5, 0.5, 0.5], "key 'mean' has 3 values but 'shape' [1, 8, 8] has 1 channels"),
            ("std", [], "key 'std' has 0 values"),
            ("std", [0.0], "key 'std[0]' is 0.0"),
            ("std", [-0.2], "key 'std[0]' is -0.2"),
            ("std", [float("nan")], "key 'std[0]' is nan"),
            ("mean", [float("inf")], "key 'mean[0]' is inf"),
            ("mean", [3.0], "key 'mean[0]' is 3.0"),
        ],
    )
    def test_channel_statistics_are_checked(self, dataset, key, value, named):
        _edit(dataset, _set([key], value))
        _refused(lambda: read_metadata(dataset), "metadata.json", named)

    def test_same_byte_count_other_shape_is_refused(self, dataset):
        """(1,4,16) has the 64 bytes of (1,8,8): the shape stamped into each Parquet file tells them apart."""
        _edit(dataset, _set(["shape"], [1, 4, 16]))
        read_metadata(dataset)  # consistent on its own ...
        _refused(
            lambda: validate_dataset(dataset),
            str(dataset / "train/part-00000.parquet"),
            "written for shape [1, 8, 8] and 4 classes, but metadata.json says shape [1, 4, 16]",
        )
        # ... and (4,4,4) contradicts the one channel of mean/std before any file is read.
        _edit(dataset, _set(["shape"], [4, 4, 4]))
        _refused(lambda: read_metadata(dataset), "key 'mean' has 1 values but 'shape' [4, 4, 4] has 4 channels")

    def test_more_classes_than_written_is_refused(self, dataset):
        _edit(dataset, lambda m: m.update(num_classes=5, class_names=list("abcde")))
        _refused(lambda: load_split(dataset, "val"), "val/part-00000.parquet", "written for", "4 classes")

    def test_zero_training_rows_are_refused(self, dataset):
        original = _meta(dataset)
        _edit(dataset, _set(["splits", "train"], []))
        _refused(lambda: read_metadata(dataset), "key 'splits.train'", "at least 1 item")
        _write_meta(dataset, original)
        _edit(dataset, _set(["splits", "test", 0, "num_rows"], 0))
        _refused(lambda: read_metadata(dataset), "key 'splits.test[0].num_rows'")

    def test_row_count_lie_is_refused(self, dataset):
        _edit(dataset, _set(["splits", "train", 1, "num_rows"], 16))
        _refused(lambda: validate_dataset(dataset), "train/part-00001.parquet: 15 rows but metadata.json says 16")

    def test_written_labels_out_of_range_are_refused(self, tmp_path):
        splits = random_splits()
        splits["val"][1][7] = 4
        _refused(
            lambda: write_dataset(tmp_path / "out", splits, class_names=list("abcd"), source="s"),
            "s [val]: row 7 has label 4, outside [0, 4)",
        )
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        ("raw", "named"),
        [
            (b'{"format_version": 1,', "not valid JSON"),
            (b"", "not valid JSON"),
            (b"\xff\xfe{}", "not UTF-8 text (byte 0)"),
            (b"[" * 100_000 + b"]" * 100_000, "not valid JSON (nested too deeply)"),
            (b"[]", "the file must be a JSON object (got [])"),
            (b"null", "the file must be a JSON object (got None)"),
            (b'{"num_classes": ' + b"9" * 5000 + b"}", "not valid JSON"),
        ],
    )
    def test_unparseable_metadata_is_refused(self, dataset, raw, named):
        (dataset / "metadata.json").write_bytes(raw)
        _refused(lambda: validate_dataset(dataset), str(dataset / "metadata.json"), named)


# --------------------------------------------------------------------------- path escapes


class TestPathEscapes:
    """A file entry never reaches outside its dataset folder: another dataset's file is never read."""

    @pytest.fixture
    def other(self, tmp_path):
        """A second, valid dataset of the same shape whose files an escaping entry would read."""
        path = tmp_path / "other"
        write_dataset(path, random_splits(seed=9), class_names=list("abcd"), source="other", rows_per_file=15)
        return path

    @pytest.mark.parametrize(
        "name",
        [
            "{other}/train/part-00000.parquet",
            "../other/train/part-00000.parquet",
            "train/../../other/train/part-00000.parquet",
            "train/sub/part-00000.parquet",
            "val/part-00000.parquet",
            "train\\..\\..\\other\\train\\part-00000.parquet",
            "train/.hidden.parquet",
            "train/part-00000.parquet\x00",
            "train/",
        ],
    )
    def test_escaping_names_are_refused(self, dataset, other, name):
        name = name.format(other=other)
        target = other / "train/part-00000.parquet"
        # The lie is complete: the entry carries the other file's real checksum and row count.
        _edit(dataset, _set(["splits", "train", 0], {"name": name, "num_rows": 15, "sha256": sha256_file(target)}))
        message = _refused(lambda: validate_dataset(dataset), "key 'splits.train[0].name'", "'train/<file>.parquet'")
        assert "no '..'" in message

    def test_a_file_listed_twice_is_refused(self, dataset):
        meta = _meta(dataset)
        meta["splits"]["test"].append(copy.deepcopy(meta["splits"]["train"][0]))
        meta["splits"]["test"][-1]["name"] = "test/part-00000.parquet"
        _write_meta(dataset, meta)
        _refused(lambda: read_metadata(dataset), "key 'splits.test[3].name'", "listed twice")

    def test_symlink_out_of_the_folder_is_refused(self, dataset, other):
        """The name is fine, but the file is a link to another dataset's file with the same checksum."""
        target = other / "train/part-00000.parquet"
        link = dataset / "train/part-00000.parquet"
        link.unlink()
        link.symlink_to(target)
        _edit(dataset, _set(["splits", "train", 0, "sha256"], sha256_file(target)))
        _refused(lambda: validate_dataset(dataset), str(link), "outside the dataset folder", str(dataset))

    def test_symlinked_split_folder_is_refused(self, dataset, other):
        for part in (dataset / "val").iterdir():
            part.unlink()
        (dataset / "val").rmdir()
        (dataset / "val").symlink_to(other / "val")
        _edit(dataset, lambda m: m["splits"].update(val=_meta(other)["splits"]["val"]))
        _refused(lambda: load_split(dataset, "val"), "val/part-00000.parquet", "outside the dataset folder")


# --------------------------------------------------------------------------- data that lies (sources)


class TestLyingSources:
    """Source files that are readable but lie; nothing is written for any of them."""

    def test_more_images_than_labels_is_refused_not_truncated(self, tmp_path):
        src = _npz(tmp_path / "src.npz", y_train=np.arange(90) % 3, n=100)
        before = _tree(tmp_path)
        _refused(lambda: prepare_npz(src, tmp_path / "out"), "src.npz [train]: x_train / y_train: 100 images but 90")
        assert _tree(tmp_path) == before

    @pytest.mark.parametrize(
        ("overrides", "named"),
        [
            (
                {"x_train": np.zeros((0, 8, 8), np.uint8), "y_train": np.zeros(0, np.int64)},
                "x_train must be a non-empty",
            ),
            ({"x_train": np.zeros((1, 8, 8), np.uint8), "y_train": np.zeros(1, np.int64)}, "1 training images leave"),
            ({"x_train": np.zeros((30, 8), np.uint8)}, "x_train must be a non-empty (N,H,W)"),
            ({"y_train": np.zeros((30, 2), np.int64)}, "y_train must be one label per image"),
            ({"y_train": np.zeros(30, np.float32)}, "labels must be integers, got float32"),
            ({"x_train": np.zeros((30, 8, 8), bool)}, "unsupported pixel dtype bool"),
            ({"x_train": np.full((30, 8, 8), 300, np.int32)}, "integer pixels must lie in [0,255]"),
            ({"x_train": np.zeros((30, 5, 8, 8), np.uint8)}, "with C in 1/3, got (30, 5, 8, 8)"),
            (
                {"y_train": np.zeros(30, np.int64), "y_test": np.zeros(10, np.int64)},
                "'num_classes' is 1: a classifier needs at least 2 classes",
            ),
            (  # 10 class names, labels up to 666
                {"class_names": np.array(list("abcdefghij")), "y_train": (np.arange(30) % 3) * 333},
                ("[train]: row", ", outside [0, 10)"),
            ),
            ({"class_names": np.array(["a", "b", "b"])}, "'class_names' must be distinct"),
            ({"class_names": np.array([b"a", b"b", b"c"])}, "class_names must be a 1-D str array"),
            ({"x_val": np.zeros((3, 8, 8), np.uint8)}, "missing arrays ['y_val']"),
        ],
    )
    def test_lying_npz_is_refused(self, tmp_path, overrides, named):
        src = _npz(tmp_path / "src.npz", **overrides)
        before = _tree(tmp_path)
        fragments = named if isinstance(named, tuple) else (named,)
        _refused(lambda: prepare_npz(src, tmp_path / "out"), str(src), *fragments)
        assert _tree(tmp_path) == before

    def test_fashion_mnist_counts_labels_and_val_size(self, tmp_path):
        src = _fashion_source(tmp_path / "fm")
        _refused(lambda: prepare_fashion_mnist(src, tmp_path / "out"), "100 training images", "val_size")
        _write_idx(src / "train-labels-idx1-ubyte.gz", np.arange(90) % 10)
        _refused(
            lambda: prepare_fashion_mnist(src, tmp_path / "out", val_size=10),
            "train-images-idx3-ubyte.gz / train-labels-idx1-ubyte.gz: 100 images but 90 labels",
        )
        labels = np.arange(100) % 10
        labels[42] = 12
        _write_idx(src / "train-labels-idx1-ubyte.gz", labels)
        _refused(
            lambda: prepare_fashion_mnist(src, tmp_path / "out", val_size=10),
            f"{src / 'train-labels-idx1-ubyte.gz'}: row 42 has label 12, outside [0, 10)",
        )
        assert sorted(p.name for p in tmp_path.iterdir()) == ["fm"]  # no output, no staging folder

    def test_cifar_lying_batches_are_refused(self, tmp_path):
        src = _cifar_source(tmp_path / "cifar")
        bad = src / "data_batch_2"
        images = np.zeros((20, 3072), np.uint8)
        cases = [
            ({b"data": images, b"labels": list(range(10)) * 3}, "20 images but 30 labels"),
            ({b"data": images, b"labels": [10] * 20}, "row 0 has label 10, outside [0, 10)"),
            ({b"data": images.astype(np.float32), b"labels": [0] * 20}, "b'data' must be uint8 of shape (N, 3072)"),
            ({b"data": images[:, :100], b"labels": [0] * 20}, "got uint8 (20, 100)"),
            ({b"data": images, b"labels": ["cat"] * 20}, "b'labels' must be a list of integers"),
            ({b"data": images, b"labels": [2**70] * 20}, "too large"),
            ({b"data": list(images), b"labels": [0] * 20}, "b'data' must be uint8"),
            ({b"labels": [0] * 20}, "a dict with b'data' and b'labels'"),
            ([images, [0] * 20], "a dict with b'data' and b'labels'"),
        ]
        for batch, named in cases:
            _write_cifar_batch(bad, batch)
            _refused(lambda: prepare_cifar10(src, tmp_path / "out", val_size=10), str(bad), named)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar"]  # no output, no staging folder
        _write_cifar_batch(bad, {b"data": images, b"labels": [i % 10 for i in range(20)]})
        _refused(lambda: prepare_cifar10(src, tmp_path / "out"), "100 training images", "takes 5000")


# --------------------------------------------------------------------------- corrupt or truncated files


def _truncated(raw):
    return raw[: len(raw) // 2]


def _flipped_head(raw):
    """Bytes flipped among the first 64, where a pickle's opcodes (not the pixels) are."""
    out = bytearray(raw)
    for i in range(2, 64, 7):
        out[i] ^= 0x5A
    return bytes(out)


def _flipped(raw):
    out = bytearray(raw)
    for i in range(len(out) // 3, len(out) - 30, 97):
        out[i] ^= 0x5A
    return bytes(out)


class TestCorruptSources:
    """Truncated or corrupt files of every source: a DataError naming the file; `--out` untouched."""

    @pytest.mark.parametrize("damage", [_truncated, _flipped, lambda raw: b"", lambda raw: b"hello world"])
    def test_corrupt_npz(self, tmp_path, damage):
        src = tmp_path / "src.npz"
        np.savez_compressed(src, x_train=np.zeros((300, 8, 8), np.uint8), y_train=np.arange(300) % 3)
        src.write_bytes(damage(src.read_bytes()))
        before = _tree(tmp_path)
        _refused(lambda: prepare_npz(src, tmp_path / "out"), str(src))
        assert _tree(tmp_path) == before

    def test_npz_odd_members(self, tmp_path):
        npy = io.BytesIO()
        np.save(npy, np.zeros(4, np.uint8))
        (tmp_path / "one.npz").write_bytes(npy.getvalue())
        _refused(lambda: prepare_npz(tmp_path / "one.npz", tmp_path / "out"), "one.npz: holds one .npy array")
        # A header that claims 90 TiB (same length, so it parses): numpy's MemoryError becomes a DataError.
        old, new = b"'shape': (4,), }", b"'shape': (99999999999999,), }"
        huge = npy.getvalue().replace(old + b" " * (len(new) - len(old)), new)
        for member, data, named in [
            # MemoryError, or (where the host overcommits memory) a read past the end: either is a DataError.
            ("x_train.npy", huge, "'x_train' is truncated or corrupt"),
            ("notes.txt", b"hi", "member 'notes.txt'"),
        ]:
            with zipfile.ZipFile(tmp_path / "odd.npz", "w") as zf:
                zf.writestr(member, data)
            _refused(lambda: prepare_npz(tmp_path / "odd.npz", tmp_path / "out"), "odd.npz", named)
        assert not (tmp_path / "out").exists()

    @pytest.mark.parametrize(
        ("damage", "named"),
        [
            (lambda raw: gzip.compress(raw)[:-40], "cannot read IDX file"),  # gzip stream cut short
            (lambda raw: _flipped(gzip.compress(raw)), "cannot read IDX file"),
            (lambda raw: gzip.compress(raw[:6]), "truncated inside its IDX header"),
            (lambda raw: gzip.compress(raw[:-5]), "header says (100, 28, 28) (78400 bytes) but has 78395"),
            (lambda raw: raw[:-5], "header says (100, 28, 28)"),  # an uncompressed IDX file, truncated
            (lambda raw: gzip.compress(b"\x00\x00\x08\x01" + raw[4:]), "IDX file of 1 dimensions"),
            (lambda raw: gzip.compress(b"\x00\x00\x0d\x03" + raw[4:]), "not an unsigned-byte IDX file"),
            (
                lambda raw: gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 2**32 - 1, 2**32 - 1, 2**32 - 1)),
                "header says",
            ),
        ],
    )
    def test_corrupt_idx(self, tmp_path, damage, named):
        src = _fashion_source(tmp_path / "fm")
        target = src / "train-images-idx3-ubyte.gz"
        raw = gzip.decompress(target.read_bytes())
        damaged = damage(raw)
        if not damaged.startswith(b"\x1f\x8b"):  # an uncompressed file goes by the uncompressed name
            target.unlink()
            target = src / "train-images-idx3-ubyte"
        target.write_bytes(damaged)
        before = _tree(tmp_path)
        _refused(lambda: prepare_fashion_mnist(src, tmp_path / "out", val_size=10), str(target), named)
        assert _tree(tmp_path) == before

    @pytest.mark.parametrize(
        "damage",
        [_truncated, _flipped_head, lambda raw: b"", lambda raw: b"\x80\x05junk", lambda raw: raw[:2] + b"\xff" * 40],
    )
    def test_corrupt_cifar_batch(self, tmp_path, damage):
        src = _cifar_source(tmp_path / "cifar")
        target = src / "test_batch"
        target.write_bytes(damage(target.read_bytes()))
        before = _tree(tmp_path)
        _refused(lambda: prepare_cifar10(src, tmp_path / "out", val_size=10), str(target))
        assert _tree(tmp_path) == before

    def test_corrupt_parquet_file_is_refused(self, dataset):
        """The checksum is fixed up too, as a buggy producer would: Parquet's own checks must catch it."""
        target = dataset / "val/part-00002.parquet"
        target.write_bytes(_flipped(target.read_bytes()))
        _edit(dataset, _set(["splits", "val", 2, "sha256"], sha256_file(target)))
        _refused(lambda: validate_dataset(dataset), str(target))
        target.write_bytes(b"PAR1")
        _edit(dataset, _set(["splits", "val", 2, "sha256"], sha256_file(target)))
        _refused(lambda: validate_dataset(dataset), str(target), "unreadable Parquet")

    def test_parquet_without_the_writers_stamp_is_refused(self, dataset):
        target = dataset / "test/part-00000.parquet"
        table = pq.read_table(target).replace_schema_metadata(None)
        pq.write_table(table, target)
        _edit(dataset, _set(["splits", "test", 0, "sha256"], sha256_file(target)))
        _refused(lambda: validate_dataset(dataset), str(target), "not written by `advtrain data prepare`")


class TestOutputUnchanged:
    """--out is new, empty, or a dataset; a failed prepare leaves it byte-identical."""

    def test_out_that_is_a_file_is_refused(self, tmp_path):
        src = _npz(tmp_path / "src.npz")
        (tmp_path / "out").write_text("my notes")
        before = _tree(tmp_path)
        _refused(lambda: prepare_npz(src, tmp_path / "out"), f"{tmp_path / 'out'}: exists and is not a folder")
        assert _tree(tmp_path) == before

    def test_out_that_holds_other_files_is_refused(self, tmp_path):
        src = _npz(tmp_path / "src.npz")
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "thesis.tex").write_text("\\begin{document}")
        before = _tree(tmp_path)
        _refused(lambda: prepare_npz(src, tmp_path / "out"), "holds files but no metadata.json")
        assert _tree(tmp_path) == before

    def test_failed_prepare_leaves_a_dataset_byte_identical(self, tmp_path):
        out = tmp_path / "out"
        prepare_npz(_npz(tmp_path / "good.npz"), out)
        bad = _npz(tmp_path / "bad.npz", y_train=np.arange(29) % 3)
        before = _tree(tmp_path)
        _refused(lambda: prepare_npz(bad, out), "30 images but 29 labels")
        assert _tree(tmp_path) == before
        validate_dataset(out)

    def test_failure_while_writing_leaves_a_dataset_byte_identical(self, tmp_path, monkeypatch):
        """A disk that fills up after the first file: the old dataset stays, no staging folder remains."""
        out = tmp_path / "out"
        prepare_npz(_npz(tmp_path / "good.npz"), out)
        before = _tree(tmp_path)
        real_write = pq.write_table
        calls = []

        def write_then_fail(table, where, **kwargs):
            calls.append(where)
            if len(calls) > 1:
                raise OSError(28, "No space left on device")
            real_write(table, where, **kwargs)

        monkeypatch.setattr(pq, "write_table", write_then_fail)
        _refused(lambda: prepare_npz(tmp_path / "good.npz", out, seed=1), str(out), "No space left on device")
        assert _tree(tmp_path) == before

    def test_replacing_a_dataset_keeps_other_files_and_leaves_no_staging(self, tmp_path):
        out = tmp_path / "out"
        prepare_npz(_npz(tmp_path / "a.npz", n=30), out)
        (out / "README").write_text("kept")
        info = prepare_npz(_npz(tmp_path / "b.npz", n=50), out)
        assert info.num_rows("train") + info.num_rows("val") == 50
        assert (out / "README").read_text() == "kept"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npz", "b.npz", "out"]
        validate_dataset(out)


# --------------------------------------------------------------------------- pickle payloads


class _Payload:
    """Unpickling this calls `call(*args)`: what a tampered file would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _payloads(marker):
    """Each would create `marker` if unpickled by pickle.load."""
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.open": _Payload(builtins.open, str(marker), "w"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "pathlib.Path.write_text": _Payload(pathlib.Path.write_text, pathlib.Path(marker), "x"),
        "numpy.save": _Payload(np.save, str(marker), np.zeros(1)),
    }


class TestPicklePayloads:
    """Pickles are refused, never executed: CIFAR batches go through an arrays-only unpickler, .npz files
    are read with allow_pickle=False."""

    def test_the_payloads_are_live(self, tmp_path):
        """The control: the plain unpickler runs a payload (so the tests below would see it if ours did)."""
        marker = tmp_path / "marker"
        pickle.loads(pickle.dumps(_payloads(marker)["builtins.open"])).close()
        assert marker.exists()

    @pytest.mark.parametrize("kind", list(_payloads("m")))
    @pytest.mark.parametrize("where", ["top", "labels", "data", "key"])
    def test_cifar_payload_is_refused_and_not_run(self, tmp_path, kind, where):
        marker = tmp_path / "marker"
        payload = _payloads(marker)[kind]
        src = _cifar_source(tmp_path / "cifar")
        images = np.zeros((20, 3072), np.uint8)
        batch = {
            "top": payload,
            "labels": {b"data": images, b"labels": [0] * 19 + [payload]},
            "data": {b"data": np.array([payload], dtype=object), b"labels": [0]},
            "key": {b"data": images, b"labels": [0] * 20, payload: b"x"},
        }[where]
        _write_cifar_batch(src / "data_batch_4", batch)
        before = _tree(tmp_path)
        _refused(lambda: prepare_cifar10(src, tmp_path / "out", val_size=10), "data_batch_4: refusing to load")
        assert not marker.exists()
        assert _tree(tmp_path) == before

    @pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
    def test_every_pickle_protocol_is_restricted(self, tmp_path, protocol):
        marker = tmp_path / "marker"
        src = _cifar_source(tmp_path / "cifar")
        _write_cifar_batch(src / "test_batch", _payloads(marker)["os.system"], protocol=protocol)
        _refused(
            lambda: prepare_cifar10(src, tmp_path / "out", val_size=10), "test_batch: refusing to load posix.system"
        )
        assert not marker.exists()

    def test_cifar_batch_written_at_protocol_2_still_loads(self, tmp_path):
        """Python 3 pickles bytes at protocol 2 via _codecs.encode: the genuine format stays readable."""
        src = _cifar_source(tmp_path / "cifar")
        for name in [*CIFAR10_TRAIN_BATCHES, "test_batch"]:
            batch = pickle.loads((src / name).read_bytes())
            _write_cifar_batch(src / name, batch, protocol=2)
        info = prepare_cifar10(src, tmp_path / "out", val_size=10)
        assert info.num_rows("test") == 20

    @pytest.mark.parametrize("array", ["x_train", "y_test", "class_names"])
    def test_npz_object_array_is_refused_and_not_run(self, tmp_path, array):
        marker = tmp_path / "marker"
        src = _npz(tmp_path / "src.npz", **{array: np.array([_payloads(marker)["builtins.open"]], dtype=object)})
        before = _tree(tmp_path)
        _refused(
            lambda: prepare_npz(src, tmp_path / "out"), f"{src}: array '{array}'", "object arrays/pickles are refused"
        )
        assert not marker.exists()
        assert _tree(tmp_path) == before

    def test_pickle_passed_as_npz_is_refused_and_not_run(self, tmp_path):
        marker = tmp_path / "marker"
        src = tmp_path / "src.npz"
        src.write_bytes(pickle.dumps({"x_train": _payloads(marker)["os.system"]}))
        _refused(lambda: prepare_npz(src, tmp_path / "out"), str(src), "pickles are refused")
        assert not marker.exists()
        assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fuzz


_JUNK = [
    None,
    "",
    "x",
    "15",
    "../x",
    "/etc/passwd",
    True,
    False,
    0,
    -1,
    1.5,
    10**30,
    -(10**30),
    2**63,
    float("nan"),
    float("inf"),
    -1e308,
    [],
    {},
    [[[[[]]]]],
    {"a": {"b": [1, {"c": None}]}},
]


def _paths(node, prefix=()):
    """Every location in a JSON tree, as a tuple of keys/indices."""
    yield prefix
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _paths(child, (*prefix, key))


def _mutate(rng, meta, text):
    """One random mutation of a valid metadata.json: the file's new bytes."""
    kind = rng.randrange(7)
    if kind == 0:  # byte flips
        raw = bytearray(text.encode())
        for _ in range(rng.randint(1, 5)):
            raw[rng.randrange(len(raw))] ^= rng.randrange(1, 256)
        return bytes(raw)
    if kind == 1:  # truncation
        return text.encode()[: rng.randrange(len(text))]
    meta = copy.deepcopy(meta)
    path = rng.choice([p for p in _paths(meta) if p])
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    if kind == 2:  # key deletion
        del parent[path[-1]]
    elif kind == 3:  # type swap / huge, negative, NaN numbers
        parent[path[-1]] = copy.deepcopy(rng.choice(_JUNK))
    elif kind == 4:  # nested junk
        junk = "x"
        for _ in range(rng.randint(1, 60)):
            junk = rng.choice([[junk], {"k": junk}])
        parent[path[-1]] = junk
    elif kind == 5:  # an unknown key
        target = parent if isinstance(parent, dict) else meta
        target[rng.choice(["extra", "labels", "shape_", "__class__"])] = 1
    else:  # a number nudged
        value = parent[path[-1]]
        parent[path[-1]] = value + rng.choice([-1, 1, 1000]) if type(value) in (int, float) else value
    return json.dumps(meta).encode()


class TestFuzzMetadata:
    def test_mutated_metadata_is_accepted_or_a_data_error(self, tmp_path):
        """300 seeded mutations of a valid metadata.json: reading and validating the dataset either works or
        raises DataError naming the dataset; any other exception type fails the test with its traceback."""
        path = tmp_path / "ds"
        write_dataset(path, random_splits(n=20), class_names=list("abcd"), source="fuzz", rows_per_file=10)
        text = (path / "metadata.json").read_text()
        meta = json.loads(text)
        files_before = {k: v for k, v in _tree(path).items() if k != "metadata.json"}
        rng = random.Random(20240611)
        outcomes = {"accepted": 0, "refused": 0}
        for _ in range(300):
            (path / "metadata.json").write_bytes(_mutate(rng, meta, text))
            try:
                validate_dataset(path)
                outcomes["accepted"] += 1
            except DataError as err:
                assert str(path) in str(err)
                outcomes["refused"] += 1
        assert outcomes["refused"] > 200, outcomes
        assert {k: v for k, v in _tree(path).items() if k != "metadata.json"} == files_before
