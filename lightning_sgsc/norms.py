"""BatchNorm next to quantized twins: which norm reads which twin, and statistics that fit the current weights.

Two facts about BatchNorm under compression (pure torch, no Trainer in here):

* Running statistics lag behind weights whose bit depths change every step, so an eval-mode measurement made with
  them judges stale statistics, not the model. :func:`recalibrate_norms_` recomputes them for the weights as they
  are now (a cumulative average over a few batches, as quantization-aware training pipelines do).
* A channel at zero bits followed by BatchNorm still outputs ``beta - gamma * mean / std``. Zeroing that channel's
  ``gamma`` and ``beta`` too (network slimming) makes the normalised channel exactly zero, so removing it is exact.
  :func:`norms_after` finds the BatchNorm that reads each twin's output.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from lightning_sgsc.quant.modes import couple_norm
from lightning_sgsc.quant.modules import QuantizedLayer

BatchNorm = nn.modules.batchnorm._BatchNorm


def batch_norms(model: nn.Module) -> list[BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, BatchNorm) and m.track_running_stats]


@torch.no_grad()
def norms_after(model: nn.Module, run: Callable[[], Any]) -> dict[str, str]:
    """``{twin name: BatchNorm name}`` for every BatchNorm whose input is a twin's output, as one call of ``run()``
    (a forward pass of ``model``) shows. The outputs are kept alive during the pass, so a tensor's ``id`` names one
    tensor only."""
    names = {id(m): n for n, m in model.named_modules()}
    produced: dict[int, str] = {}
    alive: list[Tensor] = []
    found: dict[str, str] = {}

    def on_output(module: nn.Module, args: Any, out: Any) -> None:
        if isinstance(out, Tensor):
            produced[id(out)] = names[id(module)]
            alive.append(out)

    def on_input(module: nn.Module, args: Any) -> None:
        if args and isinstance(args[0], Tensor) and id(args[0]) in produced:
            found.setdefault(produced[id(args[0])], names[id(module)])

    hooks = []
    for module in model.modules():
        if isinstance(module, QuantizedLayer):
            hooks.append(module.register_forward_hook(on_output))  # type: ignore[attr-defined]
        elif isinstance(module, BatchNorm) and module.affine:
            hooks.append(module.register_forward_pre_hook(on_input))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return found


@torch.no_grad()
def recalibrate_norms_(model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any]) -> int:
    """Recomputes every BatchNorm's running statistics from ``forward(batch)`` over ``batches``: reset, then a
    cumulative average (``momentum=None``) with only the norms in training mode (dropout and the rest stay in eval
    mode, so no random number is drawn). Returns the number of norms recalibrated (0: nothing to do, no pass)."""
    norms = batch_norms(model)
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    try:
        model.eval()
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for batch in batches:
            forward(batch)
    finally:
        for norm, momentum in momenta:
            norm.momentum = momentum
        for module, training in modes:
            module.training = training
    return len(norms)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` in eval mode within the block, in its own mode after."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def link_norms_(model: nn.Module, run: Callable[[], Any]) -> int:
    """Tells each twin which BatchNorm reads it, as one forward pass ``run()`` (in eval mode, no gradients) shows
    (:func:`norms_after`); a plain attribute, not a submodule, so nothing is added to the state dict. Pruning a
    channel then also zeroes and freezes that norm's ``gamma``/``beta`` rows. Returns the number of links made."""
    with torch.inference_mode(False), torch.no_grad(), eval_mode(model):
        links = norms_after(model, run)
    modules = dict(model.named_modules())
    made = 0
    for twin_name, norm_name in links.items():
        twin, norm = modules.get(twin_name), modules.get(norm_name)
        if isinstance(twin, QuantizedLayer) and isinstance(norm, BatchNorm) and norm.num_features == twin.out_channels_:
            couple_norm(twin, norm)
            made += 1
    return made
