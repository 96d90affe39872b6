"""Per-worker tensors from a prepared dataset: float32 pixels in [0,1] and each rank's share of an epoch.

Pixel space: workers get float32 in [0,1] and normalisation is the model's first layer. This module
never imports ray: the Ray Data path (which maps `decode_columns` over the files) lives in
pipeline.orchestrate.train and pipeline.orchestrate.worker.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.data.format import DataError, DatasetInfo, image_bytes, read_file, read_metadata
from pipeline.data.images import decode_rows


def load_split(
    path: str | Path, split: str, *, max_examples: int = 0, verify_checksum: bool = True, as_uint8: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole split in memory: x float32 (N,C,H,W) in [0,1] (`as_uint8`: the stored uint8 pixels, a
    quarter of the bytes, for a loader that converts per batch), y int64 (N,). Validates every file."""
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
    images = torch.from_numpy(np.ascontiguousarray(x)) if as_uint8 else to_float(x)
    return images, torch.from_numpy(y)


def decode_columns(
    batch: dict[str, np.ndarray] | pa.Table, *, shape: tuple[int, int, int], num_classes: int, encoded: bool
) -> dict[str, np.ndarray]:
    """A Ray Data batch as read from Parquet (image bytes, labels; a pyarrow Table or numpy columns) ->
    {"image": uint8 (N,C,H,W), "label": int64}, every row checked. Runs in Ray Data's map_batches tasks on
    CPUs, so decoding (PNG/JPEG included) never runs on a training worker; pixels stay uint8 (a quarter of
    float32's bytes through the object store) and become float on the worker's device (`to_float`).
    Raw pixels in a Table are read straight from Arrow's data buffer: no Python object per row."""
    if isinstance(batch, pa.Table):
        labels = np.asarray(batch.column("label").to_numpy(), dtype=np.int64)
        column = batch.column("image").combine_chunks()
        if encoded:
            images = decode_rows(column.to_pylist(), shape, "streamed batch")
        else:  # a copy: the view is on Arrow's buffer, which Ray Data may reuse
            images = image_bytes(column, shape, "streamed batch").reshape(len(column), *shape).copy()
    else:
        rows, labels = batch["image"], np.asarray(batch["label"], dtype=np.int64)
        if encoded:
            images = decode_rows(list(rows), shape, "streamed batch")
        else:
            flat = np.frombuffer(b"".join(bytes(b) for b in rows), dtype=np.uint8)
            if flat.size != len(rows) * math.prod(shape):
                raise DataError(f"streamed batch: images do not all have shape {shape}")
            images = flat.reshape(len(rows), *shape)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"streamed batch: label outside [0, {num_classes})")
    return {"image": images, "label": labels}


def split_files(path: str | Path, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """A split file by file, each as (float32 pixels in [0,1], labels), every check applied: what reads
    a split that may not fit in memory (the final test metrics of a streamed dataset)."""
    info = read_metadata(path)
    for entry in info.splits[split]:
        x, y = read_file(info, entry)
        yield to_float(x), torch.from_numpy(y)


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels (numpy or a tensor on any device) -> float32 in [0,1], on the same device."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(np.ascontiguousarray(images))
    return images.to(torch.float32).div_(255.0)


def train_bytes_as_float(info: DatasetInfo) -> int:
    """Bytes the train split takes as float32 tensors (what an in-memory shard loader would hold)."""
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
