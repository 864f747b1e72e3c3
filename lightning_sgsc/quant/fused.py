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

The arithmetic is the per-layer quantizer's, element for element: the quantized weights and weight gradients are
bit-identical to it; the per-channel ``b``/``e`` gradient sums may differ in the last bits (other summation order).
Plain torch throughout: the same seed and threads give the same numbers wherever the package is installed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_sgsc.losses import bits_per_weight
from lightning_sgsc.quant import modes
from lightning_sgsc.quant.functional import MAX_BITS, _quantize_backward, _quantize_forward, _Steps
from lightning_sgsc.quant.modules import QuantizedLayer

PAD_BUDGET = 16_384
"""Most zero elements a merge of a narrower group into a wider one may add. About the cost of one more group's
dozen operations on CPU (each padded element costs ~20 elementwise passes)."""

WORKSPACE_MAX = 1 << 20
"""Groups of at most this many elements (4 MiB in float32) stack into matrices kept from step to step (two per
group: weights and gradients); larger ones allocate anew, where the allocation is small next to the arithmetic."""


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    return tuple(strides)


@dataclass(frozen=True)
class _Group:
    """Rows ``[start, stop)`` of the channel vectors: the layers ``members`` stacked in a ``(rows, width)`` matrix.

    Stacking and unstacking run every step for every layer, so they use as few tensor calls as possible (each costs
    several microseconds on CPU): a single member with no padding is used in place; a small group is copied into a
    zero-padded workspace matrix kept from step to step (one ``copy_`` per member, into views made once); a large
    one is concatenated anew. Unstacking is one ``as_strided`` view per member. Members are given by their
    position in the tensors passed in."""

    start: int
    stop: int
    width: int
    members: tuple[int, ...]  # positions in the tensor lists, in row order
    channels: tuple[int, ...]
    fan_in: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]  # plain ints: ``view`` with a ``torch.Size`` is several times slower
    padded: bool = field(init=False)
    numel: int = field(init=False)
    # per member: (position, shape, strides, offset) of its block in a contiguous (rows, width) matrix
    layout: tuple[tuple[int, tuple[int, ...], tuple[int, ...], int], ...] = field(init=False)
    _workspace: dict[tuple[int, torch.device], list[Tensor]] = field(default_factory=dict, compare=False, repr=False)
    _stamps: dict[tuple[int, torch.device], object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "padded", any(f != self.width for f in self.fan_in))
        object.__setattr__(self, "numel", (self.stop - self.start) * self.width)
        layout, row = [], 0
        for i, c, shape in zip(self.members, self.channels, self.shapes, strict=True):
            strides = (self.width, *_contiguous_strides(shape)[1:])
            layout.append((i, shape, strides, row * self.width))
            row += c
        object.__setattr__(self, "layout", tuple(layout))

    def stack(self, tensors: Sequence[Tensor], slot: int, stamp: object = None) -> Tensor:
        """The members' tensors (each shaped like its weight) as one float32 ``(rows, width)`` matrix. ``slot``
        names the workspace (weights and gradients each have their own); the result is only valid until the next
        ``stack`` into the same slot, so callers use it at once and keep nothing that aliases it. ``stamp`` marks
        the workspace as holding these tensors (see :meth:`restack`)."""
        if len(self.members) == 1 and not self.padded:
            t = tensors[self.members[0]]
            return (t if t.dim() == 2 else t.reshape(self.channels[0], self.width)).float()
        device = tensors[self.members[0]].device
        if self.numel > WORKSPACE_MAX:
            parts = [tensors[i] if len(s) == 2 else tensors[i].reshape(c, -1) for i, c, s in self._zip()]
            if not self.padded:
                return torch.cat(parts).float()
            out = parts[0].new_zeros((self.stop - self.start, self.width), dtype=torch.float32)
            for block, part, f in zip(out.split_with_sizes(self.channels), parts, self.fan_in, strict=True):
                (block if f == self.width else block[:, :f]).copy_(part)
            return out
        key = (slot, device)
        views = self._workspace.get(key)
        if views is None:  # the matrix, then one view per member shaped like its tensor; padding stays zero
            matrix = torch.zeros((self.stop - self.start, self.width), device=device)
            blocks = matrix.split_with_sizes(self.channels)
            views = [matrix] + [b[:, :f].view(s) for b, f, s in zip(blocks, self.fan_in, self.shapes, strict=True)]
            self._workspace[key] = views
        for view, i in zip(views[1:], self.members, strict=True):
            view.copy_(tensors[i])
        self._stamps[key] = stamp
        return views[0]

    def restack(self, tensors: Sequence[Tensor], slot: int, stamp: object) -> Tensor:
        """:meth:`stack`, or the workspace as it is when the last ``stack`` into ``slot`` was the one marked
        ``stamp`` (the same tensors, unchanged: autograd refuses saved tensors changed in place)."""
        key = (slot, tensors[self.members[0]].device)
        if stamp is not None and self._stamps.get(key) is stamp:
            return self._workspace[key][0]
        return self.stack(tensors, slot)

    def unstack(self, matrix: Tensor, out: list[Tensor | None], dtypes: Sequence[torch.dtype] | None = None) -> None:
        """Writes each member's block of ``matrix`` into ``out`` as a view shaped like its weight (cast to
        ``dtypes[i]`` when given)."""
        if len(self.members) == 1 and not self.padded:
            i, shape, _, _ = self.layout[0]
            block = matrix if len(shape) == 2 else matrix.view(shape)
            out[i] = block if dtypes is None or dtypes[i] == block.dtype else block.to(dtypes[i])
            return
        if not matrix.is_contiguous():
            matrix = matrix.contiguous()
        base = matrix.storage_offset()
        for i, shape, strides, offset in self.layout:
            block = matrix.as_strided(shape, strides, base + offset)
            out[i] = block if dtypes is None or dtypes[i] == block.dtype else block.to(dtypes[i])

    def _zip(self) -> zip[tuple[int, int, tuple[int, ...]]]:
        return zip(self.members, self.channels, self.shapes, strict=True)


def _plan(layers: Sequence[QuantizedLayer]) -> list[_Group]:
    """Groups layers by fan-in, merging a group into the next wider one while the padding stays within budget.
    Member ``i`` of a group is ``layers[i]``."""
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
        shapes = tuple(tuple(int(d) for d in layers[i].channel_weight.shape) for i in members)
        groups.append(_Group(start, start + sum(channels), width, tuple(members), channels, fan_in, shapes))
        start += sum(channels)
    return groups


@dataclass(frozen=True)
class _Arithmetic:
    """The per-group arithmetic of each direction: the functions of :mod:`.functional`, eager or compiled."""

    forward: Any = _quantize_forward
    backward: Any = _quantize_backward

    @staticmethod
    def compiled() -> _Arithmetic:
        """Both directions through ``torch.compile`` (compiled at their first call, per shape; needs the compiler
        toolchain torch's inductor uses)."""
        return _Arithmetic(
            torch.compile(_quantize_forward, dynamic=False), torch.compile(_quantize_backward, dynamic=False)
        )


@dataclass(frozen=True)
class _Plan:
    """What :class:`_FusedQuantize` needs besides the learned tensors, for layers given in channel-vector order
    (group by group): the groups (members renumbered to that order), the channels per layer, ``fan_in /
    n_weights`` per channel (the weights of the bits-per-weight term) and ``keep`` (1.0, or 0.0 for a pruned
    channel: the pruned masks change only when the feedback loop prunes, so they are concatenated then, not every
    step)."""

    groups: list[_Group]
    channels: list[int]
    share: Tensor
    keep: Tensor
    pruned: tuple[Tensor, ...]  # the masks ``keep`` was made from, with their versions below
    versions: tuple[int, ...]
    arithmetic: _Arithmetic

    @property
    def n(self) -> int:
        return len(self.channels)

    @property
    def whole(self) -> bool:
        """One group holds every channel (its rows are the whole channel vectors)."""
        return len(self.groups) == 1


class _FusedQuantize(torch.autograd.Function):
    """Every layer's quantized weight and the bits-per-weight term in one call::

        apply(plan, *bits, *exponents, *weights) -> (bits_per_weight, *quantized)

    (each input per layer, in the plan's layer order). ``max(b, 0)``, the pruned mask, the concatenations and the
    per-layer slices all happen inside, so the step adds one autograd node, not a dozen. Saves the weights (inputs,
    no copy) and per-channel vectors; the backward uses the forward's stacked weights while they are still in the
    group's workspace (nothing stacked into it since), else stacks them again."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, *tensors: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        n = plan.n
        weights = tensors[2 * n :]
        ctx.plan = plan
        bits = (torch.cat(tensors[:n]) if n > 1 else tensors[0]).float()
        exponent = (torch.cat(tensors[n : 2 * n]) if n > 1 else tensors[n]).float()
        effective = torch.relu(bits).clamp_max_(MAX_BITS).mul_(plan.keep)  # b in [0, 16], 0 for pruned channels
        steps = _Steps.of(effective, exponent)
        quantized: list[Tensor | None] = [None] * n
        stamp = object()  # marks the stacked weights, so the backward can use them if nothing stacked since
        for group in plan.groups:
            rows = steps if plan.whole else steps.rows(group.start, group.stop)
            group.unstack(plan.arithmetic.forward(group.stack(weights, 0, stamp), rows), quantized)
        ctx.stamp = stamp
        ctx.save_for_backward(effective, *steps, *weights)
        return (torch.dot(effective, plan.share), *quantized)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, grad_bpw: Tensor, *grads: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        plan: _Plan = ctx.plan
        n = plan.n
        needs_input = ctx.needs_input_grad
        effective, *saved = ctx.saved_tensors
        steps, weights, stamp = _Steps(*saved[:6]), saved[6:], ctx.stamp
        need_b, need_e = any(needs_input[1 : 1 + n]), any(needs_input[1 + n : 1 + 2 * n])
        needs_w = needs_input[1 + 2 * n :]
        grad_w: list[Tensor | None] = [None] * n
        grad_b: list[Tensor] = []
        grad_e: list[Tensor] = []
        for group in plan.groups:
            needs = (any(needs_w[i] for i in group.members), need_b, need_e)
            rows = steps if plan.whole else steps.rows(group.start, group.stop)
            stacked = group.restack(weights, 0, stamp)
            gw, gb, ge = plan.arithmetic.backward(stacked, group.stack(grads, 1), rows, needs)
            if gw is not None:
                group.unstack(gw, grad_w, [w.dtype for w in weights])
            if gb is not None:
                grad_b.append(gb)
            if ge is not None:
                grad_e.append(ge)
        b = e = None
        if need_b:
            b = torch.cat(grad_b) if len(grad_b) > 1 else grad_b[0]
            # the gradient passes where b > 0 (above 16 too, as effective_bits), never for pruned channels
            b = b.addcmul_(plan.share, grad_bpw).mul_(effective.sign())
        if need_e:
            e = torch.cat(grad_e) if len(grad_e) > 1 else grad_e[0]
        grad_w = [g if need else None for g, need in zip(grad_w, needs_w, strict=True)]
        return (None, *_per_layer(plan, b), *_per_layer(plan, e), *grad_w)


def _per_layer(plan: _Plan, flat: Tensor | None) -> Sequence[Tensor | None]:
    """A flat ``(C,)`` gradient as one view per layer (``None`` for each layer when there is none)."""
    if flat is None:
        return [None] * plan.n
    return flat.split_with_sizes(plan.channels) if plan.n > 1 else (flat,)


class FusedQuantizer:
    """Quantizes a fixed list of twins in one pass.

    Args:
        layers: the twins, as the callback swapped them in. Their shapes must not change while this object is used
            (restoring and pruning keep shapes; physical pruning happens after training). Layers spread over several
            devices (model parallelism) cannot share one matrix: :meth:`step` then leaves each layer its own
            quantizer.
        compile: run the arithmetic through ``torch.compile`` (opt-in: a compile at the first steps, and the
            per-channel ``b``/``e`` gradient sums may differ in their last bits from the eager path).
        followers: the second holders of tied weights, by ``id`` of their first holder (one of ``layers``): they
            compute with the same quantized weight (:func:`~lightning_sgsc.quant.modules.followers`).
    """

    def __init__(
        self,
        layers: Sequence[QuantizedLayer],
        compile: bool = False,
        followers: dict[int, list[QuantizedLayer]] | None = None,
    ) -> None:
        self.layers = list(layers)
        self.followers = followers or {}  # the other holders of a tied weight, by id of the first (same result)
        self._arithmetic = _Arithmetic.compiled() if compile else _Arithmetic()
        # the layers in channel-vector order (group by group), so each group's members are consecutive
        self._ordered = [self.layers[i] for group in _plan(self.layers) for i in group.members]
        self._groups = _plan(self._ordered)
        assert [i for group in self._groups for i in group.members] == list(range(len(self._ordered)))
        self._n_weights = sum(int(layer.channel_weight.numel()) for layer in self.layers)
        self._plan: _Plan | None = None
        self._step_bpw: Tensor | None = None  # the bits-per-weight term of the current step

    def _plan_on(self, device: torch.device) -> _Plan:
        plan = self._plan
        pruned = tuple(m.pruned for m in self._ordered)
        versions = tuple(p._version for p in pruned)
        if (
            plan is not None
            and plan.share.device == device
            and plan.versions == versions
            and all(a is b for a, b in zip(plan.pruned, pruned, strict=True))
        ):
            return plan
        channels = [m.out_channels_ for m in self._ordered]
        if plan is None or plan.share.device != device:
            fan_in = torch.tensor([float(m.fan_in) for m in self._ordered])
            share = (torch.repeat_interleave(fan_in, torch.tensor(channels)) / max(self._n_weights, 1)).to(device)
        else:
            share = plan.share
        keep = torch.cat(pruned).logical_not().to(device=device, dtype=torch.float32)
        self._plan = _Plan(self._groups, channels, share, keep, pruned, versions, self._arithmetic)
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
        bpw, quantized = self._quantize_ordered()
        by_layer = {id(m): q for m, q in zip(self._ordered, quantized, strict=True)}
        return bpw, [by_layer[id(m)] for m in self.layers]

    def _quantize_ordered(self) -> tuple[Tensor, list[Tensor]]:
        """:meth:`quantize_all` with the weights in channel-vector order (``self._ordered``)."""
        layers = self._ordered
        weights = [m.channel_weight for m in layers]
        plan = self._plan_on(weights[0].device)
        params = [m._parameters for m in layers]  # type: ignore[attr-defined]  # skips nn.Module.__getattr__
        tensors = [p["bits"] for p in params] + [p["exponent"] for p in params] + weights
        bpw, *quantized = _FusedQuantize.apply(plan, *tensors)
        return bpw, quantized

    @contextmanager
    def step(self) -> Iterator[FusedQuantizer]:
        """Within this block (grad mode, one training step, no optimizer step inside), every layer's
        ``quantized_weight()`` returns the result of one shared :meth:`quantize_all`. A layer whose ``weight``,
        ``bits``, ``exponent`` or ``pruned`` is changed in place inside the block falls back to its own quantizer."""
        layers = self._ordered
        devices = {m.bits.device for m in layers}
        if not layers or not torch.is_grad_enabled() or len(devices) != 1:
            yield self
            return
        self._step_bpw, quantized = self._quantize_ordered()
        try:
            holders, results = list(self._ordered), list(quantized)
            for layer, q in zip(self._ordered, quantized, strict=True):
                for follower in self.followers.get(id(layer), ()):
                    holders.append(follower)
                    results.append(q)
            with modes.fused(holders, results):
                yield self
        finally:
            self._step_bpw = None
