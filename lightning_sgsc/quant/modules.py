"""Quantized twins: any module that computes with one weight Parameter, that weight quantized per output channel.

A twin *is* its float module: its class is a subclass of the module's own class (``QuantLinear`` of ``nn.Linear``;
``QuantConv1D`` of transformers' ``Conv1D``; a twin of timm's ``Linear`` is still a timm ``Linear``), so
``isinstance`` holds, hooks, Grad-CAM target layers and dependency graphs keep working, and the module's *own*
``forward`` runs unchanged. During that forward (and only then) the weight attribute it reads (``weight``, or
``in_proj_weight`` for ``nn.MultiheadAttention``) is the quantized weight; outside it, it is the float Parameter, so
``state_dict`` keys, optimizers and ``layer.weight.data`` writes see what they always saw. Three per-channel tensors
come with it:

* ``bits`` (Parameter): the learned bit depth ``b``;
* ``exponent`` (Parameter): the learned exponent ``e``;
* ``pruned`` (bool buffer): channels frozen at zero bits for good.

What a channel is depends on the layout (:class:`TwinKind`): rows of ``nn.Linear``/``ConvNd``/``nn.Embedding``
weights (axis 0), columns of transformers' ``Conv1D`` (``(in, out)``, axis 1), the output axis of transposed
convolutions (axis 1). Internally every twin works on :attr:`QuantizedLayer.channel_weight`, a view with the
channels first. A weight under ``torch.nn.utils.parametrize`` (``weight_norm``) is quantized as the parametrization
computes it. Two modules holding one tied Parameter (a language model's head and token embedding, per vocabulary
row) share one quantizer: the second twin's ``bits``/``exponent``/``pruned`` are the first's (``share=``).

``from_float`` reuses the module's Parameters (no copy: memory stays flat and an optimizer built on the float model
still sees them); ``to_float`` converts back.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_sgsc.config import MAX_BITS, MIN_INIT_BITS, resolve_headroom
from lightning_sgsc.quant.functional import effective_bits, init_exponent, quantize, quantize_int


@dataclass(frozen=True)
class TwinKind:
    """Which Parameter of a module a twin quantizes, and its output-channel axis."""

    param: str = "weight"
    axis: int = 0


def _is_hf_conv1d(module: nn.Module) -> bool:
    cls = type(module)
    return any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__)


def kind_of(module: nn.Module) -> TwinKind | None:
    """What a twin of ``module`` would quantize, or ``None`` for a module no twin supports (by type, subclasses
    included)."""
    if isinstance(module, QuantizedLayer):
        return None
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return TwinKind("weight", 1)
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)):
        return TwinKind("weight", 0)
    if _is_hf_conv1d(module):
        return TwinKind("weight", 1)
    if isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is not None:
        return TwinKind("in_proj_weight", 0)
    return None


def why_not(module: nn.Module) -> str | None:
    """For a module with weights that no twin quantizes, the reason (``None`` when it is supported or holds none)."""
    if isinstance(module, nn.MultiheadAttention) and getattr(module, "in_proj_weight", None) is None:
        return "separate q/k/v projection weights (kdim/vdim differ from embed_dim)"
    return None


@dataclass
class TwinModes:
    """How a twin computes its weight at the moment. Switched only by the context managers of
    :mod:`lightning_sgsc.quant.modes` (the fused step, the gradient probe, float weights) and its norm coupling."""

    fused: tuple[Tensor, tuple[int, ...]] | None = None  # the step's fused result (channels first), with versions
    probe: Tensor | None = None  # a zero tensor (channels first) added to the quantized weight, to read dL/dw_q
    float_weight: bool = False  # compute with the float weight, unquantized
    norm: nn.Module | None = None  # the BatchNorm that reads this twin's output (pruning zeroes its rows too)


class QuantizedLayer:
    """Behaviour shared by every twin; mixed into the float module's class (``QuantConv2d(QuantizedLayer,
    nn.Conv2d)``)."""

    float_cls: ClassVar[type[nn.Module]]
    quant_param: ClassVar[str] = "weight"
    channel_axis: ClassVar[int] = 0
    bias: Any  # a Parameter or None
    bits: nn.Parameter
    exponent: nn.Parameter
    pruned: Tensor
    modes: TwinModes

    # ------------------------------------------------------------------------------------------------ the weight

    @property
    def float_weight(self) -> Tensor:
        """The float weight as the module stores (or its parametrization computes) it, in the module's layout."""
        module: nn.Module = self  # type: ignore[assignment]
        if parametrize.is_parametrized(module, self.quant_param):
            return getattr(self.float_cls, self.quant_param).__get__(self, type(self))  # type: ignore[no-any-return]
        return module._parameters[self.quant_param]  # type: ignore[return-value]

    @property
    def channel_weight(self) -> Tensor:
        """:attr:`float_weight` with the output channels first (a view): what the quantizer works on."""
        if self.__dict__.get("_sgsc_plain"):  # a Parameter with its channels first: read directly (every forward)
            return self._parameters[self.quant_param]  # type: ignore[attr-defined,no-any-return]
        w = self.float_weight
        return w if self.channel_axis == 0 else w.movedim(self.channel_axis, 0)

    def to_layout(self, channels_first: Tensor) -> Tensor:
        """A channels-first tensor in the module's own weight layout (a view)."""
        return channels_first if self.channel_axis == 0 else channels_first.movedim(0, self.channel_axis)

    def leaf_tensors(self) -> list[Tensor]:
        """The Parameters the float weight is made of (the weight itself, or its parametrization's originals)."""
        module: nn.Module = self  # type: ignore[assignment]
        if parametrize.is_parametrized(module, self.quant_param):
            plist: nn.Module = module.parametrizations[self.quant_param]  # type: ignore[index,assignment]
            return [t for name, t in plist.named_parameters(recurse=False) if name.startswith("original")]
        return [module._parameters[self.quant_param]]  # type: ignore[list-item]

    @property
    def channel_bias(self) -> Tensor | None:
        """The bias with one entry per output channel, if the module has one (``in_proj_bias`` for attention)."""
        module: nn.Module = self  # type: ignore[assignment]
        name = "in_proj_bias" if self.quant_param == "in_proj_weight" else "bias"
        bias = module._parameters.get(name)
        return bias if bias is not None and bias.dim() == 1 and bias.shape[0] == self.out_channels_ else None

    def channel_rows(self) -> list[tuple[Tensor, int, bool]]:
        """``(tensor, axis, zeroable)`` for every Parameter whose slices along ``axis`` belong to output channels: the
        weight (or the originals of a parametrized one: not zeroable, a ``weight_norm`` of zeros is NaN), the channel
        bias and ``bits``. Pruning zeroes and freezes these slices."""
        module: nn.Module = self  # type: ignore[assignment]
        channels = self.out_channels_
        if parametrize.is_parametrized(module, self.quant_param):
            axis = self.channel_axis
            rows = [(t, axis, False) for t in self.leaf_tensors() if t.dim() > axis and t.shape[axis] == channels]
        else:
            rows = [(self.leaf_tensors()[0], self.channel_axis, True)]
        bias = self.channel_bias
        return [*rows, *([(bias, 0, True)] if bias is not None else []), (self.bits, 0, True)]

    @property
    def out_channels_(self) -> int:
        """Number of output channels."""
        return int(self.channel_weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Weights per output channel."""
        w = self.channel_weight
        return int(w.numel() // max(int(w.shape[0]), 1))

    def _versions(self) -> tuple[int, ...]:
        """In-place modification counters of the tensors the quantized weight depends on."""
        module: nn.Module = self  # type: ignore[assignment]
        params, buffers = module._parameters, module._buffers  # direct reads: this runs on every forward
        if module.__dict__.get("_sgsc_plain"):
            return (
                params[self.quant_param]._version,  # type: ignore[union-attr]
                params["bits"]._version,  # type: ignore[union-attr]
                params["exponent"]._version,  # type: ignore[union-attr]
                buffers["pruned"]._version,  # type: ignore[union-attr]
            )
        return (
            *(t._version for t in self.leaf_tensors()),
            params["bits"]._version,  # type: ignore[union-attr]
            params["exponent"]._version,  # type: ignore[union-attr]
            buffers["pruned"]._version,  # type: ignore[union-attr]
        )

    def quantized_channels(self) -> Tensor:
        """The weight the layer computes with, channels first: quantized at the current ``bits``/``exponent``,
        differentiable. Inside :meth:`~lightning_sgsc.quant.fused.FusedQuantizer.step` (one training step) this is the
        layer's slice of the step's single fused quantizer pass, as long as none of its tensors changed in place."""
        modes = self.modes
        if modes.float_weight:  # inside float_weights(): the uncompressed layer
            return self.channel_weight
        fused = modes.fused
        w = self.channel_weight
        if fused is not None and torch.is_grad_enabled() and fused[1] == self._versions():
            q = fused[0].to(w.dtype)
        else:
            q = quantize(w, self.bits, self.exponent, self.pruned)
        if modes.probe is not None:  # inside quant.modes.weight_probes()
            q = q + modes.probe.to(q.dtype)
        return q

    def quantized_weight(self) -> Tensor:
        """:meth:`quantized_channels` in the module's own weight layout (what its forward computes with)."""
        q = self.quantized_channels()
        return q if self.channel_axis == 0 else q.movedim(0, self.channel_axis)

    @contextmanager
    def computing(self) -> Iterator[None]:
        """Within the block the module's weight attribute is the quantized weight (what ``forward`` reads)."""
        module: nn.Module = self  # type: ignore[assignment]
        module.__dict__["_sgsc_sub"] = self.quantized_weight()
        try:
            yield
        finally:
            module.__dict__.pop("_sgsc_sub", None)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The module's own ``forward``, computing with the quantized weight (:meth:`computing`, inlined: this
        runs on every forward of every twin)."""
        state = self.__dict__
        state["_sgsc_sub"] = self.quantized_weight()
        try:
            return self.float_cls.forward(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            state.pop("_sgsc_sub", None)

    def effective_bits(self) -> Tensor:
        """``b`` clamped to [0, 16] per channel, 0 where pruned (differentiable)."""
        return effective_bits(self.bits, self.pruned)

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """The stored integers per weight, channels first (``int32``); ``2**exponent * integer_weight`` is
        :meth:`quantized_channels`."""
        return quantize_int(self.channel_weight, self.bits, self.exponent, self.pruned)

    # --------------------------------------------------------------------------------------------- conversion

    def _init_quantizer(self, init_bits: float, headroom: float, share: QuantizedLayer | None) -> None:
        module: nn.Module = self  # type: ignore[assignment]
        module.__dict__["modes"] = TwinModes()
        # a plain Parameter with its channels first: the hot paths read it directly (a parametrization added to the
        # twin later is not supported: add it before the swap)
        plain = self.channel_axis == 0 and not parametrize.is_parametrized(module, self.quant_param)
        module.__dict__["_sgsc_plain"] = plain
        if share is not None:  # a tied weight: one quantizer for both holders
            module.bits, module.exponent = share.bits, share.exponent
            module.register_buffer("pruned", share.pruned)
            return
        w = self.channel_weight.detach()
        n = w.shape[0]
        module.bits = nn.Parameter(torch.full((n,), float(init_bits), device=w.device, dtype=torch.float32))
        module.exponent = nn.Parameter(init_exponent(w, float(init_bits), headroom).to(w.device))
        module.register_buffer("pruned", torch.zeros(n, dtype=torch.bool, device=w.device))

    @classmethod
    def from_float(
        cls,
        module: nn.Module,
        init_bits: float = 8.0,
        init_headroom: float | None = None,
        share: QuantizedLayer | None = None,
    ) -> QuantizedLayer:
        """Builds the twin of ``module``, sharing its Parameters. Called on :class:`QuantizedLayer` itself, the twin
        class is chosen from the module's type (:func:`twin_class`); on a twin class, ``module`` must be an instance
        of exactly its ``float_cls``.

        Args:
            module: a module :func:`kind_of` supports.
            init_bits: starting bit depth of every channel, from 2 to 16.
            init_headroom: bits of room above each channel's largest weight at the start (see
                :func:`~lightning_sgsc.config.resolve_headroom`; ``None``: 2, or ``init_bits - 2`` if less).
            share: the twin of the other holder of a tied weight: this twin uses its quantizer.

        Raises:
            SGSCTypeError: no twin quantizes ``module``, or it is not this twin class's float class.
            SGSCValueError: ``init_bits`` is outside 2–16, or ``init_headroom`` outside 0 to ``init_bits - 2``.
        """
        from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule

        kind = kind_of(module)
        if kind is None:
            raise SGSCTypeError(describe_rule("module", "a layer a twin quantizes", type(module)))
        twin_cls = twin_class(type(module), kind) if cls is QuantizedLayer else cls
        if type(module) is not twin_cls.float_cls:
            raise SGSCTypeError(describe_rule("module", f"an instance of {twin_cls.float_cls.__name__}", type(module)))
        if not isinstance(init_bits, (int, float)) or not MIN_INIT_BITS <= float(init_bits) <= MAX_BITS:
            raise SGSCValueError(describe_rule("init_bits", "a number from 2 to 16", init_bits))
        headroom = resolve_headroom(float(init_bits), init_headroom, arg="init_headroom")
        twin = twin_cls.__new__(twin_cls)
        _copy_module_state(module, twin)  # type: ignore[arg-type]
        twin._init_quantizer(float(init_bits), headroom, share)
        return twin

    def to_float(self, bake: bool = True) -> nn.Module:
        """Converts back to a plain float module.

        Args:
            bake: ``True``: the new module's weight is a new Parameter holding the quantized weight, so it computes
                exactly what the twin computes in eval mode (a parametrized weight becomes a plain Parameter).
                ``False``: the new module shares the original float weight (undoes the swap).
        """
        module: nn.Module = self  # type: ignore[assignment]
        name = self.quant_param
        parametrized = parametrize.is_parametrized(module, name)
        out_cls: type[nn.Module] = self.float_cls.__bases__[0] if bake and parametrized else self.float_cls
        out = out_cls.__new__(out_cls)
        _copy_module_state(module, out)
        del out._parameters["bits"], out._parameters["exponent"], out._buffers["pruned"]
        for key in ("modes", "_sgsc_sub", "_sgsc_plain"):
            out.__dict__.pop(key, None)
        if bake:
            with torch.no_grad():
                baked = nn.Parameter(self.quantized_weight().detach().clone(), self.leaf_tensors()[0].requires_grad)
            if parametrized:
                out._modules = {k: v for k, v in out._modules.items() if k != "parametrizations"}
            out._parameters[name] = baked
        return out

    def extra_repr(self) -> str:
        base = self.float_cls.extra_repr(self)  # type: ignore[arg-type]
        with torch.no_grad():
            mean_bits = float(self.effective_bits().mean())
        return f"{base}, mean_bits={mean_bits:.2f}, pruned={int(self.pruned.sum())}"


def _copy_module_state(src: nn.Module, dst: nn.Module) -> None:
    """Gives ``dst`` the attributes of ``src`` (hyperparameters, hooks, training flag), with registries of its own
    that hold the *same* Parameter, buffer and submodule objects."""
    for key, value in src.__dict__.items():
        dst.__dict__[key] = value.copy() if isinstance(value, (dict, set)) else value


def _weight_property(name: str, base: Any) -> property:
    """The twin class's ``name`` attribute: the quantized weight while the module computes (:meth:`computing`),
    else the float weight (the Parameter, or what the float class's parametrization property computes)."""

    def get(self: nn.Module) -> Tensor:
        sub = self.__dict__.get("_sgsc_sub")
        if sub is not None:
            return sub  # type: ignore[no-any-return]
        if base is not None:
            return base.__get__(self, type(self))  # type: ignore[no-any-return]
        try:
            return self._parameters[name]  # type: ignore[return-value]
        except KeyError:
            raise AttributeError(name) from None

    return property(get, getattr(base, "fset", None))


_TWIN_CLASSES: dict[type[nn.Module], type[QuantizedLayer]] = {}


def twin_class(float_cls: type[nn.Module], kind: TwinKind) -> type[QuantizedLayer]:
    """The twin class of ``float_cls`` (made once per class, kept in this module so a twin pickles)."""
    found = _TWIN_CLASSES.get(float_cls)
    if found is not None:
        return found
    base = float_cls.__dict__.get(kind.param)  # a parametrization's property, when the class is parametrized
    name = "Quant" + re.sub(r"\W", "_", float_cls.__name__)
    if name in globals():
        name = f"{name}_{len(_TWIN_CLASSES)}"
    namespace = {
        "float_cls": float_cls,
        "quant_param": kind.param,
        "channel_axis": kind.axis,
        kind.param: _weight_property(kind.param, base if isinstance(base, property) else None),
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"Quantized twin of :class:`{float_cls.__module__}.{float_cls.__qualname__}`.",
    }
    cls: type = type(name, (QuantizedLayer, float_cls), namespace)
    globals()[name] = cls
    _TWIN_CLASSES[float_cls] = cls  # type: ignore[assignment]
    return cls  # type: ignore[return-value]


QuantLinear = twin_class(nn.Linear, TwinKind())
QuantConv1d = twin_class(nn.Conv1d, TwinKind())
QuantConv2d = twin_class(nn.Conv2d, TwinKind())


def all_twins(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Every twin in ``model`` as ``(fully qualified name, module)``, in ``named_modules`` order, both holders of a
    tied weight included."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Every quantized weight once, as ``(name, twin)`` of its first holder (a tied weight's second holder shares
    the first's quantizer and is left out), in ``named_modules`` order."""
    seen: set[int] = set()
    out = []
    for name, twin in all_twins(model):
        if id(twin.bits) not in seen:
            seen.add(id(twin.bits))
            out.append((name, twin))
    return out


def followers(model: nn.Module) -> dict[int, list[QuantizedLayer]]:
    """For each first holder (by ``id``), the other twins sharing its quantizer (tied weights)."""
    owners = {id(t.bits): t for _, t in quantized_layers(model)}
    out: dict[int, list[QuantizedLayer]] = {}
    for _, twin in all_twins(model):
        owner = owners[id(twin.bits)]
        if owner is not twin:
            out.setdefault(id(owner), []).append(twin)
    return out


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``bits`` and ``exponent`` Parameters of every quantizer, once each (for their own optimizer param
    group)."""
    params: list[nn.Parameter] = []
    for _, layer in quantized_layers(model):
        params += [layer.bits, layer.exponent]
    return params


def quantizer_state_ids(model: nn.Module) -> set[int]:
    """``id`` of every twin's ``bits``, ``exponent`` and ``pruned`` tensor: training-time state that a compressed
    artifact does not keep (its integers and scales stand for it). Found by owner, not by name."""
    return {id(t) for _, layer in all_twins(model) for t in (layer.bits, layer.exponent, layer.pruned)}


def stored_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The ``state_dict`` tensors a compressed artifact stores as they are: each distinct tensor once (tied weights
    count once), without the twins' quantizer state, and without the originals of a quantized parametrized weight
    (the quantized weight stands for them)."""
    skip = quantizer_state_ids(model)
    for _, layer in quantized_layers(model):
        if parametrize.is_parametrized(layer, layer.quant_param):  # type: ignore[arg-type]
            skip |= {id(t) for t in layer.leaf_tensors()}
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out
