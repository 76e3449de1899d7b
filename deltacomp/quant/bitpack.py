"""Dense packing of k-bit unsigned codes (k = 1..8) into a uint8 bit stream.

Layout KBITS (little-endian bit order, no padding between codes):
    code i (0-based, in flattened row-major order) occupies stream bits p = i*k + j, j = 0..k-1, where
    bit j is the j-th least significant bit of the code; stream bit p is bit (p % 8) (LSB = 0) of byte
    p // 8. So a 3-bit stream holds 8 codes in every 3 bytes and codes straddle byte boundaries.
    The packed tensor is 1-D with ceil(count*k / 8) bytes; padding bits in the last byte are 0.

For k = 1 this matches the SIGNS layout of ops.py row by row only when each row's length is a multiple
of 8 (SIGNS pads every row; KBITS pads only the end of the stream).
"""
from __future__ import annotations

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def packed_nbytes(count: int, bits: int) -> int:
    """Bytes used by ``count`` codes of ``bits`` bits in the KBITS layout."""
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bit width must be an int in 1..8, got {bits!r}")


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """Pack uint8 ``codes`` (any shape, each < 2**bits) into a 1-D uint8 KBITS stream."""
    _check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"pack_bits: codes must be uint8, got {codes.dtype}")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) >= (1 << bits):
        raise ValueError(f"pack_bits: a code is {int(flat.max())}, which does not fit in {bits} bits")
    if bits == 8:
        return flat.clone()
    count = flat.numel()
    nbytes = packed_nbytes(count, bits)
    shifts = torch.arange(bits, dtype=torch.uint8, device=flat.device)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # bit j of code i at position i*bits + j
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = _BIT_WEIGHTS.to(flat.device)
    return (stream.reshape(nbytes, 8) * weights).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, bits: int, count: int) -> Tensor:
    """Inverse of pack_bits: the first ``count`` codes of a KBITS stream, as a 1-D uint8 tensor."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise TypeError(f"unpack_bits: packed must be 1-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    need = packed_nbytes(count, bits)
    if packed.numel() != need:
        raise ValueError(f"unpack_bits: {count} codes of {bits} bits need {need} bytes, got {packed.numel()}")
    if bits == 8:
        return packed.clone()
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed[:, None] >> shifts) & 1).reshape(-1)[: count * bits]
    weights = (torch.ones(bits, dtype=torch.uint8, device=packed.device) << torch.arange(
        bits, dtype=torch.uint8, device=packed.device))
    return (stream.reshape(count, bits) * weights).sum(-1, dtype=torch.uint8)
