"""MNIST's IDX files (gzip-compressed), read with numpy alone so that tests and benchmarks can load
the data without importing torch."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def read_idx(path: Path) -> np.ndarray:
    """A gzip-compressed IDX file: big-endian header (magic 2051 images, 2049 labels), then uint8 data."""
    with gzip.open(path) as fh:
        raw = fh.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic == 2051:
        count, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
        return np.frombuffer(raw, np.uint8, offset=16).reshape(count, rows, cols)
    if magic == 2049:
        return np.frombuffer(raw, np.uint8, offset=8)
    raise ValueError(f"{path}: not an IDX image or label file (magic {magic})")


def load_mnist(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images [n, 28, 28] uint8, labels [n] uint8)`` for ``split`` 'train' or 'test'."""
    prefix = {"train": "train", "test": "t10k"}[split]
    images = read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    if len(images) != len(labels):
        raise ValueError(f"{folder}: {len(images)} images but {len(labels)} labels for {split}")
    return images, labels
