"""svd-mixed's ladder (``Codec.ladder``): every rung of a budget ladder from one decomposition.

A rung with the data-independent allocation ``alloc`` (groups (b, c), rows i..i+c of the SVD at b bits)
is, in ``encode``: the top-r SVD, its V rows and U columns RTN-quantized group by group, U re-fitted
against the quantized V, the better of the two U kept. Everything but the refit is per row, so one SVD at
the largest rank R any rung keeps, and each width's quantization of all R rows (and its product with the
delta, which the refit and the error need) serve every rung by slicing: RTN groups run along a row, so
quantizing rows i..i+c alone gives the rows i..i+c of quantizing them all. Per rung there remain the
r x r refit and the U quantization of the refit; the error is the one encode measures to choose between
the two U (``_fit_error``, without the reconstruction); the reconstruction (one N x r x K product, instead
of unpacking and dequantizing) and the packing are left to ``Rung.rebuild`` and ``Rung.pack`` (the bytes
are ``alloc_nbytes``, exactly).

Same results as encoding each rung alone: bit for bit in the SVD where the SVD path is exact
(min(N, K) < quant/svd.py's EXACT_BELOW, or svd=exact; products over a different number of rows may round
differently in the last float32 bit); with svd=auto on larger shapes the top r of a rank-R decomposition
is at least as accurate as a rank-r one, within quant/svd.py's stated tolerance.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

from . import allocation as al
from ...errors import SettingsError
from ...quant.rtn import dequantize, quantize
from ...quant.svd import energy, truncated_svd
from ..base import Codec, Rung

# The floor given to ``prune`` is the SVD's tail energy times (1 - TAIL_SLACK): quant/svd.py's
# randomized path may place the tail up to its TOL (1%) above the exact one; the exact paths are
# float64-accurate.
TAIL_SLACK = 0.02

if TYPE_CHECKING:
    from .codec import SvdMixedCodec


class _Rows:
    """One width's RTN quantization of the rows ``lo..hi`` of a factor (the rows any rung gives that
    width): codes, scales, zeros and the dequantized rows; ``proj`` = delta times those dequantized rows
    for V, (N, hi - lo)."""

    def __init__(self, rows: Tensor, bits: int, gs: int, lo: int, hi: int, delta: Tensor | None = None):
        self.lo = lo
        self.q = quantize(rows[lo:hi].contiguous(), bits, gs)
        self.deq = dequantize(*self.q, gs)
        self.proj = None if delta is None else (self.deq @ delta.T).T

    def take(self, i: int, c: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t[i - self.lo:i - self.lo + c].clone() for t in self.q)

    def deq_rows(self, i: int, c: int) -> Tensor:
        return self.deq[i - self.lo:i - self.lo + c]

    def proj_cols(self, i: int, c: int) -> Tensor:
        return self.proj[:, i - self.lo:i - self.lo + c]


def _spans(alloc: al.Allocation) -> list[tuple[int, int, int]]:
    """(bits, first row, count) of each group."""
    out, i = [], 0
    for b, c in alloc:
        out.append((b, i, c))
        i += c
    return out


def svd_mixed_ladder(codec: "SvdMixedCodec", delta: Tensor, settings: Sequence[dict[str, Any]],
                     prune: Callable[[int, float], bool] | None = None) -> Iterator[Rung]:
    """``codec.ladder``: rungs with the default allocation share one SVD per (svd, group_size); the others
    (allocation=optimal, an all-zero or non-2-D delta, a rung keeping nothing) are encoded on their own.
    With ``prune``, a shared rung is asked about before its quantization, with the energy the SVD leaves
    outside its r vectors as the floor (no rank-r matrix does better: Eckart-Young), less TAIL_SLACK."""
    shared: dict[tuple[str, int], list[tuple[dict[str, Any], dict[str, Any], al.Allocation]]] = {}
    plain = delta.dim() == 2 and delta.dtype == torch.float32 and bool(torch.count_nonzero(delta))
    for given in settings:
        try:
            s = codec.resolve_settings(given)
            alloc = codec.allocation_for(tuple(delta.shape), s) if plain and s["allocation"] == "default" else []
        except SettingsError:
            continue  # encode would refuse it too
        if alloc:
            shared.setdefault((s["svd"], s["group_size"]), []).append((given, s, alloc))
        else:
            yield from Codec.ladder(codec, delta, [given])
    for (svd, gs), group in shared.items():
        yield from _shared_rungs(codec, delta, svd, gs, group, prune)


def _shared_rungs(codec: "SvdMixedCodec", delta: Tensor, svd: str, gs: int,
                  group: list[tuple[dict[str, Any], dict[str, Any], al.Allocation]],
                  prune: Callable[[int, float], bool] | None) -> Iterator[Rung]:
    from .codec import _fit_error, _refit, pack_encoded

    shape = tuple(delta.shape)
    rank = max(sum(c for _, c in alloc) for *_, alloc in group)
    u, sv, vh = truncated_svd(delta, rank, svd)
    dd = energy(delta)
    if prune is not None:
        kept = torch.cumsum(sv.double() ** 2, 0).tolist()
        group = [(given, s, alloc) for given, s, alloc in group
                 if not prune(al.alloc_nbytes(shape, alloc, gs),
                              (1 - TAIL_SLACK) * (dd - kept[sum(c for _, c in alloc) - 1]))]
    spans = {id(alloc): _spans(alloc) for *_, alloc in group}
    reach: dict[int, tuple[int, int]] = {}  # bits -> (first row, end row) any rung quantizes at that width
    for sp in spans.values():
        for b, i, c in sp:
            lo, hi = reach.get(b, (i, i + c))
            reach[b] = (min(lo, i), max(hi, i + c))
    vrows = {b: _Rows(vh, b, gs, lo, hi, delta) for b, (lo, hi) in reach.items()}
    urows = {b: _Rows(u.T, b, gs, lo, hi) for b, (lo, hi) in reach.items()}
    for given, s, alloc in group:
        sp = spans[id(alloc)]
        r = sum(c for _, c in alloc)
        vq = [vrows[b].take(i, c) for b, i, c in sp]
        v_hat = torch.cat([vrows[b].deq_rows(i, c) for b, i, c in sp])
        proj = torch.cat([vrows[b].proj_cols(i, c) for b, i, c in sp], dim=1)
        vv = v_hat @ v_hat.T
        u_hat = torch.cat([urows[b].deq_rows(i, c) for b, i, c in sp]).T
        best = (_fit_error(delta, u_hat * sv[:r], v_hat, proj, vv, dd),
                [urows[b].take(i, c) for b, i, c in sp], sv[:r], u_hat)
        if s["refit"]:
            um, norms = _refit(delta, v_hat, proj, vv)
            uq = codec._quantize_rows(um.T, alloc, gs)
            u_ref = torch.cat([dequantize(*q, gs) for q in uq]).T
            err = _fit_error(delta, u_ref * norms, v_hat, proj, vv, dd)
            if err < best[0]:  # encode keeps the first candidate on ties
                best = (err, uq, norms, u_ref)
        err, uq, svals, u_best = best

        def pack(alloc=alloc, uq=uq, vq=vq, svals=svals, s=s):
            return pack_encoded(codec.name, shape, alloc, uq, vq, svals, s)

        def rebuild(a=u_best * svals, v_hat=v_hat):
            return (a @ v_hat).cpu()

        yield Rung(dict(given), al.alloc_nbytes(shape, alloc, gs), pack, rebuild, err)
