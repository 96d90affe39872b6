"""Data round trip and every bad-data case refused with the file named."""

import gzip
import json
import os
import re
import shutil
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from synthetic import random_splits

from pipeline.data import (
    DataError,
    decode_columns,
    load_split,
    prepare_fashion_mnist,
    prepare_npz,
    read_metadata,
    sha256_file,
    shard_indices,
    validate_dataset,
    write_dataset,
)


@pytest.fixture
def dataset(tmp_path):
    splits = random_splits()
    write_dataset(tmp_path / "ds", splits, class_names=list("abcd"), source="test", rows_per_file=15)
    return tmp_path / "ds", splits


def test_round_trip_is_exact(dataset):
    path, splits = dataset
    info = validate_dataset(path)
    assert info.shape == (1, 8, 8) and info.num_classes == 4 and info.class_names == tuple("abcd")
    assert len(info.splits["train"]) == 3  # 40 rows at 15 per file
    x, y = load_split(path, "train")
    assert x.dtype == torch.float32 and x.min() >= 0 and x.max() <= 1
    assert torch.equal((x * 255).round().to(torch.uint8), torch.from_numpy(splits["train"][0]))
    assert torch.equal(y, torch.from_numpy(splits["train"][1]))
    x5, _ = load_split(path, "val", max_examples=5)
    assert len(x5) == 5
    schema = pq.read_schema(path / info.splits["train"][0]["name"])
    assert schema.field("image").type == pa.binary(64) and schema.field("label").type == pa.int64()


def test_arrow_batches_decode_like_the_reader_and_uint8_loads_the_same_pixels(dataset):
    path, splits = dataset
    info = validate_dataset(path)
    table = pq.read_table(path / info.splits["train"][1]["name"]).slice(3, 9)  # a sliced Arrow view, as Ray hands it
    decoded = decode_columns(table, shape=info.shape, num_classes=4, encoded=False)
    images, labels = splits["train"][0][18:27], splits["train"][1][18:27]
    assert decoded["image"].dtype == np.uint8 and np.array_equal(decoded["image"], images)
    assert np.array_equal(decoded["label"], labels)
    bad = table.set_column(1, "label", pa.array([9] * len(table), pa.int64()))
    with pytest.raises(DataError, match=r"label outside \[0, 4\)"):
        decode_columns(bad, shape=info.shape, num_classes=4, encoded=False)
    with pytest.raises(DataError, match="shape"):
        decode_columns(table, shape=(1, 4, 4), num_classes=4, encoded=False)
    x8, _ = load_split(path, "train", as_uint8=True)
    assert x8.dtype == torch.uint8 and torch.equal(x8, torch.from_numpy(splits["train"][0]))


def _replace_file(path, split, table):
    """Write a bad file in place and fix its checksum, as a buggy producer would."""
    meta = json.loads((path / "metadata.json").read_text())
    entry = meta["splits"][split][0]
    pq.write_table(table, path / entry["name"])
    entry["sha256"] = sha256_file(path / entry["name"])
    entry["num_rows"] = len(table)
    (path / "metadata.json").write_text(json.dumps(meta))
    return path / entry["name"]


def test_label_out_of_range_is_refused(dataset):
    path, _ = dataset
    table = pq.read_table(path / "train/part-00000.parquet")
    labels = table.column("label").to_numpy().copy()
    labels[3] = 999
    bad = _replace_file(path, "train", table.set_column(1, "label", pa.array(labels)))
    with pytest.raises(DataError, match=rf"{bad}: row 3 has label 999, outside \[0, 4\)"):
        load_split(path, "train")


def test_wrong_shape_is_refused(dataset):
    path, _ = dataset
    images = pa.array([b"\x00" * 63] * 15, pa.binary(63))
    table = pa.table({"image": images, "label": pa.array(np.zeros(15, np.int64))})
    bad = _replace_file(path, "val", table)
    with pytest.raises(DataError, match=rf"{bad}: images have 63 bytes, shape \(1, 8, 8\) needs 64"):
        load_split(path, "val")


def test_ragged_rows_are_refused(dataset):
    path, _ = dataset
    rows = [b"\x00" * 64] * 14 + [b"\x00" * 10]
    bad = _replace_file(path, "val", pa.table({"image": pa.array(rows, pa.binary()), "label": pa.array([0] * 15)}))
    with pytest.raises(DataError, match=rf"{bad}: row 14 image has 10 bytes"):
        load_split(path, "val")


def test_missing_column_is_refused(dataset):
    path, _ = dataset
    bad = _replace_file(path, "test", pa.table({"image": pa.array([b"\x00" * 64] * 15, pa.binary(64))}))
    with pytest.raises(DataError, match=rf"{bad}: required column 'label' missing"):
        load_split(path, "test")


def test_changed_file_fails_checksum(dataset):
    path, _ = dataset
    target = path / "train/part-00001.parquet"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"{target}: sha256 .* does not match metadata.json"):
        validate_dataset(path)


def test_missing_metadata_and_file(tmp_path, dataset):
    with pytest.raises(DataError, match="advtrain data prepare digits"):
        read_metadata(tmp_path / "nothing")
    path, _ = dataset
    (path / "test/part-00000.parquet").unlink()
    with pytest.raises(DataError, match=re.escape("test/part-00000.parquet: listed in metadata.json but missing")):
        validate_dataset(path)


def test_npz_floats_nan_and_range_are_refused(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((20, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, 20)
    x_nan = x.copy()
    x_nan[7, 2, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x_nan, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"nan.npz \[train\]: row 7 has non-finite pixel values"):
        prepare_npz(tmp_path / "nan.npz", tmp_path / "out")
    np.savez(tmp_path / "range.npz", x_train=x * 2, y_train=y, x_test=x, y_test=y)
    with pytest.raises(DataError, match=r"range.npz \[train\]: float pixels must lie in \[0,1\]"):
        prepare_npz(tmp_path / "range.npz", tmp_path / "out")
    np.savez(tmp_path / "partial.npz", x_train=x, y_train=y)
    with pytest.raises(DataError, match=r"partial.npz: missing arrays \['x_test', 'y_test'\]"):
        prepare_npz(tmp_path / "partial.npz", tmp_path / "out")
    y_bad = y.copy()
    y_bad[0] = -1
    np.savez(tmp_path / "neg.npz", x_train=x, y_train=y_bad, x_test=x, y_test=y)
    with pytest.raises(DataError, match="has label -1"):
        prepare_npz(tmp_path / "neg.npz", tmp_path / "out")


def test_npz_round_trip_channels_last(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (30, 4, 4, 3), dtype=np.uint8)
    y = rng.integers(0, 5, 30)
    np.savez(tmp_path / "ok.npz", x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    info = prepare_npz(tmp_path / "ok.npz", tmp_path / "out")
    assert info.shape == (3, 4, 4)
    xt, yt = load_split(tmp_path / "out", "test")
    assert torch.equal((xt * 255).round().to(torch.uint8), torch.from_numpy(x[:10].transpose(0, 3, 1, 2)))
    assert torch.equal(yt, torch.from_numpy(y[:10]))


def _write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(2)
    src = tmp_path / "fm"
    src.mkdir()
    x_train = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    y_train = np.repeat(np.arange(10), 10)
    _write_idx(src / "train-images-idx3-ubyte.gz", x_train)
    _write_idx(src / "train-labels-idx1-ubyte.gz", y_train)
    _write_idx(src / "t10k-images-idx3-ubyte.gz", x_train[:20])
    _write_idx(src / "t10k-labels-idx1-ubyte.gz", y_train[:20])
    info = prepare_fashion_mnist(src, tmp_path / "out", val_size=10)
    assert info.shape == (1, 28, 28) and info.num_rows("val") == 10 and info.num_rows("train") == 90
    assert info.class_names[0] == "T-shirt/top"
    xt, _ = load_split(tmp_path / "out", "test")
    assert torch.equal((xt[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(x_train[:20]))
    (src / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(DataError, match=re.escape("t10k-labels-idx1-ubyte.gz: not an unsigned-byte IDX file")):
        prepare_fashion_mnist(src, tmp_path / "out2")
    shutil.rmtree(src)
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        prepare_fashion_mnist(src, tmp_path / "out3")


def test_shards_are_disjoint_equal_and_change_per_epoch():
    shards = [shard_indices(103, rank=r, world_size=2, epoch=1, seed=0) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 51
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    assert not torch.equal(shards[0], shard_indices(103, rank=0, world_size=2, epoch=2, seed=0))
    assert torch.equal(shards[0], shard_indices(103, rank=0, world_size=2, epoch=1, seed=0))


def _write_cifar_batch(path, images, labels):
    import pickle

    with path.open("wb") as f:
        pickle.dump({b"batch_label": b"x", b"data": images.reshape(len(images), -1), b"labels": list(labels)}, f)


def test_cifar10_python_batches(tmp_path):
    """The format of the official cifar-10-batches-py archive: pickled dicts of a uint8 (N, 3072) array
    (channel-major rows) and a list of labels."""
    import pickle

    from pipeline.data import prepare_cifar10

    rng = np.random.default_rng(3)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = [rng.integers(0, 256, (20, 3, 32, 32), dtype=np.uint8) for _ in range(6)]
    for i, images in enumerate(batches[:5], start=1):
        _write_cifar_batch(src / f"data_batch_{i}", images, np.arange(20) % 10)
    _write_cifar_batch(src / "test_batch", batches[5], (np.arange(20) + 3) % 10)
    info = prepare_cifar10(src, tmp_path / "out", val_size=10)
    assert info.shape == (3, 32, 32) and info.num_rows("train") == 90 and info.num_rows("val") == 10
    assert list(info.class_names[:2]) == ["airplane", "automobile"]
    xt, yt = load_split(tmp_path / "out", "test")
    assert torch.equal((xt * 255).round().to(torch.uint8), torch.from_numpy(batches[5]))
    assert yt.tolist() == ((np.arange(20) + 3) % 10).tolist()

    # A pickle naming anything but numpy's array rebuilders is refused before it runs.
    with (src / "test_batch").open("wb") as f:
        pickle.dump({b"data": batches[5].reshape(20, -1), b"labels": os.system}, f)
    with pytest.raises(DataError, match=re.escape("refusing to load posix.system")):
        prepare_cifar10(src, tmp_path / "out2")
    (src / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"data_batch_3: missing.*cifar-10-batches-py"):
        prepare_cifar10(src, tmp_path / "out3")
