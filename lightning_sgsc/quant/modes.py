"""The ways a twin can compute its weight, each switched by one context manager (and nothing else).

* :func:`fused` (one training step): every twin returns its slice of the step's single fused quantizer pass
  (:class:`~lightning_sgsc.quant.fused.FusedQuantizer`).
* :func:`weight_probes`: each twin adds a zero tensor to its quantized weight (channels first), so a backward pass
  yields ``dL/dw_q`` per layer (the restore scores of :mod:`lightning_sgsc.feedback`).
* :func:`float_weights`: every twin computes with its float weight, unquantized (the distillation term's teacher).

and :func:`couple_norm`: the BatchNorm that reads a twin's output, whose rows pruning zeroes with the channel's.
Each mode lives in the twin's :class:`~lightning_sgsc.quant.modules.TwinModes`; modules outside ``quant/`` use these
functions rather than writing to a twin.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from lightning_sgsc.quant.modules import QuantizedLayer, all_twins, quantized_layers


@contextmanager
def fused(layers: Sequence[QuantizedLayer], quantized: Sequence[Tensor]) -> Iterator[None]:
    """Within the block each of ``layers`` computes with its entry of ``quantized`` (while none of its tensors
    changes in place: then it falls back to its own quantizer)."""
    try:
        for layer, q in zip(layers, quantized, strict=True):
            layer.modes.fused = (q, layer._versions())
        yield
    finally:
        for layer in layers:
            layer.modes.fused = None


@contextmanager
def weight_probes(model: nn.Module) -> Iterator[dict[str, Tensor]]:
    """Within the block each twin of ``model`` adds a zero tensor (a leaf that requires grad) to its quantized weight;
    the dict yielded maps layer names to those tensors. After a ``loss.backward(inputs=list(probes.values()))``
    their ``.grad`` is ``dL/dw_q``."""
    layers = quantized_layers(model)
    probes = {
        name: torch.zeros_like(layer.channel_weight, dtype=torch.float32, requires_grad=True) for name, layer in layers
    }
    by_quantizer = {id(layer.bits): probes[name] for name, layer in layers}
    twins = [twin for _, twin in all_twins(model)]
    try:
        for twin in twins:  # the holders of a tied weight share its probe: its gradient sums both uses
            twin.modes.probe = by_quantizer[id(twin.bits)]
        yield probes
    finally:
        for twin in twins:
            twin.modes.probe = None


@contextmanager
def float_weights(model: nn.Module) -> Iterator[None]:
    """Within the block every twin of ``model`` computes with its float weight, unquantized: the uncompressed model
    the same Parameters describe (the preservation term's teacher)."""
    layers = [m for _, m in all_twins(model)]
    try:
        for layer in layers:
            layer.modes.float_weight = True
        yield
    finally:
        for layer in layers:
            layer.modes.float_weight = False


def couple_norm(layer: QuantizedLayer, norm: nn.Module | None) -> None:
    """Records ``norm`` as the BatchNorm that reads ``layer``'s output (``None``: none)."""
    layer.modes.norm = norm


def coupled_norm(layer: QuantizedLayer) -> nn.Module | None:
    """The BatchNorm coupled to ``layer`` by :func:`couple_norm`, if any."""
    return layer.modes.norm
