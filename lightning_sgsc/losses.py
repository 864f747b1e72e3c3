"""The compression terms of the loss, as pure functions of the model.

``total = task + l1_weight * l1_term + bit_weight * bits_per_weight + preservation_weight * preservation_loss``
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sgsc.quant.modules import QuantizedLayer, quantized_layers


def _layers(model: nn.Module | list[QuantizedLayer]) -> list[QuantizedLayer]:
    return model if isinstance(model, list) else [m for _, m in quantized_layers(model)]


def l1_term(model: nn.Module | list[QuantizedLayer]) -> Tensor:
    """Mean absolute float weight over every quantized layer's kept (unpruned) channels.

    A mean, not a sum, so its weight means the same for a tiny and a large model.
    """
    layers = _layers(model)
    total = layers[0].bits.new_zeros(())
    count = 0
    for layer in layers:
        weight = layer.channel_weight
        keep = (~layer.pruned).to(weight.dtype).reshape((-1,) + (1,) * (weight.dim() - 1))
        total = total + (weight.abs() * keep).sum()
        count += weight.numel()
    return total / max(count, 1)


def bits_per_weight(model: nn.Module | list[QuantizedLayer]) -> Tensor:
    """Average learned bit depth per quantized weight, ``sum_c max(b_c, 0) * fan_in_c / n_weights``; differentiable.

    This is the bit-depth penalty: its gradient reaches every channel's ``b`` in proportion to the channel's size.
    """
    layers = _layers(model)
    total = layers[0].bits.new_zeros(())
    count = 0
    for layer in layers:
        total = total + layer.effective_bits().sum() * layer.fan_in
        count += layer.out_channels_ * layer.fan_in
    return total / max(count, 1)


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """``T² · KL(softmax(teacher / T) || softmax(student / T))`` over the last dimension (the classes or the
    vocabulary), averaged over every other position (examples, tokens). Exactly 0 where the two agree, positive
    otherwise; differentiable in ``student`` (``teacher`` is a target)."""
    classes = student.shape[-1]
    s = student.reshape(-1, classes).float() / temperature
    t = teacher.detach().reshape(-1, classes).float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def weighted_sum(terms: dict[str, Tensor], weights: dict[str, float], base: Tensor | None = None) -> Tensor:
    """``base + sum(weights[k] * terms[k])`` over the keys of ``weights`` whose weight is not 0 (no ``base``: the
    sum alone). Each term added is one ``torch.add(..., alpha=weight)`` call, in ``base``'s dtype."""
    out = base
    for key, weight in weights.items():
        if weight:
            term = terms[key]
            out = term * weight if out is None else torch.add(out, term.to(out.dtype), alpha=weight)
    if out is None:
        return torch.zeros(())
    return out


def classes_first(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits`` laid out ``(batch, classes, ...)`` against ``targets`` ``(batch, ...)``, whatever the task: class
    logits ``(batch, classes)``, token logits ``(batch, time, vocab)`` (classes last) or dense scores ``(batch,
    classes, height, width)`` (classes on axis 1), told apart by the targets' shape.

    Raises:
        SGSCTypeError: the shapes do not fit any of these.
    """
    from lightning_sgsc.errors import SGSCTypeError, describe_rule

    if logits.dim() == targets.dim() + 1:
        if logits.shape[:-1] == targets.shape:  # classes last
            return logits if logits.dim() == 2 else logits.movedim(-1, 1)
        if logits.shape[0] == targets.shape[0] and logits.shape[2:] == targets.shape[1:]:  # classes on axis 1
            return logits
    raise SGSCTypeError(
        describe_rule("model output", f"class scores for targets of shape {tuple(targets.shape)}", tuple(logits.shape))
        + " Override `preservation_step` and `preservation_evaluate` for other tasks."
    )


def task_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Cross entropy of ``logits`` against ``targets`` for any of the layouts :func:`classes_first` reads; targets of
    -1 (padding) do not count."""
    return F.cross_entropy(classes_first(logits, targets).float(), targets, ignore_index=-1)
