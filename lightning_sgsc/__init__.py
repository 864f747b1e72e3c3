"""lightning-sgsc: safety-guided self-compression for PyTorch Lightning.

The public API is small: the callback, the mixin, the in-place swap and its twins, and the size report.
"""

from lightning_sgsc.callback import SafetyGuidedQuantization
from lightning_sgsc.errors import AlreadyQuantizedError, SGSCError, SGSCRuntimeError, SGSCTypeError, SGSCValueError
from lightning_sgsc.mixin import SafetyGuidedMixin
from lightning_sgsc.quant import QuantConv1d, QuantConv2d, QuantizedLayer, QuantLinear, dequantize_, quantize_
from lightning_sgsc.size import ModelSize, model_size

__version__ = "0.1.0"

__all__ = [
    "AlreadyQuantizedError",
    "ModelSize",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "SGSCError",
    "SGSCRuntimeError",
    "SGSCTypeError",
    "SGSCValueError",
    "SafetyGuidedMixin",
    "SafetyGuidedQuantization",
    "__version__",
    "dequantize_",
    "model_size",
    "quantize_",
]
