"""Quantization: weight-only int8 / int4 with group-wise scales (:mod:`.weight_only`), used by
:class:`parallel.zero.inference.StreamedInference` (``quantize="int8" | "int4"``)."""
from parallel.quant.codec import UnitCodec, roundtrip
from parallel.quant.weight_only import QMAX, dequantize_groups, quantize_groups

__all__ = ["UnitCodec", "roundtrip", "quantize_groups", "dequantize_groups", "QMAX"]
