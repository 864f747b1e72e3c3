"""Model outputs as libraries return them, reduced to the one tensor the package works with.

One documented convention, used everywhere the package runs a model (preservation scoring and terms, the default
feedback metric, :func:`~lightning_sgsc.prune_zero_channels`, :func:`~lightning_sgsc.export_onnx`): the ``logits``
of an output that has them (transformers' ``ModelOutput``, or a dict with a ``"logits"`` key), else the first tensor
found (a tuple, a list, a dict's first tensor value, a dataclass's first tensor field), else the tensor itself. Pass
``output_fn`` where a function takes one to choose otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor, nn

from lightning_sgsc.errors import SGSCTypeError, describe_rule

OutputFn = Callable[[Any], Tensor]


def _first_tensor(output: Any) -> Tensor | None:
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    if isinstance(output, Mapping):
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    elif dataclasses.is_dataclass(output):
        values = [getattr(output, f.name) for f in dataclasses.fields(output)]
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def main_output(output: Any, output_fn: OutputFn | None = None) -> Tensor:
    """The tensor of ``output`` the package works with (see the module docstring), or ``output_fn(output)``.

    Raises:
        SGSCTypeError: there is no tensor in ``output`` (pass ``output_fn``).
    """
    if output_fn is not None:
        chosen = output_fn(output)
        if not isinstance(chosen, Tensor):
            raise SGSCTypeError(describe_rule("output_fn(output)", "a Tensor", type(chosen)))
        return chosen
    found = _first_tensor(output)
    if found is None:
        raise SGSCTypeError(
            describe_rule(
                "model output", "a Tensor, or logits / a tensor inside a tuple, dict or ModelOutput", type(output)
            )
            + " Pass `output_fn=` to say which tensor to use."
        )
    return found


class MainOutput(nn.Module):
    """``model`` returning :func:`main_output` of its output (for exporters and tracers that need a tensor)."""

    def __init__(self, model: nn.Module, output_fn: OutputFn | None = None) -> None:
        super().__init__()
        self.model = model
        self.output_fn = output_fn

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return main_output(self.model(*args, **kwargs), self.output_fn)
