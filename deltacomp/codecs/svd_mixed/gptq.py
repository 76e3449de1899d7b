"""GPTQ for the svd-mixed codec's singular vectors (Delta-CoMe's quantizer), writing svd-mixed's format.

References: Frantar et al., "GPTQ" (2023) — column-by-column quantization with the error of each column
spread over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs; Ping et
al., "Delta-CoMe" (2024) — V quantized first with the Hessian of the layer inputs X, then U with the
Hessian of the U factor's inputs z = x V_hat^T diag(s).

For a layer y = x delta^T with delta ~= U diag(s) V (U: N x r, V: r x K), given H_x = sum x^T x (K x K):
  1. V (r x K) is a linear map on x: GPTQ along K. Row i of V has its own bit width (svd-mixed groups by
     singular value) and fp16 scale/zero per run of ``group_size`` columns, computed when the run starts
     (or, with act-order, up front from the unquantized V: "static groups", so the stored runs stay
     consecutive in K).
  2. H_z = diag(s) V_hat H_x V_hat^T diag(s) (r x r), exactly the Hessian of z = x V_hat^T diag(s), so no
     second pass over data is needed. Optionally U is first re-fitted to the data: U* = argmin over U of
     ||X delta^T - Z U^T|| (the data-aware form of svd-mixed's refit), kept only if it lowers the output
     error. Then GPTQ along r: column j of U (singular vector j, length N) is RTN-quantized with its
     group's width and groups along N, and its error is spread over columns j+1..r.
Damping: ``damp`` * mean(diag H) is added to the diagonal; inputs that never fire (zero diagonal) get
weight 1 and their column is zeroed, as in GPTQ. The output is svd-mixed's Encoded, byte for byte the
same layout (and size) as its RTN encoding.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import allocation as al
from ..base import Encoded
from ...quant.svd import truncated_svd
from ...quant.whiten import whitened_svd
from ..lowrank import refuse_1d
from ..calibrator import Calibrator, LayerwiseOptions, output_error
from .codec import SvdMixedCodec, best_candidate, pack_encoded
from ...quant.rtn import dequantize, n_groups, quantize

QParams = tuple[Tensor, Tensor, Tensor]  # codes uint8, scale fp16, zero fp16 (rtn.py layout)


def _row_bits(alloc: al.Allocation, device=None) -> Tensor:
    return torch.cat([torch.full((c,), b, dtype=torch.int64, device=device) for b, c in alloc]) if alloc \
        else torch.zeros(0, dtype=torch.int64, device=device)


def _inverse_cholesky(h: Tensor, damp: float) -> Tensor:
    """Upper Cholesky factor of H^-1 after damping (GPTQ's Hinv); float64."""
    h = h.to(torch.float64).clone()
    idx = torch.arange(h.shape[0], device=h.device)
    h[idx, idx] += damp * torch.mean(torch.diag(h)).clamp_min(1e-12)
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _group_params(block: Tensor, alloc: al.Allocation) -> tuple[Tensor, Tensor]:
    """fp16 scale and zero (rows,) for one run of columns, each row at its own width (rtn.py's rules)."""
    scales, zeros, i = [], [], 0
    for b, c in alloc:
        _, s, z = quantize(block[i:i + c], b, block.shape[1])
        scales.append(s[:, 0])
        zeros.append(z[:, 0])
        i += c
    return torch.cat(scales), torch.cat(zeros)


def _quant_col(w: Tensor, scale: Tensor, zero: Tensor, levels: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and dequantized values of one column (rows,), matching rtn.dequantize exactly."""
    s, z = scale.float(), zero.float()
    safe = torch.where(s > 0, s, torch.ones_like(s))
    code = torch.minimum(torch.round((w - z) / safe).clamp_min(0), levels)
    code = torch.where(s > 0, code, torch.zeros_like(code))
    return code.to(torch.uint8), z + code * s


def gptq_rows(w: Tensor, h: Tensor, alloc: al.Allocation, group_size: int = 128, damp: float = 0.01,
              act_order: bool = False, block: int = 128) -> list[QParams]:
    """GPTQ of ``w`` (rows, K), inputs with Hessian ``h`` (K, K); row groups of ``alloc`` at their widths.

    Returns rtn.py's (codes, scale, zero) for each alloc group, groups of ``group_size`` along K."""
    rows, k = w.shape
    if rows != sum(c for _, c in alloc):
        raise ValueError(f"gptq: alloc covers {sum(c for _, c in alloc)} rows, w has {rows}")
    w = w.to(torch.float32).clone()
    h = h.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    levels = ((1 << _row_bits(alloc, w.device)) - 1).to(torch.float32)
    g = n_groups(k, group_size)
    scale = torch.zeros(rows, g, dtype=torch.float16, device=w.device)
    zero = torch.zeros_like(scale)
    if act_order:  # static groups: parameters from the unquantized weights, runs stay consecutive in K
        for gi in range(g):
            scale[:, gi], zero[:, gi] = _group_params(w[:, gi * group_size:(gi + 1) * group_size], alloc)
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(k, device=w.device)
        block = max(group_size, block // group_size * group_size)  # blocks aligned to groups
    w, h = w[:, perm], h[perm][:, perm]
    hinv = _inverse_cholesky(h, damp).to(torch.float32)
    codes = torch.zeros(rows, k, dtype=torch.uint8, device=w.device)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(perm[i1 + i])
            gi = col // group_size
            if not act_order and col % group_size == 0:  # run starts: parameters from the updated weights
                scale[:, gi], zero[:, gi] = _group_params(w1[:, i:i + group_size], alloc)
            c, q = _quant_col(w1[:, i], scale[:, gi], zero[:, gi], levels)
            codes[:, col] = c
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    out, i = [], 0
    for _, c in alloc:
        out.append((codes[i:i + c].contiguous(), scale[i:i + c].contiguous(), zero[i:i + c].contiguous()))
        i += c
    return out


def gptq_columns(u: Tensor, h: Tensor, alloc: al.Allocation, group_size: int = 128,
                 damp: float = 0.01) -> list[QParams]:
    """GPTQ of ``u`` (N, r) along r with Hessian ``h`` (r, r); column j is quantized whole (groups along N)
    at its alloc group's width. Returns (codes, scale, zero) of U^T rows for each alloc group."""
    n, r = u.shape
    u = u.to(torch.float32).clone()
    hinv = _inverse_cholesky(h, damp).to(torch.float32)
    bits = _row_bits(alloc).tolist()
    cols: list[QParams] = []
    for j in range(r):
        c, s, z = quantize(u[:, j][None], bits[j], group_size)
        q = dequantize(c, s, z, group_size)[0]
        e = (u[:, j] - q) / hinv[j, j]
        u[:, j + 1:] -= e[:, None] * hinv[j, j + 1:][None, :]
        cols.append((c, s, z))
    out, i = [], 0
    for _, cnt in alloc:
        part = cols[i:i + cnt]
        out.append(tuple(torch.cat([p[t] for p in part]) for t in range(3)) if part else
                   (torch.zeros(0, n, dtype=torch.uint8), torch.zeros(0, n_groups(n, group_size), dtype=torch.float16),
                    torch.zeros(0, n_groups(n, group_size), dtype=torch.float16)))
        i += cnt
    return out


def encode_gptq(delta: Tensor, h: Tensor, damp: float = 0.01, act_order: bool = False, whiten: bool = False,
                **settings: Any) -> Encoded:
    """svd-mixed encoding of ``delta`` (N, K) with GPTQ against input Hessian ``h`` (K, K).

    ``settings`` are svd-mixed's (groups / ratio / bits / nbytes / group_size / refit / svd); allocation
    ``optimal`` is computed as svd-mixed does (from RTN errors), then quantized with GPTQ."""
    codec = SvdMixedCodec()
    codec.check_input(delta)
    s = codec.resolve_settings(settings)
    shape = tuple(delta.shape)
    refuse_1d(codec.name, shape)
    if tuple(h.shape) != (shape[1], shape[1]):
        raise ValueError(f"gptq: Hessian has shape {tuple(h.shape)}, expected {(shape[1], shape[1])} for delta {shape}")
    gs = s["group_size"]
    if not torch.count_nonzero(delta):
        return codec.encode(delta, **settings)
    if s["allocation"] == "optimal":
        budget = codec.budget(shape, s)
        r_cap = al.fill_rest(shape, [], al.OPTIMAL_LEVELS[-1], budget, gs)
        if whiten:
            u, sv, vh, rank_by = whitened_svd(delta, h, r_cap, damp)
        else:
            u, sv, vh = truncated_svd(delta, r_cap, s["svd"])
            rank_by = sv
        alloc = al.optimal_allocation(rank_by, al.vector_errors(u, vh, al.OPTIMAL_LEVELS, gs), shape, budget, gs)
    else:
        alloc = codec.allocation_for(shape, s)
        r = sum(c for _, c in alloc)
        u, sv, vh = whitened_svd(delta, h, r, damp)[:3] if whiten else truncated_svd(delta, r, s["svd"])
    r = sum(c for _, c in alloc)
    if r == 0:
        return codec.encode(delta, **settings)
    u, sv, vh = u[:, :r], sv[:r].to(torch.float32), vh[:r]
    h = h.to(torch.float64)
    vq = gptq_rows(vh, h, alloc, gs, damp, act_order)
    v_hat = torch.cat([dequantize(*q, gs) for q in vq])
    hz = (sv[:, None].double() * (v_hat.double() @ h @ v_hat.double().T)) * sv[None, :].double()
    candidates = [u]
    if s["refit"]:
        candidates.append(_refit_data(delta, v_hat, sv, h, hz, damp))

    def quantize_u(cu):
        uq = gptq_columns(cu, hz, alloc, gs, damp)
        u_hat = torch.cat([dequantize(*q, gs) for q in uq]).T
        return output_error(delta, (u_hat * sv) @ v_hat, h), uq

    return pack_encoded(codec.name, shape, alloc, best_candidate(candidates, quantize_u), vq, sv, s)


def _refit_data(delta: Tensor, v_hat: Tensor, sv: Tensor, h: Tensor, hz: Tensor, damp: float) -> Tensor:
    """U* = argmin_U ||X delta^T - Z U^T||_F with Z = X v_hat^T diag(s): U*^T = Hz^-1 diag(s) v_hat H delta^T."""
    hz = hz.clone()
    idx = torch.arange(hz.shape[0])
    hz[idx, idx] += damp * torch.mean(torch.diag(hz)).clamp_min(1e-12)
    rhs = sv[:, None].double() * (v_hat.double() @ h @ delta.double().T)  # (r, N)
    return torch.linalg.solve(hz, rhs).T.to(torch.float32).contiguous()


class Gptq(Calibrator):
    """svd-mixed's calibrator (layerwise stage): GPTQ of the stored encoding's singular vectors, in the
    stored groups (same bytes) or in groups re-chosen within the same budget (``allocation=optimal``);
    then, in the tune stage, its scales, zeros and singular values trained end to end (tune.py)."""

    stage = "layerwise"
    description = "gptq"
    tunes = True

    def student(self, linear, enc: Encoded):
        from .tune import LowRankTunedLinear

        return LowRankTunedLinear(linear, enc)

    def encoded(self, student, enc: Encoded) -> Encoded:
        return student.encoded(enc)

    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded | None:
        if not enc.params.get("alloc"):
            return None  # an all-zero delta: nothing to quantize, keep the stored encoding
        settings = {k: v for k, v in enc.params.items() if k != "alloc"}
        if options.allocation == "keep":
            settings.update(groups=enc.params["alloc"], allocation="default")  # same groups
        else:
            settings.update(groups=None, allocation="optimal")  # same budget, groups re-chosen
        return encode_gptq(delta, h, damp=options.damp, act_order=options.act_order, whiten=options.whiten,
                           **settings)
