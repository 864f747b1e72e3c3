"""Swapping float modules for their quantized twins, in place (torchao's ``quantize_`` shape).

Which modules: every one :func:`~lightning_sgsc.quant.modules.kind_of` supports, subclasses included —
``nn.Linear`` (and timm's, attention's ``out_proj``, weight-normed ones), ``nn.Conv1d/2d/3d``, transposed
convolutions, ``nn.Embedding``, transformers' ``Conv1D`` and ``nn.MultiheadAttention``'s ``in_proj_weight`` — then
narrowed by ``include``/``exclude`` patterns and ``filter_fn``. A Parameter held by two modules (a tied head and
embedding) gets one quantizer, shared by both twins, when both hold it the same way (same channel axis and shape);
otherwise both stay float, with a warning. :func:`swap_report` says what was quantized and what stays float.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from torch import nn

from lightning_sgsc.errors import AlreadyQuantizedError, SGSCTypeError, SGSCValueError, describe_rule
from lightning_sgsc.quant.modules import (
    QuantizedLayer,
    TwinKind,
    all_twins,
    kind_of,
    why_not,
)

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
                describe_rule(arg, "patterns that each match a quantizable layer name", pattern) + f" Layers: {shown}."
            )


def _quant_tensor(module: nn.Module, kind: TwinKind) -> Any:
    """The tensor a twin would quantize: the Parameter itself, or a parametrization's output (never shared)."""
    return module._parameters.get(kind.param) if kind.param in module._parameters else None


def candidates(model: nn.Module) -> dict[str, TwinKind]:
    """Every module of ``model`` a twin supports, by fully qualified name."""
    return {name: k for name, m in model.named_modules() if name and (k := kind_of(m)) is not None}


def _holders(model: nn.Module) -> dict[int, list[str]]:
    """For every Parameter, the names of the modules that hold it as their own (more than one: tied)."""
    out: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for p in module.parameters(recurse=False):
            if name not in out.setdefault(id(p), []):
                out[id(p)].append(name)
    return out


def select_layers(
    model: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
) -> list[str]:
    """Names of the modules :func:`quantize_` would swap (see the module docstring).

    Raises:
        SGSCValueError: a pattern matches no quantizable layer, or no layer is left to quantize.
        AlreadyQuantizedError: the model already holds twins.
    """
    if not isinstance(model, nn.Module):
        raise SGSCTypeError(describe_rule("model", "a torch.nn.Module", type(model)))
    existing = all_twins(model)
    if existing:
        raise AlreadyQuantizedError(
            describe_rule("model", "a float model with no quantized layers", f"{len(existing)} quantized layers")
            + " Quantizing twice would stack quantizers; swap once (the callback re-uses an already swapped model)."
        )
    found = candidates(model)
    names = list(found)
    _check_patterns("include", include, names)
    _check_patterns("exclude", exclude, names)
    chosen = []
    for name in names:
        if include is not None and not any(fnmatch.fnmatchcase(name, p) for p in include):
            continue
        if exclude is not None and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            continue
        if filter_fn is not None and not filter_fn(model.get_submodule(name), name):
            continue
        chosen.append(name)
    chosen = _resolve_ties(model, chosen, found)
    if not chosen:
        raise SGSCValueError(
            describe_rule("model", "a model with at least one layer to quantize", "none")
            + (f" Quantizable layers before include/exclude/filter_fn: {names}." if names else " Supported: Linear,"
               " Conv1d/2d/3d, transposed convolutions, Embedding, transformers' Conv1D, MultiheadAttention.")
        )  # fmt: skip
    return chosen


def _resolve_ties(model: nn.Module, chosen: list[str], found: dict[str, TwinKind]) -> list[str]:
    """Keeps the holders of a tied Parameter when every holder is chosen and holds it the same way; otherwise all of
    them stay float, with a warning naming them."""
    holders = _holders(model)
    out = []
    for name in chosen:
        module = model.get_submodule(name)
        tensor = _quant_tensor(module, found[name])
        shared = [h for h in holders.get(id(tensor), [name]) if h != name] if tensor is not None else []
        if not shared:
            out.append(name)
            continue
        kinds = {found.get(h) for h in [name, *shared]}
        if all(h in chosen for h in shared) and len(kinds) == 1:
            out.append(name)  # quantized once: the first holder owns the quantizer, the others share it
        else:
            warnings.warn(
                f"[sgsc] {name!r} shares its weight with {shared}, which hold it differently or are not chosen: "
                "left in float (tied weights).",
                stacklevel=4,
            )
    return out


def _read_directly(parent: nn.Module, args: Any) -> None:
    """A forward pre-hook on a module that reads a child twin's weight attribute without calling the child
    (``nn.MultiheadAttention`` reads ``out_proj.weight``): the child computes with its quantized weight meanwhile."""
    child = parent.out_proj
    if isinstance(child, QuantizedLayer):
        child.__dict__["_sgsc_sub"] = child.quantized_weight()


def _done_reading(parent: nn.Module, args: Any, output: Any) -> None:
    parent.out_proj.__dict__.pop("_sgsc_sub", None)


def _uses_quantized_weight(module: nn.Module, args: Any) -> None:
    """A forward pre-hook that does nothing. Its presence turns off ``nn.TransformerEncoderLayer``'s fused inference
    path, which reads ``linear1.weight``/``linear2.weight`` directly and would bypass the twins' quantizer."""
    return None


def _add_hooks(model: nn.Module) -> None:
    for parent in model.modules():
        if isinstance(parent, nn.MultiheadAttention) and isinstance(parent.out_proj, QuantizedLayer):
            if _read_directly not in parent._forward_pre_hooks.values():
                parent.register_forward_pre_hook(_read_directly)
                parent.register_forward_hook(_done_reading, always_call=True)
        if isinstance(parent, nn.TransformerEncoderLayer):
            for child in parent.modules():
                if (
                    isinstance(child, QuantizedLayer)
                    and _uses_quantized_weight not in child._forward_pre_hooks.values()  # type: ignore[attr-defined]
                ):
                    child.register_forward_pre_hook(_uses_quantized_weight)  # type: ignore[attr-defined]


def quantize_(
    model: nn.Module,
    init_bits: float = 8.0,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    filter_fn: FilterFn | None = None,
    init_headroom: float | None = None,
) -> list[str]:
    """Replaces the chosen float modules of ``model`` by quantized twins, in place.

    Twins share the original Parameters. Applying it to a model that already holds twins is an error, not a no-op.

    Args:
        model: the model to change.
        init_bits: starting bit depth of every channel, 2 to 16.
        include: fnmatch patterns over fully qualified names; only matching modules are swapped. Default: all.
        exclude: fnmatch patterns of modules to leave in float.
        filter_fn: ``filter_fn(module, fqn) -> bool``, a further choice after the patterns.
        init_headroom: bits of room above each channel's largest weight at the start, so weights that grow early
            in training are not clipped (``None``: 2, or ``init_bits - 2`` if less; 0 to ``init_bits - 2``).

    Returns:
        The fully qualified names of the swapped modules.

    Example::

        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> quantize_(net, init_bits=8, exclude=["2"])
        ['0']
    """
    names = select_layers(model, include, exclude, filter_fn)
    owners: dict[int, QuantizedLayer] = {}
    for name in names:
        module = model.get_submodule(name)
        kind = kind_of(module)
        assert kind is not None
        tensor = _quant_tensor(module, kind)
        share = owners.get(id(tensor)) if tensor is not None else None
        twin = QuantizedLayer.from_float(module, init_bits, init_headroom, share=share)
        if tensor is not None and share is None:
            owners[id(tensor)] = twin
        _set_submodule(model, name, cast(nn.Module, twin))  # every twin is also its float module's class
    _add_hooks(model)
    return names


def dequantize_(model: nn.Module, bake: bool = True) -> list[str]:
    """Replaces every twin by a plain float module (``to_float(bake)``), in place; returns the names replaced."""
    names = []
    baked: dict[int, nn.Module] = {}  # the first holder's float module, by quantizer: a tied weight stays tied
    for name, layer in all_twins(model):
        if not name:
            raise SGSCValueError(describe_rule("model", "a container of quantized layers, not a twin itself", model))
        first = baked.get(id(layer.bits))
        out = layer.to_float(bake=bake and first is None)
        if first is not None and bake:
            out._parameters[layer.quant_param] = first._parameters[layer.quant_param]
        baked.setdefault(id(layer.bits), out)
        _set_submodule(model, name, out)
        names.append(name)
    return names


@dataclass
class SwapReport:
    """What a swap quantized and what it left float, with shares of the model's parameters (quantizer state not
    counted, each tied Parameter once)."""

    quantized: list[str] = field(default_factory=list)
    quantized_params: int = 0  # weights a quantizer covers
    float_by_type: dict[str, int] = field(default_factory=dict)  # type name -> modules whose own parameters stay float
    total_params: int = 0
    reasons: dict[str, str] = field(default_factory=dict)  # module -> why it stays float, where no twin supports it

    @property
    def float_share(self) -> float:
        """Share of the parameters left float (biases and norms included)."""
        return 1.0 - self.quantized_params / max(self.total_params, 1)

    def summary(self) -> str:
        """One line, e.g. ``quantized 26 layers, 97.1 % of parameters; left float: 9 LayerNorm (2.9 % with biases)``."""
        line = f"quantized {len(self.quantized)} layers, {100 * (1 - self.float_share):.1f} % of parameters"
        kinds = ", ".join(f"{n} {t}" for t, n in sorted(self.float_by_type.items(), key=lambda kv: (-kv[1], kv[0])))
        line += (
            f"; left float: {kinds or 'biases only'} ({100 * self.float_share:.1f} % of parameters, biases included)"
        )
        for name, why in list(self.reasons.items())[:3]:
            line += f"; {name!r}: {why}"
        return line


def swap_report(model: nn.Module) -> SwapReport:
    """What :func:`quantize_` did to ``model``: the quantized layers and, by type, the modules whose own
    Parameters stay float."""
    report = SwapReport()
    twins = all_twins(model)
    state = {id(t) for _, twin in twins for t in (twin.bits, twin.exponent)}
    quantized = {id(t): t for _, twin in twins for t in twin.leaf_tensors()}
    report.quantized = [name for name, _ in twins]
    report.quantized_params = sum(t.numel() for t in quantized.values())
    report.total_params = sum(p.numel() for p in model.parameters() if id(p) not in state)
    seen: set[int] = set(state) | set(quantized)
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for p in own)
        if own and not isinstance(module, QuantizedLayer):
            kind = type(module).__name__
            report.float_by_type[kind] = report.float_by_type.get(kind, 0) + 1
            reason = why_not(module)
            if reason:
                report.reasons[name] = reason
    return report


def checkpoint_layers(state_dict: Mapping[str, Any]) -> list[str]:
    """The modules a state dict holds quantizer state for (its ``<module>.bits``, ``.exponent`` and ``.pruned``),
    in the state dict's order: what was quantized when it was saved."""
    return [
        key[: -len(".bits")]
        for key in state_dict
        if key.endswith(".bits") and {key[:-5] + ".exponent", key[:-5] + ".pruned"} <= set(state_dict)
    ]


def prepare_for_state_dict(model: nn.Module, state_dict: Mapping[str, Any]) -> list[str]:
    """Makes ``model`` hold twins exactly where ``state_dict`` holds quantizer state, so the state dict loads: a float
    model (``Net.load_from_checkpoint`` without the callback) is swapped first; a model swapped the same way is left
    as it is. The checkpoint's bit depths and exponents then load over the twins'. Returns the modules swapped now.

    Raises:
        SGSCValueError: the model is already swapped, differently from the checkpoint (another ``include`` or
            ``exclude`` than when it was saved): the message names the layers that differ.
    """
    wanted = checkpoint_layers(state_dict)
    if not wanted:
        return []
    present = [name for name, _ in all_twins(model)]
    if present:
        if set(present) != set(wanted):
            missing, extra = sorted(set(wanted) - set(present)), sorted(set(present) - set(wanted))
            raise SGSCValueError(
                describe_rule("state_dict", "quantizer state for the layers this model quantizes", "another set")
                + f" The checkpoint quantizes {missing[:6]} that this model keeps float, and this model quantizes"
                f" {extra[:6]} that the checkpoint kept float. Resume with the `include`/`exclude` it was saved with;"
                " or load it into a float instance (`Net.load_from_checkpoint`, which swaps as the checkpoint says)."
            )
        return []
    chosen = set(wanted)
    return quantize_(model, filter_fn=lambda module, fqn: fqn in chosen)


__all__ = [
    "FilterFn",
    "QuantizedLayer",
    "SwapReport",
    "checkpoint_layers",
    "dequantize_",
    "prepare_for_state_dict",
    "quantize_",
    "select_layers",
    "swap_report",
]
