"""Architectures users bring, at toy sizes: each builder returns ``(net, example inputs, targets, kind)``.

``kind`` is ``"class"`` (logits ``(B, C)`` against labels ``(B,)``) or ``"tokens"`` (logits ``(B, T, V)`` against
next tokens ``(B, T)``). Random initialisation, seeded; seconds each on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedMixin


class ResidualBNCNN(nn.Module):
    """Two residual blocks with affine BatchNorm (conv → BN → ReLU → conv → BN, plus a 1×1 shortcut) on 8×8 images."""

    def __init__(self, classes: int = 10, width: int = 16, in_ch: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_ch, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = _Block(width, width)
        self.block2 = _Block(width, 2 * width, stride=2)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block2(self.block1(self.stem(x)))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.short(x))


class TinyGPT(nn.Module):
    """nanoGPT's layout: token + position embeddings, pre-LN blocks (fused qkv Linear, causal attention, MLP), a final
    LayerNorm and an ``lm_head`` whose weight *is* the token embedding's."""

    def __init__(self, vocab: int = 13, block: int = 8, n_embd: int = 16, n_head: int = 2, n_layer: int = 2) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList([_GPTBlock(n_embd, n_head) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied

    def forward(self, idx: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class _GPTBlock(nn.Module):
    def __init__(self, n_embd: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))
        self.n_head = n_head

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp(self.ln_2(x))


class TinyViT(nn.Module):
    """A vision transformer: a strided Conv2d patch embedding, a class token, encoder layers, a linear head."""

    def __init__(self, classes: int = 10, dim: int = 16, patch: int = 4, image: int = 8) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 1 + (image // patch) ** 2, dim))
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.encoder(x)[:, 0])


class Conv1dSeq(nn.Module):
    """A 1-D convolutional sequence classifier (audio/sensor style): Conv1d → BN → ReLU → Conv1d → pool → Linear."""

    def __init__(self, classes: int = 10, channels: int = 2) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(channels, 12, 5, padding=2),
            nn.BatchNorm1d(12),
            nn.ReLU(),
            nn.Conv1d(12, 16, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(-1))


class NestedContainers(nn.Module):
    """Layers inside nested ``nn.Sequential`` and ``nn.ModuleDict`` containers."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU()), nn.Linear(32, 24))
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.ReLU(), nn.Linear(24, classes)), "b": nn.Linear(24, classes)})

    def forward(self, x: Tensor) -> Tensor:
        z = self.trunk(x)
        return self.heads["a"](z) + self.heads["b"](z)


def _images(n: int, channels: int, size: int, classes: int = 10, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Separable images: each class lights up its own band, plus noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = 0.5 * torch.randn(n, channels, size, size, generator=g)
    band = max(size // classes, 1)
    for c in range(classes):
        x[y == c, :, (c * band) % size, :] += 2.0
    return x, y


def _resnet18() -> tuple[nn.Module, Tensor, Tensor, str]:
    from torchvision.models import resnet18

    x, y = _images(16, 3, 16)
    return resnet18(num_classes=10), x, y, "class"


def _mobilenet() -> tuple[nn.Module, Tensor, Tensor, str]:
    from torchvision.models import mobilenet_v3_small

    x, y = _images(16, 3, 16)
    return mobilenet_v3_small(num_classes=10, dropout=0.0), x, y, "class"  # no dropout: resume compares bits


def _gpt() -> tuple[nn.Module, Tensor, Tensor, str]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 13, (32, 9), generator=g)
    tokens[:, 1::2] = (tokens[:, 0::2][:, : tokens[:, 1::2].shape[1]] + 1) % 13  # a learnable pattern
    return TinyGPT(), tokens[:, :-1], tokens[:, 1:], "tokens"


def _conv1d() -> tuple[nn.Module, Tensor, Tensor, str]:
    x, y = _images(32, 2, 16)
    return Conv1dSeq(), x[:, :, :, 0] + x[:, :, 0, :], y, "class"


ZOO: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor, str]]] = {
    "resnet18": _resnet18,
    "mobilenet_v3_small": _mobilenet,
    "residual_bn_cnn": lambda: (ResidualBNCNN(), *_images(32, 1, 8), "class"),
    "gpt_tied": _gpt,
    "vit": lambda: (TinyViT(), *_images(32, 1, 8), "class"),
    "conv1d": _conv1d,
    "nested": lambda: (NestedContainers(), *_images(32, 1, 8), "class"),
}


class ZooModule(SafetyGuidedMixin, pl.LightningModule):
    """A plain user LightningModule around any zoo net (classification or next-token), Adam."""

    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, kind: str, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.kind, self.lr = net, kind, lr
        self.data = TensorDataset(x, y)
        if kind == "tokens":
            self.preservation_metric_mode = "min"

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = self(x)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self._loss(*batch)

    def preservation_step(self, batch: Any) -> Tensor:
        return self._loss(batch[0], batch[1])

    def preservation_evaluate(self, batches: Any) -> float:
        if self.kind == "class":
            return super().preservation_evaluate(batches)
        losses = [float(self._loss(b[0], b[1])) for b in batches]
        return sum(losses) / len(losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=4)
