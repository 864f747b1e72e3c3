"""Quantized twins of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d``.

A twin *is* its float layer (it subclasses it, so ``isinstance(twin, nn.Conv2d)`` holds and hooks, Grad-CAM target
layers and dependency graphs keep working) plus three per-output-channel tensors:

* ``bits`` (Parameter): the learned bit depth ``b``;
* ``exponent`` (Parameter): the learned exponent ``e``;
* ``pruned`` (bool buffer): channels frozen at zero bits for good.

``from_float`` reuses the float layer's ``weight`` and ``bias`` Parameters (no copy: memory stays flat and an
optimizer built on the float model still sees them); ``to_float`` converts back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_sgsc.config import MAX_BITS, MIN_INIT_BITS, resolve_headroom
from lightning_sgsc.quant.functional import effective_bits, init_exponent, quantize, quantize_int


@dataclass
class TwinModes:
    """How a twin computes its weight at the moment. Switched only by the context managers of
    :mod:`lightning_sgsc.quant.modes` (the fused step, the gradient probe, float weights) and its norm coupling."""

    fused: tuple[Tensor, tuple[int, int, int, int]] | None = None  # the step's fused result, with tensor versions
    probe: Tensor | None = None  # a zero tensor added to the quantized weight, to read dL/dw_q
    float_weight: bool = False  # compute with the float weight, unquantized
    norm: nn.Module | None = None  # the BatchNorm that reads this twin's output (pruning zeroes its rows too)


class QuantizedLayer:
    """Behaviour shared by every twin; mixed into the float layer class (``QuantConv2d(QuantizedLayer, nn.Conv2d)``)."""

    float_cls: ClassVar[type[nn.Module]]
    weight: Tensor  # an nn.Parameter; declared as the float layers declare it
    bias: Any  # a Parameter or None (nn.Linear and nn.Conv2d declare it differently)
    bits: nn.Parameter
    exponent: nn.Parameter
    pruned: Tensor

    def _init_quantizer(self, init_bits: float, headroom: float) -> None:
        w = self.weight
        n = w.shape[0]
        module: nn.Module = self  # type: ignore[assignment]
        module.bits = nn.Parameter(torch.full((n,), float(init_bits), device=w.device, dtype=torch.float32))
        module.exponent = nn.Parameter(init_exponent(w, float(init_bits), headroom).to(w.device))
        module.register_buffer("pruned", torch.zeros(n, dtype=torch.bool, device=w.device))
        module.__dict__["modes"] = TwinModes()

    @property
    def out_channels_(self) -> int:
        """Number of output channels (rows of the weight)."""
        return int(self.weight.shape[0])

    @property
    def fan_in(self) -> int:
        """Weights per output channel."""
        return int(self.weight[0].numel())

    modes: TwinModes

    def _versions(self) -> tuple[int, int, int, int]:
        """In-place modification counters of the tensors the quantized weight depends on."""
        module: nn.Module = self  # type: ignore[assignment]
        params, buffers = module._parameters, module._buffers  # direct reads: this runs on every forward
        weight, bits, exponent = params["weight"], params["bits"], params["exponent"]
        assert weight is not None and bits is not None and exponent is not None
        return (weight._version, bits._version, exponent._version, buffers["pruned"]._version)  # type: ignore[union-attr]

    def quantized_weight(self) -> Tensor:
        """The weight the layer computes with: quantized at the current ``bits``/``exponent``, differentiable.

        Inside :meth:`~lightning_sgsc.quant.fused.FusedQuantizer.step` (one training step) this is the layer's
        slice of the step's single fused quantizer pass, as long as none of its tensors changed in place since.
        """
        modes = self.modes
        if modes.float_weight:  # inside float_weights(): the uncompressed layer
            return self.weight
        fused = modes.fused
        if fused is not None and torch.is_grad_enabled() and fused[1] == self._versions():
            q = fused[0].to(self.weight.dtype)
        else:
            q = quantize(self.weight, self.bits, self.exponent, self.pruned)
        if modes.probe is not None:  # inside quant.modes.weight_probes()
            q = q + modes.probe.to(q.dtype)
        return q

    def effective_bits(self) -> Tensor:
        """``max(bits, 0)`` per channel, 0 where pruned (differentiable)."""
        return effective_bits(self.bits, self.pruned)

    @torch.no_grad()
    def integer_weight(self) -> Tensor:
        """The stored integers per weight (``int32``); ``2**exponent * integer_weight`` is the quantized weight."""
        return quantize_int(self.weight, self.bits, self.exponent, self.pruned)

    @classmethod
    def from_float(
        cls, module: nn.Module, init_bits: float = 8.0, init_headroom: float | None = None
    ) -> QuantizedLayer:
        """Builds the twin of ``module``, sharing its ``weight`` and ``bias`` Parameters.

        Args:
            module: an instance of exactly ``cls.float_cls`` (subclasses with their own ``forward`` are refused,
                since the twin would drop that forward).
            init_bits: starting bit depth of every channel, from 2 to 16.
            init_headroom: bits of room above each channel's largest weight at the start (see
                :func:`resolve_headroom`; ``None``: 2, or ``init_bits - 2`` if less).

        Raises:
            SGSCTypeError: ``module`` is not a plain ``cls.float_cls``.
            SGSCValueError: ``init_bits`` is outside 2–16, or ``init_headroom`` outside 0 to ``init_bits - 2``.
        """
        from lightning_sgsc.errors import SGSCTypeError, SGSCValueError, describe_rule

        if type(module) is not cls.float_cls:
            raise SGSCTypeError(describe_rule("module", f"an instance of {cls.float_cls.__name__}", type(module)))
        if not isinstance(init_bits, (int, float)) or not MIN_INIT_BITS <= float(init_bits) <= MAX_BITS:
            raise SGSCValueError(describe_rule("init_bits", "a number from 2 to 16", init_bits))
        headroom = resolve_headroom(float(init_bits), init_headroom, arg="init_headroom")
        twin = cls.__new__(cls)
        _copy_module_state(module, twin)  # type: ignore[arg-type]
        twin._init_quantizer(float(init_bits), headroom)
        return twin

    def to_float(self, bake: bool = True) -> nn.Module:
        """Converts back to a plain float layer.

        Args:
            bake: ``True``: the new layer's weight is a new Parameter holding the quantized weight, so it computes
                exactly what the twin computes in eval mode. ``False``: the new layer shares the original float
                ``weight`` Parameter (undoes the swap).
        """
        module: nn.Module = self  # type: ignore[assignment]
        out = self.float_cls.__new__(self.float_cls)
        _copy_module_state(module, out)
        del out._parameters["bits"], out._parameters["exponent"], out._buffers["pruned"]
        out.__dict__.pop("modes", None)
        if bake:
            with torch.no_grad():
                out.weight = nn.Parameter(self.quantized_weight().detach().clone(), self.weight.requires_grad)
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


class QuantLinear(QuantizedLayer, nn.Linear):
    """Quantized twin of :class:`torch.nn.Linear`."""

    float_cls = nn.Linear

    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.quantized_weight(), self.bias)


class QuantConv1d(QuantizedLayer, nn.Conv1d):
    """Quantized twin of :class:`torch.nn.Conv1d`."""

    float_cls = nn.Conv1d

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.quantized_weight(), self.bias)


class QuantConv2d(QuantizedLayer, nn.Conv2d):
    """Quantized twin of :class:`torch.nn.Conv2d`."""

    float_cls = nn.Conv2d

    def forward(self, input: Tensor) -> Tensor:
        return self._conv_forward(input, self.quantized_weight(), self.bias)


TWIN_FOR: dict[type[nn.Module], type[QuantizedLayer]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
}


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    """Every twin in ``model`` as ``(fully qualified name, module)``, in ``named_modules`` order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLayer)]


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``bits`` and ``exponent`` Parameters of every twin (for their own optimizer param group)."""
    params: list[nn.Parameter] = []
    for _, layer in quantized_layers(model):
        params += [layer.bits, layer.exponent]
    return params


def quantizer_state_ids(model: nn.Module) -> set[int]:
    """``id`` of every twin's ``bits``, ``exponent`` and ``pruned`` tensor: training-time state that a compressed
    artifact does not keep (its integers and scales stand for it). Found by owner, not by name."""
    return {id(t) for _, layer in quantized_layers(model) for t in (layer.bits, layer.exponent, layer.pruned)}


def stored_tensors(model: nn.Module) -> list[tuple[str, Tensor]]:
    """The ``state_dict`` tensors a compressed artifact stores as they are: each distinct tensor once (tied weights
    count once), without the twins' quantizer state."""
    skip = quantizer_state_ids(model)
    seen: set[int] = set()
    out = []
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in skip and id(t) not in seen:
            seen.add(id(t))
            out.append((name, t))
    return out
