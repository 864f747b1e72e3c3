"""DataModules that work offline."""

from __future__ import annotations

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
