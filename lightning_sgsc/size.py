"""What a model costs to store: per-layer bits, kept channels and bytes, against float32.

The accounting matches the exported artifact (``export.py``) byte for byte, less the file's header: a quantized
layer stores one uint8 bit depth per channel, a float32 scale per channel that has any nonzero integer, and the
integers packed at ``required_bits`` per channel (channels whose integers are all zero take no payload). Every other
parameter and buffer is stored at its own dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lightning_sgsc.packing import packed_nbytes
from lightning_sgsc.quant.functional import required_bits
from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers, stored_tensors

#: every channel stores its bit depth as uint8; every kept channel its float32 scale
BITS_BYTES_PER_CHANNEL = 1
SCALE_BYTES_PER_KEPT_CHANNEL = 4


@dataclass(frozen=True)
class LayerSize:
    """Storage of one quantized layer."""

    name: str
    channels: int
    kept: int
    mean_bits: float
    weight_bytes: int
    float32_bytes: int


@dataclass(frozen=True)
class ModelSize:
    """Storage of a whole model at its current bit depths."""

    layers: list[LayerSize]
    quantized_bytes: int
    other_bytes: int
    float32_bytes: int
    bits_per_weight: float
    zero_bit_channels: int
    pruned_channels: int

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole model: packed quantized weights and their per-channel data, plus everything else."""
        return self.quantized_bytes + self.other_bytes

    @property
    def compression_ratio(self) -> float:
        """``float32_bytes / total_bytes``."""
        return self.float32_bytes / max(self.total_bytes, 1)

    def as_dict(self) -> dict:
        """Plain data (for JSON)."""
        out = asdict(self)
        out.update(total_bytes=self.total_bytes, compression_ratio=self.compression_ratio)
        return out


@torch.no_grad()
def layer_storage_bits(layer: QuantizedLayer) -> torch.Tensor:
    """Bits each channel needs to store its integers exactly (``int64`` ``(C,)``; 0 for zero-bit channels)."""
    return required_bits(layer.integer_weight())


@torch.no_grad()
def model_size(model: nn.Module) -> ModelSize:
    """Counts every parameter and buffer of ``model``; quantized weights at their storage bits."""
    layers: list[LayerSize] = []
    quantized_bytes = 0
    counted: set[int] = set()
    total_bits = 0
    total_weights = 0
    zero_bit = pruned = 0
    float32_bytes = 0
    for name, layer in quantized_layers(model):
        bits = layer_storage_bits(layer)
        kept = int((bits > 0).sum())
        payload_bits = int((bits * layer.fan_in).sum())
        weight_bytes = (
            packed_nbytes(bits, layer.fan_in)
            + layer.out_channels_ * BITS_BYTES_PER_CHANNEL
            + kept * SCALE_BYTES_PER_KEPT_CHANNEL
        )
        n = layer.out_channels_ * layer.fan_in
        layers.append(
            LayerSize(
                name=name,
                channels=layer.out_channels_,
                kept=kept,
                mean_bits=payload_bits / n,
                weight_bytes=weight_bytes,
                float32_bytes=4 * n,
            )
        )
        quantized_bytes += weight_bytes
        total_bits += payload_bits
        total_weights += n
        zero_bit += layer.out_channels_ - kept
        pruned += int(layer.pruned.sum())
        counted.update(id(t) for t in layer.leaf_tensors())
        float32_bytes += 4 * n
    other = 0
    params = {id(p) for p in model.parameters()}
    for _, t in stored_tensors(model):
        if id(t) in counted:
            continue
        other += t.numel() * t.element_size()
        float32_bytes += 4 * t.numel() if id(t) in params else t.numel() * t.element_size()
    return ModelSize(
        layers=layers,
        quantized_bytes=quantized_bytes,
        other_bytes=other,
        float32_bytes=float32_bytes,
        bits_per_weight=total_bits / max(total_weights, 1),
        zero_bit_channels=zero_bit,
        pruned_channels=pruned,
    )


def size_metrics(size: ModelSize) -> dict[str, float]:
    """What the callback logs of a model's size (under ``sgsc/``), per layer too."""
    out = {
        "sgsc/bits_per_weight": size.bits_per_weight,
        "sgsc/model_bytes": float(size.total_bytes),
        "sgsc/compression_ratio": size.compression_ratio,
        "sgsc/zero_bit_channels": float(size.zero_bit_channels),
        "sgsc/pruned_total": float(size.pruned_channels),
    }
    out.update({f"sgsc/bits/{layer.name}": layer.mean_bits for layer in size.layers})
    return out


def float32_bytes(model: nn.Module) -> int:
    """Bytes of ``model`` with every parameter at float32 and buffers at their dtype (quantizer state excluded, each
    tied tensor once)."""
    params = {id(p) for p in model.parameters()}
    return sum(4 * t.numel() if id(t) in params else t.numel() * t.element_size() for _, t in stored_tensors(model))


def format_rows(rows: Sequence[tuple[str, ...]]) -> str:
    """A plain-text table: the first row is the header, first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_size_table(size: ModelSize) -> str:
    """A per-layer table: channels kept / total, mean bits, bytes, and the totals against float32."""
    rows = [("layer", "kept/total", "mean bits", "bytes", "float32 bytes")]
    for layer in size.layers:
        rows.append(
            (
                layer.name,
                f"{layer.kept}/{layer.channels}",
                f"{layer.mean_bits:.2f}",
                f"{layer.weight_bytes:,}",
                f"{layer.float32_bytes:,}",
            )
        )
    rows.append(("(other tensors)", "", "", f"{size.other_bytes:,}", ""))
    rows.append(("total", "", f"{size.bits_per_weight:.2f}", f"{size.total_bytes:,}", f"{size.float32_bytes:,}"))
    lines = format_rows(rows).splitlines()
    lines.append(
        f"compression: {size.compression_ratio:.1f}x against float32 "
        f"({100 / max(size.compression_ratio, 1e-9):.1f} % of the float32 bytes)"
    )
    return "\n".join(lines)


def size_report(model: nn.Module, print_table: bool = True) -> ModelSize:
    """Measures ``model`` (:func:`model_size`), prints the per-layer table, and returns the figures as data."""
    size = model_size(model)
    if print_table:
        print(format_size_table(size))
    return size
