"""Models from the libraries users take them from (transformers, timm) and shapes the zoo lacks (a U-Net with
transposed convolutions, an MLP, attention), tiny, built from configs in the test (nothing downloaded). Each builder
returns ``(net, inputs, targets)``; :class:`UserModule` is the plain LightningModule a user writes around one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_sgsc import SafetyGuidedMixin
from lightning_sgsc.losses import task_loss
from lightning_sgsc.outputs import main_output


def gpt2() -> tuple[nn.Module, Tensor, Tensor]:
    """transformers' GPT2LMHeadModel at the default config's shape (tied head), 2 layers of width 32."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=50, n_positions=16, bos_token_id=0, eos_token_id=0)
    net = GPT2LMHeadModel(cfg)
    seqs = torch.randint(0, 50, (48, 9), generator=torch.Generator().manual_seed(0))
    return net, seqs[:, :-1], seqs[:, 1:]


def bert() -> tuple[nn.Module, Tensor, Tensor]:
    """transformers' BertForSequenceClassification, 2 layers of width 32, 2 classes."""
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2,
    )  # fmt: skip
    net = BertForSequenceClassification(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 60, (48, 8), generator=g)
    return net, x, (x[:, 0] % 2).long()


def _images(n: int = 48, channels: int = 3, size: int = 32, classes: int = 4) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, classes, (n,), generator=g)


def timm_model(name: str) -> Callable[[], tuple[nn.Module, Tensor, Tensor]]:
    def build() -> tuple[nn.Module, Tensor, Tensor]:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=4), *_images()

    return build


class UNet(nn.Module):
    """A two-level U-Net: conv downsampling, a transposed-conv upsampling, a skip concatenation, per-pixel classes."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fuse = nn.Sequential(nn.Conv2d(16, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        a = self.down1(x)
        b = self.up(self.down2(a))
        return self.out(self.fuse(torch.cat([a, b], dim=1)))


def unet() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 1, 16, 16, generator=g)
    return UNet(), x, (x[:, 0] > 0).long() + (x[:, 0] > 1).long()


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


def mlp() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 10, generator=g)
    return MLP(), x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()


class AttentionClassifier(nn.Module):
    """Token embeddings, one ``nn.MultiheadAttention`` (its ``in_proj_weight`` and ``out_proj``), a linear head."""

    def __init__(self, vocab: int = 30, dim: int = 16, classes: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


def attention() -> tuple[nn.Module, Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 30, (48, 6), generator=g)
    return AttentionClassifier(), x, (x[:, 0] > 15).long()


BROUGHT: dict[str, Callable[[], tuple[nn.Module, Tensor, Tensor]]] = {
    "gpt2": gpt2,
    "bert": bert,
    "mobilenetv3_small_050": timm_model("mobilenetv3_small_050"),
    "resnet10t": timm_model("resnet10t"),
    "unet": unet,
    "mlp": mlp,
    "attention": attention,
}


class UserModule(SafetyGuidedMixin, pl.LightningModule):
    """What a user writes around such a model: the task loss on the model's logits, nothing about compression."""

    def __init__(self, net: nn.Module, x: Tensor, y: Tensor, lr: float = 3e-3) -> None:
        super().__init__()
        self.net, self.lr = net, lr
        self.data = TensorDataset(x, y)

    def forward(self, x: Tensor) -> Any:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return task_loss(main_output(self(x)), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", task_loss(main_output(self(x)), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.data, batch_size=48)
