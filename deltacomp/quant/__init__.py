"""Shared quantization primitives: dense k-bit packing (bitpack) and the RTN group quantizer (rtn)."""
from .bitpack import packed_nbytes, pack_bits, unpack_bits
from .rtn import dequantize, quantize, quantized_nbytes

__all__ = ["packed_nbytes", "pack_bits", "unpack_bits", "quantize", "dequantize", "quantized_nbytes"]
