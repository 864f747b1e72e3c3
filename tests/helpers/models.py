"""Tiny models and data shared by the tests."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedMixin


class TinyConvNet(nn.Module):
    """Conv2d -> ReLU -> Conv1d-free CNN on 1x8x8 inputs with a linear head."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.flatten(self.features(x), 1))


class TinyConv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 8, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.relu(self.conv(x)), 1))


def blob_data(n: int = 96, classes: int = 3, seed: int = 0) -> TensorDataset:
    """Separable 1x8x8 'images': each class lights up its own rows, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.3 * torch.randn(n, 1, 8, 8, generator=g)
    for c in range(classes):
        x[y == c, 0, c * 2 : c * 2 + 2, :] += 1.0
    return TensorDataset(x, y)


class TinyClassifier(SafetyGuidedMixin, pl.LightningModule):
    """A plain user LightningModule: its training_step knows nothing about compression."""

    def __init__(self, lr: float = 0.01, weight_decay: float = 0.0, n: int = 96) -> None:
        super().__init__()
        self.net = TinyConvNet()
        self.lr = lr
        self.weight_decay = weight_decay
        self.data = blob_data(n)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/acc", (self(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=32)


def cpu_trainer(tmp_path: Any, callbacks: list[Any], **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(callbacks=callbacks, **defaults)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class TinyTransformer(nn.Module):
    """A one-block character transformer: embeddings, LayerNorm, attention and MLP built from Linear layers."""

    def __init__(self, vocab: int = 11, dim: int = 16, heads: int = 2, block: int = 8) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(block, dim)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, vocab)
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)))

    def forward(self, idx: Tensor) -> Tensor:
        b, t = idx.shape
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        q, k, v = self.qkv(self.ln1(x)).split(x.shape[-1], dim=-1)
        q, k, v = (z.view(b, t, self.heads, -1).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / (q.shape[-1] ** 0.5)
        att = att.masked_fill(~self.mask[:t, :t], float("-inf")).softmax(-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, -1))
        x = x + self.mlp(self.ln2(x))
        return self.head(x)


def aggressive_callback(**overrides: Any) -> Any:
    """A callback that drives channels to zero bits within a few steps, so feedback decisions happen in tiny runs.
    ``overrides``: whole groups (``budget=Budget(...)``), shortcuts or 0.2's flat names, each setting one field."""
    from dataclasses import fields, is_dataclass

    from lightning_sgsc import SafetyGuidedQuantization
    from lightning_sgsc.config import SETTINGS
    from lightning_sgsc.settings import DEPRECATED, SHORTCUTS

    groups: dict[str, dict[str, Any]] = {
        "quantization": dict(init_bits=2, lr=0.3),
        "losses": dict(bit_weight=2.0),
        "preservation": dict(size=24, batch_size=8, warmup_epochs=1),
        "feedback": dict(threshold=0.0, restore_fraction=0.5),
        "budget": {},
    }
    seed = overrides.pop("seed", 0)
    for key, value in overrides.items():
        if key in SETTINGS:
            groups[key].update(
                {f.name: getattr(value, f.name) for f in fields(value)} if is_dataclass(value) else value
            )
        else:
            group, field = {**SHORTCUTS, **DEPRECATED}[key]
            groups[group][field] = value
    return SafetyGuidedQuantization(**groups, seed=seed)
