"""Wrappers of the int8 lookup-table (TL4) CPU ops, split from ops.py: the load-time repacks into the TL4
layout (``tl4_pack``: svd-mixed's V and U^T, bitdelta's signs; ``quant/tl4.py`` is their torch reference)
and bitdelta's sign delta at one x row (``sign_matmul_tl``). svd-mixed's int8 matmul is
``ops.kbit_lowrank_matmul_groups_tl``. Fake kernels beside each op, as in ops.py."""
from __future__ import annotations


import torch
from torch import Tensor

from . import environment
from .ops import HAS_EXTENSION, _ext_on, _sign_fake_checks, cpu_isa
from .quant import tl4


def _tl4_native(q: Tensor, bits: int, count: int) -> bool:
    """Whether the C++ repack takes this code stream (else quant.tl4's torch version: other devices, and
    a stream of the wrong size or dtype, which it refuses with its own error)."""
    return (q.device.type == "cpu" and _ext_on(q) and q.dtype == torch.uint8 and q.dim() == 1
            and q.numel() == (count * bits + 7) // 8)


def pack_tl4(v_q: Tensor, v_scale: Tensor, bits: int, k: int, group_size: int) -> tuple[Tensor, Tensor]:
    """``quant.tl4.pack_tl4`` (the torch reference; the same bytes, the same errors) by the C++ op
    ``tl4_pack`` for CPU codes: (v_tl, v_tl_scale) of one group's V, at load time."""
    r = v_scale.shape[0]
    if not _tl4_native(v_q, bits, r * k):
        return tl4.pack_tl4(v_q, v_scale, bits, k, group_size)
    tl4.check("V", bits, group_size, tl4.supports(bits, group_size))
    return torch.ops.deltacomp.tl4_pack(v_q.contiguous(), bits, r, k, group_size, False), tl4.tile_scales(v_scale)


def pack_tl4_u(u_q: Tensor, u_scale: Tensor, u_zero: Tensor, bits: int, n: int,
               group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """``quant.tl4.pack_tl4_u`` by the C++ op ``tl4_pack`` (transposed) for CPU codes, as ``pack_tl4``."""
    r = u_scale.shape[0]
    if not _tl4_native(u_q, bits, r * n):
        return tl4.pack_tl4_u(u_q, u_scale, u_zero, bits, n, group_size)
    tl4.check("U", bits, group_size, tl4.supports_u(bits, group_size, r))
    return (torch.ops.deltacomp.tl4_pack(u_q.contiguous(), bits, n, r, r, True), u_scale.T.contiguous(),
            u_zero.T.contiguous())


if HAS_EXTENSION:
    @torch.library.register_fake("deltacomp::tl4_pack")
    def _tl4_pack_fake(q: Tensor, bits: int, rows: int, length: int, group_size: int, transposed: bool) -> Tensor:
        torch._check(bits in (1, 2), lambda: f"tl4_pack: no TL4 layout for {bits}-bit codes (1 or 2 bits)")
        torch._check(group_size >= 1, lambda: f"tl4_pack: group_size must be >= 1, got {group_size}")
        torch._check(q.dim() == 1 and q.shape[0] == (rows * length * bits + 7) // 8,
                     lambda: f"tl4_pack: q must hold {rows} x {length} codes of {bits} bits, got {tuple(q.shape)}")
        tiles = (rows + tl4.ROWS - 1) // tl4.ROWS
        return q.new_empty((tiles * tl4.row_groups(length, group_size) * 16 * bits,))


def pack_tl4_signs(signs: Tensor, k: int) -> Tensor:
    """``quant.tl4.pack_tl4_signs`` (the torch reference) by the C++ op ``tl4_pack`` where the SIGNS rows are
    one KBITS stream of 1-bit codes (k % 8 == 0: no padding bits between rows), for CPU signs."""
    n = signs.shape[0] if signs.dim() == 2 else 0
    if signs.dim() == 2 and k % 8 == 0 and tl4.supports_signs(k) and _tl4_native(signs.reshape(-1), 1, n * k):
        return torch.ops.deltacomp.tl4_pack(signs.contiguous().reshape(-1), 1, n, k, k, False)
    return tl4.pack_tl4_signs(signs, k)


# -- the sign delta at one x row by int8 lookup tables (inexact; AVX2, NEON, portable) ---------------------
_SIGN_EXACT = ("exact", "simd", "lut8")  # DELTACOMP_SIGN_KERNEL values that keep the exact kernels


TABLE_PATHS = ("avx2", "neon", "portable")  # the extension's code paths with int8-table kernels


def tables_path() -> bool:
    """Whether the kernels' code path now (``ops.cpu_isa``, DELTACOMP_ISA honoured) has the int8-table
    kernels of one x row: AVX2 (vpshufb), NEON and portable (a 16-byte table lookup: tbl, pshufb); the
    AVX-512 path keeps its exact kernels."""
    return HAS_EXTENSION and cpu_isa() in TABLE_PATHS


def sign_tl_wanted() -> bool:
    """Whether bitdelta's serving terms take ``sign_matmul_tl`` at one x row: a path with the int8 tables
    (``tables_path``), unless DELTACOMP_SIGN_KERNEL is ``exact`` (or names another exact kernel).
    The terms read this when they are built (when a model is patched), not on every call."""
    return tables_path() and environment.choice("DELTACOMP_SIGN_KERNEL") not in _SIGN_EXACT


def sign_matmul_tl(x: Tensor, w_base: Tensor | None, s_tl: Tensor, scale: Tensor, n: int, k: int) -> Tensor:
    """``x @ (w_base + scale * sign)^T`` (or the delta alone, w_base None) for one x row (1, K), the sign
    dots by int8 lookup tables (inexact: x is quantized through its tables, as in the svd-mixed int8 path);
    ``s_tl`` the signs repacked by ``quant.tl4.pack_tl4_signs`` (K % 4 == 0). The AVX2, NEON and portable paths
    only (``sign_tl_wanted``); scale fp32 () / (1,) / (N,)."""
    base = _EMPTY if w_base is None else w_base.contiguous()
    op = _TL_OP if torch.compiler.is_compiling() else _TL_OP_CALL  # (see ops._FUSED_OP_CALL)
    return op(x.contiguous(), base, s_tl, scale.to(torch.float32).contiguous(), n, k)


def rows_op_built() -> bool:
    """Whether the extension has ``sign_matmul_tl_rows`` (a build from before it has not)."""
    return _TL_ROWS is not None


def sign_matmul_tl_rows(x: Tensor, s_tl: list[Tensor], scale: list[Tensor], n: int, k: int) -> Tensor:
    """``sign_matmul_tl``'s delta for each row of x (M, K) on its own signs: row i with ``s_tl[i]`` (a TL4 repack,
    or an empty tensor for a zero row) and ``scale[i]`` (fp32, () / (1,) / (N,)), in one call -> (M, N). Needs
    the op in the build (``rows_op_built``)."""
    return _TL_ROWS_OP(x.contiguous(), s_tl, scale, n, k)


# None: an extension built before the op (tables_rows is then not offered; SignStacks.tables_serve)
_TL_ROWS = getattr(torch.ops.deltacomp, "sign_matmul_tl_rows", None) if HAS_EXTENSION else None

if _TL_ROWS is not None:
    _TL_ROWS_OP = _TL_ROWS.default

    @torch.library.register_fake("deltacomp::sign_matmul_tl_rows")
    def _sign_matmul_tl_rows_fake(x: Tensor, s_tl: list[Tensor], scale: list[Tensor], n: int, k: int) -> Tensor:
        _sign_fake_checks("sign_matmul_tl_rows", x, k)
        return x.new_empty((x.shape[0], n))

if HAS_EXTENSION:
    _EMPTY = torch.empty(0)

    _TL_OP = torch.ops.deltacomp.sign_matmul_tl.default
    _TL_OP_CALL = getattr(_TL_OP, "_op", _TL_OP)

    @torch.library.register_fake("deltacomp::sign_matmul_tl")
    def _sign_matmul_tl_fake(x: Tensor, w_base: Tensor, s_tl: Tensor, scale: Tensor, n: int, k: int) -> Tensor:
        _sign_fake_checks("sign_matmul_tl", x, k)
        torch._check(x.shape[0] == 1, lambda: f"sign_matmul_tl: x must have one row, got {tuple(x.shape)}")
        return x.new_empty((1, n))
