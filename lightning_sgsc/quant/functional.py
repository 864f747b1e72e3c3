"""The differentiable per-channel quantizer, in pure torch.

For output channel ``c`` with learnable bit depth ``b_c`` and exponent ``e_c``::

    q(w) = 2^e * clamp(round(2^-e * w), -2^(b-1), 2^(b-1) - 1)

with ``b`` taken as ``max(b, 0)``. The rounding passes gradients straight through (STE); ``b`` receives gradient
through the clamp bounds, ``e`` through the scale, ``w`` where it is not clipped. A channel whose ``b`` is 0 has
bounds ``[-0.5, -0.5]`` and rounds to exactly zero.

The clamp comes before the rounding (as in the self-compression paper's code). For integer ``b >= 1`` this equals
``2^e * clamp(round(2^-e w), ...)`` exactly; for ``b = 0`` only this order gives exact zeros, and for fractional
``b`` it keeps every stored value an integer (so it can be bit-packed).

The forward pass and the gradients are one :class:`torch.autograd.Function`: four weight-sized operations forward,
about ten backward, and no weight-sized tensor saved between the two beyond the weight itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LN2 = math.log(2.0)


def _channel_view(t: Tensor, weight: Tensor) -> Tensor:
    """Reshapes a per-channel vector ``(C,)`` to broadcast against ``weight`` ``(C, ...)``."""
    return t.reshape((-1,) + (1,) * (weight.dim() - 1))


def _channel_sum(t: Tensor) -> Tensor:
    """Sums ``(C, ...)`` over everything but dimension 0."""
    return t.reshape(t.shape[0], -1).sum(1)


def effective_bits(bits: Tensor, pruned: Tensor | None = None) -> Tensor:
    """The bit depth the quantizer uses: ``max(b, 0)``, and 0 for pruned channels."""
    b = bits.clamp_min(0.0)
    if pruned is not None:
        b = torch.where(pruned, torch.zeros_like(b), b)
    return b


class _Quantize(torch.autograd.Function):
    """Forward and STE gradients of the quantizer.

    Only the input ``weight`` (for a parameter: no extra memory) and per-channel vectors are saved; the backward
    recomputes ``x = 2^-e w`` and its clamp (two elementwise passes) instead of keeping two weight-sized tensors
    alive from the forward to the backward."""

    @staticmethod
    def forward(ctx, weight: Tensor, bits: Tensor, exponent: Tensor) -> Tensor:  # type: ignore[override]
        scale = torch.exp2(_channel_view(exponent, weight))
        inv_scale = torch.exp2(_channel_view(exponent.neg(), weight))
        half = torch.exp2(_channel_view(bits, weight) - 1.0)
        lo, hi = half.neg(), half - 1.0
        r = torch.clamp(weight * inv_scale, lo, hi).round_()
        ctx.save_for_backward(weight, scale, inv_scale, half, lo, hi)
        return r.mul_(scale)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        weight, scale, inv_scale, half, lo, hi = ctx.saved_tensors
        x = weight * inv_scale
        clamped = torch.clamp(x, lo, hi)
        over = x - clamped  # > 0 above the range, < 0 below it, exactly 0 inside
        grad_inside = torch.where(over == 0, grad, 0.0)
        ln2_scale = (_LN2 * scale).reshape(-1)
        grad_b = grad_e = None
        if ctx.needs_input_grad[2]:
            # q = 2^e r;  inside: r' = -ln2 x  ->  dq/de = ln2 2^e (r - x);  clipped: dq/de = ln2 2^e r.
            r = clamped.round()
            grad_e = (_channel_sum(grad * r) - _channel_sum(grad_inside * x)) * ln2_scale
        if ctx.needs_input_grad[1]:
            # d lo / db = -2^(b-1) ln2, d hi / db = 2^(b-1) ln2; scaled by 2^e.
            grad_b = _channel_sum(grad * over.sign_()) * (ln2_scale * half.reshape(-1))
        return (grad_inside if ctx.needs_input_grad[0] else None), grad_b, grad_e


def quantize(weight: Tensor, bits: Tensor, exponent: Tensor, pruned: Tensor | None = None) -> Tensor:
    """Quantizes ``weight`` per output channel (dimension 0) at ``bits`` with exponent ``exponent``.

    Args:
        weight: float tensor ``(C, ...)``.
        bits: learnable bit depth per channel ``(C,)``; negative values act as 0.
        exponent: learnable exponent per channel ``(C,)``; the step size is ``2**exponent``.
        pruned: optional bool mask ``(C,)``; pruned channels quantize to exactly zero and pass no gradient to
            their ``bits``.

    Returns:
        The quantized weight, same shape and dtype as ``weight``; differentiable in all three inputs.
    """
    b = effective_bits(bits, pruned)
    w32 = weight.float()
    q = _Quantize.apply(w32, b, exponent.float())
    return q.to(weight.dtype)


@torch.no_grad()
def quantize_int(weight: Tensor, bits: Tensor, exponent: Tensor, pruned: Tensor | None = None) -> Tensor:
    """The integers ``round(clamp(2^-e w))`` that :func:`quantize` multiplies by ``2^e``, as ``int32``.

    ``torch.exp2(exponent)[:, None] * quantize_int(...)`` equals :func:`quantize` bit for bit.
    """
    b = _channel_view(effective_bits(bits, pruned).float(), weight)
    e = _channel_view(exponent.float(), weight)
    half = torch.exp2(b - 1.0)
    r = torch.round(torch.clamp(weight.float() * torch.exp2(-e), -half, half - 1.0))
    return r.to(torch.int32)


def required_bits(q_int: Tensor) -> Tensor:
    """The fewest two's-complement bits per channel that hold every integer of that channel (0 if all are 0).

    Args:
        q_int: integer tensor ``(C, ...)``, e.g. from :func:`quantize_int`.

    Returns:
        ``int64`` tensor ``(C,)``.
    """
    flat = q_int.reshape(q_int.shape[0], -1).to(torch.int64)
    hi = flat.amax(dim=1).clamp_min(0)
    lo = flat.amin(dim=1).clamp_max(0)
    # v >= 0 needs B with v <= 2^(B-1) - 1; v < 0 needs -v <= 2^(B-1).
    need_hi = torch.where(hi > 0, _bit_length(hi) + 1, torch.zeros_like(hi))
    need_lo = torch.where(lo < 0, _bit_length(-lo - 1) + 1, torch.zeros_like(lo))
    return torch.maximum(need_hi, need_lo)


def _bit_length(v: Tensor) -> Tensor:
    """``int.bit_length`` for a non-negative int64 tensor."""
    out = torch.zeros_like(v)
    v = v.clone()
    while bool((v > 0).any()):
        out += (v > 0).to(out.dtype)
        v >>= 1
    return out


@torch.no_grad()
def init_exponent(weight: Tensor, bits: float | Tensor) -> Tensor:
    """The per-channel exponent at which no weight of a channel is clipped at ``bits`` bits.

    The largest magnitude maps onto the positive bound ``2^(b-1) - 1``; a tiny margin keeps float rounding from
    clipping it. Requires ``bits >= 2`` (at 1 bit the positive bound is 0).
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    max_abs = flat.abs().amax(dim=1).clamp_min(1e-12)
    bits_t = torch.as_tensor(bits, dtype=torch.float32, device=weight.device)
    hi = torch.exp2(bits_t - 1.0) - 1.0
    return torch.log2(max_abs / hi) + 1e-6
