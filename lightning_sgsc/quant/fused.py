"""One quantizer pass per step over all layers, shared by every forward of that step.

The per-layer quantizer (:func:`~lightning_sgsc.quant.functional.quantize`) costs a dozen tensor operations per
layer and per forward; on CPU, where each operation has a fixed dispatch cost of several microseconds, that is a
visible share of a small model's step, and the preservation loss's second forward pays it again.
:class:`FusedQuantizer` instead quantizes every layer in **one** autograd Function call per step:

* layers with the same fan-in are rows of one ``(channels, fan_in)`` matrix (a transformer's many ``Linear`` layers
  fall into two or three such groups); a group of few rows is zero-padded into the next wider group when that adds
  at most ``PAD_BUDGET`` elements (the DigitsCNN's three layers become one matrix), since a padded zero quantizes
  to zero and receives no gradient;
* the per-channel vectors (``2^e``, ``2^-e``, ``2^(b-1)``) are computed once for all channels;
* stacking, slicing and the per-layer gradients happen inside the Function, so they add no autograd nodes.

Inside :meth:`FusedQuantizer.step` every layer's ``quantized_weight()`` returns its slice of that result, for the
task forward and the preservation forward alike; the gradients of both reach ``w``, ``b`` and ``e`` through the
same node.

The arithmetic is the per-layer quantizer's, element for element: the quantized weights are bit-identical; the
per-channel gradient sums may differ in the last bits (other summation order)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_sgsc.losses import bits_per_weight
from lightning_sgsc.quant.functional import _quantize_backward, _quantize_forward, _Steps
from lightning_sgsc.quant.modules import QuantizedLayer

PAD_BUDGET = 16_384
"""Most zero elements a merge of a narrower group into a wider one may add. About the cost of one more group's
dozen operations on CPU (each padded element costs ~20 elementwise passes)."""

WORKSPACE_MAX = 1 << 20
"""Groups of at most this many elements (4 MiB in float32) stack into matrices kept from step to step (two per
group: weights and gradients); larger ones allocate anew, where the allocation is small next to the arithmetic."""


@dataclass(frozen=True)
class _Group:
    """Rows ``[start, stop)`` of the channel vectors: the layers ``members`` stacked in a ``(rows, width)`` matrix.

    Stacking and unstacking run every step for every layer, so they use as few tensor calls as possible (each costs
    several microseconds on CPU): a single member with no padding is used in place; a small group is copied into a
    zero-padded workspace matrix kept from step to step (one ``copy_`` per member, into views made once); a large
    one is concatenated anew. Unstacking is one ``split``, a column slice only for padded members and a ``view``
    only for weights that are not 2-D."""

    start: int
    stop: int
    width: int
    members: tuple[int, ...]  # layer indices, in row order
    channels: tuple[int, ...]
    fan_in: tuple[int, ...]
    shapes: tuple[torch.Size, ...]
    _workspace: dict[tuple[int, torch.device], list[Tensor]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def padded(self) -> bool:
        return any(f != self.width for f in self.fan_in)

    @property
    def numel(self) -> int:
        return (self.stop - self.start) * self.width

    def stack(self, tensors: Sequence[Tensor], slot: int) -> Tensor:
        """The members' tensors (each shaped like its weight) as one float32 ``(rows, width)`` matrix. ``slot``
        names the workspace (weights and gradients each have their own); the result is only valid until the next
        ``stack`` into the same slot, so callers use it at once and keep nothing that aliases it."""
        if len(self.members) == 1 and not self.padded:
            i, c, shape = next(self._zip())
            return (tensors[i] if len(shape) == 2 else tensors[i].reshape(c, -1)).float()
        device = tensors[self.members[0]].device
        if self.numel > WORKSPACE_MAX:
            parts = [tensors[i] if len(s) == 2 else tensors[i].reshape(c, -1) for i, c, s in self._zip()]
            if not self.padded:
                return torch.cat(parts).float()
            out = parts[0].new_zeros((self.stop - self.start, self.width), dtype=torch.float32)
            for block, part, f in zip(out.split_with_sizes(self.channels), parts, self.fan_in, strict=True):
                (block if f == self.width else block[:, :f]).copy_(part)
            return out
        views = self._workspace.get((slot, device))
        if views is None:  # the matrix, then one view per member shaped like its tensor; padding stays zero
            matrix = torch.zeros((self.stop - self.start, self.width), device=device)
            blocks = matrix.split_with_sizes(self.channels)
            views = [matrix] + [b[:, :f].view(s) for b, f, s in zip(blocks, self.fan_in, self.shapes, strict=True)]
            self._workspace[(slot, device)] = views
        for view, i in zip(views[1:], self.members, strict=True):
            view.copy_(tensors[i])
        return views[0]

    def unstack(self, matrix: Tensor, out: list[Tensor | None], dtypes: Sequence[torch.dtype] | None = None) -> None:
        """Writes each member's block of ``matrix`` into ``out`` as a view shaped like its weight (cast to
        ``dtypes[i]`` when given)."""
        blocks = matrix.split_with_sizes(self.channels) if len(self.members) > 1 else (matrix,)
        for block, (i, _, shape), f in zip(blocks, self._zip(), self.fan_in, strict=True):
            if f != self.width:
                block = block[:, :f]
            if len(shape) != 2:
                block = block.view(shape)
            out[i] = block if dtypes is None or dtypes[i] == block.dtype else block.to(dtypes[i])

    def _zip(self) -> zip[tuple[int, int, torch.Size]]:
        return zip(self.members, self.channels, self.shapes, strict=True)


def _plan(layers: Sequence[QuantizedLayer]) -> list[_Group]:
    """Groups layers by fan-in, merging a group into the next wider one while the padding stays within budget."""
    by_fan_in: dict[int, list[int]] = {}
    for i, layer in enumerate(layers):
        by_fan_in.setdefault(layer.fan_in, []).append(i)
    merged: list[tuple[int, list[int]]] = []  # (width, members)
    for width in sorted(by_fan_in):
        members = by_fan_in[width]
        if merged:
            prev = merged[-1][1]
            if sum(layers[i].out_channels_ * (width - layers[i].fan_in) for i in prev) <= PAD_BUDGET:
                merged[-1] = (width, prev + members)
                continue
        merged.append((width, list(members)))
    groups = []
    start = 0
    for width, members in merged:
        channels = tuple(layers[i].out_channels_ for i in members)
        fan_in = tuple(layers[i].fan_in for i in members)
        shapes = tuple(layers[i].weight.shape for i in members)
        groups.append(_Group(start, start + sum(channels), width, tuple(members), channels, fan_in, shapes))
        start += sum(channels)
    return groups


@dataclass(frozen=True)
class _Plan:
    """What :class:`_FusedQuantize` needs besides tensors: the groups, the layer order of the channel vectors, and
    ``fan_in / n_weights`` per channel (the weights of the bits-per-weight term)."""

    groups: list[_Group]
    order: list[int]  # layer indices in channel-vector order (group by group)
    channels: list[int]  # channels per layer, in that order
    share: Tensor

    @property
    def n(self) -> int:
        return len(self.order)


class _FusedQuantize(torch.autograd.Function):
    """Every layer's quantized weight and the bits-per-weight term in one call::

        apply(plan, *bits, *exponents, *pruned, *weights) -> (bits_per_weight, *quantized)

    (each input per layer, in layer order). ``max(b, 0)``, the pruned mask, the concatenations and the per-layer
    slices all happen inside, so the step adds one autograd node, not a dozen. Saves the weights (inputs, no copy)
    and per-channel vectors; the backward re-stacks the weights rather than keeping a stacked copy."""

    @staticmethod
    def forward(ctx, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n = plan.n
        bits, exponent, pruned = (torch.cat([tensors[k * n + i] for i in plan.order]) for k in range(3))
        weights = tensors[3 * n :]
        bits = bits.float()
        # d max(b, 0) / db is 1 where b > 0 (as clamp_min's gradient), never for pruned channels
        open_ = (bits > 0).logical_and_(pruned.logical_not()).float()
        effective = bits.clamp_min(0.0).mul_(open_)
        steps = _Steps.of(effective, exponent.float())
        out: list[Tensor | None] = [None] * len(weights)
        for group in plan.groups:
            group.unstack(_quantize_forward(group.stack(weights, 0), steps.rows(group.start, group.stop)), out)
        ctx.plan = plan
        ctx.save_for_backward(open_, *steps, *weights)
        return (torch.dot(effective, plan.share), *out)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx, grad_bpw: Tensor, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan: _Plan = ctx.plan
        n = plan.n
        open_, *vectors = ctx.saved_tensors
        steps = _Steps(*vectors[:4])
        weights = vectors[4:]
        need_b, need_e = any(ctx.needs_input_grad[1 : 1 + n]), any(ctx.needs_input_grad[1 + n : 1 + 2 * n])
        needs_w = ctx.needs_input_grad[1 + 3 * n :]
        grad_w: list[Tensor | None] = [None] * n
        grad_b: list[Tensor] = []
        grad_e: list[Tensor] = []
        for group in plan.groups:
            needs = (any(needs_w[i] for i in group.members), need_b, need_e)
            gw, gb, ge = _quantize_backward(
                group.stack(weights, 0), group.stack(grads, 1), steps.rows(group.start, group.stop), needs
            )
            if gw is not None:
                group.unstack(gw, grad_w, [w.dtype for w in weights])
            grad_b += [gb] if gb is not None else []
            grad_e += [ge] if ge is not None else []
        per_layer_b: list[Tensor | None] = [None] * n
        per_layer_e: list[Tensor | None] = [None] * n
        if need_b:
            b = torch.cat(grad_b) if len(grad_b) > 1 else grad_b[0]
            b = b.addcmul_(plan.share, grad_bpw).mul_(open_)
            for i, part in zip(plan.order, b.split_with_sizes(plan.channels), strict=True):
                per_layer_b[i] = part
        if need_e:
            e = torch.cat(grad_e) if len(grad_e) > 1 else grad_e[0]
            for i, part in zip(plan.order, e.split_with_sizes(plan.channels), strict=True):
                per_layer_e[i] = part
        grad_w = [g if need else None for g, need in zip(grad_w, needs_w, strict=True)]
        return (None, *per_layer_b, *per_layer_e, *([None] * n), *grad_w)


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
        self._groups = _plan(self.layers)
        self._order = [i for group in self._groups for i in group.members]  # channel order of every vector
        self._n_weights = sum(int(layer.weight.numel()) for layer in self.layers)
        self._plan: _Plan | None = None
        self._step_bpw: Tensor | None = None  # the bits-per-weight term of the current step

    def _plan_on(self, device: torch.device) -> _Plan:
        if self._plan is None or self._plan.share.device != device:
            fan_in = torch.tensor([float(self.layers[i].fan_in) for i in self._order])
            channels = [self.layers[i].out_channels_ for i in self._order]
            share = torch.repeat_interleave(fan_in, torch.tensor(channels)) / max(self._n_weights, 1)
            self._plan = _Plan(self._groups, self._order, channels, share.to(device))
        return self._plan

    def bits_per_weight(self) -> Tensor:
        """:func:`lightning_sgsc.losses.bits_per_weight` over these layers; inside :meth:`step` the step's own
        (computed with the quantized weights, one graph node for both)."""
        if self._step_bpw is not None:
            return self._step_bpw
        return bits_per_weight(self.layers)

    def quantize_all(self) -> tuple[Tensor, list[Tensor]]:
        """``(bits per weight, every layer's quantized weight)`` (float32, each layer's shape) from one autograd
        Function call."""
        layers = self.layers
        plan = self._plan_on(layers[0].weight.device)
        tensors = [m.bits for m in layers] + [m.exponent for m in layers] + [m.pruned for m in layers]
        bpw, *quantized = _FusedQuantize.apply(plan, *tensors, *[m.weight for m in layers])
        return bpw, quantized

    @contextmanager
    def step(self) -> Iterator[FusedQuantizer]:
        """Within this block (grad mode, one training step, no optimizer step inside), every layer's
        ``quantized_weight()`` returns the result of one shared :meth:`quantize_all`. A layer whose ``weight``,
        ``bits``, ``exponent`` or ``pruned`` is changed in place inside the block falls back to its own quantizer."""
        if not self.layers or not torch.is_grad_enabled() or len({m.weight.device for m in self.layers}) != 1:
            yield self
            return
        self._step_bpw, quantized = self.quantize_all()
        try:
            for layer, q in zip(self.layers, quantized, strict=True):
                layer.__dict__["_fused"] = (q, layer._versions())  # plain attribute; skips nn.Module.__setattr__
            yield self
        finally:
            self._step_bpw = None
            for layer in self.layers:
                layer.__dict__["_fused"] = None
