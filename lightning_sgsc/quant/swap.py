"""Swapping float layers for their quantized twins, in place (torchao's ``quantize_`` shape)."""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

from torch import nn

from lightning_sgsc.errors import AlreadyQuantizedError, SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.quant.modules import TWIN_FOR, QuantizedLayer, quantized_layers

FilterFn = Callable[[nn.Module, str], bool]


def _set_submodule(model: nn.Module, fqn: str, new: nn.Module) -> None:
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _check_patterns(arg: str, patterns: Sequence[str] | None, candidates: Sequence[str]) -> None:
    if patterns is None:
        return
    if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
        raise SGSCTypeError(describe_rule(arg, "a list of fnmatch patterns such as ['features.*']", patterns))
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in candidates):
            shown = ", ".join(candidates[:12]) + (", …" if len(candidates) > 12 else "")
            raise SGSCValueError(
                describe_rule(arg, "patterns that each match a Conv1d/Conv2d/Linear layer name", pattern)
                + f" Layers: {shown}."
            )


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[str]:
    """Names of the layers :func:`quantize_` would swap.

    A layer is chosen when its type has a twin (``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` exactly), its fully
    qualified name matches one of ``include`` (all, if ``None``) and none of ``exclude`` (fnmatch patterns), and
    ``filter_fn(module, fqn)`` is true (if given). A layer whose weight is shared with another module (tied weights,
    e.g. a language model's head and token embedding) stays in float, with a warning naming both: quantizing one
    holder would silently untie them, and pruning its channels would edit the other.

    Raises:
        SGSCValueError: a pattern matches no quantizable layer, or no layer is left to quantize.
        AlreadyQuantizedError: the model already holds twins.
    """
    if not isinstance(model, nn.Module):
        raise SGSCTypeError(describe_rule("model", "a torch.nn.Module", type(model)))
    existing = quantized_layers(model)
    if existing:
        raise AlreadyQuantizedError(
            describe_rule("model", "a float model with no quantized layers", f"{len(existing)} quantized layers")
            + " Quantizing twice would stack quantizers; swap once (the callback re-uses an already swapped model)."
        )
    candidates = [name for name, m in model.named_modules() if type(m) in TWIN_FOR and name]
    _check_patterns("include", include, candidates)
    _check_patterns("exclude", exclude, candidates)
    holders = _holders(model)
    chosen = []
    for name in candidates:
        module = model.get_submodule(name)
        shared = [h for h in holders[id(module.weight)] if h != name]
        if shared:
            warnings.warn(
                f"[sgsc] {name!r} shares its weight with {shared}: left in float (tied weights)", stacklevel=3
            )
            continue
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if filter_fn is not None and not filter_fn(module, name):
            continue
        chosen.append(name)
    if not chosen:
        raise SGSCValueError(
            describe_rule("model", "a model with at least one Conv1d, Conv2d or Linear layer to quantize", "none")
            + (f" Quantizable layers before include/exclude/filter_fn: {candidates}." if candidates else "")
        )
    return chosen


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """For every Parameter, the names of the modules that hold it as their own (more than one: tied)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if name not in out.setdefault(id(p), []):
                out[id(p)].append(name)
    return out


def _uses_quantized_weight(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing. Its presence turns off ``nn.TransformerEncoderLayer``'s fused inference
    path, which reads ``linear1.weight``/``linear2.weight`` directly and would bypass the twins' quantizer."""
    return None


def quantize_(
    model: nn.Module,
    init_bits: float = 8.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
    init_headroom: float | None = None,
) -> list[str]:
    """Replaces the chosen float layers of ``model`` by quantized twins, in place.

    Twins share the original ``weight``/``bias`` Parameters. Applying it to a model that already holds twins is an
    error, not a no-op.

    Args:
        model: the model to change.
        init_bits: starting bit depth of every channel, 2 to 16.
        include: fnmatch patterns over fully qualified names; only matching layers are swapped. Default: all.
        exclude: fnmatch patterns of layers to leave in float.
        filter_fn: ``filter_fn(module, fqn) -> bool``, a further choice after the patterns.
        init_headroom: bits of room above each channel's largest weight at the start, so weights that grow early
            in training are not clipped (``None``: 2, or ``init_bits - 2`` if less; 0 to ``init_bits - 2``).

    Returns:
        The fully qualified names of the swapped layers.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> quantize_(net, init_bits=8, exclude=["2"])
        ['0']
    """
    names = select_layers(model, include, exclude, filter_fn)
    for name in names:
        module = model.get_submodule(name)
        twin = TWIN_FOR[type(module)].from_float(module, init_bits, init_headroom)
        _set_submodule(model, name, cast(nn.Module, twin))  # every twin is also its float layer's class
    for parent in model.modules():
        if isinstance(parent, nn.TransformerEncoderLayer):
            for child in parent.modules():
                if (
                    isinstance(child, QuantizedLayer)
                    and _uses_quantized_weight not in child._forward_pre_hooks.values()
                ):  # type: ignore[attr-defined]
                    child.register_forward_pre_hook(_uses_quantized_weight)  # type: ignore[attr-defined]
    return names


def dequantize_(model: nn.Module, bake: bool = True) -> list[str]:
    """Replaces every twin by a plain float layer (``to_float(bake)``), in place; returns the names replaced."""
    names = []
    for name, layer in quantized_layers(model):
        if not name:
            raise SGSCValueError(describe_rule("model", "a container of quantized layers, not a twin itself", model))
        _set_submodule(model, name, layer.to_float(bake=bake))
        names.append(name)
    return names


__all__ = ["FilterFn", "QuantizedLayer", "dequantize_", "quantize_", "select_layers"]
