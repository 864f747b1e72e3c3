"""Quantizer math (:mod:`.functional`), quantized twins (:mod:`.modules`) and the in-place swap (:mod:`.swap`)."""

from lightning_sgsc.quant.functional import quantize, quantize_int, required_bits
from lightning_sgsc.quant.modules import (
    QuantConv1d,
    QuantConv2d,
    QuantizedLayer,
    QuantLinear,
    quantized_layers,
    quantizer_parameters,
)
from lightning_sgsc.quant.swap import dequantize_, quantize_, select_layers, swap_report

__all__ = [
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizedLayer",
    "dequantize_",
    "quantize",
    "quantize_",
    "quantize_int",
    "quantized_layers",
    "quantizer_parameters",
    "required_bits",
    "select_layers",
    "swap_report",
]
