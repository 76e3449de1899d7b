"""Packed ops: pure-torch references, and dispatch to ``torch.ops.deltacomp.*`` when the C++
extension is built.

Layouts (shared by every implementation, references included):

  SIGNS (uint8, shape (*lead, ceil(K / 8))): bit i (LSB = 0) of byte j holds element 8*j + i along the
      last axis K; bit 1 means value >= 0 (sign +1), bit 0 means value < 0 (sign -1). Padding bits past
      K are 0. A (N, K) weight is packed row by row, along K (the reduction axis of x @ W^T).
  SIGNS stack (uint8, (T, N, ceil(K / 8))): T SIGNS matrices of one shape, one per delta (tenant).
  TERNARY_CSR (runtime form of a ternary delta T (N, K) in {-1, 0, +1}; built once from the codec's
      decoded support by ``ternary_runtime``, never stored on disk): ``row_ptr`` int64 (N + 1),
      ``neg_start`` int64 (N), ``cols`` int32 (nnz). Row r is +1 at columns cols[row_ptr[r] :
      neg_start[r]] and -1 at cols[neg_start[r] : row_ptr[r + 1]] (positives first, so kernels never
      branch on a sign); columns ascend within each part.
  KBITS factors (svd-mixed, one bit-width group of r singular vectors; quant/bitpack.py, quant/rtn.py):
      ``v_q`` uint8 1-D KBITS stream of r*K ``bits``-bit codes, V row j = codes [j*K, (j+1)*K);
      ``u_q`` likewise r*N codes, row j of U^T = codes [j*N, (j+1)*N); ``v_scale``/``v_zero`` fp16
      (r, ceil(K / group_size)), ``u_scale``/``u_zero`` fp16 (r, ceil(N / group_size)): element c of a
      row is zero[g] + code * scale[g] with g = c // group_size; ``s`` fp32 (r,).
  TL4 (run-time form of the V codes of a 1- or 2-bit group, built at load time by ``ops_tl.pack_tl4``,
      the C++ op ``tl4_pack``; layout and torch reference in deltacomp/quant/tl4.py), and of U^T with the
      output columns as its rows: taken by ``kbit_lowrank_matmul_groups_tl`` for stages 1 and 3 at one x
      row by int8 tables on AVX2 (inexact: x, and the stage-1 result times U's scales, are quantized
      through their tables).

The reference functions below are the specification: every kernel is tested against them.
"""
from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

from . import environment
from .quant.bitpack import unpack_bits

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


def sign_matmul_fused_ref(x: Tensor, w_base: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (w_base + scale * sign)^T``; the effective weight is formed in fp32 (not rounded to w_base's
    dtype), accumulated in fp32, returned in x.dtype."""
    _check_sign_matmul(x, packed, scale, k)
    if tuple(w_base.shape) != (packed.shape[0], k):
        raise ValueError(f"sign_matmul_fused: w_base has shape {tuple(w_base.shape)}, packed needs "
                         f"({packed.shape[0]}, {k})")
    s = scale.to(torch.float32).reshape(-1, 1) if scale.dim() else scale.to(torch.float32)
    w = w_base.to(torch.float32) + unpack_signs_ref(packed, k, torch.float32) * s
    return (x.to(torch.float32) @ w.T).to(x.dtype)


def sign_matmul_multi_ref(x: Tensor, packed: Tensor, scales: Tensor, index: Tensor, k: int) -> Tensor:
    """Multi-tenant (decode): row i of the result is ``x[i] @ (scales[t] * sign_t)^T``, t = index[i];
    zeros where index[i] == -1. packed: SIGNS stack (T, N, ceil(k/8)); scales fp32 (T,) or (T, N);
    index int64 (M,)."""
    if packed.dim() != 3:
        raise ValueError(f"sign_matmul_multi: packed must be a 3-D stack (T, N, ceil(k/8)), got {tuple(packed.shape)}")
    t_count, n = packed.shape[0], packed.shape[1]
    if tuple(scales.shape) not in ((t_count,), (t_count, n)):
        raise ValueError(f"sign_matmul_multi: scales must have shape ({t_count},) or ({t_count}, {n}), "
                         f"got {tuple(scales.shape)}")
    if index.dim() != 1 or index.shape[0] != x.shape[0]:
        raise ValueError(f"sign_matmul_multi: index must be 1-D with one entry per row of x ({x.shape[0]}), "
                         f"got shape {tuple(index.shape)}")
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= t_count):
        raise ValueError(f"sign_matmul_multi: index values must be in [-1, {t_count}), got "
                         f"[{int(index.min())}, {int(index.max())}]")
    y = torch.zeros(x.shape[0], n, dtype=x.dtype, device=x.device)
    for t in range(t_count):
        rows = (index == t).nonzero().reshape(-1)
        if rows.numel():
            y[rows] = sign_matmul_ref(x[rows], packed[t], scales[t], k)
    return y


def ternary_runtime(positions: Tensor, signs: Tensor, shape: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """TERNARY_CSR runtime form from a decoded support: ``positions`` int64 sorted flat indices into an
    (N, K) matrix, ``signs`` bool (True = +1). Returns (row_ptr, neg_start, cols)."""
    n, k = shape
    pos = torch.as_tensor(positions, dtype=torch.int64).reshape(-1)
    neg = ~torch.as_tensor(signs, dtype=torch.bool).reshape(-1)
    if pos.numel() != neg.numel():
        raise ValueError(f"ternary_runtime: {pos.numel()} positions but {neg.numel()} signs")
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= n * k):
        raise ValueError(f"ternary_runtime: positions must be in [0, {n * k}) for shape {tuple(shape)}")
    rows = pos // k
    order = torch.argsort(rows * 2 + neg.to(torch.int64), stable=True)  # by row, positives first
    counts = torch.bincount(rows, minlength=n)
    row_ptr = torch.zeros(n + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    neg_start = row_ptr[:-1] + torch.bincount(rows[~neg], minlength=n)
    return row_ptr, neg_start, (pos[order] % k).to(torch.int32).contiguous()


def ternary_dense_ref(row_ptr: Tensor, neg_start: Tensor, cols: Tensor, k: int) -> Tensor:
    """The dense (N, k) float32 matrix in {-1, 0, +1} of a TERNARY_CSR form."""
    n = row_ptr.shape[0] - 1
    counts = row_ptr[1:] - row_ptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n), counts)
    j = torch.arange(cols.shape[0])
    sign = torch.where(j < neg_start[rows], 1.0, -1.0)
    out = torch.zeros(n, k, dtype=torch.float32)
    out[rows, cols.to(torch.int64)] = sign
    return out


def ternary_matmul_ref(x: Tensor, row_ptr: Tensor, neg_start: Tensor, cols: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (scale * T)^T`` with T the dense ternary matrix of the TERNARY_CSR form; fp32 accumulation,
    x.dtype out. scale fp32 () / (1,) / (N,)."""
    if x.shape[-1] != k:
        raise ValueError(f"ternary_matmul: x has {x.shape[-1]} columns (shape {tuple(x.shape)}) but k={k}")
    t = ternary_dense_ref(row_ptr, neg_start, cols, k)
    s = scale.to(torch.float32).reshape(-1, 1) if scale.dim() else scale.to(torch.float32)
    return (x.to(torch.float32) @ (t * s).T).to(x.dtype)


def _check_lowrank(x: Tensor, v_q: Tensor, v_scale: Tensor, v_zero: Tensor, u_q: Tensor, u_scale: Tensor,
                   u_zero: Tensor, s: Tensor, bits: int, n: int, k: int, group_size: int) -> None:
    op = "kbit_lowrank_matmul"
    if not 1 <= bits <= 8 or group_size < 1 or n < 0 or k < 0:
        raise ValueError(f"{op}: need bits in 1..8, group_size >= 1, n, k >= 0; got bits={bits}, "
                         f"group_size={group_size}, n={n}, k={k}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{op}: x must be (M, k={k}), got shape {tuple(x.shape)}")
    if s.dim() != 1:
        raise ValueError(f"{op}: s must be 1-D (r,), got shape {tuple(s.shape)}")
    r = s.shape[0]
    for name, q, sc, z, length in (("v", v_q, v_scale, v_zero, k), ("u", u_q, u_scale, u_zero, n)):
        need = (r * length * bits + 7) // 8
        if q.dim() != 1 or q.numel() != need:
            raise ValueError(f"{op}: {r} x {length} codes of {bits} bits need {need} bytes, but {name}_q has "
                             f"shape {tuple(q.shape)}")
        g = (length + group_size - 1) // group_size
        if tuple(sc.shape) != (r, g) or tuple(z.shape) != (r, g):
            raise ValueError(f"{op}: {name}_scale and {name}_zero must have shape ({r}, {g}), got "
                             f"{tuple(sc.shape)}, {tuple(z.shape)}")


def _dequant_rows(q: Tensor, scale: Tensor, zero: Tensor, bits: int, rows: int, length: int, group_size: int,
                  dtype: torch.dtype) -> Tensor:
    """(rows, length) values zero + code * scale in ``dtype`` (float64 holds every one exactly)."""
    codes = unpack_bits(q, bits, rows * length).reshape(rows, length).to(dtype)
    rep = min(group_size, max(length, 1))  # a group spans at most the row: a huge group size costs no memory
    sc = scale.to(dtype).repeat_interleave(rep, dim=1)[:, :length]
    z = zero.to(dtype).repeat_interleave(rep, dim=1)[:, :length]
    return z + codes * sc


def kbit_lowrank_matmul_ref(x: Tensor, v_q: Tensor, v_scale: Tensor, v_zero: Tensor, u_q: Tensor, u_scale: Tensor,
                            u_zero: Tensor, s: Tensor, bits: int, n: int, k: int, group_size: int) -> Tensor:
    """``x @ (U diag(s) V)^T`` for one svd-mixed group (KBITS factors), by dequantizing U and V.

    Computes in float64 when x is float64, else in fp32; returns (M, n) in x.dtype."""
    _check_lowrank(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k, group_size)
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    r = s.shape[0]
    v = _dequant_rows(v_q, v_scale, v_zero, bits, r, k, group_size, dt)    # (r, k)
    ut = _dequant_rows(u_q, u_scale, u_zero, bits, r, n, group_size, dt)   # (r, n)
    return (((x.to(dt) @ v.T) * s.to(dt)) @ ut).to(x.dtype)


def kbit_lowrank_matmul_groups_ref(x: Tensor, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s: Tensor, bits,
                                   n: int, k: int, group_size: int) -> Tensor:
    """Every group of an svd-mixed layer: the sum over g of ``kbit_lowrank_matmul_ref`` of group g
    (list entries g; rank r_g = v_scale[g].shape[0]; s the groups' values in order)."""
    if not len(v_q) == len(v_scale) == len(v_zero) == len(u_q) == len(u_scale) == len(u_zero) == len(bits):
        raise ValueError(f"kbit_lowrank_matmul_groups: {len(bits)} bit widths but factor lists of "
                         f"{[len(t) for t in (v_q, v_scale, v_zero, u_q, u_scale, u_zero)]} entries")
    ranks = [int(t.shape[0]) for t in v_scale]
    if s.dim() != 1 or s.shape[0] != sum(ranks):
        raise ValueError(f"kbit_lowrank_matmul_groups: the groups have {sum(ranks)} rows in all, s has shape "
                         f"{tuple(s.shape)}")
    y, i = x.new_zeros(x.shape[0], n, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32), 0
    for g, r in enumerate(ranks):
        y += kbit_lowrank_matmul_ref(x, v_q[g], v_scale[g], v_zero[g], u_q[g], u_scale[g], u_zero[g], s[i:i + r],
                                     bits[g], n, k, group_size).to(y.dtype)
        i += r
    return y.to(x.dtype)


# -- public entry points (extension when built, reference otherwise) -------------------------------
# Each op: its fake (meta) kernel, for torch.compile / FakeTensor tracing, sits beside its wrapper;
# the schemas are declared once in csrc/ops.cpp.
_MATMUL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# The CUDA kernels (csrc/cuda) are opt-in until a GPU run has checked them against the references:
# DELTACOMP_CUDA_KERNELS=1 turns them on, =0 off; unset means _CUDA_KERNELS_DEFAULT. Without them, CUDA
# tensors take the pure-torch references (correct, slower).
_CUDA_KERNELS_DEFAULT = False
CUDA_KERNELS_BUILT = HAS_EXTENSION and torch._C._dispatch_has_kernel_for_dispatch_key("deltacomp::sign_matmul", "CUDA")


def cuda_kernels_enabled() -> bool:
    """True when CUDA tensors go to the extension's CUDA kernels (built, and not switched off)."""
    flag = environment.choice("DELTACOMP_CUDA_KERNELS")
    return CUDA_KERNELS_BUILT and (flag == "1" if flag else _CUDA_KERNELS_DEFAULT)


def _ext_devices() -> tuple[str, ...]:
    """Devices the extension has kernels for ("meta": shapes only, through the fake kernels below)."""
    return ("cpu", "meta", "cuda") if cuda_kernels_enabled() else ("cpu", "meta")


def _ext_on(*tensors: Tensor) -> bool:
    """True when the extension is built and has kernels for every tensor's device (CPU tensors, the
    decode path of a small model, are answered without reading the environment)."""
    if not _use_ext():
        return False
    for t in tensors:
        if not t.is_cpu:
            devices = _ext_devices()
            return all(u.device.type in devices for u in tensors)
    return True


def cpu_isa() -> str:
    """The CPU code path the kernels take now: "avx512", "avx2", "neon" or "portable" (the environment
    variable DELTACOMP_ISA forces one; read on every call), or "torch" without the extension."""
    return str(torch.ops.deltacomp.cpu_isa()) if HAS_EXTENSION else "torch"


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


def _sign_fake_checks(op: str, x: Tensor, k: int) -> None:
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D, got {tuple(x.shape)}")
    torch._check(x.shape[1] == k, lambda: f"{op}: x has {x.shape[1]} columns but k={k}")


_CPU_FUSED_W = (torch.float32, torch.bfloat16)


def sign_matmul_fused(x: Tensor, w_base: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (w_base + scale * sign)^T`` in one pass over the base weight and the signs (a base linear
    layer and its BitDelta term together). w_base fp32/bf16 (N, K), fp16 too on CUDA; the rest as
    ``sign_matmul``."""
    if (HAS_EXTENSION and x.is_cpu and w_base.is_cpu and packed.is_cpu and scale.is_cpu and x.dim() == 2
            and x.dtype in _MATMUL_DTYPES and w_base.dtype in _CPU_FUSED_W and packed.dtype == torch.uint8
            and scale.dtype == torch.float32):  # the decode path, checked in as few steps as it can
        op = _FUSED_OP if torch.compiler.is_compiling() else _FUSED_OP_CALL
        return op(x.contiguous(), w_base.contiguous(), packed.contiguous(), scale.contiguous(), k)
    # fp16 bases have a CUDA kernel; the CPU kernels take fp32/bf16 (fp16 goes to the reference there)
    w_ok = w_base.dtype in (torch.float32, torch.bfloat16) or (w_base.dtype == torch.float16 and w_base.is_cuda)
    if (_ext_on(x, w_base, packed, scale) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES and w_ok
            and packed.dtype == torch.uint8):
        return _FUSED_OP(x.contiguous(), w_base.contiguous(), packed.contiguous(),
                         scale.to(torch.float32).contiguous(), k)
    return sign_matmul_fused_ref(x, w_base, packed, scale, k)


if HAS_EXTENSION:
    # the overload itself: calling it skips the packet's overload resolution (a few microseconds a call,
    # which a 135M model's decode step pays 210 times); outside a torch.compile trace, the overload's own
    # callable (what OpOverload.__call__ calls: 1.7 us less a call), traced code keeps the OpOverload
    _FUSED_OP = torch.ops.deltacomp.sign_matmul_fused.default
    _FUSED_OP_CALL = getattr(_FUSED_OP, "_op", _FUSED_OP)

    @torch.library.register_fake("deltacomp::sign_matmul_fused")
    def _sign_matmul_fused_fake(x: Tensor, w_base: Tensor, packed: Tensor, scale: Tensor, k: int) -> Tensor:
        _sign_fake_checks("sign_matmul_fused", x, k)
        torch._check(w_base.dim() == 2 and w_base.shape[1] == k,
                     lambda: f"sign_matmul_fused: w_base must be (N, {k}), got {tuple(w_base.shape)}")
        torch._check(tuple(packed.shape) == (w_base.shape[0], (k + 7) // 8),
                     lambda: f"sign_matmul_fused: packed must be ({w_base.shape[0]}, {(k + 7) // 8}), "
                             f"got {tuple(packed.shape)}")
        return x.new_empty((x.shape[0], w_base.shape[0]))


def sign_matmul_multi(x: Tensor, packed: Tensor, scales: Tensor, index: Tensor, k: int) -> Tensor:
    """Multi-tenant decode (BGMV-style): row i uses delta ``index[i]`` of the SIGNS stack ``packed``
    (T, N, ceil(k/8)) with ``scales`` (T,) or (T, N); -1 gives a zero row. Rows sharing a delta are
    grouped inside the kernel, so one call also serves prefill; for long prefill segments of one delta,
    ``sign_matmul`` on each contiguous row range does the same work without the gather."""
    if (_ext_on(x, packed, scales, index) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES
            and packed.dim() == 3 and packed.dtype == torch.uint8):
        return torch.ops.deltacomp.sign_matmul_multi(x.contiguous(), packed.contiguous(),
                                                     scales.to(torch.float32).contiguous(),
                                                     index.to(torch.int64).contiguous(), k)
    return sign_matmul_multi_ref(x, packed, scales.to(torch.float32), index.to(torch.int64), k)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::sign_matmul_multi")
    def _sign_matmul_multi_fake(x: Tensor, packed: Tensor, scales: Tensor, index: Tensor, k: int) -> Tensor:
        _sign_fake_checks("sign_matmul_multi", x, k)
        torch._check(packed.dim() == 3 and packed.shape[2] == (k + 7) // 8,
                     lambda: f"sign_matmul_multi: packed must be (T, N, {(k + 7) // 8}), got {tuple(packed.shape)}")
        torch._check(index.dim() == 1 and index.shape[0] == x.shape[0],
                     lambda: f"sign_matmul_multi: index must be ({x.shape[0]},), got {tuple(index.shape)}")
        return x.new_empty((x.shape[0], packed.shape[1]))


def ternary_matmul(x: Tensor, row_ptr: Tensor, neg_start: Tensor, cols: Tensor, scale: Tensor, k: int) -> Tensor:
    """``x @ (scale * T)^T`` for a ternary T in its TERNARY_CSR runtime form (see ``ternary_runtime``):
    a signed sparse gather-add per output row, the dense T never built. x (M, K) fp32/bf16/fp16."""
    if (_ext_on(x, row_ptr, neg_start, cols, scale) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES):
        return torch.ops.deltacomp.ternary_matmul(x.contiguous(), row_ptr.contiguous(), neg_start.contiguous(),
                                                  cols.contiguous(), scale.to(torch.float32).contiguous(), k)
    return ternary_matmul_ref(x, row_ptr, neg_start, cols, scale, k)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::ternary_matmul")
    def _ternary_matmul_fake(x: Tensor, row_ptr: Tensor, neg_start: Tensor, cols: Tensor, scale: Tensor,
                             k: int) -> Tensor:
        _sign_fake_checks("ternary_matmul", x, k)
        torch._check(row_ptr.dim() == 1 and row_ptr.shape[0] >= 1,
                     lambda: f"ternary_matmul: row_ptr must be 1-D (N + 1,), got {tuple(row_ptr.shape)}")
        return x.new_empty((x.shape[0], row_ptr.shape[0] - 1))


def kbit_lowrank_matmul(x: Tensor, v_q: Tensor, v_scale: Tensor, v_zero: Tensor, u_q: Tensor, u_scale: Tensor,
                        u_zero: Tensor, s: Tensor, bits: int, n: int, k: int, group_size: int) -> Tensor:
    """``x @ (U diag(s) V)^T`` for one bit-width group of an svd-mixed delta (KBITS factors, see the
    layouts above), decoding the codes on the fly: t = x V^T, t *= s, y = t U^T^T; the dense U, V and
    delta are never built. x (M, k) fp32/bf16/fp16 (fp32 accumulation) -> (M, n) in x.dtype; float64 x
    and devices without a kernel go to the reference."""
    if (_ext_on(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES
            and v_q.dtype == u_q.dtype == torch.uint8
            and v_scale.dtype == v_zero.dtype == u_scale.dtype == u_zero.dtype == torch.float16):
        c = Tensor.contiguous
        return torch.ops.deltacomp.kbit_lowrank_matmul(c(x), c(v_q), c(v_scale), c(v_zero), c(u_q), c(u_scale),
                                                       c(u_zero), c(s.to(torch.float32)), bits, n, k, group_size)
    return kbit_lowrank_matmul_ref(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k, group_size)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::kbit_lowrank_matmul")
    def _kbit_lowrank_matmul_fake(x: Tensor, v_q: Tensor, v_scale: Tensor, v_zero: Tensor, u_q: Tensor,
                                  u_scale: Tensor, u_zero: Tensor, s: Tensor, bits: int, n: int, k: int,
                                  group_size: int) -> Tensor:
        _sign_fake_checks("kbit_lowrank_matmul", x, k)
        torch._check(s.dim() == 1, lambda: f"kbit_lowrank_matmul: s must be 1-D (r,), got {tuple(s.shape)}")
        torch._check(1 <= bits <= 8, lambda: f"kbit_lowrank_matmul: bits must be in 1..8, got {bits}")
        torch._check(v_q.dim() == 1 and v_q.shape[0] == (s.shape[0] * k * bits + 7) // 8,
                     lambda: f"kbit_lowrank_matmul: v_q must hold r*k {bits}-bit codes, got {tuple(v_q.shape)}")
        torch._check(u_q.dim() == 1 and u_q.shape[0] == (s.shape[0] * n * bits + 7) // 8,
                     lambda: f"kbit_lowrank_matmul: u_q must hold r*n {bits}-bit codes, got {tuple(u_q.shape)}")
        return x.new_empty((x.shape[0], n))


def kbit_lowrank_matmul_groups(x: Tensor, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s: Tensor, bits, n: int,
                               k: int, group_size: int) -> Tensor:
    """Every bit-width group of an svd-mixed layer in one op call: the sum over the groups g of
    ``kbit_lowrank_matmul`` (list entry g of each factor list, bits[g], group g's rank v_scale[g].shape[0],
    s the groups' singular values one after the other). x (M, k) fp32/bf16/fp16 -> (M, n) in x.dtype.
    The CPU kernel sums the groups in its accumulators; other devices (CUDA) call the one-group op per
    group; float64 x goes to the reference."""
    if (x.device.type in ("cpu", "meta") and _ext_on(x, s) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES
            and all(t.device == x.device and t.dtype == torch.uint8 for t in (*v_q, *u_q))
            and all(t.device == x.device and t.dtype == torch.float16 for t in (*v_scale, *v_zero, *u_scale, *u_zero))):
        return torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero,
                                                              s.to(torch.float32).contiguous(), bits, n, k,
                                                              group_size)
    if x.dtype == torch.float64:
        return kbit_lowrank_matmul_groups_ref(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k, group_size)
    y, i = None, 0  # one op call per group, summed in fp32
    x2 = x.to(torch.float32)
    for g, b in enumerate(bits):
        r = v_scale[g].shape[0]
        term = kbit_lowrank_matmul(x2, v_q[g], v_scale[g], v_zero[g], u_q[g], u_scale[g], u_zero[g], s[i:i + r], b,
                                   n, k, group_size)
        y = term if y is None else y + term
        i += r
    return (x2.new_zeros(x.shape[0], n) if y is None else y).to(x.dtype)


def kbit_lowrank_matmul_groups_tl(x: Tensor, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s: Tensor, bits, n: int,
                                  k: int, group_size: int, v_tl, v_tl_scale, u_tl, u_tl_scale, u_tl_zero) -> Tensor:
    """``kbit_lowrank_matmul_groups`` with the TL4 repacks of ``quant.tl4`` (five lists, see the op in
    csrc/ops.cpp): the CPU kernel with them (int8 tables at one x row on AVX2, inexact), else the exact op."""
    if x.device.type in ("cpu", "meta") and _ext_on(x, s) and x.dim() == 2 and x.dtype in _MATMUL_DTYPES:
        return torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero,
                                                                 s.to(torch.float32).contiguous(), bits, n, k,
                                                                 group_size, v_tl, v_tl_scale, u_tl, u_tl_scale,
                                                                 u_tl_zero)
    return kbit_lowrank_matmul_groups(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k, group_size)


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::kbit_lowrank_matmul_groups")
    def _kbit_lowrank_matmul_groups_fake(x: Tensor, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s: Tensor, bits,
                                         n: int, k: int, group_size: int) -> Tensor:
        op = "kbit_lowrank_matmul_groups"
        torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D, got shape {tuple(x.shape)}")
        torch._check(x.shape[1] == k, lambda: f"{op}: x has {x.shape[1]} columns but k={k}")
        torch._check(len(v_q) == len(bits), lambda: f"{op}: {len(bits)} bit widths but {len(v_q)} v_q tensors")
        torch._check(s.dim() == 1 and s.shape[0] == sum(t.shape[0] for t in v_scale),
                     lambda: f"{op}: s must hold the groups' {sum(t.shape[0] for t in v_scale)} values")
        return x.new_empty((x.shape[0], n))

    @torch.library.register_fake("deltacomp::kbit_lowrank_matmul_groups_tl")
    def _kbit_lowrank_matmul_groups_tl_fake(x: Tensor, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s: Tensor, bits,
                                            n: int, k: int, group_size: int, v_tl, v_tl_scale, u_tl, u_tl_scale,
                                            u_tl_zero) -> Tensor:
        torch._check(all(len(t) == len(bits) for t in (v_tl, v_tl_scale, u_tl, u_tl_scale, u_tl_zero)),
                     lambda: f"kbit_lowrank_matmul_groups_tl: {len(bits)} bit widths but {len(v_tl)} v_tl tensors")
        return _kbit_lowrank_matmul_groups_fake(x, v_q, v_scale, v_zero, u_q, u_scale, u_zero, s, bits, n, k,
                                                group_size)
