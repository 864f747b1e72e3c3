"""One quantizer pass per step over all layers, shared by every forward of that step.

The per-layer quantizer (:func:`~lightning_sgsc.quant.functional.quantize`) costs a dozen small tensor operations
per layer and per forward; on CPU, where each operation has a fixed dispatch cost, that is a visible share of a
small model's step, and the preservation loss's second forward pays it again. :class:`FusedQuantizer` instead
stacks the weights of all layers that have the same fan-in into one ``(channels, fan_in)`` matrix (a transformer's
many ``Linear`` layers fall into two or three such groups) and quantizes each group with one call of the same
autograd Function, once per step. Inside :meth:`FusedQuantizer.step` every layer's ``quantized_weight()`` returns
its slice of that result, for the task forward and the preservation forward alike; the gradients of both reach
``w``, ``b`` and ``e`` through the same node.

The arithmetic is the per-layer quantizer's, element for element: the quantized weights are bit-identical; the
per-channel gradient sums may differ in the last bits (other summation order)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from lightning_sgsc.quant.functional import _Quantize, effective_bits
from lightning_sgsc.quant.modules import QuantizedLayer


class FusedQuantizer:
    """Quantizes a fixed list of twins in one pass.

    Args:
        layers: the twins, as the callback swapped them in. Their shapes must not change while this object is used
            (restoring and pruning keep shapes; physical pruning happens after training). Layers spread over several
            devices (model parallelism) cannot share one matrix: :meth:`step` then leaves each layer its own
            quantizer.
    """

    def __init__(self, layers: Sequence[QuantizedLayer]) -> None:
        self.layers = list(layers)
        self._channels = [layer.out_channels_ for layer in self.layers]
        groups: dict[int, list[int]] = {}
        for i, layer in enumerate(self.layers):  # same fan-in: rows of one (channels, fan_in) matrix
            groups.setdefault(layer.fan_in, []).append(i)
        self._groups = list(groups.values())
        self._fan_in: Tensor | None = None
        self._n_weights = sum(int(layer.weight.numel()) for layer in self.layers)
        self._step_bits: Tensor | None = None  # the effective bits of the current step

    def _fan_in_vector(self, device: torch.device) -> Tensor:
        if self._fan_in is None or self._fan_in.device != device:
            fan_in = [float(layer.fan_in) for layer in self.layers for _ in range(layer.out_channels_)]
            self._fan_in = torch.tensor(fan_in, device=device)
        return self._fan_in

    def effective_bits(self) -> Tensor:
        """``max(b, 0)`` of every channel of every layer, 0 where pruned, concatenated (differentiable)."""
        bits = torch.cat([layer.bits for layer in self.layers])
        return effective_bits(bits, torch.cat([layer.pruned for layer in self.layers]))

    def bits_per_weight(self, effective: Tensor | None = None) -> Tensor:
        """Same value as :func:`lightning_sgsc.losses.bits_per_weight` over these layers, in three operations;
        inside :meth:`step` it reuses the step's effective bits (one graph node for both uses)."""
        if effective is None:
            effective = self._step_bits if self._step_bits is not None else self.effective_bits()
        return (effective * self._fan_in_vector(effective.device)).sum() / max(self._n_weights, 1)

    def quantize_all(self, effective: Tensor | None = None) -> list[Tensor]:
        """Every layer's quantized weight (float32, each layer's shape): one quantizer call per distinct fan-in."""
        b = self.effective_bits() if effective is None else effective
        bits = torch.split(b.float(), self._channels)
        out: list[Tensor | None] = [None] * len(self.layers)
        for members in self._groups:
            if len(members) == 1:  # nothing to stack: skip the cat/split pair
                i = members[0]
                layer = self.layers[i]
                out[i] = _Quantize.apply(layer.weight.float(), bits[i], layer.exponent.float())
                continue
            w = torch.cat([self.layers[i].weight.float().reshape(self._channels[i], -1) for i in members])
            e = torch.cat([self.layers[i].exponent.float() for i in members])
            q = _Quantize.apply(w, torch.cat([bits[i] for i in members]), e)
            for i, part in zip(members, torch.split(q, [self._channels[i] for i in members]), strict=True):
                out[i] = part.view(self.layers[i].weight.shape)
        return out  # type: ignore[return-value]

    @contextmanager
    def step(self) -> Iterator[FusedQuantizer]:
        """Within this block (grad mode, one training step, no optimizer step inside), every layer's
        ``quantized_weight()`` returns the result of one shared :meth:`quantize_all`. A layer whose ``weight``,
        ``bits``, ``exponent`` or ``pruned`` is changed in place inside the block falls back to its own quantizer."""
        if not torch.is_grad_enabled() or len({layer.weight.device for layer in self.layers}) != 1:
            yield self
            return
        self._step_bits = self.effective_bits()
        quantized = self.quantize_all(self._step_bits)
        try:
            for layer, q in zip(self.layers, quantized, strict=True):
                layer._fused = (q, layer._versions())
            yield self
        finally:
            self._step_bits = None
            for layer in self.layers:
                layer._fused = None
