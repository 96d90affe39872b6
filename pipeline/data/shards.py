"""Per-worker tensors from a prepared dataset: float32 pixels in [0,1] and each rank's share of an epoch.

Pixel space: workers get float32 in [0,1] and normalisation is the model's first layer. This module
never imports ray: the Ray Data path (which calls `decode_batch`) lives in pipeline.orchestrate.train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.format import DataError, DatasetInfo, read_file, read_metadata


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
