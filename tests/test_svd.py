"""quant/svd.py: truncated SVD paths against the float64 reference, fallbacks, determinism, edge cases."""
import pytest
import torch

from deltacomp.codecs import get_codec
from deltacomp.codecs.svd_mixed.codec import _refit
from deltacomp.quant import svd as S


def _spectrum(n, k, sigma, seed, noise=0.0):
    """A matrix with singular values ``sigma`` (random singular vectors) plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    m = len(sigma)
    u = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(k, m, generator=g, dtype=torch.float64)).Q
    d = (u * torch.as_tensor(sigma, dtype=torch.float64)) @ v.T
    d = d + noise * float(d.norm()) / (n * k) ** 0.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return d.float()


def _power_law(n, k, alpha, seed, noise=0.0):
    return _spectrum(n, k, (torch.arange(min(n, k)) + 1.0) ** -alpha, seed, noise)


def _real_like(n, k, seed):
    """A fine-tune-like delta: a few strong directions, a power-law body and noise."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g)
    return 0.5 * low / low.norm() + _power_law(n, k, 0.6, seed + 1, noise=0.5) / 1.0


CASES = {"pl0.5": lambda n, k: _power_law(n, k, 0.5, 1, noise=0.3), "pl1": lambda n, k: _power_law(n, k, 1.0, 2),
         "real_like": lambda n, k: _real_like(n, k, 3)}


def _tail(d, u, s, vh):
    """||d - U S Vh||_F^2 in float64."""
    return float(torch.linalg.matrix_norm(d.double() - (u.double() * s.double()) @ vh.double())) ** 2


def _reference(d, r):
    ref = torch.linalg.svdvals(d.double())
    return ref[:r], float((ref[r:] ** 2).sum())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(300, 520), (520, 300)])
@pytest.mark.parametrize("rank", [6, 30])
def test_randomized_matches_exact(case, shape, rank):
    d = CASES[case](*shape)
    u, s, vh, info = S.randomized_svd(d, rank, depth=3, max_depth=4)
    ref_s, ref_tail = _reference(d, rank)
    assert info.method == "randomized" and u.shape == (shape[0], rank) and vh.shape == (rank, shape[1])
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(s.double()[: rank // 2], ref_s[: rank // 2], rtol=1e-3)   # the top half: tight
    assert torch.allclose(s.double(), ref_s, rtol=3e-2)
    assert _tail(d, u, s, vh) <= ref_tail * 1.01 + 1e-10                      # within 1% of the optimum
    eye = torch.eye(rank)
    assert torch.allclose(u.T @ u, eye, atol=1e-4) and torch.allclose(vh @ vh.T, eye, atol=1e-4)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(300, 520), (520, 300)])
def test_mixed_precision_exact_matches_float64(case, shape):
    d = CASES[case](*shape)
    r = 96  # ~30% of min(N, K): svd-mixed's regime
    u, s, vh = S.exact_svd(d, r, mixed=True)
    ref_s, ref_tail = _reference(d, r)
    assert torch.allclose(s.double()[:34], ref_s[:34], rtol=1e-4)
    assert _tail(d, u, s, vh) <= ref_tail * (1 + 1e-3) + 1e-10
    assert torch.all(s[:-1] >= s[1:])


def test_mixed_precision_falls_back_on_steep_spectrum():
    d = _power_law(120, 200, 3.0, 4)  # s_r / s_1 ~ 1e-5 at r = 60: float32 eigh cannot place those vectors
    assert S._mixed_svd(d, 60) is None
    for a, b in zip(S.exact_svd(d, 60, mixed=True), S.exact_svd(d, 60)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("shape", [(301, 517), (517, 301)])
def test_subspace_matches_float64_exact(case, shape):
    d = CASES[case](*shape)
    r = 45  # ~15% of min(N, K): the ranks auto gives this path
    u, s, vh, info = S.subspace_svd(d, r)
    ref_s, ref_tail = _reference(d, r)
    assert info.method == "subspace" and S.SUBSPACE_STEPS + 2 <= info.passes <= S.SUBSPACE_MAX_STEPS + 2
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    assert torch.all(s[:-1] >= s[1:])
    assert torch.allclose(s.double()[:10], ref_s[:10], rtol=1e-3)             # the top: tight
    assert _tail(d, u, s, vh) <= ref_tail * 1.01 + 1e-10                      # within 1% of the optimum
    eye = torch.eye(r)
    assert torch.allclose(u.T @ u, eye, atol=1e-4) and torch.allclose(vh @ vh.T, eye, atol=1e-4)


def test_subspace_falls_back_on_flat_spectrum():
    d = torch.randn(300, 500, generator=torch.Generator().manual_seed(11))  # Marchenko-Pastur: flat at the cut
    u, s, vh, info = S.subspace_svd(d, 40, max_steps=2, tol=1e-4)
    assert info.method == "fallback" and info.passes == 4 and info.change > 1e-4
    for a, b in zip((u, s, vh), S.exact_svd(d, 40, mixed=True)):
        assert torch.equal(a, b)
    *_, info = S.subspace_svd(d, 40)                                           # more steps, TOL: converges
    assert info.method == "subspace"


def test_subspace_edge_cases():
    z = torch.zeros(50, 80)
    u, s, vh, info = S.subspace_svd(z, 5)                                      # zero: the exact path's zeros
    assert info.method == "fallback" and torch.equal(s, torch.zeros(5)) and torch.isfinite(u).all()
    d = CASES["pl1"](40, 7)
    u, s, vh, info = S.subspace_svd(d, 7)                                      # every vector (q = min dim)
    assert torch.allclose((u * s) @ vh, d, atol=1e-5)
    u, s, vh, info = S.subspace_svd(d, 0)
    assert u.shape == (40, 0) and vh.shape == (0, 7)
    a, b = S.subspace_svd(d, 3, seed=4), S.subspace_svd(d, 3, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a[:3], b[:3]))                # deterministic for a seed
    assert S.subspace_svd(d.double(), 3)[0].dtype == torch.float64


def test_auto_routes_and_falls_back(monkeypatch):
    monkeypatch.setattr(S, "EXACT_BELOW", 0)  # let auto decide on small test matrices
    d = CASES["real_like"](300, 520)
    *_, info = S.truncated_svd(d, 10, "auto", with_info=True)
    assert info.method == "randomized" and info.passes in (6, 8)
    *_, info = S.truncated_svd(d, 100, "auto", with_info=True)          # 4 blocks would be most of min dim
    assert info.method == "exact-mixed"
    *_, info = S.truncated_svd(d, 30, "auto", with_info=True)           # q = 40 <= SUBSPACE_FRACTION * 300
    assert info.method == "subspace"
    *_, info = S.truncated_svd(d.double(), 30, "auto", with_info=True)  # float64: the exact path
    assert info.method == "exact-mixed"
    monkeypatch.setattr(S, "TOL", 0.0)                                   # nothing converges: exact instead
    monkeypatch.setattr(S.randomized_svd, "__kwdefaults__", {**S.randomized_svd.__kwdefaults__, "tol": 0.0})
    u, s, vh, info = S.truncated_svd(d, 10, "auto", with_info=True)
    assert info.method == "fallback" and info.passes == 2 * S.MAX_DEPTH
    for a, b in zip((u, s, vh), S.exact_svd(d, 10, mixed=True)):
        assert torch.equal(a, b)
    monkeypatch.setattr(S, "EXACT_BELOW", 10_000)
    *_, info = S.truncated_svd(d, 10, "auto", with_info=True)
    assert info.method == "exact"


def test_deterministic_given_seed():
    d = CASES["pl0.5"](200, 330)
    a = S.truncated_svd(d, 12, "randomized", seed=5)
    b = S.truncated_svd(d, 12, "randomized", seed=5)
    c = S.truncated_svd(d, 12, "randomized", seed=6)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    S.truncated_svd(d, 12, "randomized")
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is left alone
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and torch.allclose(a[1], c[1], rtol=1e-2)


@pytest.mark.parametrize("method", ["exact", "randomized", "auto"])
@pytest.mark.parametrize("shape", [(1, 77), (77, 1), (9, 40), (40, 9)])
def test_edge_cases(method, shape):
    n, k = shape
    m = min(shape)
    d = torch.randn(shape, generator=torch.Generator().manual_seed(n * k))
    for rank in [0, 1, m, m + 5]:                                      # rank >= min dim is clipped
        u, s, vh = S.truncated_svd(d, rank, method)
        r = min(rank, m)
        assert u.shape == (n, r) and s.shape == (r,) and vh.shape == (r, k)
        assert u.dtype == s.dtype == vh.dtype == torch.float32
    u, s, vh = S.truncated_svd(d, m, method)
    assert torch.allclose((u * s) @ vh, d, atol=1e-4)                   # full rank: exact reconstruction
    u, s, vh = S.truncated_svd(d, None, method)                         # None: all of it (exact path)
    assert s.shape == (m,)
    z = torch.zeros(shape)
    u, s, vh = S.truncated_svd(z, 2, method)
    assert torch.equal(s, torch.zeros(min(2, m))) and torch.isfinite(u).all() and torch.isfinite(vh).all()
    assert torch.equal((u * s) @ vh, z)


def test_float64_input_stays_float64():
    d = CASES["pl1"](60, 90).double()
    for method in ["exact", "randomized"]:
        u, s, vh = S.truncated_svd(d, 5, method)
        assert u.dtype == s.dtype == vh.dtype == torch.float64


def test_bad_arguments():
    with pytest.raises(ValueError, match="method must be one of"):
        S.truncated_svd(torch.randn(4, 4), 2, "lanczos")
    with pytest.raises(ValueError, match="2-D"):
        S.truncated_svd(torch.randn(4), 2)
    with pytest.raises(ValueError, match="rank must be >= 0"):
        S.truncated_svd(torch.randn(4, 4), -1)
    with pytest.raises(ValueError, match="depth must be >= 1"):
        S.randomized_svd(torch.randn(4, 4), 2, depth=0)


def _rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("shape", [(260, 400), (400, 260)])
def test_codecs_close_to_exact_path(shape):
    d = CASES["real_like"](*shape)
    sm, lr = get_codec("svd-mixed"), get_codec("lowrank")
    e_exact = _rel(sm.decode(sm.encode(d, svd="exact")), d)
    for method in ["randomized", "auto"]:
        enc = sm.encode(d, svd=method)
        assert enc.nbytes == sm.encode(d, svd="exact").nbytes                 # same allocation, same bytes
        assert _rel(sm.decode(enc), d) <= e_exact * 1.01
    l_exact = _rel(lr.decode(lr.encode(d, ratio=16, svd="exact")), d)
    assert _rel(lr.decode(lr.encode(d, ratio=16, svd="randomized")), d) <= l_exact * 1.005


def test_svd_mixed_mixed_precision_path_close_to_exact(monkeypatch):
    monkeypatch.setattr(S, "EXACT_BELOW", 0)  # the path auto takes at 7B widths, here on a small matrix
    d = CASES["real_like"](260, 400)
    sm = get_codec("svd-mixed")
    e_exact = _rel(sm.decode(sm.encode(d, svd="exact")), d)
    *_, info = S.truncated_svd(d, 100, "auto", with_info=True)
    assert info.method == "exact-mixed"
    assert abs(_rel(sm.decode(sm.encode(d, svd="auto")), d) - e_exact) <= 1e-3 * e_exact


def test_refit_cholesky_matches_lstsq_and_survives_singular_gram():
    g = torch.Generator().manual_seed(7)
    delta = torch.randn(50, 70, generator=g)
    v_hat = torch.linalg.qr(torch.randn(70, 12, generator=g)).Q.T + 0.05 * torch.randn(12, 70, generator=g)
    u, s = _refit(delta, v_hat)
    ref = torch.linalg.lstsq(v_hat.T.double(), delta.T.double()).solution.T  # (50, 12)
    assert torch.allclose((u * s).double(), ref, atol=1e-5)
    v_dup = torch.cat([v_hat[:6], v_hat[:6]])                        # singular Gram: gelsd route
    u2, s2 = _refit(delta, v_dup)
    assert torch.isfinite(u2).all() and torch.isfinite(s2).all()
    assert _rel((u2 * s2) @ v_dup, delta) <= _rel((u * s) @ v_hat, delta) + 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_same_code_path():
    d = CASES["real_like"](300, 520)
    for method in ["randomized", "exact"]:
        u, s, vh = S.truncated_svd(d.cuda(), 20, method)
        assert u.device.type == "cuda" and s.device.type == "cuda" and vh.device.type == "cuda"
        ref_s, ref_tail = _reference(d, 20)
        assert torch.allclose(s.double().cpu()[:10], ref_s[:10], rtol=1e-3)
        assert _tail(d, u.cpu(), s.cpu(), vh.cpu()) <= ref_tail * 1.01 + 1e-10
    u, s, vh, info = S.subspace_svd(d.cuda(), 40)
    assert u.device.type == "cuda" and info.method == "subspace"
    assert _tail(d, u.cpu(), s.cpu(), vh.cpu()) <= _reference(d, 40)[1] * 1.01 + 1e-10
    u, s, vh = S.exact_svd(d.cuda(), 60, mixed=True)
    assert s.device.type == "cuda"


@pytest.mark.parametrize("noise", [1.0, 1e-4])  # the expansion (large error) and the direct route (small)
def test_fit_error_matches_direct(noise):
    from deltacomp.codecs.svd_mixed.codec import _fit_error
    g = torch.Generator().manual_seed(8)
    v_hat = torch.randn(9, 70, generator=g)
    a = torch.randn(50, 9, generator=g)
    delta = a @ v_hat + noise * torch.randn(50, 70, generator=g)
    direct = float(torch.linalg.matrix_norm((delta - a @ v_hat).double())) ** 2
    got = _fit_error(delta, a, v_hat, delta @ v_hat.T, v_hat @ v_hat.T)
    assert got == pytest.approx(direct, rel=1e-4)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (37, 91), (91, 37), (64, 64)])
@pytest.mark.parametrize("view", ["contiguous", "transposed"])
def test_top_eigh_cpu_matches_float64(shape, view):
    """scipy's syrk + syevr path against the float64 eigendecomposition: odd shapes, one row, a
    transposed (non-contiguous) input, ranks 1 and all."""
    d = _power_law(*shape, 0.5, 5, noise=0.2)
    a = d.T.contiguous().T if view == "transposed" else d
    assert a.is_contiguous() == (view == "contiguous" or 1 in shape)
    m = a.shape[0]
    g64 = a.double() @ a.double().T
    ref_w, ref_u = torch.linalg.eigh(g64 / g64.diagonal().max())
    for r in sorted({1, m // 2, m} - {0}):
        w, u = S._top_eigh_cpu(a, r)
        assert w.dtype == u.dtype == torch.float32 and w.shape == (r,) and u.shape == (m, r)
        assert torch.allclose(w.double(), ref_w.flip(0)[:r], rtol=1e-4, atol=1e-6)
        assert torch.all(w[:-1] >= w[1:])
        # the kept subspace captures the top-r energy (vectors may mix inside a cluster)
        captured = float((u.double().T @ a.double()).square().sum())
        assert captured == pytest.approx(float(ref_w.flip(0)[:r].sum() * g64.diagonal().max()), rel=1e-4)
        assert torch.allclose(u.T @ u, torch.eye(r), atol=1e-4)


def test_top_eigh_cpu_zero_and_rank_zero():
    assert S._top_eigh_cpu(torch.zeros(5, 9), 3) is None
    w, u = S._top_eigh_cpu(torch.randn(5, 9), 0)
    assert w.shape == (0,) and u.shape == (5, 0)
    assert S.exact_svd(torch.zeros(5, 9), 3, mixed=True)[1].abs().max() == 0  # the float64 path takes it


def test_mixed_svd_cpu_path_matches_torch_path():
    """The CPU (scipy) and the torch (other devices) Gram paths give the same factors on one matrix."""
    d = _real_like(150, 260, 6)
    for mat in (d, d.T):
        a = mat if mat.shape[0] <= mat.shape[1] else mat.T
        w1, u1 = S._top_eigh_cpu(a, 40)
        w2, u2 = S._top_eigh_torch(a, 40)
        assert torch.allclose(w1, w2, rtol=1e-4, atol=1e-6)
        assert torch.allclose((u1.T @ u2).abs().diagonal()[:20], torch.ones(20), atol=1e-3)


def test_svd_mixed_subspace_path_close_to_exact(monkeypatch):
    monkeypatch.setattr(S, "EXACT_BELOW", 0)
    monkeypatch.setattr(S, "SUBSPACE_FRACTION", 0.5)  # svd-mixed's 16x ranks (~30%) through the subspace path
    d = CASES["real_like"](260, 400)
    sm = get_codec("svd-mixed")
    e_exact = _rel(sm.decode(sm.encode(d, svd="exact")), d)
    r = sum(c for _, c in sm.allocation_for(tuple(d.shape), sm.resolve_settings({})))
    *_, info = S.truncated_svd(d, r, "auto", with_info=True)
    assert info.method == "subspace"
    assert _rel(sm.decode(sm.encode(d, svd="auto")), d) <= e_exact * 1.005
