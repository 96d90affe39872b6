"""Synthetic data the unit tests share (imported by test modules; not a test module itself)."""

import numpy as np


def random_splits(n=40, shape=(1, 8, 8), classes=4, seed=0):
    """{split: (uint8 images (n, *shape), int64 labels in [0, classes))} for train, val and test."""
    rng = np.random.default_rng(seed)
    return {
        s: (rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, classes, n).astype(np.int64))
        for s in ("train", "val", "test")
    }
