"""Bit packing of per-channel signed integers: pure tensor code, no model inside.

A layer's integers ``q`` (``C × fan_in``) with per-channel widths ``bits`` (0–16) become one little-endian
bitstream: channels grouped by width (ascending), each group in channel order, each value in two's complement on
``width`` bits. Channels of width 0 take no space. The stream is padded to a whole byte.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor


def packed_nbytes(bits: Tensor, fan_in: int) -> int:
    """Bytes :func:`pack` produces for these widths."""
    return math.ceil(int(bits.to(torch.int64).sum()) * fan_in / 8)


def pack(q: Tensor, bits: Tensor) -> np.ndarray:
    """Packs ``q`` (``C × ...`` integers) at ``bits`` (``(C,)``) per channel into a ``uint8`` array."""
    flat = q.reshape(q.shape[0], -1).to(torch.int64)
    chunks = []
    for width in sorted({int(b) for b in bits.tolist() if b > 0}):
        rows = flat[bits == width]
        unsigned = (rows & ((1 << width) - 1)).numpy()
        shifts = np.arange(width, dtype=np.int64)
        chunks.append(((unsigned[..., None] >> shifts) & 1).astype(np.uint8).reshape(-1))
    if not chunks:
        return np.zeros(0, dtype=np.uint8)
    return np.packbits(np.concatenate(chunks), bitorder="little")


def unpack(data: np.ndarray, bits: Tensor, fan_in: int) -> Tensor:
    """Inverse of :func:`pack`: the ``int32`` matrix ``C × fan_in`` (rows of width-0 channels are zero)."""
    stream = np.unpackbits(data, bitorder="little")
    out = torch.zeros(bits.shape[0], fan_in, dtype=torch.int32)
    offset = 0
    for width in sorted({int(b) for b in bits.tolist() if b > 0}):
        idx = (bits == width).nonzero().flatten()
        n = idx.numel() * fan_in * width
        chunk = stream[offset : offset + n].reshape(idx.numel(), fan_in, width).astype(np.int64)
        offset += n
        unsigned = (chunk << np.arange(width, dtype=np.int64)).sum(axis=-1)
        signed = np.where(unsigned >= (1 << (width - 1)), unsigned - (1 << width), unsigned)
        out[idx] = torch.from_numpy(signed.astype(np.int32))
    return out
