"""bitdelta's serving terms: the packed signs (``sign_matmul``), fused with a dense base weight in one
pass (``sign_matmul_fused``), and every tenant of a batch in one ``sign_matmul_multi`` call (or, when
every row is one single-mask tenant, that tenant fused with the base weight: ``fused_one``)."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ... import ops
from ..base import Encoded
from ..term import DeltaTerm

_FUSED_DTYPES = (torch.float32, torch.bfloat16)


def field(base: str, i: int) -> str:
    """Tensor field of mask i: ``signs``/``scale`` for the first, ``signs_i``/``scale_i`` after."""
    return base if i == 0 else f"{base}_{i}"


class BitDeltaTerm(DeltaTerm):
    """The default term (``BitDeltaCodec.matmul``, one ``sign_matmul`` per mask), plus the fused path
    (one pass over the base weight and the signs). Whether a batch takes the fused path is measured per
    machine and shape by serve/dispatch.py."""

    def fuses_with(self, weight: Tensor) -> bool:
        return weight.dtype in _FUSED_DTYPES and int(self.params.get("masks", 1)) == 1

    def fused(self, x2: Tensor, weight: Tensor) -> Tensor:
        buffers = self._buffers  # (not getattr: nn.Module's lookup costs more than the dict's, per layer per token)
        return ops.sign_matmul_fused(x2, weight, buffers["t_signs"], buffers["t_scale"], self.shape[1])


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
        """``x2 @ (weight + delta_t)^T`` in one pass (every row of x2 is tenant t; see ``fuses_one``)."""
        signs, scales = self._one_tensors(t)
        return ops.sign_matmul_fused(x2, weight, signs, scales, self.k)

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
        self._views = {}  # .to() and the like replace the stacks: drop the views (and the old tensors they hold)
        return super()._apply(fn, *args, **kwargs)

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
