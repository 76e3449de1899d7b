"""Bit allocation over singular vectors for the svd-mixed codec.

An allocation is a list of (bits, count) groups, bits strictly decreasing: the first ``count`` singular
vectors (descending sigma) get the first width, the next ones the second, and so on; vectors past the
last group are dropped. Its exact byte size (``alloc_nbytes``) is what svd-mixed writes:
    per group (b, c): KBITS codes of c*K (V rows) and c*N (U columns) b-bit values, fp16 scale and zero
    per ``group_size`` run of each row, plus 4 bytes (fp32 sigma) per kept vector.

``default_allocation`` follows Delta-CoMe (8 / 3 / 2 bits, counts scaled with min(N, K) / 4096).
``optimal_allocation`` solves, exactly (enumeration, see its docstring):
    minimize  sum_i sigma_i^2 * e_i(b_i)     s.t. bytes(allocation) <= budget, b_i non-increasing in i,
where e_i(b) is the measured relative squared error of the rank-1 term u_i v_i^T when u_i and v_i are
both RTN-quantized at b bits (e_i(0) = 1: a dropped vector loses all its energy).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ...errors import SettingsError
from ...quant.rtn import dequantize, quantize, quantized_nbytes

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
    u (N, r) and vh (r, K) quantized as svd-mixed does (U columns and V rows, groups along each).

    With du = q(u) - u, dv = q(v) - v: u v^T - q(u) q(v)^T = -(du q(v)^T + u dv^T), so the error is
    |du|^2 |q(v)|^2 + |u|^2 |dv|^2 + 2 (du.u)(q(v).dv): terms of the error's own size, summed in float64
    from float32 products (no float64 copies of U and V; the expansion around |u|^2 |v|^2 cancelled)."""
    r = vh.shape[0]
    out = torch.ones(r, len(levels), dtype=torch.float64)
    ut = u.T

    def dot(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(1, dtype=torch.float64)

    un, vn = dot(ut, ut), dot(vh, vh)
    for j, b in enumerate(levels):
        uq = dequantize(*quantize(ut, b, group_size), group_size)
        vq = dequantize(*quantize(vh, b, group_size), group_size)
        du, dv = uq - ut, vq - vh
        num = dot(du, du) * dot(vq, vq) + un * dot(dv, dv) + 2 * dot(du, ut) * dot(vq, dv)
        out[:, j] = (num / (un * vn).clamp_min(1e-300)).clamp_min(0).cpu()
    return out


def model_error(sigma: Tensor, errors: Tensor, levels: tuple[int, ...], alloc: Allocation) -> float:
    """sum_i sigma_i^2 e_i(b_i) for an allocation (dropped vectors count sigma_i^2)."""
    s2 = sigma.detach().double().cpu() ** 2
    errors = errors.cpu()
    total, i = float(s2.sum()), 0
    for b, c in alloc:
        j = levels.index(b)
        seg = slice(i, i + c)
        total -= float((s2[seg] * (1 - errors[seg, j])).sum())
        i += c
    return total


def _range_min(values: np.ndarray):
    """Sparse table over ``values``: query(lo, hi) -> (min, argmin) over values[lo..hi], vectorized."""
    tables, args = [values], [np.arange(values.size)]
    span = 1
    while 2 * span <= values.size:
        prev, parg = tables[-1], args[-1]
        left, right = prev[:-span], prev[span:]
        take_right = right < left
        tables.append(np.where(take_right, right, left))
        args.append(np.where(take_right, parg[span:], parg[:-span]))
        span *= 2

    def query(lo: np.ndarray, hi: np.ndarray):
        k = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
        out_v = np.empty(lo.shape)
        out_a = np.empty(lo.shape, dtype=np.int64)
        for j in np.unique(k):
            sel = k == j
            a, b = lo[sel], hi[sel] - (1 << int(j)) + 1
            va, vb = tables[j][a], tables[j][b]
            use_b = vb < va
            out_v[sel] = np.where(use_b, vb, va)
            out_a[sel] = np.where(use_b, args[j][b], args[j][a])
        return out_v, out_a

    return query


def optimal_allocation(sigma: Tensor, errors: Tensor, shape: tuple[int, int], budget: int, group_size: int,
                       levels: tuple[int, ...] = OPTIMAL_LEVELS) -> Allocation:
    """Exact minimizer of the error model under the byte budget, bits non-increasing with i.

    With a_l = number of vectors given at least levels[l] bits (a_1 <= ... <= a_L), the error is
    E0 + sum_l H_l(a_l), H_l(a) = sum_{i<a} sigma_i^2 (e_i(l) - e_i(l+1)), e_i(L+1) = 1, and the bytes are
    sum_l f_l(a_l - a_{l-1}) with f_l(c) the exact size of c vectors at levels[l] (ceil of KBITS included).
    All counts of the top L-1 levels within the budget are enumerated (the loop over the first count,
    the next two as a grid); for each, the best a_L under the remaining bytes is a range minimum of H_L
    (sparse table). Cost ~ (number of affordable (c_1, c_2, c_3)): about 1e7 for 4096 x 4096 at 1/16."""
    if len(levels) != 4 or list(levels) != sorted(levels, reverse=True) or errors.shape[1] != 4:
        raise ValueError("optimal_allocation: needs 4 strictly decreasing levels matching errors' columns")
    r = errors.shape[0]
    if r == 0 or budget <= 0:
        return []
    s2 = (sigma.detach().double().cpu() ** 2).numpy()[:r]
    e = np.concatenate([errors.detach().double().cpu().numpy(), np.ones((r, 1))], axis=1)
    h = np.zeros((4, r + 1))
    h[:, 1:] = np.cumsum(s2[:, None] * (e[:, :4] - e[:, 1:]), axis=0).T
    cnt = np.arange(r + 1)
    f = np.stack([np.array([alloc_nbytes(shape, [(b, int(c))], group_size) for c in cnt]) for b in levels])
    last_min = _range_min(h[3])
    best_val, best = 0.0, (0, 0, 0, 0)                  # all dropped: H terms are 0
    for c1 in range(r + 1):
        r1 = budget - f[0, c1]
        if r1 < 0:
            break
        c2 = cnt[: r + 1 - c1][f[1, : r + 1 - c1] <= r1]
        c3 = cnt[: r + 1 - c1][f[2, : r + 1 - c1] <= r1]
        rem = r1 - f[1, c2][:, None] - f[2, c3][None, :]
        a3 = c1 + c2[:, None] + c3[None, :]
        ok = (rem >= 0) & (a3 <= r)
        i2, i3 = np.nonzero(ok)
        if i2.size == 0:
            continue
        a2, a3v, remv = c1 + c2[i2], a3[i2, i3], rem[i2, i3]
        c4max = np.searchsorted(f[3], remv, side="right") - 1
        hi = np.minimum(a3v + c4max, r)
        v4, a4 = last_min(a3v, hi)
        total = h[0, c1] + h[1, a2] + h[2, a3v] + v4
        j = int(np.argmin(total))
        if total[j] < best_val:
            best_val, best = float(total[j]), (c1, int(a2[j]), int(a3v[j]), int(a4[j]))
    bounds = (0, *best)
    alloc = [(b, bounds[l + 1] - bounds[l]) for l, b in enumerate(levels)]
    return [(b, c) for b, c in alloc if c > 0]
