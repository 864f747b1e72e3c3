"""Optimizer surgery: the quantizer's ``bits``/``exponent`` in a param group of their own.

diffq's ``setup_optimizer`` convention: the per-channel bit depths and exponents train with their own learning rate
and no weight decay (decay would pull every bit depth towards zero regardless of the loss). The user's
``configure_optimizers`` builds the optimizer over all parameters, twins' quantizer parameters included; this module
moves those into one group of their own, keeps every other group as the user made it, and extends an LR scheduler's
``base_lrs`` so it schedules the new group too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

try:  # devices with fused optimizer kernels (private in torch; the fallback is the documented pair)
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    _FUSED_DEVICES = frozenset(_get_fused_kernels_supported_devices())
except ImportError:  # pragma: no cover - older or newer torch
    _FUSED_DEVICES = frozenset({"cuda", "cpu"})

GROUP_FLAG = "sgsc_quantizer"
"""Key set to ``True`` in the quantizer's param group (so a second fit with the same optimizer finds it)."""


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


def own_param_group(
    optimizer: torch.optim.Optimizer,
    params: Sequence[nn.Parameter],
    lr: float,
    schedulers: Sequence[Any] = (),
) -> bool:
    """Moves ``params`` out of the optimizer's groups into one group of their own (``lr``, ``weight_decay=0``).

    The new group copies the other settings (betas, eps, ...) of the first group that held one of them. Groups left
    empty are dropped. Every scheduler in ``schedulers`` that drives ``optimizer`` and has ``base_lrs`` gets ``lr``
    appended for the new group. Returns ``False`` (and changes nothing more) when the optimizer already has such a
    group, e.g. on a second ``fit`` with the same optimizer.
    """
    if any(group.get(GROUP_FLAG) for group in optimizer.param_groups):
        return False
    ids = {id(p) for p in params}
    template: dict[str, Any] = {}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            template = template or {k: v for k, v in group.items() if k != "params"}
            group["params"] = [p for p in group["params"] if id(p) not in ids]
    template = template or {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    template.update(lr=lr, initial_lr=lr, weight_decay=0.0, **{GROUP_FLAG: True})
    _batched_update(template, params[0].device if params else None)
    optimizer.add_param_group({"params": list(params), **template})
    for scheduler in schedulers:
        if getattr(scheduler, "optimizer", None) is optimizer and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [*list(scheduler.base_lrs)[: len(optimizer.param_groups) - 1], lr]
    return True
