"""Truncated SVD that computes only the singular vectors a codec keeps, on the input's device.

    truncated_svd(mat, rank, method) -> (U (N, r), S (r,), Vh (r, K)), S descending, U columns and Vh rows
    unit-norm (or zero where S is zero). Callers know r before calling (codecs: from the byte budget).

exact       float64 Gram (of the smaller side) and its eigendecomposition; only the kept r vectors are
            projected to the other side. Why not torch.linalg.svd: on the CPU builds we run, LAPACK
            gesdd took 22 s on a 512 x 1376 matrix where eigh of its Gram took 0.24 s. Squaring the
            condition number only costs accuracy below ~1e-8 of the largest singular value.
randomized  randomized block Krylov (Musco & Musco 2015; Halko, Martinsson & Tropp 2011): q = rank +
            oversample Gaussian vectors, blocks X_j = orth(A^T A X_{j-1}) kept side by side (each
            orthogonalized against the earlier ones, QR twice: float32 drifts), Rayleigh-Ritz on all of
            them: A ~= P X^T, P = A X, whose SVD comes from the small float64 Gram of P. Two products
            with A per block. Keeping every block, not only the last (plain subspace iteration), is what
            makes it accurate at a few blocks: on 1024 x 2752 deltas at rank 8-30% of min(N, K) subspace
            iteration still lost 1-5% of the tail energy after 8 products, 3-4 Krylov blocks < 0.2%.
            Deterministic for a given ``seed`` (own generator on the input's device).
auto        for min(N, K) < EXACT_BELOW or rank None (every vector): exact (cheap there; small models
            keep the reference path). Else:
            - randomized when MAX_DEPTH * q <= MAX_FRACTION * min(N, K) (e.g. lowrank's ranks), built
              to DEPTH blocks and up to MAX_DEPTH while the last block raised the top-r energy by more
              than TOL x the tail energy (||A||^2 - top-r energy); still moving at MAX_DEPTH (a spectrum
              too flat at the cut) -> the exact path below (info.method "fallback");
            - on the CPU in float32, when q <= SUBSPACE_FRACTION * min(N, K) (e.g. svd-mixed at 32x on
              a 4096 x 4096 tensor, 12%): shifted subspace iteration on the float32 Gram with
              Rayleigh-Ritz (subspace_svd; products with the m x m Gram and QRs only), SUBSPACE_STEPS
              steps and up to SUBSPACE_MAX_STEPS while the last one raised the q-space energy by > TOL x
              the tail energy; still moving -> the exact-mixed path below (info.method "fallback").
              Measured at 4096 x 4096, power law (benchmarks/compress_speed.py's delta, one thread, load
              ~4 on 2 cores): rank 444 3.1-3.4 s vs 4.3-4.6 s for exact-mixed, tail energy +3e-3
              relative; rank 650 (q 17%) 4.0 s vs 4.5 s; svd-mixed's 16x rank 889 (q 24%) needs 3 steps:
              5.4 s for both, hence the 15% bound;
            - otherwise (large ranks, e.g. svd-mixed's ~30%: a Krylov space would cost more than the
              Gram) exact with the float32 Gram and eigh (_mixed_svd; on the CPU BLAS syrk and LAPACK
              syevr for only the kept vectors), redone in float64 when (s_r / s_1)^2 < MIXED_MIN_RATIO,
              where float32 cannot place the kept vectors. syevr's tridiagonalization (sytrd, memory-bound
              at m = 4096: ~5 s on one core here, whatever the rank) is most of this path's time.
Tolerance (tests/test_svd.py): the rank-r reconstruction error^2 of auto is within 1% of the exact path's,
the top singular values within 1e-3 relative (subspace_svd: the same bounds). Measured: the change test
leaves the tail energy about TOL above exact (4096 x 4096, rank 127, rank-64 + noise: 3 blocks +5e-3 in 0.8 s, 5 blocks +8e-4 in
1.3 s, vs 9.8 s for the float32 Gram path; a power law: +3e-3, +5e-6); the mixed path < 2e-4 above.
At TOL = 0.01, lowrank at 16x on 7B shapes runs 0.9-1.6x as fast as subspace iteration with 3 power steps
(8 products) did before, at +0.5-0.6% tail energy vs its +0.7-0.9% (benchmarks/results/
compress_speed_cpu_1thread.json); svd=exact is there for the last half percent.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import single_threaded

METHODS = ("auto", "exact", "randomized")
EXACT_BELOW = 1024    # min(N, K) under which auto always takes the exact path
MAX_FRACTION = 0.5    # auto takes exact when MAX_DEPTH * (rank + oversample) exceeds this part of min(N, K)
DEPTH = 3             # Krylov blocks built before the convergence test is read (2 products with A each)
MAX_DEPTH = 6         # auto's limit before it falls back to exact
MIXED_MIN_RATIO = 1e-5  # auto's float32 eigh is kept while lam_r / lam_1 (= (s_r / s_1)^2) is above this
TOL = 0.01            # converged when the last block raised the top-rank energy by <= TOL * the tail energy
SUBSPACE_FRACTION = 0.15  # auto on the CPU: shifted subspace iteration when rank + oversample <= this of min(N, K)
SUBSPACE_STEPS = 2        # shifted steps before the convergence test is read
SUBSPACE_MAX_STEPS = 4    # still moving after this many -> the exact-mixed path (info.method "fallback")


@dataclass(frozen=True)
class SvdInfo:
    """How a truncated SVD was computed. ``method``: exact (float64 Gram), exact-mixed (float32 Gram path),
    randomized, unconverged (randomized_svd stopped at max_depth still moving), fallback (auto's
    randomized did not converge and the exact path was used). ``passes``: products with A of the
    randomized part; ``change``: its last convergence ratio (see TOL)."""

    method: str
    passes: int = 0
    change: float = 0.0


def default_oversample(rank: int) -> int:
    """Extra test vectors: 10, or 10% of a large rank (the tail vectors near the cut converge faster)."""
    return max(10, rank // 10)


def _work_dtype(mat: Tensor) -> torch.dtype:
    return torch.float64 if mat.dtype == torch.float64 else torch.float32


def _empty(mat: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    dt = _work_dtype(mat)
    n, k = mat.shape
    return mat.new_zeros(n, 0, dtype=dt), mat.new_zeros(0, dtype=dt), mat.new_zeros(0, k, dtype=dt)


def _unit_columns(x: Tensor) -> Tensor:
    norms = torch.linalg.vector_norm(x, dim=0)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def exact_svd(mat: Tensor, rank: int | None = None, mixed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``rank`` (all when None) SVD through the eigendecomposition of the smaller Gram; only the kept
    vectors are formed on the other side. Float64 throughout, or with ``mixed`` see _mixed_svd."""
    n, k = mat.shape
    if n > k:
        u, s, vh = exact_svd(mat.T, rank, mixed)
        return vh.T, s, u.T
    r = n if rank is None else min(rank, n)
    dt = _work_dtype(mat)
    if mixed and dt == torch.float32:
        out = _mixed_svd(mat.to(dt), r)
        if out is not None:
            return out
    m64 = mat.double()
    with single_threaded():
        w, u = torch.linalg.eigh(m64 @ m64.T)
    u, s = u.flip(1)[:, :r], w.flip(0)[:r].clamp_min(0).sqrt()    # descending, kept only
    vh = _unit_columns((u.T @ m64).T).T                            # unit rows even for tiny s
    return u.to(dt), s.to(dt), vh.to(dt)


def _mixed_svd(a: Tensor, r: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """The Gram, the top ``r`` of its eigendecomposition and the projections in float32 (the Gram 2x and
    eigh 4x faster than float64: 8.9 s vs 34.7 s at 4096, one thread here); None when float32 cannot
    resolve the cut. On the CPU the Gram and eigenvectors come from _top_eigh_cpu.

    Float32 eigenvectors carry errors ~1e-7 * lam_1 / gap: vectors with close eigenvalues mix, which
    leaves the energy the kept subspace captures float64-accurate while lam_r / lam_1 = (s_r / s_1)^2
    >= MIXED_MIN_RATIO (measured on 1024 x 2752: tail energy +2.6e-4 relative at s_r / s_1 = 6e-3,
    <1e-6 on flatter spectra). s is re-measured as ||u_i^T A|| (float64 sums), so it is exact for
    the vectors returned; they are re-sorted by it."""
    top = _top_eigh_cpu(a, r) if a.device.type == "cpu" else _top_eigh_torch(a, r)
    if top is None:
        return None
    return _project(a, *top)


def _project(a: Tensor, w: Tensor, u: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
    """(u, s, vh) from the top eigenpairs (w descending, u) of a a^T: s_i v_i^T = u_i^T a, re-measured
    and re-sorted (see _mixed_svd); None when float32 cannot place the kept vectors (MIXED_MIN_RATIO)."""
    if u.shape[1] and float(w[-1]) < MIXED_MIN_RATIO * float(w[0]):
        return None
    proj = u.T @ a                                                 # (r, K): s_i v_i^T
    s = torch.linalg.vector_norm(proj, dim=1, dtype=torch.float64)
    s, order = torch.sort(s, descending=True)
    u, proj = u[:, order], proj[order]
    return u, s.to(a.dtype), _unit_columns(proj.T).T


def _top_eigh_torch(a: Tensor, r: int) -> tuple[Tensor, Tensor] | None:
    """(w (r,) descending, u (m, r)): the top ``r`` eigenpairs of a a^T / max(diag), float32, torch.
    None for a zero ``a``."""
    gram = a @ a.T
    scale = gram.diagonal().amax()
    if not float(scale) > 0:
        return None
    with single_threaded():
        w, u = torch.linalg.eigh(gram / scale)
    return w.flip(0)[:r], u.flip(1)[:, :r]


def _top_eigh_cpu(a: Tensor, r: int) -> tuple[Tensor, Tensor] | None:
    """_top_eigh_torch on the CPU, 2.5-3x faster at 4096 x 11008 and rank 1305 (benchmarks/
    compress_speed.py --stages): the Gram by BLAS syrk (one triangle: half gemm's flops) and only the
    kept eigenvectors by LAPACK syevr (MRRR; torch's eigh, syevd, forms all m of them and back-transforms
    them: ~3/4 of its time at m = 4096). Float32 as _top_eigh_torch; the same subspace up to float32
    rounding."""
    from scipy.linalg import eigh
    from threadpoolctl import threadpool_limits

    m = a.shape[0]
    if r == 0:
        return a.new_zeros(0), a.new_zeros(m, 0)
    gram = _syrk_lower(a)                                          # (m, m) Fortran order, lower triangle
    scale = float(gram.diagonal().max())
    if not scale > 0:
        return None
    gram *= 1.0 / scale
    with threadpool_limits(limits=1, user_api="blas"):            # see linalg.single_threaded
        w, u = eigh(gram, lower=True, subset_by_index=[m - r, m - 1], driver="evr", overwrite_a=True,
                    check_finite=False)
    return torch.from_numpy(w[::-1].copy()), torch.from_numpy(u[:, ::-1].copy())


def _syrk_lower(a: Tensor):
    """a a^T of a float32 CPU ``a`` (m, big) by BLAS syrk (one triangle: half gemm's flops) as a
    Fortran-order numpy array holding the lower triangle (the upper one is zero)."""
    from scipy.linalg import blas  # scipy's BLAS: torch does not expose syrk
    from threadpoolctl import threadpool_limits

    # syrk reads a Fortran-order array: a row-major (m, big) is the Fortran-order a^T (trans=1 gives
    # a a^T); a transposed view of a row-major (big, m) is a in Fortran order (trans=0). No copy either way.
    if a.is_contiguous():
        f, trans = a.numpy().T, 1
    else:
        f, trans = a.T.contiguous().numpy().T, 0
    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        return blas.ssyrk(1.0, f, trans=trans, lower=1)


def gram_of_columns(x: Tensor) -> Tensor:
    """x^T x for a 2-D ``x``; float32 on the CPU by syrk (half the flops of x.T @ x), else x.T @ x."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or 0 in x.shape:
        return x.T @ x
    low = torch.from_numpy(_syrk_lower(x.T))
    full = low + low.T
    full.diagonal().mul_(0.5)
    return full


def energy(x: Tensor) -> float:
    """||x||_F^2: float32 row norms summed in float64 (a float64 norm of a 45M-entry matrix took 25x the
    time of the float32 one here; row norms keep the sum accurate to ~1e-6)."""
    return float(torch.linalg.vector_norm(x, dim=-1).double().square().sum())


def _mm(a: Tensor, z: Tensor) -> Tensor:
    """a @ z for a skinny z, computed as (z^T a^T)^T: 25-30% faster with this CPU BLAS on every layout
    of a 11008 x 4096 a times 204 columns (the wide result is produced row-major)."""
    return (z.T @ a.T).T


def _orthonormal(x: Tensor) -> Tensor:
    with single_threaded():
        return torch.linalg.qr(x).Q


def _small_svd(p: Tensor, basis: Tensor, gram: Tensor, rank: int) -> tuple[Tensor, Tensor, Tensor]:
    """A-side ~= P basis^T with P (M, d), basis (B, d) orthonormal and gram = P^T P in float64:
    (left (M, r), s (r,), right (r, B)) of P basis^T."""
    with single_threaded():
        w, vecs = torch.linalg.eigh(gram)                          # d x d, float64
    w, vecs = w.flip(0)[:rank], vecs.flip(1)[:, :rank]
    s = w.clamp_min(0).sqrt()
    left = _unit_columns(p.double() @ vecs).to(p.dtype)
    right = (basis @ vecs.to(basis.dtype)).T
    return left, s.to(p.dtype), right


def _top_energy(gram: Tensor, rank: int) -> float:
    with single_threaded():
        w = torch.linalg.eigvalsh(gram)
    return float(w.flip(0)[:rank].clamp_min(0).sum())


def _orthogonal_to(z: Tensor, basis: Tensor | None) -> Tensor:
    """Orthonormal columns spanning z with ``basis``'s span removed (block Gram-Schmidt, QR, twice:
    float32 loses orthogonality to earlier blocks after one pass)."""
    for _ in range(2):
        if basis is not None:
            z = z - basis @ (basis.T @ z)
        z = _orthonormal(z)
    return z


def randomized_svd(mat: Tensor, rank: int, *, oversample: int | None = None, depth: int = DEPTH,
                   max_depth: int | None = None, tol: float = TOL, seed: int = 0
                   ) -> tuple[Tensor, Tensor, Tensor, SvdInfo]:
    """Top-``rank`` SVD from a randomized block Krylov space (see the module docstring); (U, S, Vh, info).

    Builds ``depth`` blocks of q = rank + oversample vectors (2 products with A each); with ``max_depth``
    > depth it adds blocks while the last one still raised the energy of the top ``rank`` by more than
    ``tol`` times the energy left outside them, and reports ``info.method == "unconverged"`` if it
    stops at max_depth still moving."""
    if depth < 1:
        raise ValueError(f"randomized_svd: depth must be >= 1, got {depth}")
    n, k = mat.shape
    m = min(n, k)
    r = min(rank, m)
    if r <= 0:
        return (*_empty(mat), SvdInfo("randomized"))
    q = min(r + (default_oversample(r) if oversample is None else oversample), m)
    max_depth = max(depth, max_depth or depth)
    # The blocks X_j live on the larger side; P = A X on the smaller one, so the float64 Gram of P and
    # the products with it are of the short dimension.
    a = mat.to(_work_dtype(mat))
    a = a.T if n > k else a                                        # a: (m, big)
    total = energy(a)
    gen = torch.Generator(device=a.device).manual_seed(seed)
    y = torch.randn(a.shape[0], q, generator=gen, device=a.device, dtype=a.dtype)
    x_all = y_all = gram = None
    top, change = 0.0, float("inf")
    while True:
        x = _orthogonal_to(_mm(a.T, y), x_all)
        y = _mm(a, x)
        y64 = y.double()
        if gram is None:
            x_all, y_all, gram = x, y, y64.T @ y64
        else:
            cross = y_all.double().T @ y64
            gram = torch.cat([torch.cat([gram, cross], 1), torch.cat([cross.T, y64.T @ y64], 1)], 0)
            x_all, y_all = torch.cat([x_all, x], 1), torch.cat([y_all, y], 1)
        prev, top = top, _top_energy(gram, r)
        rest = total - top
        # a tail under the accuracy of the energies (an exactly low-rank or zero A) counts as converged
        change = 0.0 if rest <= 1e-5 * total else (top - prev) / rest
        blocks = x_all.shape[1] // q
        full = x_all.shape[1] + q > a.shape[1]                   # the Krylov space cannot grow further
        if full or (blocks >= depth and (change <= tol or blocks >= max_depth)):
            break
    left, s, right = _small_svd(y_all, x_all, gram, r)
    converged = max_depth == depth or change <= tol or full
    info = SvdInfo("randomized" if converged else "unconverged", 2 * blocks, change)
    if n > k:
        return right.T, s, left.T, info
    return left, s, right, info


def _full_gram(a: Tensor) -> tuple[Tensor, float]:
    """(a a^T, a lower estimate-ish of its smallest eigenvalue): on the CPU in float32 by syrk, mirrored,
    with the bottom eigenvalue from ARPACK (_bottom_eig_cpu); elsewhere a @ a.T and 0 (a PSD bound)."""
    if a.device.type != "cpu" or a.dtype != torch.float32:
        return a @ a.T, 0.0
    low = _syrk_lower(a)
    bottom = _bottom_eig_cpu(low)
    gram = torch.from_numpy(low)
    gram = gram + gram.T                                           # the upper triangle of low is zero
    gram.diagonal().mul_(0.5)
    return gram, bottom


def _bottom_eig_cpu(low) -> float:
    """The smallest eigenvalue of the symmetric matrix whose lower triangle is ``low`` (numpy, Fortran),
    to ARPACK's 10% (Lanczos, ~200 products with a vector: 0.4 s at 4096; at most 30 restarts); 0 if
    ARPACK does not settle.
    It only places the shift of _top_eigh_subspace, so an estimate suffices."""
    import numpy as np
    from scipy.linalg import blas
    from scipy.sparse.linalg import ArpackError, ArpackNoConvergence, LinearOperator, eigsh
    from threadpoolctl import threadpool_limits

    m = low.shape[0]
    if m < 3:
        return 0.0
    op = LinearOperator((m, m), matvec=lambda x: blas.ssymv(1.0, low, x, lower=1), dtype=np.float32)
    v0 = np.random.default_rng(0).standard_normal(m).astype(np.float32)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            w = eigsh(op, k=1, which="SA", tol=0.1, v0=v0, return_eigenvectors=False, maxiter=30)
    except (ArpackNoConvergence, ArpackError):
        return 0.0
    return max(0.0, float(w[0]))


def _top_eigh_subspace(a: Tensor, r: int, *, steps: int = SUBSPACE_STEPS, max_steps: int = SUBSPACE_MAX_STEPS,
                       tol: float = TOL, seed: int = 0):
    """Top ``r`` eigenpairs of G = a a^T (a: (m, big), float32) by shifted subspace iteration on G with
    Rayleigh-Ritz: q = r + oversample columns X, X <- orth((G - sigma I) X), only products with the
    m x m G and QRs (level-3 BLAS; no tridiagonalization of G, which is memory-bound and most of the
    exact-mixed path's time at m = 4096). The shift sigma = (theta_q + lam_min) / 2 (theta_q: the
    smallest Ritz value after the first step, lam_min: _full_gram's estimate) centres the damped
    interval [lam_min, theta_q]: the unwanted components shrink by (theta_q - sigma) / (lam_i - sigma)
    per step instead of theta_q / lam_i (on the power-law 7B-width deltas 0.78 vs 0.93 at the cut).
    Convergence as randomized_svd: the last step raised the energy of the q-space by <= ``tol`` times
    the tail energy (trace(G) - top-r Ritz energy), read from ``steps`` on, up to ``max_steps``.
    Returns (w (r,) descending, u (m, r), steps, change), or None for a zero ``a``."""
    m = a.shape[0]
    gram, bottom = _full_gram(a)
    scale = float(gram.diagonal().amax())
    if not scale > 0:
        return None
    gram, bottom = gram / scale, bottom / scale
    total = float(gram.diagonal().sum(dtype=torch.float64))
    q = min(m, r + default_oversample(r))
    gen = torch.Generator(device=a.device).manual_seed(seed)
    x = _orthonormal(_mm(gram, torch.randn(m, q, generator=gen, device=a.device, dtype=a.dtype)))
    y = _mm(gram, x)
    with single_threaded():
        theta = torch.linalg.eigvalsh((x.T @ y).double())
    sigma = max(0.0, (float(theta[0]) + bottom) / 2)
    prev, k = float(theta.sum()), 0
    while True:
        x = _orthonormal(y - sigma * x)
        y = _mm(gram, x)
        k += 1
        cur = float((x * y).sum(dtype=torch.float64))              # trace(X^T G X): the q-space energy
        if k >= steps:
            with single_threaded():
                w, c = torch.linalg.eigh((x.T @ y).double())
            w, c = w.flip(0)[:r], c.flip(1)[:, :r]
            rest = total - float(w.clamp_min(0).sum())
            change = 0.0 if rest <= 1e-5 * total else max(cur - prev, 0.0) / rest
            if change <= tol or k >= max_steps:
                break
        prev = cur
    return w.to(a.dtype), x @ c.to(a.dtype), k, change


def subspace_svd(mat: Tensor, rank: int, *, seed: int = 0, steps: int = SUBSPACE_STEPS,
                 max_steps: int = SUBSPACE_MAX_STEPS, tol: float = TOL) -> tuple[Tensor, Tensor, Tensor, SvdInfo]:
    """Top-``rank`` SVD by _top_eigh_subspace on the smaller side's Gram, the other side projected as in
    _mixed_svd; (U, S, Vh, info). Still moving after ``max_steps`` (a spectrum too flat at the cut), or
    a cut float32 cannot place (MIXED_MIN_RATIO), or a zero matrix: the exact path (exact_svd with
    mixed=True) and info.method "fallback"; else "subspace" with passes = products with G."""
    n, k = mat.shape
    r = min(rank, n, k)
    if r <= 0:
        return (*_empty(mat), SvdInfo("subspace"))
    a = mat.to(_work_dtype(mat))
    a = a.T if n > k else a                                        # a: (m, big)
    top = _top_eigh_subspace(a, r, steps=steps, max_steps=max_steps, tol=tol, seed=seed)
    if top is None:                                                # a zero matrix
        return (*exact_svd(mat, r, mixed=True), SvdInfo("fallback"))
    w, u, done, change = top
    out = _project(a, w, u) if change <= tol else None
    if out is None:
        return (*exact_svd(mat, r, mixed=True), SvdInfo("fallback", done + 2, change))
    u, s, vh = out
    info = SvdInfo("subspace", done + 2, change)
    return (vh.T, s, u.T, info) if n > k else (u, s, vh, info)


def truncated_svd(mat: Tensor, rank: int | None, method: str = "auto", *, oversample: int | None = None,
                  depth: int = DEPTH, seed: int = 0, with_info: bool = False):
    """Top-``rank`` SVD of a 2-D float ``mat`` (all of it when rank is None) by ``method`` (auto, exact,
    randomized; see the module docstring). Returns (U, S, Vh), plus an SvdInfo when ``with_info``."""
    if method not in METHODS:
        raise ValueError(f"truncated_svd: method must be one of {', '.join(METHODS)}, got {method!r}")
    if mat.dim() != 2:
        raise ValueError(f"truncated_svd: expected a 2-D tensor, got shape {tuple(mat.shape)}")
    if rank is not None and rank < 0:
        raise ValueError(f"truncated_svd: rank must be >= 0, got {rank}")
    m = min(mat.shape)
    r = m if rank is None else min(rank, m)
    if r == 0:
        out, info = _empty(mat), SvdInfo("exact")
    elif method == "randomized" and rank is not None:
        *out, info = randomized_svd(mat, r, oversample=oversample, depth=depth, seed=seed)
    elif method != "auto" or m < EXACT_BELOW or rank is None:  # None: every vector, the reference path
        out, info = exact_svd(mat, r), SvdInfo("exact")
    elif _randomized_pays(m, r, oversample):
        *out, info = randomized_svd(mat, r, oversample=oversample, depth=depth, max_depth=MAX_DEPTH,
                                    seed=seed)
        if info.method == "unconverged":
            out, info = exact_svd(mat, r, mixed=True), SvdInfo("fallback", info.passes, info.change)
    elif _subspace_pays(mat, m, r):
        *out, info = subspace_svd(mat, r, seed=seed)
    else:
        out, info = exact_svd(mat, r, mixed=True), SvdInfo("exact-mixed")
    u, s, vh = (t.contiguous() for t in out)
    return (u, s, vh, info) if with_info else (u, s, vh)


def _randomized_pays(m: int, rank: int, oversample: int | None) -> bool:
    """Whether the largest Krylov space auto may build is a small enough part of min(N, K)."""
    q = rank + (default_oversample(rank) if oversample is None else oversample)
    return MAX_DEPTH * q <= MAX_FRACTION * m


def _subspace_pays(mat: Tensor, m: int, rank: int) -> bool:
    """auto's shifted subspace iteration: float32 on the CPU (where the exact-mixed path's LAPACK
    tridiagonalization is memory-bound; CUDA's eigh is not) and q = rank + oversample small enough that
    ~5 products of the m x m Gram with q columns cost less than it (SUBSPACE_FRACTION)."""
    return (mat.device.type == "cpu" and mat.dtype == torch.float32
            and rank + default_oversample(rank) <= SUBSPACE_FRACTION * m)
