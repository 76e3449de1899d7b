"""Packed ops: pure-torch references, and dispatch to ``torch.ops.deltacomp.*`` when the C++
extension is built.

Layouts (shared by every implementation, references included):

  SIGNS (uint8, shape (*lead, ceil(K / 8))): bit i (LSB = 0) of byte j holds element 8*j + i along the
      last axis K; bit 1 means value >= 0 (sign +1), bit 0 means value < 0 (sign -1). Padding bits past
      K are 0. A (N, K) weight is packed row by row, along K (the reduction axis of x @ W^T).

The reference functions below are the specification: every kernel is tested against them.
"""
from __future__ import annotations

import warnings

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)

# -- extension loading ------------------------------------------------------------------------------
_EXT_ERROR: str | None = None
try:  # the compiled extension registers torch.ops.deltacomp.* on import
    from . import _C  # noqa: F401
    HAS_EXTENSION = True
except ImportError as exc:  # pragma: no cover - depends on the build
    HAS_EXTENSION = False
    _EXT_ERROR = str(exc)

_warned = False


def _use_ext() -> bool:
    global _warned
    if not HAS_EXTENSION and not _warned:
        _warned = True
        warnings.warn(
            f"deltacomp: C++ extension not built ({_EXT_ERROR}); using the slower pure-torch ops. "
            "Build it with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=3,
        )
    return HAS_EXTENSION


# -- references -------------------------------------------------------------------------------------
def pack_signs_ref(x: Tensor) -> Tensor:
    """Pack ``x >= 0`` along the last axis into uint8 (SIGNS layout)."""
    k = x.shape[-1]
    pad = (-k) % 8
    bits = (x >= 0).to(torch.uint8)
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*x.shape[:-1], (k + pad) // 8, 8)
    return (bits * _BIT_WEIGHTS).sum(-1, dtype=torch.uint8)


def unpack_signs_ref(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of pack_signs: +1/-1 values of shape (*lead, k)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs: packed must be uint8, got {packed.dtype}")
    nbytes = packed.shape[-1]
    if not (nbytes - 1) * 8 < k <= nbytes * 8:
        raise ValueError(f"unpack_signs: k={k} does not fit {nbytes} bytes per row (needs {(k + 7) // 8})")
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS) != 0
    bits = bits.reshape(*packed.shape[:-1], nbytes * 8)[..., :k]
    return bits.to(dtype) * 2 - 1


def sign_matmul_ref(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (scale * sign)^T``; x (M, K), packed (N, ceil(K/8)), scale fp32 of shape () / (1,) / (N,)."""
    signs = unpack_signs_ref(packed, k, torch.float32)
    y = x.to(torch.float32) @ signs.T
    return (y * scale.to(torch.float32)).to(x.dtype)


# -- public entry points (extension when built, reference otherwise) -------------------------------
def pack_signs(x: Tensor) -> Tensor:
    if _use_ext() and x.dim() == 2 and x.dtype == torch.float32:
        return torch.ops.deltacomp.pack_signs(x.contiguous())
    return pack_signs_ref(x)


def unpack_signs(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    if _use_ext() and packed.dim() == 2 and dtype == torch.float32:
        return torch.ops.deltacomp.unpack_signs(packed.contiguous(), k)
    return unpack_signs_ref(packed, k, dtype)


def sign_matmul(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    if _use_ext() and x.dim() == 2:
        return torch.ops.deltacomp.sign_matmul(x.contiguous(), packed.contiguous(), scale.float().contiguous(), k)
    return sign_matmul_ref(x, packed, scale, k)
