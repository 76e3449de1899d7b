"""svd-mixed's serving term: every bit-width group of a layer in one ``kbit_lowrank_matmul_groups`` call,
with the op's arguments (the groups' tensor lists, bit widths, shape) gathered once, not per call."""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import allocation as al
from ... import environment, ops, ops_tl, plans
from ...quant import tl4
from ..base import Encoded
from ..term import DeltaTerm

_FIELDS = ("v_q", "v_scale", "v_zero", "u_q", "u_scale", "u_zero")


@functools.lru_cache(maxsize=256)
def alloc_groups(alloc: str | None) -> tuple[tuple[int, int | None], ...]:
    """``al.parse_groups`` of a stored allocation, parsed once per distinct text (every layer of a
    decode step asks)."""
    return tuple(al.parse_groups(alloc)) if alloc else ()


def group_args(enc: Encoded, get=None) -> tuple:
    """The arguments of ``ops.kbit_lowrank_matmul_groups`` after x: six lists (one entry per bit-width
    group, in the stored order), s, the bit widths, n, k and the group size. ``get(field)``: where the
    tensors come from (default ``enc.tensors``)."""
    get = enc.tensors.__getitem__ if get is None else get
    bits = [b for b, _ in alloc_groups(enc.params.get("alloc"))]
    lists = tuple([get(f"{f[0]}_{f[2:]}{b}") for b in bits] for f in _FIELDS)
    s = get("s") if bits else torch.zeros(0)
    n, k = enc.shape
    return (*lists, s, bits, int(n), int(k), int(enc.params["group_size"]))


def tl4_lists(args: tuple) -> tuple | None:
    """The TL4 repacks (``quant.tl4``, by the C++ op: ``ops_tl.pack_tl4``) of the 1- and 2-bit groups' V and
    U^T: the five extra lists of ``kbit_lowrank_matmul_groups_tl`` (empty tensors for the other groups), or
    None when no group has one or the kernels would not use them: the paths with the int8 tables take
    them (``ops_tl.tables_path``: AVX2, NEON, portable), and
    DELTACOMP_LOWRANK_KERNEL=exact or direct asks for the exact path (both read here once, when the term
    gathers its arguments)."""
    v_q, v_scale, v_zero, u_q, u_scale, u_zero = args[:6]
    bits, n, k, gs = args[7:]
    if (not ops_tl.tables_path() or environment.choice("DELTACOMP_LOWRANK_KERNEL") in ("exact", "direct")
            or not any(tl4.supports(b, gs) and vs.shape[0] for b, vs in zip(bits, v_scale))):
        return None
    codes, halves = torch.zeros(0, dtype=torch.uint8), torch.zeros(0, 0, dtype=torch.float16)
    out = tuple([] for _ in range(5))
    for g, b in enumerate(bits):
        r = v_scale[g].shape[0]
        v = ops_tl.pack_tl4(v_q[g], v_scale[g], b, k, gs) if tl4.supports(b, gs) and r else (codes, halves[None])
        u = (ops_tl.pack_tl4_u(u_q[g], u_scale[g], u_zero[g], b, n, gs) if tl4.supports_u(b, gs, r)
             else (codes, halves, halves))
        for lst, t in zip(out, (*v, *u)):
            lst.append(t)
    return out


class SvdMixedTerm(DeltaTerm):
    """``x2 @ delta^T`` by one ``kbit_lowrank_matmul_groups`` call. On the CPU with the extension the op
    is called straight (no wrapper, no per-call tensor calls: x2 may be strided, the op copies it once);
    elsewhere (CUDA, float64 x, no extension) through ``ops.kbit_lowrank_matmul_groups``. On the AVX2, NEON
    and portable paths the 1- and 2-bit groups' V and U^T are also repacked once (``tl4_lists``: as many
    bytes again as those codes) for ``kbit_lowrank_matmul_groups_tl``, whose stages 1 and 3 at one x row go through int8
    lookup tables (inexact; DELTACOMP_LOWRANK_KERNEL=exact keeps the exact kernels)."""

    def __init__(self, codec, enc: Encoded):
        super().__init__(codec, enc)
        self._args: tuple | None = None  # group_args of the buffers, until they move (_apply)
        self._direct = False  # every buffer on the CPU with the dtypes the op takes, and the extension built
        self._tl: tuple | None = None  # tl4_lists of the buffers (direct only)
        self._call: tuple | None = None  # (the op's own callable, every argument after x): direct only

    def _apply(self, fn, *args, **kwargs):
        self._args = self._call = None
        return super()._apply(fn, *args, **kwargs)

    def _prepare(self) -> tuple:
        args = group_args(self.encoded(), self.tensor)
        args = (*args[:6], args[6].to(torch.float32).contiguous(), *args[7:])
        lists, s = args[:6], args[6]
        self._direct = (s.device.type == "cpu" and all(t.device.type == "cpu" for ts in lists for t in ts)
                        and all(t.dtype == torch.uint8 for t in (*lists[0], *lists[3]))
                        and all(t.dtype == torch.float16 for ts in (lists[1], lists[2], lists[4], lists[5])
                                for t in ts)
                        and ops._ext_on())
        self._tl = tl4_lists(args) if self._direct else None
        self._args = args
        if self._direct:
            # the overload's own callable (what OpOverload.__call__ calls): a Python frame and the packet's
            # lookup less per call, which a decode step pays in every layer; a torch.compile trace keeps
            # the packet (forward)
            packet = (torch.ops.deltacomp.kbit_lowrank_matmul_groups if self._tl is None
                      else torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl)
            op = getattr(getattr(packet, "default", None), "_op", packet)
            self._call = (op, args if self._tl is None else (*args, *self._tl))
        return args

    def layer_plan(self, weight: Tensor, bias: Tensor | None, extra: Tensor | None, mode: str, rows: int):
        """``plans.lowrank`` of the kept arguments, where the op is called straight: mode "torch" at any number
        of rows, "own" at one, "rows" at several where the term has TL4 repacks (each row then takes the int8
        tables)."""
        if mode == "fused" or (mode == "own" and rows != 1) or not plans.enabled():
            return None
        if self._args is None:
            self._prepare()
        if not self._direct or (mode == "rows" and (rows < 2 or self._tl is None)):
            return None
        return plans.lowrank(weight, bias, extra, mode, self._args, self._tl)

    def forward(self, x2: Tensor) -> Tensor:
        args = self._args
        if args is None:
            args = self._prepare()
        call = self._call
        if call is not None and x2.is_cpu and x2.dtype in ops._MATMUL_DTYPES:
            if not torch.compiler.is_compiling():
                return call[0](x2, *call[1])
            if self._tl is not None:
                return torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x2, *args, *self._tl)
            return torch.ops.deltacomp.kbit_lowrank_matmul_groups(x2, *args)
        return ops.kbit_lowrank_matmul_groups(x2, *args).to(x2.dtype)
