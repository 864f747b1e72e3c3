"""Tiny stand-ins for the real datasets, written in their real formats (IDX .gz, one name per line)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_mnist_like(root: Path, n_train: int = 256, n_test: int = 64, seed: int = 0) -> Path:
    """``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` with random 28x28 images."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    return root


def write_names(path: Path, n: int = 300, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    names = ["".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(n)]
    names.append("abcdefghijklmnopqrstuvwxyz")  # every letter appears: the vocabulary is 27
    path.write_text("\n".join(names) + "\n")
    return path
