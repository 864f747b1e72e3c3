"""Small reference networks and the LightningModule that trains them (with the SGSC mixin)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sgsc.config import check_int
from lightning_sgsc.mixin import SafetyGuidedMixin
from lightning_sgsc.outputs import main_output


class DigitsCNN(nn.Module):
    """The demo CNN for 8×8 digits: two 3×3 conv blocks and a linear classifier (6,090 parameters at width 16).

    Args:
        width: channels of the first conv (the second has ``2 * width``).
        num_classes: output classes.
    """

    def __init__(self, width: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.fc = nn.Linear(2 * width * 2 * 2, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


class FashionCNN(nn.Module):
    """Reference CNN for 28×28 grey images (Fashion-MNIST, MNIST): conv 32 → conv 64 → linear 128 → linear 10,
    each conv 3×3 followed by ReLU and 2×2 max-pooling (421,642 parameters).

    Args:
        num_classes: output classes.
        width: multiplies every hidden width (channels and the 128 hidden units); 1 is the reference CNN.
    """

    def __init__(self, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        check_int("width", width, 1)
        self.conv1 = nn.Conv2d(1, 32 * width, 3, padding=1)
        self.conv2 = nn.Conv2d(32 * width, 64 * width, 3, padding=1)
        self.fc1 = nn.Linear(64 * width * 7 * 7, 128 * width)
        self.fc2 = nn.Linear(128 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class ClassifierModule(SafetyGuidedMixin, pl.LightningModule):
    """Cross-entropy classifier around any ``nn.Module`` that returns logits; Adam(W) optimiser.

    This is plain Lightning code: the mixin adds the compression terms when the callback is present.

    Args:
        net: the network.
        lr: learning rate.
        weight_decay: AdamW weight decay.
    """

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=stage == "val")
        self.log(f"{stage}/acc", (logits.argmax(-1) == y).float().mean(), prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)


class CharTransformer(nn.Module):
    """A GPT-style character transformer (makemore's): ``n_layer`` blocks of causal self-attention and MLP.

    Args:
        vocab_size: characters (including the end token).
        block_size: context length.
        n_embd: embedding width.
        n_head: attention heads.
        n_layer: transformer blocks.
    """

    def __init__(self, vocab_size: int = 27, block_size: int = 32, n_embd: int = 64, n_head: int = 4, n_layer: int = 4):
        super().__init__()
        self.block_size = block_size
        self.tok = nn.Embedding(vocab_size, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.ModuleList(_Block(n_embd, n_head, block_size) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class _Block(nn.Module):
    """Pre-norm transformer block. Follows the attention protocol of :func:`lightning_sgsc.prune.prune_attention_heads`
    (``qkv``, ``proj``, ``n_head``), so whole heads can be removed."""

    def __init__(self, n_embd: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.fc = nn.Linear(n_embd, 4 * n_embd)
        self.out = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        inner = self.qkv.out_features // 3  # n_head * head_dim; shrinks when heads are pruned
        q, k, v = self.qkv(self.ln1(x)).split(inner, dim=-1)
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, inner))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


def gpt2_lm(
    vocab_size: int = 27, block_size: int = 32, n_embd: int = 64, n_head: int = 4, n_layer: int = 4
) -> nn.Module:
    """transformers' ``GPT2LMHeadModel`` at the character transformer's size (its head tied to the token embedding,
    its projections transformers' ``Conv1D``), built from a config: nothing is downloaded. Needs ``transformers``."""
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as err:  # pragma: no cover - the test extra installs it
        raise ImportError("gpt2_lm needs transformers: pip install transformers") from err
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd, n_head=n_head, n_layer=n_layer,
        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


class LanguageModule(SafetyGuidedMixin, pl.LightningModule):
    """Next-character language model around :class:`CharTransformer` (or any model returning next-token logits, a
    transformers ``ModelOutput`` included); the preservation metric is the loss.

    Args:
        net: the transformer.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
    """

    preservation_metric_mode = "min"

    def __init__(self, net: nn.Module, lr: float = 1e-3, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, idx: Tensor) -> Tensor:
        return main_output(self.net(idx))  # a transformers model's ModelOutput: its logits

    def _loss(self, batch: Any) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(x).transpose(1, 2), y, ignore_index=-1)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self._loss(batch)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", self._loss(batch), prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.log("test/loss", self._loss(batch))

    def preservation_step(self, batch: Any) -> Tensor:
        return self._loss(batch)

    def preservation_outputs(self, batch: Any) -> Tensor:
        x, y = batch
        return self(x)[y != -1]  # the positions that hold a character, not the padding

    def preservation_evaluate(self, batches: Any) -> float:
        losses = [self._loss(batch) for batch in batches]
        return float(torch.stack(losses).mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
