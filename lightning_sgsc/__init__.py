"""lightning-sgsc: safety-guided self-compression for PyTorch Lightning.

The public API is small: the callback and its settings, the mixin, the in-place swap and its twins, the size report,
the preservation set, and the compressed artifact. Names are imported on first use (PEP 562), so
``import lightning_sgsc.export`` reads and writes artifacts with torch alone, without importing Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.3.0"

_EXPORTS: dict[str, str] = {
    "SafetyGuidedQuantization": "lightning_sgsc.callback",
    "SafetyGuidedMixin": "lightning_sgsc.mixin",
    "Quantization": "lightning_sgsc.config",
    "Losses": "lightning_sgsc.config",
    "Preservation": "lightning_sgsc.config",
    "Feedback": "lightning_sgsc.config",
    "Budget": "lightning_sgsc.config",
    "build_preservation_set": "lightning_sgsc.preservation.build",
    "PreservationSet": "lightning_sgsc.preservation.set",
    "runtime_session": "lightning_sgsc.deploy",
    "AlreadyQuantizedError": "lightning_sgsc.errors",
    "SGSCError": "lightning_sgsc.errors",
    "SGSCRuntimeError": "lightning_sgsc.errors",
    "SGSCTypeError": "lightning_sgsc.errors",
    "SGSCValueError": "lightning_sgsc.errors",
    "QuantConv1d": "lightning_sgsc.quant",
    "QuantConv2d": "lightning_sgsc.quant",
    "QuantLinear": "lightning_sgsc.quant",
    "QuantizedLayer": "lightning_sgsc.quant",
    "dequantize_": "lightning_sgsc.quant",
    "quantize_": "lightning_sgsc.quant",
    "ModelSize": "lightning_sgsc.size",
    "model_size": "lightning_sgsc.size",
    "export_compressed": "lightning_sgsc.export",
    "load_compressed": "lightning_sgsc.export",
    "prune_zero_channels": "lightning_sgsc.prune",
    "export_onnx": "lightning_sgsc.deploy",
}

__all__ = sorted([*_EXPORTS, "__version__"])

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lightning_sgsc.callback import SafetyGuidedQuantization
    from lightning_sgsc.config import Budget, Feedback, Losses, Preservation, Quantization
    from lightning_sgsc.deploy import export_onnx, runtime_session
    from lightning_sgsc.errors import (
        AlreadyQuantizedError,
        SGSCError,
        SGSCRuntimeError,
        SGSCTypeError,
        SGSCValueError,
    )
    from lightning_sgsc.export import export_compressed, load_compressed
    from lightning_sgsc.mixin import SafetyGuidedMixin
    from lightning_sgsc.preservation.build import build_preservation_set
    from lightning_sgsc.preservation.set import PreservationSet
    from lightning_sgsc.prune import prune_zero_channels
    from lightning_sgsc.quant import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear, dequantize_, quantize_
    from lightning_sgsc.size import ModelSize, model_size


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_sgsc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
