"""Bit allocation over singular vectors for the svd-mixed codec.

An allocation is a list of (bits, count) groups, bits strictly decreasing: the first ``count`` singular
vectors (descending sigma) get the first width, the next ones the second, and so on; vectors past the
last group are dropped. Its exact byte size (``alloc_nbytes``) is what svd-mixed writes:
    per group (b, c): KBITS codes of c*K (V rows) and c*N (U columns) b-bit values, fp16 scale and zero
    per ``group_size`` run of each row, plus 4 bytes (fp32 sigma) per kept vector.

``default_allocation`` follows Delta-CoMe (8 / 3 / 2 bits, counts scaled with min(N, K) / 4096).
``optimal_allocation`` solves, exactly, with an integer program (scipy.optimize.milp / HiGHS):
    minimize  sum_i sigma_i^2 * e_i(b_i)     s.t. bytes(allocation) <= budget, b_i non-increasing in i,
where e_i(b) is the measured relative squared error of the rank-1 term u_i v_i^T when u_i and v_i are
both RTN-quantized at b bits (e_i(0) = 1: a dropped vector loses all its energy).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .errors import SettingsError
from .quant.rtn import dequantize, quantize, quantized_nbytes

Allocation = list[tuple[int, int]]
OPTIMAL_LEVELS = (8, 4, 3, 2)


def alloc_nbytes(shape: tuple[int, int], alloc: Allocation, group_size: int) -> int:
    """Exact bytes svd-mixed stores for ``alloc`` on an (N, K) delta."""
    n, k = shape
    total = 0
    for bits, count in alloc:
        if count:
            total += quantized_nbytes(count, k, bits, group_size) + quantized_nbytes(count, n, bits, group_size)
            total += 4 * count
    return total


def parse_groups(text: str) -> list[tuple[int, int | None]]:
    """``"8:2+3:32+2:rest"`` -> [(8, 2), (3, 32), (2, None)]; None = the rest of the budget (last only)."""
    out: list[tuple[int, int | None]] = []
    for part in str(text).split("+"):
        bits_s, sep, count_s = part.partition(":")
        try:
            bits = int(bits_s)
            count = None if count_s.strip() == "rest" else int(count_s)
        except ValueError:
            bits, count, sep = 0, 0, ""
        if not sep or not 1 <= bits <= 8 or (count is not None and count < 0):
            raise SettingsError(f"svd-mixed: bad group {part!r} in groups={text!r}; expected bits:count with "
                                "bits in 1..8 and count an int >= 0 or 'rest', e.g. groups=8:2+3:32+2:rest")
        out.append((bits, count))
    bits_seq = [b for b, _ in out]
    if any(a <= b for a, b in zip(bits_seq, bits_seq[1:])):
        raise SettingsError(f"svd-mixed: groups={text!r} must list strictly decreasing bit widths "
                            "(larger singular values get more bits)")
    if any(c is None for _, c in out[:-1]):
        raise SettingsError(f"svd-mixed: only the last group may be 'rest' in groups={text!r}")
    return out


def format_alloc(alloc: Allocation) -> str:
    return "+".join(f"{b}:{c}" for b, c in alloc)


def _cap(alloc: list[tuple[int, int]], m: int) -> Allocation:
    """Truncate counts so at most m vectors are used; drop empty groups."""
    out, left = [], m
    for b, c in alloc:
        c = min(c, left)
        left -= c
        if c:
            out.append((b, c))
    return out


def fill_rest(shape: tuple[int, int], prefix: Allocation, bits: int, budget: int, group_size: int) -> int:
    """Largest count c (<= the vectors left) with alloc_nbytes(prefix + [(bits, c)]) <= budget."""
    left = min(shape) - sum(c for _, c in prefix)
    lo, hi = 0, max(left, 0)
    if alloc_nbytes(shape, prefix, group_size) > budget:
        return 0
    while lo < hi:  # size is monotone in c
        mid = (lo + hi + 1) // 2
        if alloc_nbytes(shape, [*prefix, (bits, mid)], group_size) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def resolve_groups(shape: tuple[int, int], groups: list[tuple[int, int | None]], budget: int,
                   group_size: int) -> Allocation:
    """Fixed counts as given (capped at min(N, K)), then 'rest' filled up to the budget."""
    fixed = _cap([(b, c) for b, c in groups if c is not None], min(shape))
    if groups and groups[-1][1] is None:
        bits = groups[-1][0]
        fixed = [*fixed, (bits, fill_rest(shape, fixed, bits, budget, group_size))]
    return [(b, c) for b, c in fixed if c]


def default_allocation(shape: tuple[int, int], budget: int, group_size: int) -> Allocation:
    """Delta-CoMe: 2 vectors at 8 bits, 32 at 3 bits per 4096 of min(N, K), the rest of the budget at
    2 bits; when the budget cannot hold the 8/3-bit vectors, fewer of them (3-bit ones first)."""
    m = min(shape)
    n8, n3 = math.ceil(2 * m / 4096), math.ceil(32 * m / 4096)
    while n3 > 0 and alloc_nbytes(shape, _cap([(8, n8), (3, n3)], m), group_size) > budget:
        n3 -= 1
    while n8 > 0 and alloc_nbytes(shape, _cap([(8, n8)], m), group_size) > budget:
        n8 -= 1
    return resolve_groups(shape, [(8, n8), (3, n3), (2, None)], budget, group_size)


def vector_errors(u: Tensor, vh: Tensor, levels: tuple[int, ...], group_size: int) -> Tensor:
    """(r, len(levels)) float64: ||u_i v_i^T - q(u_i) q(v_i)^T||^2 / ||u_i v_i^T||^2 for each width, with
    u (N, r) and vh (r, K) quantized as svd-mixed does (U columns and V rows, groups along each)."""
    r = vh.shape[0]
    out = torch.ones(r, len(levels), dtype=torch.float64)
    ut = u.T.double()
    v = vh.double()
    un, vn = (ut * ut).sum(1), (v * v).sum(1)
    for j, b in enumerate(levels):
        uq = dequantize(*quantize(u.T, b, group_size), group_size).double()
        vq = dequantize(*quantize(vh, b, group_size), group_size).double()
        num = un * vn + (uq * uq).sum(1) * (vq * vq).sum(1) - 2 * (ut * uq).sum(1) * (v * vq).sum(1)
        out[:, j] = (num / (un * vn).clamp_min(1e-300)).clamp_min(0)
    return out


def model_error(sigma: Tensor, errors: Tensor, levels: tuple[int, ...], alloc: Allocation) -> float:
    """sum_i sigma_i^2 e_i(b_i) for an allocation (dropped vectors count sigma_i^2)."""
    s2 = sigma.double() ** 2
    total, i = float(s2.sum()), 0
    for b, c in alloc:
        j = levels.index(b)
        seg = slice(i, i + c)
        total -= float((s2[seg] * (1 - errors[seg, j])).sum())
        i += c
    return total


def optimal_allocation(sigma: Tensor, errors: Tensor, shape: tuple[int, int], budget: int, group_size: int,
                       levels: tuple[int, ...] = OPTIMAL_LEVELS, time_limit: float = 60.0) -> Allocation:
    """Exact minimizer of the error model under the byte budget, bits non-increasing with i.

    Variables: y[i, l] = 1 iff vector i gets at least levels[l] bits (levels descending), so
    y[i, l-1] <= y[i, l] and y[i+1, l] <= y[i, l]; integer pv_l, pu_l >= c_l*K*b_l/8, c_l*N*b_l/8 make
    the KBITS ceil exact, with c_l = sum_i y[i, l] - y[i, l-1] the vectors at exactly levels[l]."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    n, k = shape
    r, nl = errors.shape[0], len(levels)
    if list(levels) != sorted(levels, reverse=True) or nl != errors.shape[1]:
        raise ValueError("optimal_allocation: levels must be strictly decreasing and match errors' columns")
    if r == 0 or budget <= 0:
        return []
    s2 = (sigma.double() ** 2).numpy()
    e = np.concatenate([errors.numpy(), np.ones((r, 1))], axis=1)
    # error = sum s2 - sum_{i,l} y[i,l] * s2_i * (e_i(l+1) - e_i(l)), with e_i(nl) = 1 (dropped)
    cost = (s2[:, None] * (e[:, :nl] - e[:, 1:])).reshape(-1) / (s2.sum() or 1.0)
    ny, nv = r * nl, r * nl + 2 * nl
    idx = np.arange(ny).reshape(r, nl)                         # column of y[i, l]
    # "<= 0" rows: y[i, l-1] - y[i, l] (more bits implies fewer) and y[i+1, l] - y[i, l] (prefixes)
    pairs = [(idx[:, :-1].ravel(), idx[:, 1:].ravel()), (idx[1:, :].ravel(), idx[:-1, :].ravel())]
    pos = np.concatenate([p for p, _ in pairs])
    neg = np.concatenate([q for _, q in pairs])
    m = pos.size
    order = coo_matrix((np.concatenate([np.ones(m), -np.ones(m)]),
                        (np.concatenate([np.arange(m)] * 2), np.concatenate([pos, neg]))), shape=(m, nv))
    count_row = np.zeros((nl, nv))                             # c_l = n_l - n_{l-1}, a linear form
    for l in range(nl):
        count_row[l, idx[:, l]] += 1
        if l:
            count_row[l, idx[:, l - 1]] -= 1
    gk, gn = -(-k // group_size), -(-n // group_size)
    pack = np.zeros((2 * nl, nv))                              # 8*p - dim*b*c_l >= 0
    budget_row = np.zeros(nv)
    for l, b in enumerate(levels):
        for off, dim in ((0, k), (1, n)):
            pack[2 * l + off] = -dim * b * count_row[l]
            pack[2 * l + off, ny + 2 * l + off] = 8
            budget_row[ny + 2 * l + off] = 1
        budget_row += (4 * (gk + gn) + 4) * count_row[l]       # fp16 scale+zero per group, fp32 sigma
    cons = [LinearConstraint(order.tocsr(), -np.inf, 0), LinearConstraint(pack, 0, np.inf),
            LinearConstraint(budget_row[None, :], -np.inf, budget)]
    c_obj = np.concatenate([cost, np.zeros(2 * nl)])
    upper = np.concatenate([np.ones(ny), np.full(2 * nl, np.inf)])
    res = milp(c_obj, constraints=cons, integrality=np.ones(nv), bounds=Bounds(np.zeros(nv), upper),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:
        raise RuntimeError(f"optimal_allocation: the integer program found no solution ({res.message})")
    yv = np.round(res.x[:ny]).reshape(r, nl)
    counts = yv.sum(0).astype(int)                   # n_l: vectors with >= levels[l] bits
    alloc = [(b, int(counts[l] - (counts[l - 1] if l else 0))) for l, b in enumerate(levels)]
    alloc = [(b, c) for b, c in alloc if c > 0]
    while alloc and alloc_nbytes(shape, alloc, group_size) > budget:  # guard against solver tolerance
        b, c = alloc[-1]
        alloc = alloc[:-1] + ([(b, c - 1)] if c > 1 else [])
    return alloc
