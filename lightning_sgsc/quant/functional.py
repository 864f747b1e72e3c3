"""The differentiable per-channel quantizer, in pure torch.

For output channel ``c`` with learnable bit depth ``b_c`` and exponent ``e_c``::

    q(w) = 2^e * clamp(round(2^-e * w), -2^(b-1), 2^(b-1) - 1)

with ``b`` taken as ``min(max(b, 0), 16)``. The rounding passes gradients straight through (STE); ``b`` receives
gradient through the clamp bounds, ``e`` through the scale, ``w`` where it is not clipped. A channel whose ``b`` is 0
has bounds ``[-0.5, -0.5]`` and rounds to exactly zero.

The clamp comes before the rounding (as in the self-compression paper's code). For integer ``b >= 1`` this equals
``2^e * clamp(round(2^-e w), ...)`` exactly; for ``b = 0`` only this order gives exact zeros, and for fractional
``b`` it keeps every stored value an integer (so it can be bit-packed).

The forward pass and the gradients are one :class:`torch.autograd.Function`: five weight-sized passes forward (one
allocation), about twelve backward, and no weight-sized tensor saved between the two beyond the weight itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from lightning_sgsc.config import MAX_BITS

_LN2 = math.log(2.0)


def effective_bits(bits: Tensor, pruned: Tensor | None = None) -> Tensor:
    """The bit depth the quantizer uses: ``b`` clamped to ``[0, 16]``, and 0 for pruned channels. Above 16 the
    gradient passes straight through (as it does inside the range), so a size penalty brings such a ``b`` back."""
    b = bits.clamp_min(0.0)
    b = b - (b - MAX_BITS).clamp_min(0.0).detach()
    if pruned is not None:
        b = torch.where(pruned, torch.zeros_like(b), b)
    return b


def pow2(t: Tensor) -> Tensor:
    """``2**t`` as float32, the same for an element wherever it sits in the tensor.

    torch's float32 ``exp2`` on CPU uses a vectorised kernel for most elements and a scalar one for the last few of
    a tensor; the two disagree in the last bit for ~6 % of inputs, so a channel's scale would depend on the length
    of the vector it is computed in (a layer's own, or all layers' in the fused quantizer). Computed in float64 and
    rounded once, the kernels agree (no mismatch in 2.8 million random exponents; a disagreement needs a float64
    result within its last bit of a float32 rounding boundary)."""
    return torch.exp2(t.double()).float()


_LOG2_LN2 = math.log2(_LN2)
_CONSTANTS: dict[torch.device, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _constants(device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Columns ``(offset, sign)`` taking the rows ``(e, e, b, b, e, e + b)`` to the exponents ``e``, ``-e``,
    ``b - 1``, ``b - 1``, ``e + log2(ln 2)``, ``e + b - 1 + log2(ln 2)``, and ``(offset, sign)`` taking their
    powers of 2 to ``2^e``, ``2^-e``, ``-2^(b-1)``, ``2^(b-1) - 1``, ``ln2 2^e``, ``ln2 2^e 2^(b-1)``: each step
    one ``addcmul`` over all rows. Offsets 0 and signs ±1 are exact, so the scale and the bounds are what
    ``2^e``, ``2^-e``, ``2^(b-1)`` give."""
    found = _CONSTANTS.get(device)
    if found is None:

        def column(values: list[float]) -> Tensor:
            return torch.tensor(values, device=device).unsqueeze(1)

        found = _CONSTANTS[device] = (
            column([0.0, 0.0, -1.0, -1.0, _LOG2_LN2, _LOG2_LN2 - 1.0]),
            column([1.0, -1.0, 1.0, 1.0, 1.0, 1.0]),
            column([0.0, 0.0, 0.0, -1.0, 0.0, 0.0]),
            column([1.0, 1.0, -1.0, 1.0, 1.0, 1.0]),
        )
    return found


class _Steps(NamedTuple):
    """Per-channel vectors of the quantizer: ``2^e``, ``2^-e`` and the clamp bounds ``-2^(b-1)``, ``2^(b-1) - 1``
    (shaped to broadcast against the weight), and the flat ``(C,)`` factors of the ``e`` and ``b`` gradients,
    ``ln2 2^e`` and ``ln2 2^e 2^(b-1)``."""

    scale: Tensor
    inv_scale: Tensor
    lo: Tensor
    hi: Tensor
    e_factor: Tensor
    b_factor: Tensor

    @staticmethod
    def of(bits: Tensor, exponent: Tensor, dims: int = 1) -> _Steps:
        """From effective bits ``b`` and exponents ``e`` (float32 vectors ``(C,)``), with one :func:`pow2` call;
        the first four vectors shaped ``(C, 1, ...)`` with ``dims`` trailing ones, to broadcast against a weight of
        ``dims + 1`` dimensions (``(C, fan_in)``: 1). Eight tensor calls in all (each costs microseconds on CPU)."""
        arg_offset, arg_sign, offset, sign = _constants(bits.device)
        rows = torch.stack((exponent, exponent, bits, bits, exponent, exponent + bits))
        steps = torch.addcmul(offset, pow2(torch.addcmul(arg_offset, rows, arg_sign)), sign)
        scale, inv_scale, lo, hi, _, _ = steps.view(6, -1, *(1,) * dims).unbind()
        _, _, _, _, e_factor, b_factor = steps.unbind()
        return _Steps(scale, inv_scale, lo, hi, e_factor, b_factor)

    def rows(self, start: int, stop: int) -> _Steps:
        """Channels ``[start, stop)``."""
        return _Steps(*[v[start:stop] for v in self])


def _integers(weight: Tensor, steps: _Steps) -> Tensor:
    """``round(clamp(2^-e w, -2^(b-1), 2^(b-1) - 1))`` as float: the stored integers, shared by training
    (:func:`_quantize_forward`) and export (:func:`quantize_int`) so the two agree by construction.

    One new weight-sized tensor, updated in place; ``maximum``/``minimum`` rather than ``clamp`` with tensor bounds
    (three times slower on CPU). ``lo <= hi`` for every ``b >= 0``, so the pair equals the clamp."""
    x = weight * steps.inv_scale
    torch.maximum(x, steps.lo, out=x)
    torch.minimum(x, steps.hi, out=x)
    return x.round_()


def _quantize_forward(weight: Tensor, steps: _Steps) -> Tensor:
    """``2^e * round(clamp(2^-e w, -2^(b-1), 2^(b-1) - 1))``."""
    return _integers(weight, steps).mul_(steps.scale)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """``sum(a * b)`` per output channel (dimension 0). A product and a sum: ``linalg.vecdot`` dispatches to the
    same two and costs a third call."""
    prod = a * b
    if prod.dim() == 1:  # one weight per channel
        return prod
    return prod.sum(1) if prod.dim() == 2 else prod.flatten(1).sum(1)


def _quantize_backward(
    weight: Tensor, grad: Tensor, steps: _Steps, needs: Sequence[bool]
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """STE gradients ``(w, b, e)`` of :func:`_quantize_forward` for the upstream ``grad``; ``needs`` says which.

    Recomputes ``x = 2^-e w`` and its clamp instead of keeping them from the forward. Every mask is a float
    tensor of 0/1/±1 (comparisons to ``bool`` and ``where`` are several times slower than arithmetic on CPU)::

        inside the range:  dq/dw = 1,  dq/de = ln2 2^e (r - x),  dq/db = 0
        clipped above:     dq/dw = 0,  dq/de = ln2 2^e r,        dq/db = +ln2 2^e 2^(b-1)
        clipped below:     dq/dw = 0,  dq/de = ln2 2^e r,        dq/db = -ln2 2^e 2^(b-1)

    with ``r = round(clamp(x))``; the per-channel factors come precomputed in ``steps``. The ``e`` gradient sums
    the rounding residual ``r - x`` (small numbers) rather than subtracting two large sums."""
    x = weight * steps.inv_scale
    clamped = torch.maximum(x, steps.lo)
    torch.minimum(clamped, steps.hi, out=clamped)
    side = torch.sub(x, clamped, out=x).sign_()  # +1 clipped above, -1 clipped below, 0 inside
    grad_b = _row_dot(grad, side).mul_(steps.b_factor) if needs[1] else None
    outside = side.abs_()
    grad_e = None
    if needs[2]:
        residual = torch.round(clamped).sub_(clamped).addcmul_(outside, clamped)  # r - x inside, r clipped
        grad_e = _row_dot(grad, residual).mul_(steps.e_factor)
    grad_w = torch.addcmul(grad, grad, outside, value=-1.0) if needs[0] else None  # grad inside, exactly 0 clipped
    return grad_w, grad_b, grad_e


class _Quantize(torch.autograd.Function):
    """Forward and STE gradients of the quantizer for one weight.

    Only the input ``weight`` (for a parameter: no extra memory) and per-channel vectors are saved; the backward
    recomputes ``x = 2^-e w`` and its clamp instead of keeping two weight-sized tensors alive from the forward to
    the backward."""

    @staticmethod
    def forward(ctx: Any, weight: Tensor, bits: Tensor, exponent: Tensor) -> Tensor:  # type: ignore[override]
        steps = _Steps.of(bits, exponent, weight.dim() - 1)
        ctx.save_for_backward(weight, *steps)
        return _quantize_forward(weight, steps)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:  # type: ignore[override]
        weight, *steps = ctx.saved_tensors
        return _quantize_backward(weight, grad, _Steps(*steps), ctx.needs_input_grad)


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

    ``pow2(exponent)[:, None] * quantize_int(...)`` equals :func:`quantize` bit for bit.
    """
    steps = _Steps.of(effective_bits(bits, pruned).float(), exponent.float(), weight.dim() - 1)
    return _integers(weight.float(), steps).to(torch.int32)


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
def init_exponent(weight: Tensor, bits: float | Tensor, headroom: float = 0.0) -> Tensor:
    """The per-channel exponent at which no weight of a channel is clipped at ``bits`` bits.

    The largest magnitude maps onto the positive bound ``2^(b-1) - 1`` divided by ``2^headroom``; a tiny margin
    keeps float rounding from clipping it. ``headroom`` bits of room let weights grow (as they do early in
    training) before they clip, at a step ``2^headroom`` times coarser. Requires ``bits >= 2`` (at 1 bit the
    positive bound is 0).
    """
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    max_abs = flat.abs().amax(dim=1).clamp_min(1e-12)
    bits_t = torch.as_tensor(bits, dtype=torch.float32, device=weight.device)
    hi = torch.exp2(bits_t - 1.0) - 1.0
    return torch.log2(max_abs / hi) + (float(headroom) + 1e-6)
