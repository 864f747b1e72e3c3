"""Restore-and-prune: the feedback loop that keeps the preservation set safe. No Trainer in here.

:class:`FeedbackPolicy` judges each measurement of the preservation metric against its reference (the best value so
far, by default) and returns a :class:`Decision`; the functions below carry decisions out on the model:

* the first measurement sets the reference and decides nothing (there is nothing to compare it with);
* it degraded by more than ``threshold`` (and more than the measurement's own noise): restore a fraction of the
  zero-bit channels to ``restore_bits``, choosing the channels whose return would lower the preservation loss the most
  (first-order Taylor estimate ``|<dL/dw_q, w_restored>|``, see :func:`taylor_restore_scores`);
* otherwise, when pruning is allowed (not over a budget, not in the cool-down): make the zero-bit channels permanent
  (pruned: ``b`` and weights frozen at zero, their optimizer state cleared), never leaving a layer with fewer than
  ``min_channels`` channels;
* a NaN/inf metric: skip, so garbage never restores or prunes.

Over an accuracy budget, :func:`repair_` gives low-bit channels precision back (``restore_bits + 2``, at most 16).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sgsc.config import MAX_BITS, Feedback
from lightning_sgsc.quant.functional import init_exponent, quantize
from lightning_sgsc.quant.modes import coupled_norm, weight_probes
from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers
from lightning_sgsc.signal import Direction, Reference

Masks = dict[str, Tensor]


class Action(str, Enum):
    """What a feedback check decided."""

    RESTORE = "restore"
    PRUNE = "prune"
    SKIP = "skip"


@dataclass(frozen=True)
class Decision:
    """The verdict on one measurement of the preservation metric, and why."""

    action: Action
    metric: float
    reference: float | None
    degradation: float
    reason: str = ""


class FeedbackPolicy:
    """Compares each preservation measurement with a reference and says restore, prune or skip.

    Args:
        config: the loop's settings.
        direction: whether a larger preservation metric is better (the module's ``preservation_metric_mode``).

    Stateful (the reference); :meth:`state_dict` / :meth:`load_state_dict` carry it through checkpoints.
    """

    def __init__(self, config: Feedback, direction: Direction | str = Direction.MAX) -> None:
        self.config = config
        self.reference = Reference(Direction(direction), config.reference)

    @property
    def direction(self) -> Direction:
        return self.reference.direction

    @direction.setter
    def direction(self, value: Direction | str) -> None:
        self.reference.direction = Direction(value)

    def decide(self, metric: float, noise: float = 0.0, may_prune: bool = True, may_act: bool = True) -> Decision:
        """Judges one measurement and updates the reference. A drop restores channels only when it exceeds both
        ``threshold`` and ``noise`` (what the measurement itself can move by: a drop within it is not evidence).
        ``may_prune=False`` (over a budget): a holding metric prunes nothing; ``may_act=False`` (the cool-down): the
        measurement only updates the reference."""
        if not math.isfinite(metric):
            return Decision(Action.SKIP, metric, self.reference.value, math.nan, f"the metric is {metric}")
        reference = self.reference.value
        drop = self.reference.drop(metric)
        self.reference.update(metric)
        if reference is None:
            return Decision(Action.SKIP, metric, None, 0.0, "the first measurement: it becomes the reference")
        if not may_act:
            return Decision(Action.SKIP, metric, reference, drop, "the cool-down: bit depths are frozen")
        if drop > max(self.config.threshold, noise):
            return Decision(Action.RESTORE, metric, reference, drop, "the metric dropped beyond threshold and noise")
        if not may_prune:
            return Decision(Action.SKIP, metric, reference, drop, "over the budget: nothing becomes permanent")
        return Decision(Action.PRUNE, metric, reference, drop, "the metric held")

    def state_dict(self) -> dict[str, Any]:
        return {"reference": self.reference.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reference.value = state["reference"]


@dataclass(frozen=True)
class Event:
    """One feedback check, as recorded in the callback's history and logs."""

    action: str
    metric: float
    reference: float | None
    degradation: float
    restored: int  # zero-bit channels brought back because the preservation metric dropped
    pruned: int
    zero_bit: int
    kept_alive: int = 0  # zero-bit channels brought back only so each layer keeps ``min_channels``
    epoch: int = -1
    step: int = -1
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """What the callback logs of this check (under ``sgsc/``)."""
        return {
            "preservation_metric": self.metric,
            "restored_channels": self.restored,
            "pruned_channels": self.pruned,
            "kept_alive_channels": self.kept_alive,
        }


# ---------------------------------------------------------------------------------------------------------- channels


def zero_bit_channels(model: nn.Module) -> Masks:
    """Per layer, the channels at zero bits that are not pruned yet (candidates to restore or to prune)."""
    return low_bit_channels(model, 0.0)


def _count(masks: Masks) -> int:
    return int(sum(int(m.sum()) for m in masks.values()))


def select_top(scores: dict[str, Tensor], candidates: Masks, fraction: float) -> Masks:
    """The ``ceil(fraction * n)`` candidate channels with the highest scores, over all layers together."""
    names = [n for n in candidates if bool(candidates[n].any())]
    if not names:
        return {n: torch.zeros_like(m) for n, m in candidates.items()}
    flat_scores = torch.cat([scores[n].detach().float().flatten()[candidates[n]] for n in names])
    flat_scores = torch.nan_to_num(flat_scores, nan=-math.inf)  # a NaN score never wins a restore
    k = min(math.ceil(fraction * flat_scores.numel()), flat_scores.numel())
    chosen = torch.zeros(flat_scores.numel(), dtype=torch.bool)
    chosen[torch.topk(flat_scores.cpu(), k).indices] = True
    out: Masks = {n: torch.zeros_like(m) for n, m in candidates.items()}
    offset = 0
    for n in names:
        idx = candidates[n].nonzero().flatten()
        sel = chosen[offset : offset + idx.numel()].to(idx.device)
        out[n][idx[sel]] = True
        offset += idx.numel()
    return out


def _selected(model: nn.Module, selection: Masks) -> Iterator[tuple[QuantizedLayer, Tensor]]:
    """``(layer, mask)`` for every layer of ``selection`` with at least one selected channel."""
    layers = dict(quantized_layers(model))
    for name, mask in selection.items():
        if bool(mask.any()):
            yield layers[name], mask


@torch.no_grad()
def low_bit_channels(model: nn.Module, max_bits: float) -> Masks:
    """Per layer, the channels at ``max_bits`` bits or fewer (zero included) that are not pruned: what a repair of
    lost accuracy can give precision back to."""
    return {name: (layer.bits <= max_bits) & ~layer.pruned for name, layer in quantized_layers(model)}


@torch.no_grad()
def raise_precision_(model: nn.Module, selection: Masks, bits: float) -> int:
    """Brings the selected channels up to ``bits`` bits (never down), with exponents that clip none of their
    weights: a restore of zero-bit channels, or a repair of low-bit ones. Returns the number of channels changed."""
    bits = min(float(bits), MAX_BITS)
    total = 0
    for layer, mask in _selected(model, selection):
        layer.bits[mask] = torch.clamp(layer.bits[mask], min=bits)
        layer.exponent[mask] = init_exponent(layer.channel_weight[mask], bits).to(layer.exponent.dtype)
        total += int(mask.sum())
    return total


def restore_candidates_value(layer: QuantizedLayer, bits: float) -> Tensor:
    """The weights channel by channel would get if restored at ``bits`` bits (used to score restores)."""
    with torch.no_grad():
        weight = layer.channel_weight
        exp = init_exponent(weight, bits)
        b = torch.full_like(layer.bits, float(bits))
        return quantize(weight, b, exp)


def taylor_restore_scores(
    model: nn.Module, batches: Iterable[Any], bits: float, loss: Callable[[Any], Tensor] | None = None
) -> dict[str, Tensor]:
    """``|sum_i g_ci * (w'_ci - w_ci)|`` per channel: first-order change of the loss summed over ``batches``
    (``loss(batch)``, default ``model.preservation_step``) if channel c were requantized at ``bits`` (``w'``) from its
    quantized weights now (``w``; 0 for a zero-bit channel); ``g`` is the loss's gradient at the quantized weights
    (:func:`~lightning_sgsc.quant.modes.weight_probes`)."""
    loss_fn: Callable[[Any], Tensor] = loss if loss is not None else model.preservation_step  # type: ignore[assignment]
    with torch.inference_mode(False), torch.enable_grad(), weight_probes(model) as probes:
        for batch in batches:
            loss_fn(batch).backward(inputs=list(probes.values()))
    grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in probes.items()}
    scores = {}
    for name, layer in quantized_layers(model):
        with torch.no_grad():  # the change of the quantized weight (zero-bit channels: from 0)
            value = (restore_candidates_value(layer, bits) - layer.quantized_channels()).float()
        g = grads[name].float()
        scores[name] = (g * value).reshape(value.shape[0], -1).sum(dim=1).abs()
    return scores


@torch.no_grad()
def enforce_min_channels(model: nn.Module, to_prune: Masks, min_channels: int) -> tuple[Masks, Masks]:
    """Splits ``to_prune`` so each layer keeps ``min_channels``: returns ``(prune, keep_alive)``.

    ``keep_alive`` are the candidates spared (largest float weight norm first); they must be restored, since a
    zero-bit channel that is not pruned still outputs zero.
    """
    layers = dict(quantized_layers(model))
    prune: Masks = {}
    keep: Masks = {}
    for name, mask in to_prune.items():
        layer = layers[name]
        alive_after = int((~layer.pruned & ~mask).sum())
        spare = max(0, min_channels - alive_after)
        keep_mask = torch.zeros_like(mask)
        if spare:
            idx = mask.nonzero().flatten()
            norms = layer.channel_weight[idx].reshape(idx.numel(), -1).norm(dim=1)
            keep_mask[idx[torch.topk(norms, min(spare, idx.numel())).indices]] = True
        prune[name] = mask & ~keep_mask
        keep[name] = keep_mask
    return prune, keep


def _rows(t: Tensor, axis: int) -> Tensor:
    """``t`` with the channel axis first (a view)."""
    return t if axis == 0 else t.movedim(axis, 0)


def _clear_state(optimizers: Sequence[torch.optim.Optimizer], param: Tensor, axis: int, mask: Tensor) -> None:
    """Zeroes the channel slices ``mask`` of every per-parameter optimizer state of ``param`` (Adam moments,
    momentum)."""
    for opt in optimizers:
        for value in opt.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                _rows(value, axis)[mask] = 0


def _frozen(layer: QuantizedLayer) -> list[tuple[Tensor, int, bool]]:
    """``(tensor, channel axis, zeroable)`` of what a pruned channel freezes: the layer's channel slices
    (:meth:`~lightning_sgsc.quant.modules.QuantizedLayer.channel_rows`) and the affine parameters of the BatchNorm
    that reads the layer (see :func:`lightning_sgsc.norms.link_norms_`)."""
    norm = coupled_norm(layer)
    extra = [(t, 0, True) for t in (norm.weight, norm.bias) if t is not None] if norm is not None else []
    return [*layer.channel_rows(), *extra]  # type: ignore[list-item]


@torch.no_grad()
def prune_channels_(model: nn.Module, selection: Masks, optimizers: Sequence[torch.optim.Optimizer] = ()) -> int:
    """Makes the selected channels permanent zeros: ``pruned`` set; ``bits``, weights, bias and the following
    BatchNorm's ``gamma``/``beta`` zeroed (so the channel outputs exactly zero, after the norm too, and can be
    removed physically at export, see :mod:`lightning_sgsc.prune`); every per-parameter optimizer state of those rows
    cleared so nothing moves them again. :func:`mask_pruned_grads_` keeps their gradients at zero afterwards."""
    total = 0
    for layer, mask in _selected(model, selection):
        layer.pruned |= mask
        for param, axis, zeroable in _frozen(layer):
            if zeroable:
                _rows(param, axis)[mask] = 0
            _clear_state(optimizers, param, axis, mask)
        total += int(mask.sum())
    return total


@torch.no_grad()
def mask_pruned_grads_(model: nn.Module | list[QuantizedLayer]) -> None:
    """Zeroes the gradients of pruned channels (weight, bias, bits, the following norm's affine parameters), so no
    optimizer term can move them."""
    layers = model if isinstance(model, list) else [m for _, m in quantized_layers(model)]
    for layer in layers:
        if not bool(layer.pruned.any()):
            continue
        for param, axis, _ in _frozen(layer):
            if param.grad is not None:
                _rows(param.grad, axis)[layer.pruned] = 0


def apply_decision(
    model: nn.Module,
    decision: Decision,
    config: Feedback,
    restore_scores: Callable[[], dict[str, Tensor]],
    optimizers: list[torch.optim.Optimizer] = (),  # type: ignore[assignment]
) -> Event:
    """Carries out ``decision`` on ``model``. ``restore_scores`` is called only when channels are to be restored."""
    candidates = zero_bit_channels(model)
    zero_bit = _count(candidates)
    restored = pruned = kept_alive = 0
    if decision.action is Action.RESTORE and zero_bit:
        selection = select_top(restore_scores(), candidates, config.restore_fraction)
        restored = raise_precision_(model, selection, config.restore_bits)
    elif decision.action is Action.PRUNE and zero_bit and config.prune:
        to_prune, keep_alive = enforce_min_channels(model, candidates, config.min_channels)
        kept_alive = raise_precision_(model, keep_alive, config.restore_bits)
        pruned = prune_channels_(model, to_prune, optimizers)
    return Event(
        action=decision.action.value,
        metric=decision.metric,
        reference=decision.reference,
        degradation=decision.degradation,
        restored=restored,
        pruned=pruned,
        zero_bit=zero_bit,
        kept_alive=kept_alive,
        reason=decision.reason,
    )


def repair_(model: nn.Module, scores: Callable[[float], dict[str, Tensor]], config: Feedback) -> int:
    """Over an accuracy budget: ``restore_fraction`` of the channels at ``restore_bits`` bits or fewer (zero-bit ones
    included, pruned ones not) back to :attr:`~lightning_sgsc.config.Feedback.repair_bits`, those whose
    requantization at that depth lowers the preservation loss the most (``scores(bits)``, called only when there are
    candidates). Returns the number of channels changed."""
    candidates = low_bit_channels(model, config.restore_bits)
    if not any(bool(m.any()) for m in candidates.values()):
        return 0
    bits = config.repair_bits
    return raise_precision_(model, select_top(scores(bits), candidates, config.restore_fraction), bits)
