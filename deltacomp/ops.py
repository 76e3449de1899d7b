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
    return (bits * _BIT_WEIGHTS.to(x.device)).sum(-1, dtype=torch.uint8)


def unpack_signs_ref(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Inverse of pack_signs: +1/-1 values of shape (*lead, k)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_signs: packed must be uint8, got {packed.dtype}")
    nbytes = packed.shape[-1]
    if k < 0 or nbytes != (k + 7) // 8:
        raise ValueError(f"unpack_signs: k={k} needs {(k + 7) // 8} bytes per row, but packed has {nbytes}")
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0
    bits = bits.reshape(*packed.shape[:-1], nbytes * 8)[..., :k]
    return bits.to(dtype) * 2 - 1


def _check_sign_matmul(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> None:
    if x.shape[-1] != k:
        raise ValueError(f"sign_matmul: x has {x.shape[-1]} columns (shape {tuple(x.shape)}) but k={k}")
    if packed.dim() != 2:
        raise ValueError(f"sign_matmul: packed must be 2-D (N, ceil(k/8)), got shape {tuple(packed.shape)}")
    n = packed.shape[0]
    if not (scale.dim() <= 1 and scale.numel() == 1) and tuple(scale.shape) != (n,):
        raise ValueError(f"sign_matmul: scale must have shape () or (1,) (per tensor) or ({n},) (one per row "
                         f"of packed), got {tuple(scale.shape)}")


def sign_matmul_ref(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (scale * sign)^T``; x (M, K), packed (N, ceil(K/8)), scale fp32 of shape () / (1,) / (N,).

    Accumulates in fp32 and returns x.dtype.
    """
    _check_sign_matmul(x, packed, scale, k)
    signs = unpack_signs_ref(packed, k, torch.float32)
    y = x.to(torch.float32) @ signs.T
    return (y * scale.to(torch.float32)).to(x.dtype)


# -- public entry points (extension when built, reference otherwise) -------------------------------
# Each op: its fake (meta) kernel, for torch.compile / FakeTensor tracing, sits beside its wrapper;
# the schemas are declared once in csrc/ops.cpp.
_MATMUL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# Devices the extension has kernels for ("meta": shapes only, through the fake kernels below).
_EXT_DEVICES = ("cpu", "meta")
if HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("deltacomp::sign_matmul", "CUDA"):
    _EXT_DEVICES = ("cpu", "meta", "cuda")


def _ext_on(*tensors: Tensor) -> bool:
    """True when the extension is built and has kernels for every tensor's device."""
    return _use_ext() and all(t.device.type in _EXT_DEVICES for t in tensors)


def pack_signs(x: Tensor) -> Tensor:
    """Signs of ``x`` packed along the last axis (SIGNS layout), uint8 of shape (*lead, ceil(K/8))."""
    if _ext_on(x) and x.dim() == 2 and x.dtype == torch.float32:
        return torch.ops.deltacomp.pack_signs(x.contiguous())
    return pack_signs_ref(x)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::pack_signs")
    def _pack_signs_fake(x: Tensor) -> Tensor:
        torch._check(x.dim() == 2, lambda: f"pack_signs: x must be 2-D, got shape {tuple(x.shape)}")
        torch._check(x.dtype == torch.float32, lambda: f"pack_signs: x must be float32, got {x.dtype}")
        return x.new_empty((x.shape[0], (x.shape[1] + 7) // 8), dtype=torch.uint8)


def unpack_signs(packed: Tensor, k: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """+1/-1 values (``dtype``) of shape (*lead, k) from SIGNS-packed uint8 (*lead, ceil(k/8))."""
    if _ext_on(packed) and packed.dim() == 2 and packed.dtype == torch.uint8 and dtype == torch.float32:
        return torch.ops.deltacomp.unpack_signs(packed.contiguous(), k)
    return unpack_signs_ref(packed, k, dtype)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::unpack_signs")
    def _unpack_signs_fake(packed: Tensor, k: int) -> Tensor:
        torch._check(packed.dim() == 2 and packed.dtype == torch.uint8,
                     lambda: f"unpack_signs: packed must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
        torch._check(packed.shape[1] == (k + 7) // 8,
                     lambda: f"unpack_signs: k={k} needs {(k + 7) // 8} bytes per row, packed has {packed.shape[1]}")
        return packed.new_empty((packed.shape[0], k), dtype=torch.float32)


def sign_matmul(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (scale * sign)^T`` without building the dense sign matrix.

    x (M, K) fp32/bf16/fp16, packed SIGNS (N, ceil(K/8)), scale fp32 () / (1,) per tensor or (N,) per
    row. Accumulates in fp32; returns (M, N) in x.dtype.
    """
    if (_ext_on(x, packed, scale) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES
            and packed.dim() == 2 and packed.dtype == torch.uint8):
        return torch.ops.deltacomp.sign_matmul(x.contiguous(), packed.contiguous(),
                                               scale.to(torch.float32).contiguous(), k)
    return sign_matmul_ref(x, packed, scale, k)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::sign_matmul")
    def _sign_matmul_fake(x: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
        torch._check(x.dim() == 2 and packed.dim() == 2,
                     lambda: f"sign_matmul: x and packed must be 2-D, got {tuple(x.shape)}, {tuple(packed.shape)}")
        torch._check(x.shape[1] == k, lambda: f"sign_matmul: x has {x.shape[1]} columns but k={k}")
        torch._check(packed.shape[1] == (k + 7) // 8,
                     lambda: f"sign_matmul: k={k} needs {(k + 7) // 8} bytes per row, packed has {packed.shape[1]}")
        return x.new_empty((x.shape[0], packed.shape[0]))
