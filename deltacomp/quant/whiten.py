"""The truncated SVD that is best in a layer's output error rather than its weight error (used by the
codecs' layerwise calibrators: svd-mixed's GPTQ pass, lowrank's refit)."""
from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import single_threaded


def whitened_svd(delta: Tensor, h: Tensor, rank: int, damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Truncated SVD that minimizes the layer's output error instead of the weight error.

    With H + damping = L L^T (Cholesky), ||X E^T||^2 = ||E L||_F^2, so the best rank-r approximation of
    delta in output error is the truncated SVD of delta L mapped back: delta ~= U diag(S) W^T L^-1
    (Eckart-Young on the whitened matrix; SVD-LLM's truncation-aware whitening). Returns U (N, r) with
    unit columns, s (r,) and V (r, K) with unit rows, so delta ~= U diag(s) V as svd-mixed stores it,
    and S (r,), the whitened singular values, which rank the vectors by their share of the output error."""
    hd = h.to(torch.float64).clone()
    idx = torch.arange(hd.shape[0], device=hd.device)
    dead = torch.diag(hd) == 0
    hd[dead, dead] = 1
    hd[idx, idx] += damp * torch.mean(torch.diag(hd)).clamp_min(1e-12)
    lower = torch.linalg.cholesky(hd)
    with single_threaded():
        u, big_s, wh = torch.linalg.svd(delta.to(torch.float64) @ lower, full_matrices=False)
    u, big_s, wh = u[:, :rank], big_s[:rank], wh[:rank]
    # V' = W^T L^-1: solve L^T X = W for X = V'^T
    vp = torch.linalg.solve_triangular(lower.T, wh.T, upper=True).T
    norms = torch.linalg.vector_norm(vp, dim=1)
    keep = torch.where(norms > 0, norms, torch.ones_like(norms))
    v = vp / keep[:, None]
    return (u.to(torch.float32).contiguous(), (big_s * norms).to(torch.float32), v.to(torch.float32).contiguous(),
            big_s.to(torch.float32))
