"""bitdelta's serving terms: the packed signs (``sign_matmul``), fused with a dense base weight in one
pass (``sign_matmul_fused``), and every tenant of a batch in one ``sign_matmul_multi`` call (or, when
every row is one single-mask tenant, that tenant fused with the base weight: ``fused_one``; or, rows of
several single-mask tenants, each row through the int8 tables: ``tables_rows``).

At one x row (a decode step) on the AVX2, NEON and portable paths, a single-mask term takes
``sign_matmul_tl`` instead: the sign dots by int8 lookup tables (T-MAC style, inexact), on the signs
repacked once, at the first such call, into the TL4 layout (``ops_tl.pack_tl4_signs``: as many bytes again
as the signs). Whether a term does is decided when it is built (``ops_tl.sign_tl_wanted``:
DELTACOMP_SIGN_KERNEL=exact keeps the exact kernels)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ... import ops, ops_tl, plans
from ...quant import tl4
from ..base import Encoded
from ..term import DeltaTerm, moved

_FUSED_DTYPES = (torch.float32, torch.bfloat16)
_EMPTY_U8, _EMPTY_F32 = torch.empty(0, dtype=torch.uint8), torch.empty(0)  # a row of no tenant (tables_rows)


def _tables_wanted(k: int) -> bool:
    """Whether terms of rows of k weights take the int8 tables at one x row (``ops_tl.sign_tl_wanted``)."""
    return tl4.supports_signs(k) and ops_tl.sign_tl_wanted()


def _repacked(kept: tuple[Tensor, int, Tensor] | None, signs: Tensor, k: int) -> tuple[Tensor, int, Tensor]:
    """``kept`` (signs, their version, their TL4 repack) while it is of this signs tensor, unchanged (``.to()``
    replaces it; an in-place write bumps its version), else a new repack."""
    if kept is None or kept[0] is not signs or kept[1] != signs._version:
        kept = (signs, signs._version, ops_tl.pack_tl4_signs(signs, k))
    return kept


def field(base: str, i: int) -> str:
    """Tensor field of mask i: ``signs``/``scale`` for the first, ``signs_i``/``scale_i`` after."""
    return base if i == 0 else f"{base}_{i}"


class BitDeltaTerm(DeltaTerm):
    """The default term (``BitDeltaCodec.matmul``, one ``sign_matmul`` per mask), plus the fused path
    (one pass over the base weight and the signs). Whether a batch takes the fused path is measured per
    machine and shape by serve/dispatch.py."""

    def __init__(self, codec, enc: Encoded, tensors: dict[str, Tensor] | None = None):
        super().__init__(codec, enc, tensors)
        self._tl_on = int(self.params.get("masks", 1)) == 1 and _tables_wanted(self.shape[1])
        self._tl_kept: tuple[Tensor, int, Tensor] | None = None  # (signs, their version, their TL4 repack)

    def fuses_with(self, weight: Tensor) -> bool:
        return weight.dtype in _FUSED_DTYPES and int(self.params.get("masks", 1)) == 1

    def fused(self, x2: Tensor, weight: Tensor) -> Tensor:
        buffers = self._buffers  # (not getattr: nn.Module's lookup costs more than the dict's, per layer per token)
        if self._tl_on and x2.shape[0] == 1 and x2.is_cpu:
            n, k = self.shape
            return ops_tl.sign_matmul_tl(x2, weight, self._tl_signs(), buffers["t_scale"], n, k)
        return ops.sign_matmul_fused(x2, weight, buffers["t_signs"], buffers["t_scale"], self.shape[1])

    def forward(self, x2: Tensor) -> Tensor:
        if self._tl_on and x2.shape[0] == 1 and x2.is_cpu:
            return ops_tl.sign_matmul_tl(x2, None, self._tl_signs(), self._buffers["t_scale"], self.shape[0],
                                      self.shape[1])
        return super().forward(x2)

    def layer_plan(self, weight: Tensor, bias: Tensor | None, extra: Tensor | None, mode: str, rows: int):
        """``plans.sign_tl`` where this term takes the int8 tables (``_tl_on``): at one x row (modes "torch",
        "own", "fused"), or row by row at several (mode "rows")."""
        signs = self._buffers["t_signs"]
        if ((rows > 1) != (mode == "rows") or not self._tl_on or not signs.is_cpu or not plans.enabled()
                or (mode == "fused" and not self.fuses_with(weight))):
            return None
        scale = self._buffers["t_scale"]
        return plans.sign_tl(weight, bias, extra, mode, self._tl_signs(), scale.to(torch.float32).contiguous(),
                             [signs, scale], self.shape[0], self.shape[1])

    def _tl_signs(self) -> Tensor:
        """The signs' TL4 repack, built at the first call and kept (``_repacked``)."""
        self._tl_kept = _repacked(self._tl_kept, self._buffers["t_signs"], self.shape[1])
        return self._tl_kept[2]

    def _apply(self, fn, *args, **kwargs):
        self._tl_kept = None
        return super()._apply(fn, *args, **kwargs)


class SignStacks(nn.Module):
    """Every bitdelta tenant of one layer: one SIGNS stack per mask level; ``slots{l}[t]`` = position of
    tenant t in level l's stack, -1 when tenant t has no mask l (it adds nothing at that level)."""

    def __init__(self, encs: Sequence[Encoded | None]):
        super().__init__()
        first = next(e for e in encs if e is not None)
        self.n, self.k = first.shape
        self.levels = max(int(e.params.get("masks", 1)) for e in encs if e is not None)
        # slot of tenant t in level 0's stack when t has exactly one mask (fused_one serves it), else -1
        self._views: dict[int, tuple[Tensor, ...]] = {}  # tenant -> (stacks, views) for fused_one
        self._tl: dict[int, tuple[Tensor, int, Tensor]] = {}  # tenant -> (its signs view, version, TL4 repack)
        self._tl_on = _tables_wanted(self.k)
        self._one = [t_slot if e is not None and int(e.params.get("masks", 1)) == 1 else -1
                     for e, t_slot in zip(encs, _slots(encs))]
        for lv in range(self.levels):
            members = [t for t, e in enumerate(encs) if e is not None and field("signs", lv) in e.tensors]
            slots = torch.full((len(encs),), -1, dtype=torch.int64)
            slots[members] = torch.arange(len(members))
            scales = [encs[t].tensors[field("scale", lv)].to(torch.float32) for t in members]
            if any(s.dim() for s in scales):
                scales = [(s.expand(self.n) if s.dim() == 0 or s.numel() == 1 else s).reshape(self.n) for s in scales]
            else:
                scales = [s.reshape(()) for s in scales]
            self.register_buffer(f"slots{lv}", slots, persistent=False)
            self.register_buffer(f"signs{lv}", torch.stack([encs[t].tensors[field("signs", lv)] for t in members]),
                                 persistent=False)
            self.register_buffer(f"scales{lv}", torch.stack(scales).contiguous(), persistent=False)

    def fuses_one(self, t: int, weight: Tensor) -> bool:
        """True when tenant t's term (one mask) fuses with the base ``weight`` (fp32/bf16): ``fused_one``."""
        return 0 <= t < len(self._one) and self._one[t] >= 0 and weight.dtype in _FUSED_DTYPES

    def fused_one(self, x2: Tensor, weight: Tensor, t: int) -> Tensor:
        """``x2 @ (weight + delta_t)^T`` in one pass (every row of x2 is tenant t; see ``fuses_one``); at one
        x row on a path with int8 tables, by int8 tables on tenant t's signs repacked at its first such call."""
        signs, scales = self._one_tensors(t)
        if self._tl_on and x2.shape[0] == 1 and x2.is_cpu:
            tl = self._tl[t] = _repacked(self._tl.get(t), signs, self.k)
            return ops_tl.sign_matmul_tl(x2, weight, tl[2], scales, self.n, self.k)
        return ops.sign_matmul_fused(x2, weight, signs, scales, self.k)

    def layer_plan_one(self, t: int, weight: Tensor, bias: Tensor | None, extra: Tensor | None, rows: int,
                       mode: str = "fused"):
        """``plans.sign_tl`` of tenant t's ``fused_one(x2, weight, t) + bias (+ extra)`` at one x row (mode
        "fused"), of base + its term at one x row (the base by mode "torch" or "own"), or of base + its term
        row by row at several (mode "rows"), where this layer takes the int8 tables; else None."""
        if ((rows > 1) != (mode == "rows") or not self._tl_on or not self.fuses_one(t, weight)
                or not plans.enabled()):
            return None
        signs, scales = self._one_tensors(t)
        if not signs.is_cpu:
            return None
        tl = self._tl[t] = _repacked(self._tl.get(t), signs, self.k)
        return plans.sign_tl(weight, bias, extra, mode, tl[2], scales.contiguous(), [signs, scales], self.n, self.k)

    def _one_tensors(self, t: int) -> tuple[Tensor, Tensor]:
        """Tenant t's signs and scale in level 0's stacks, the views kept between calls (a decode step asks
        for them in every layer) for as long as the stacks are the same tensors (``.to()`` replaces them)."""
        stacks = (self._buffers["signs0"], self._buffers["scales0"])
        kept = self._views.get(t)
        if kept is None or kept[0] is not stacks[0] or kept[1] is not stacks[1]:
            slot = self._one[t]
            kept = self._views[t] = (*stacks, stacks[0][slot], stacks[1][slot])
        return kept[2], kept[3]

    def _apply(self, fn, *args, **kwargs):
        self._views, self._tl = {}, {}  # .to() and the like replace the stacks: drop the views and repacks
        moved()
        return super()._apply(fn, *args, **kwargs)

    def tables_serve(self, x2: Tensor, idx: Tensor) -> bool:
        """Whether ``tables_rows`` serves this batch: this layer takes the int8 tables, x2 is on the CPU, at
        least one row has a tenant, and every row's tenant has one mask (or none: -1)."""
        if not self._tl_on or not x2.is_cpu or x2.dim() != 2 or not ops_tl.rows_op_built():
            return False
        one = self._one
        tenants = idx.tolist()
        return (any(t >= 0 for t in tenants)
                and all(t < 0 or (t < len(one) and one[t] >= 0) for t in tenants))

    def tables_rows(self, x2: Tensor, idx: Tensor) -> Tensor:
        """``forward(x2, idx)`` with each row's sign dots through the int8 tables, on its tenant's signs
        (repacked at that tenant's first such call), in one ``sign_matmul_tl_rows`` call; rows of tenant -1 are
        zero. Only where ``tables_serve``; inexact, as at one x row."""
        s_tl, scale = [], []
        for t in idx.tolist():
            if t < 0:
                s_tl.append(_EMPTY_U8)
                scale.append(_EMPTY_F32)
                continue
            signs, scales = self._one_tensors(t)
            tl = self._tl[t] = _repacked(self._tl.get(t), signs, self.k)
            s_tl.append(tl[2])
            scale.append(scales)
        return ops_tl.sign_matmul_tl_rows(x2, s_tl, scale, self.n, self.k)

    def forward(self, x2: Tensor, idx: Tensor) -> Tensor | None:
        """x2 (M, K), idx (M,) tenant per row (-1: none) -> (M, N), or None when no row has a mask."""
        out = None
        for lv in range(self.levels):
            slots = getattr(self, f"slots{lv}")
            sel = torch.where(idx >= 0, slots[idx.clamp(min=0)], -1)
            if bool((sel >= 0).any()):
                term = ops.sign_matmul_multi(x2, getattr(self, f"signs{lv}"), getattr(self, f"scales{lv}"), sel,
                                             self.k)
                out = term if out is None else out + term
        return out


def _slots(encs: Sequence[Encoded | None]) -> list[int]:
    """Position of each tenant in level 0's stack (the tenants with a mask 0, in order), -1 for none."""
    out, n = [], 0
    for e in encs:
        has = e is not None and field("signs", 0) in e.tensors
        out.append(n if has else -1)
        n += has
    return out
