"""DataModules that work offline."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """A seeded ``(train, val, test)`` split of ``range(n)``; ``fractions`` are the val and test shares."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's 1,797 8×8 digits (shipped with the package, no download), split train/val/test by seed.

    Args:
        batch_size: batch size of every loader.
        val_fraction: share of the data held out for validation.
        test_fraction: share held out for the final test metric.
        seed: seed of the split.
    """

    def __init__(self, batch_size: int = 32, val_fraction: float = 0.1, test_fraction: float = 0.2, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size
        self.fractions = (val_fraction, test_fraction)
        self.seed = seed

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        train, val, test = split_indices(len(y), self.fractions, self.seed)
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


def read_idx(path: str | Path) -> torch.Tensor:
    """Reads an IDX file (``.gz`` or plain), as used by MNIST and Fashion-MNIST, into a uint8 tensor."""
    import gzip
    import struct

    import numpy as np

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:  # type: ignore[operator]
        data = f.read()
    zero, dtype, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"`path` must be an IDX file of unsigned bytes, got {str(path)!r} (magic {data[:4]!r}).")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy())


FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def load_idx_images(root: str | Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(images as float N×1×28×28 in [0, 1], labels)`` from ``{split}-images-idx3-ubyte.gz``; None if absent."""
    root = Path(root)
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.exists() or not labels.exists():
        return None
    x = read_idx(images).float().div_(255.0).unsqueeze(1)
    return x, read_idx(labels).long()
