"""Quantizers and quantized modules: every quantizer kind (registered by importing this package), observers,
and the generic quantized layers that model families build from."""

from vitq.quant import keep_float, log, mixed, twin, uniform  # noqa: F401  (each registers its kinds)
from vitq.quant.base import QUANTIZER_KINDS, Quantizer, make_quantizer, passthrough, quantizers_of, register_quantizer
from vitq.quant.uniform import Log2Quantizer, PTFQuantizer, UniformQuantizer

__all__ = ["QUANTIZER_KINDS", "Log2Quantizer", "PTFQuantizer", "Quantizer", "UniformQuantizer", "make_quantizer",
           "passthrough", "quantizers_of", "register_quantizer"]
