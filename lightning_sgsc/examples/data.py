"""DataModules that work offline."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def split_indices(n: int, fractions: tuple[float, float], seed: int) -> tuple[list[int], list[int], list[int]]:
    """A seeded ``(train, val, test)`` split of ``range(n)``; ``fractions`` are the val and test shares."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = int(round(fractions[0] * n)), int(round(fractions[1] * n))
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` that resumes where it stopped: Lightning's ``state_dict``/``load_state_dict`` protocol for
    loaders, so a fit resumed from any checkpoint (mid-epoch, or on an epoch's last batch) sees exactly the batches an
    uninterrupted fit would have seen.

    The state is the shuffling generator's state when the epoch's iteration began and now, and how many batches of
    the epoch were handed out (Lightning fetches no batch ahead from a loader with a length, so these are the batches
    trained on): on loading, the epoch's order is drawn again and those batches are skipped (loaded and dropped), or,
    after a finished epoch, the next epoch starts from the generator as it was. Uninterrupted, it draws exactly what a
    plain ``DataLoader`` with the same generator draws.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_state: torch.Tensor | None = None
        self._handed_out, self._exhausted, self._skip = 0, False, 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        if self.generator is not None:
            self._epoch_state = self.generator.get_state()
        batches = super().__iter__()
        skip, self._skip = self._skip, 0
        self._handed_out, self._exhausted = 0, False
        return self._count(batches, skip)

    def _count(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        for i, batch in enumerate(batches):
            if i < skip:
                continue
            self._handed_out = i + 1
            yield batch
        self._exhausted = True

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch_state": self._epoch_state,
            "state": self.generator.get_state() if self.generator is not None else None,
            "handed_out": self._handed_out,
            "exhausted": self._exhausted,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        finished = state["exhausted"] or state["handed_out"] >= len(self)
        self._skip = 0 if finished else int(state["handed_out"])
        if self.generator is None:
            return
        if finished:  # the next epoch draws from the generator as it was
            self.generator.set_state(state["state"])
        elif state["epoch_state"] is not None:  # mid-epoch: the same order again, without what was trained on
            self.generator.set_state(state["epoch_state"])


class TensorDataModule(pl.LightningDataModule):
    """Loaders over ``train_set`` / ``val_set`` / ``test_set`` (TensorDatasets that ``setup`` builds); the training
    loader shuffles with a generator seeded by ``self.seed`` and resumes exactly (:class:`ResumableDataLoader`)."""

    batch_size: int
    seed: int
    train_set: TensorDataset
    val_set: TensorDataset
    test_set: TensorDataset
    eval_batch_size = 512

    def _split(self, x: torch.Tensor, y: torch.Tensor, fractions: tuple[float, float]) -> None:
        """Sets ``train_set``, ``val_set``, ``test_set`` from one seeded split of ``(x, y)``."""
        train, val, test = split_indices(len(y), fractions, self.seed)
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return ResumableDataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.eval_batch_size)


class DigitsDataModule(TensorDataModule):
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
        self._split(x, y, self.fractions)


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


class IDXImageDataModule(TensorDataModule):
    """MNIST-format images (IDX ``.gz``) from a folder: train/validation split from the training files by seed,
    test from the ``t10k`` files. Offline: nothing is downloaded unless ``download=True`` (torchvision).

    Args:
        root: folder with ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        batch_size: batch size of the training loader.
        val_fraction: share of the training files held out for validation.
        seed: seed of the split and the shuffling.
        train_limit: use only the first ``train_limit`` training images (None: all).
        download: fetch Fashion-MNIST with torchvision into ``root`` when absent (online users only).
    """

    def __init__(
        self,
        root: str = str(FASHION_MNIST_DIR),
        batch_size: int = 64,
        val_fraction: float = 0.1,
        seed: int = 0,
        train_limit: int | None = None,
        download: bool = False,
    ) -> None:
        super().__init__()
        self.root, self.batch_size, self.val_fraction, self.seed = Path(root), batch_size, val_fraction, seed
        self.train_limit, self.download = train_limit, download

    def prepare_data(self) -> None:
        if self.download and load_idx_images(self.root, "train") is None:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.root), train=True, download=True)
            FashionMNIST(str(self.root), train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        train, test = load_idx_images(self.root, "train"), load_idx_images(self.root, "test")
        if train is None or test is None:
            raise FileNotFoundError(
                f"`root` must hold the IDX files, got {str(self.root)!r}. Install Fashion-MNIST with "
                "`apt-get install -y dataset-fashion-mnist`, or, when online, pass download=True (in the Hydra app: "
                "data.download=true; on the CLI: --data.download true)."
            )
        x, y = train
        if self.train_limit is not None:
            x, y = x[: self.train_limit], y[: self.train_limit]
        tr, va, _ = split_indices(len(y), (self.val_fraction, 0.0), self.seed)
        self.train_set, self.val_set = TensorDataset(x[tr], y[tr]), TensorDataset(x[va], y[va])
        self.test_set = TensorDataset(*test)


class MNIST10kDataModule(DigitsDataModule):
    """The official MNIST test split (10,000 images), split into train/validation/test by a fixed seed.

    Args:
        root: folder with ``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz``.
        batch_size, val_fraction, test_fraction, seed: as :class:`DigitsDataModule`.
    """

    def __init__(
        self,
        root: str = "../shared/data/mnist",
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, test_fraction, seed)
        self.root = Path(root)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        loaded = load_idx_images(self.root, "test")
        if loaded is None:
            raise FileNotFoundError(f"`root` must hold the MNIST t10k IDX files, got {str(self.root)!r}.")
        x, y = loaded
        self._split(x, y, self.fractions)


class NamesDataModule(TensorDataModule):
    """Character-level names (makemore's ``names.txt``): each name becomes ``block_size`` inputs and next-character
    targets (end token 0, padding ignored with -1); names split train/validation/test by seed.

    Args:
        path: the text file, one name per line.
        block_size: context length.
        batch_size: batch size.
        val_fraction, test_fraction: held-out shares of the names.
        seed: seed of the split and the shuffling.
    """

    def __init__(
        self,
        path: str = "../shared/data/names.txt",
        block_size: int = 32,
        batch_size: int = 16,
        val_fraction: float = 0.1,
        test_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.path, self.block_size, self.batch_size, self.seed = Path(path), block_size, batch_size, seed
        self.fractions = (val_fraction, test_fraction)

    def setup(self, stage: str | None = None) -> None:
        if hasattr(self, "train_set"):
            return
        if not self.path.exists():
            raise FileNotFoundError(f"`path` must be a text file of names, got {str(self.path)!r}.")
        words = [w.strip() for w in self.path.read_text().splitlines() if w.strip()]
        chars = sorted(set("".join(words)))
        self.stoi = {c: i + 1 for i, c in enumerate(chars)}
        self.vocab_size = len(chars) + 1
        x = torch.zeros(len(words), self.block_size, dtype=torch.long)
        y = torch.full((len(words), self.block_size), -1, dtype=torch.long)
        for i, w in enumerate(words):
            ids = [self.stoi[c] for c in w[: self.block_size - 1]]
            x[i, 1 : 1 + len(ids)] = torch.tensor(ids, dtype=torch.long)
            y[i, : len(ids) + 1] = torch.tensor([*ids, 0], dtype=torch.long)
        self._split(x, y, self.fractions)  # len(y) == len(words)
