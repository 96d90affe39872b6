"""The project's Parquet dataset format: preparation, validation and per-worker tensors.

A prepared dataset is a folder::

    metadata.json            shape (C,H,W), num_classes, class names, channel mean/std, source,
                             and per split the files with their row counts and sha256
    train/part-00000.parquet columns image: fixed_size_binary(C*H*W) of uint8 pixels (or, with
                             "image_encoding": "encoded", binary PNG/JPEG/WebP bytes), label: int64
    val/...  test/...

- `metadata`: metadata.json's strict schema (pydantic, unknown keys and wrong types refused) and its
  consistency checks (class names, channel statistics, file names inside the folder).
- `format`: the Parquet schema, DatasetInfo, DataError, read_metadata/read_file (every check
  applied), validate_dataset. numpy and pyarrow.
- `writing`: write_dataset, all or nothing (a failed write leaves `--out` as it was).
- `readers`: the source files (IDX, CIFAR-10 python batches via a restricted unpickler, .npz without
  pickles), each read as if hostile.
- `sources`: SOURCES, the registry of what `advtrain data prepare` reads (digits, Fashion-MNIST IDX,
  CIFAR-10 python batches, .npz).
- `images`: encoded images (PNG/JPEG/WebP), decoded and checked where they are read.
- `image_sources`: `prepare images` (class folders) and `prepare parquet` (Hugging Face-style files).
- `shards`: what a worker holds: load_split (float32 in [0,1]), decode_columns (Ray Data batches),
  shard_indices (each rank's share of an epoch).

Nothing here imports ray: the Ray Data path lives in pipeline.orchestrate.train.
"""

from pipeline.data.format import DataError, DatasetInfo, read_file, read_metadata, sha256_file, validate_dataset
from pipeline.data.metadata import FORMAT_VERSION, METADATA_FILE, SPLITS
from pipeline.data.shards import (
    decode_columns,
    load_split,
    shard_indices,
    split_files,
    to_float,
    train_bytes_as_float,
)
from pipeline.data.sources import (
    CIFAR10_CLASSES,
    CIFAR10_TRAIN_BATCHES,
    FASHION_MNIST_CLASSES,
    SOURCES,
    SourceSpec,
    prepare_cifar10,
    prepare_digits,
    prepare_fashion_mnist,
    prepare_npz,
)
from pipeline.data.writing import write_dataset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_TRAIN_BATCHES",
    "FASHION_MNIST_CLASSES",
    "FORMAT_VERSION",
    "METADATA_FILE",
    "SOURCES",
    "SPLITS",
    "DataError",
    "DatasetInfo",
    "SourceSpec",
    "decode_columns",
    "load_split",
    "prepare_cifar10",
    "prepare_digits",
    "prepare_fashion_mnist",
    "prepare_npz",
    "read_file",
    "read_metadata",
    "sha256_file",
    "shard_indices",
    "split_files",
    "to_float",
    "train_bytes_as_float",
    "validate_dataset",
    "write_dataset",
]
