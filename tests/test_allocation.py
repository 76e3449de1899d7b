import itertools

import pytest
import torch

from deltacomp.codecs.svd_mixed import allocation as al
from deltacomp.codecs import get_codec
from deltacomp.codecs.lowrank import truncated_svd


def _lowrank_plus_noise(n, k, r, seed, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) * 0.1 + noise * torch.randn(n, k, generator=g)


def _brute_force(sigma, errors, shape, budget, gs, levels):
    """Every monotone allocation by enumeration of the level boundaries (small r only)."""
    r = sigma.numel()
    best = (al.model_error(sigma, errors, levels, []), [])
    for cuts in itertools.combinations_with_replacement(range(r + 1), len(levels)):
        counts = [cuts[0]] + [b - a for a, b in zip(cuts, cuts[1:])]
        alloc = [(b, c) for b, c in zip(levels, counts) if c]
        if al.alloc_nbytes(shape, alloc, gs) <= budget:
            err = al.model_error(sigma, errors, levels, alloc)
            if err < best[0] - 1e-12:
                best = (err, alloc)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_optimal_matches_brute_force(seed):
    shape, gs = (40, 24), 16
    d = _lowrank_plus_noise(*shape, 3, seed, noise=0.05)
    u, s, vh = truncated_svd(d, 12, "exact")
    errors = al.vector_errors(u, vh, al.OPTIMAL_LEVELS, gs)
    budget = [300, 500, 800, 1200][seed]
    alloc = al.optimal_allocation(s, errors, shape, budget, gs)
    assert al.alloc_nbytes(shape, alloc, gs) <= budget
    best_err, _ = _brute_force(s, errors, shape, budget, gs, al.OPTIMAL_LEVELS)
    assert al.model_error(s, errors, al.OPTIMAL_LEVELS, alloc) == pytest.approx(best_err, rel=1e-9, abs=1e-12)


def test_vector_errors_decrease_with_bits():
    d = _lowrank_plus_noise(100, 80, 5, 3)
    u, s, vh = truncated_svd(d, 10, "exact")
    e = al.vector_errors(u, vh, al.OPTIMAL_LEVELS, 32)
    assert e.shape == (10, 4)
    assert (e[:, 0] < e[:, -1]).all() and (e < 1).all() and (e >= 0).all()


@pytest.mark.parametrize("shape,rank,ratio", [((256, 192), 12, 16), ((200, 300), 40, 8), ((150, 150), 4, 32),
                                              ((256, 256), 100, 16)])
def test_optimal_never_worse_than_default(shape, rank, ratio):
    codec = get_codec("svd-mixed")
    d = _lowrank_plus_noise(*shape, rank, sum(shape) + rank, noise=0.02)
    budget = shape[0] * shape[1] * 2 // ratio
    e_def = codec.encode(d, nbytes=budget)
    e_opt = codec.encode(d, nbytes=budget, allocation="optimal")
    assert e_opt.nbytes <= budget and e_def.nbytes <= budget
    # by the error model ...
    u, s, vh = truncated_svd(d, min(shape), "exact")
    errors = al.vector_errors(u, vh, al.OPTIMAL_LEVELS, 128)
    default = al.parse_groups(e_def.params["alloc"])
    optimal = al.parse_groups(e_opt.params["alloc"])
    assert al.model_error(s, errors, al.OPTIMAL_LEVELS, optimal) <= al.model_error(
        s, errors, al.OPTIMAL_LEVELS, default) * (1 + 1e-9)
    # ... and by the actual reconstruction error
    err = lambda e: float(torch.linalg.matrix_norm(codec.decode(e) - d))  # noqa: E731
    assert err(e_opt) <= err(e_def) * 1.001


def test_vector_errors_match_direct_float64():
    # each entry against ||u v^T - q(u) q(v)^T||^2 / ||u v^T||^2 formed densely in float64
    from deltacomp.quant.rtn import dequantize, quantize
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(70, 5, generator=g)).Q
    vh = torch.linalg.qr(torch.randn(90, 5, generator=g)).Q.T
    e = al.vector_errors(u, vh, al.OPTIMAL_LEVELS, 32)
    for j, b in enumerate(al.OPTIMAL_LEVELS):
        uq = dequantize(*quantize(u.T.contiguous(), b, 32), 32).double()
        vq = dequantize(*quantize(vh, b, 32), 32).double()
        for i in range(5):
            full = torch.outer(u[:, i].double(), vh[i].double())
            ref = float(((full - torch.outer(uq[i], vq[i])) ** 2).sum() / (full ** 2).sum())
            assert float(e[i, j]) == pytest.approx(ref, rel=1e-4)
