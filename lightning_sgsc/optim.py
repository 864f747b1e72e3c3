"""Optimizer surgery: each quantizer's ``bits``/``exponent`` in a param group of their own, in exactly one optimizer.

diffq's ``setup_optimizer`` convention: the per-channel bit depths and exponents train with their own learning rate
and no weight decay (decay would pull every bit depth towards zero regardless of the loss). The user's
``configure_optimizers`` builds one or more optimizers; this module

* puts each quantizer in the optimizer that holds its layer's weights (a GAN's generator and discriminator each get
  their own layers' quantizers), in one new group per optimizer, and takes it out of every other group;
* copies the other settings (betas, eps, ...) of the group that held the layer's weights, and scales every
  learning-rate value a scheduler wrote into that group (``lr``, ``initial_lr``, ``max_lr``, ``min_lr``, ...) by
  ``quantizer_lr / reference``, where the reference is the group's ``max_lr`` (one-cycle schedules: the quantizer's
  lr peaks at ``quantizer_lr``), else its ``initial_lr`` (the lr when the scheduler was built), else its ``lr``; so any
  scheduler moves the quantizer's lr as it moves the user's, in proportion;
* extends every scheduler's per-group lists (``base_lrs``, ``min_lrs``, ``max_lrs``, ``_last_lr``) the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_sgsc.quant.modules import QuantizedLayer

try:  # devices with fused optimizer kernels (private in torch; the fallback is the documented pair)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older or newer torch
    _FUSED_DEVICES = frozenset({"cuda", "cpu"})

GROUP_FLAG = "sgsc_quantizer"
"""Key set to ``True`` in the quantizer's param group (so a second fit with the same optimizer finds it)."""

LR_KEYS = ("lr", "initial_lr", "max_lr", "min_lr", "base_lr")
"""Group keys that hold learning rates (torch's schedulers write the last four)."""

_SCHEDULER_LISTS = ("base_lrs", "min_lrs", "max_lrs", "_last_lr")


def _batched_update(group: dict[str, Any], device: torch.device | None) -> None:
    """Makes the optimizer update all ``bits``/``exponent`` tensors (two small ones per layer) in one call instead
    of a Python loop over them: the fused kernel where the optimizer has one for this device, else the multi-tensor
    path. Settings the user chose (``fused``/``foreach`` not ``None``) are kept."""
    if group.get("foreach") is not None or group.get("fused") or group.get("differentiable"):
        return
    if "fused" in group and group["fused"] is None and device is not None and device.type in _FUSED_DEVICES:
        group["fused"] = True
    elif "foreach" in group:
        group["foreach"] = True


def lr_factor(group: dict[str, Any], lr: float) -> float:
    """``lr`` over the group's reference learning rate (see the module docstring)."""
    for key in ("max_lr", "initial_lr", "lr"):
        value = group.get(key)
        if isinstance(value, (int, float)) and value > 0:
            return lr / float(value)
    return 1.0


def _quantizer_group(template: dict[str, Any], params: list[torch.Tensor], lr: float) -> dict[str, Any]:
    factor = lr_factor(template, lr)
    group = {k: v for k, v in template.items() if k != "params"}
    for key in LR_KEYS:
        if isinstance(group.get(key), (int, float)):
            group[key] = group[key] * factor
    group.setdefault("initial_lr", group["lr"])
    group.update(weight_decay=0.0, **{GROUP_FLAG: True})
    _batched_update(group, params[0].device if params else None)
    return {"params": params, **group}


def assign_quantizer_groups(
    optimizers: Sequence[torch.optim.Optimizer],
    layers: Sequence[QuantizedLayer],
    lr: float,
    schedulers: Sequence[Any] = (),
) -> list[QuantizedLayer]:
    """Moves each layer's ``bits``/``exponent`` into a group of their own in the optimizer that holds the layer's
    weights, and out of every other group (see the module docstring). An optimizer that already has such a group (a
    second ``fit``) is left as it is. Returns the layers whose weights no optimizer holds (their quantizers train in
    none)."""
    quantizer_ids = {id(p) for layer in layers for p in (layer.bits, layer.exponent)}
    placed: set[int] = set()
    for opt in optimizers:
        if any(group.get(GROUP_FLAG) for group in opt.param_groups):
            placed.update(id(p) for g in opt.param_groups if g.get(GROUP_FLAG) for p in g["params"])
            continue
        held = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
        owned = [layer for layer in layers if any(id(t) in held for t in layer.leaf_tensors())]
        for group in opt.param_groups:  # no other group steps or decays a quantizer
            group["params"] = [p for p in group["params"] if id(p) not in quantizer_ids]
        if not owned:
            continue
        index = next(held[id(t)] for t in owned[0].leaf_tensors() if id(t) in held)
        template = opt.param_groups[index]
        params: list[torch.Tensor] = [p for layer in owned for p in (layer.bits, layer.exponent) if id(p) not in placed]
        placed.update(id(p) for p in params)
        group = _quantizer_group(template, params, lr)
        opt.add_param_group(group)
        factor = lr_factor(template, lr)
        for scheduler in schedulers:
            if getattr(scheduler, "optimizer", None) is opt:
                _extend(scheduler, index, factor, len(opt.param_groups))
    return [layer for layer in layers if id(layer.bits) not in placed]


def _extend(scheduler: Any, index: int, factor: float, groups: int) -> None:
    """Appends the new group's entry, scaled from the template group's, to each per-group list of ``scheduler``."""
    for name in _SCHEDULER_LISTS:
        values = getattr(scheduler, name, None)
        if isinstance(values, list) and len(values) == groups - 1:
            value = values[index]
            values.append(value * factor if isinstance(value, (int, float)) else value)
