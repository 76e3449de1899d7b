"""The serving ops (sign_matmul_fused, sign_matmul_multi, ternary_matmul) against float64 products of
their references (deltacomp/ops.py), on both CPU code paths, odd shapes, error paths, opcheck."""
import itertools

import pytest
import torch

from deltacomp import ops
from deltacomp.codecs import get_codec
from deltacomp.quant import positions as P

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION,
                               reason=f"C++ extension deltacomp._C not built ({ops._EXT_ERROR})")

KS = (1, 7, 9, 33, 577)
MS = (1, 3, 17)
NS = (1, 5, 64)
XDTYPES = (torch.float32, torch.bfloat16)
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_close64(y, x, w_eff64, k, what, magnitude64=None):
    """|y - x @ w_eff^T| within fp32 accumulation error + rounding to y.dtype (w_eff float64 dense).
    magnitude64: the |terms| the kernel may sum separately (default |w_eff|); the fused kernels add
    x @ w^T and scale * (x @ sign^T), whose error scales with |w| + |scale|, not |w + scale * sign|."""
    want = x.to(torch.float64) @ w_eff64.T
    bound = x.to(torch.float64).abs() @ (w_eff64.abs() if magnitude64 is None else magnitude64).T
    tol = bound * (EPS[y.dtype] + 4 * 2.0 ** -23 * max(k, 1) ** 0.5) + 1e-30
    err = (y.to(torch.float64) - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max():.3g} (tol there {tol.flatten()[err.argmax()]:.3g})"


def _signs64(packed, k):
    return ops.unpack_signs_ref(packed, k, torch.float64)


def _scale_col(scale):
    return scale.to(torch.float64).reshape(-1, 1) if scale.dim() else scale.to(torch.float64)


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_path(request, monkeypatch):
    monkeypatch.setenv("DELTACOMP_ISA", request.param)
    return request.param


# -- references agree with the plain definitions (always run) ---------------------------------------
def test_fused_ref_is_base_plus_sign_matmul():
    g = _gen(1)
    x, w = torch.randn(3, 40, generator=g), torch.randn(6, 40, generator=g)
    p, s = ops.pack_signs_ref(torch.randn(6, 40, generator=g)), torch.rand(6, generator=g)
    torch.testing.assert_close(ops.sign_matmul_fused_ref(x, w, p, s, 40), x @ w.T + ops.sign_matmul_ref(x, p, s, 40))


def test_multi_ref_rows_follow_index():
    g = _gen(2)
    x = torch.randn(5, 20, generator=g)
    p = ops.pack_signs_ref(torch.randn(3, 4, 20, generator=g))
    s = torch.rand(3, generator=g)
    idx = torch.tensor([2, -1, 0, 2, 1])
    y = ops.sign_matmul_multi_ref(x, p, s, idx, 20)
    for i, t in enumerate(idx.tolist()):
        want = torch.zeros(4) if t < 0 else ops.sign_matmul_ref(x[i:i + 1], p[t], s[t], 20)[0]
        torch.testing.assert_close(y[i], want)


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_runtime_from_codec_support(per_row):
    """The runtime form built from the codec's decoded support reproduces the codec's decode."""
    g = _gen(3)
    delta = torch.randn(13, 37, generator=g)
    delta[4] = 0.0  # a row with nothing kept
    codec = get_codec("ternary")
    enc = codec.encode(delta, density=0.2, per_row=per_row)
    pos, signs = P.decode_support(enc.tensors, enc.params, delta.numel())
    rp, ns, cols = ops.ternary_runtime(pos, signs, (13, 37))
    assert rp.dtype == ns.dtype == torch.int64 and cols.dtype == torch.int32 and int(rp[-1]) == len(pos)
    assert int(rp[5] - rp[4]) == 0
    dense = ops.ternary_dense_ref(rp, ns, cols, 37) * _scale_col(enc.tensors["scale"]).float()
    torch.testing.assert_close(dense, codec.decode(enc))


def test_ref_errors():
    p = torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"w_base has shape \(4, 15\), packed needs \(4, 16\)"):
        ops.sign_matmul_fused_ref(torch.randn(2, 16), torch.randn(4, 15), p, torch.ones(()), 16)
    with pytest.raises(ValueError, match=r"index values must be in \[-1, 2\), got \[0, 2\]"):
        ops.sign_matmul_multi_ref(torch.randn(2, 16), p.expand(2, 4, 2), torch.ones(2), torch.tensor([0, 2]), 16)
    with pytest.raises(ValueError, match=r"scales must have shape \(2,\) or \(2, 4\), got \(3,\)"):
        ops.sign_matmul_multi_ref(torch.randn(2, 16), p.expand(2, 4, 2), torch.ones(3), torch.tensor([0, 1]), 16)
    with pytest.raises(ValueError, match="3 positions but 2 signs"):
        ops.ternary_runtime(torch.tensor([0, 1, 2]), torch.tensor([True, False]), (2, 2))
    with pytest.raises(ValueError, match=r"positions must be in \[0, 4\)"):
        ops.ternary_runtime(torch.tensor([0, 4]), torch.tensor([True, False]), (2, 2))


# -- kernels vs references -------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
def test_fused_vs_reference(cpu_path, xdtype, wdtype, per_row):
    for m, n, k in itertools.product(MS, NS, KS):
        g = _gen(m * 100000 + n * 1000 + k)
        x = torch.randn(m, k, generator=g).to(xdtype)
        w = torch.randn(n, k, generator=g).to(wdtype)
        packed = ops.pack_signs_ref(torch.randn(n, k, generator=g))
        scale = torch.rand(n if per_row else (), generator=g) + 0.1
        y = torch.ops.deltacomp.sign_matmul_fused(x, w, packed, scale, k)
        assert y.dtype == xdtype and y.shape == (m, n)
        w_eff = w.to(torch.float64) + _signs64(packed, k) * _scale_col(scale)
        magnitude = w.to(torch.float64).abs() + _scale_col(scale).abs()
        _assert_close64(y, x, w_eff, k, f"fused m={m} n={n} k={k}", magnitude)


@needs_ext
@pytest.mark.parametrize("kernel", ["default", "simd"])
@pytest.mark.parametrize("wdtype", (torch.float32, torch.bfloat16), ids=str)
def test_fused_one_row_vs_reference(cpu_path, monkeypatch, kernel, wdtype):
    """One x row, each sign pass (DELTACOMP_SIGN_KERNEL; AVX2 default: the 3-bit lookup tables after the
    dense pass of each 8-row tile): ragged tiles, k around the 32- and 256-weight blocks, all-zero w and
    x, every sign +1."""
    if kernel != "default":
        monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", kernel)
    for n, k in itertools.product((1, 7, 8, 9, 17), (31, 32, 63, 257, 300, 1031)):
        g = _gen(n * 1000 + k)
        x = torch.randn(1, k, generator=g)
        w = torch.randn(n, k, generator=g).to(wdtype)
        packed = ops.pack_signs_ref(torch.randn(n, k, generator=g))
        scale = torch.rand(n, generator=g) + 0.1
        for xi, wi, pi in ((x, w, packed), (x, torch.zeros_like(w), ops.pack_signs_ref(torch.ones(n, k))),
                           (torch.zeros_like(x), w, packed)):
            y = torch.ops.deltacomp.sign_matmul_fused(xi, wi, pi, scale, k)
            w_eff = wi.to(torch.float64) + _signs64(pi, k) * _scale_col(scale)
            magnitude = wi.to(torch.float64).abs() + _scale_col(scale).abs()
            _assert_close64(y, xi, w_eff, k, f"fused one row n={n} k={k}", magnitude)


@needs_ext
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
@pytest.mark.parametrize("tenants", [1, 3])
def test_multi_vs_reference(cpu_path, xdtype, per_row, tenants):
    for m, n, k in itertools.product(MS, NS, KS):
        g = _gen(m * 100000 + n * 1000 + k + tenants)
        x = torch.randn(m, k, generator=g).to(xdtype)
        packed = ops.pack_signs_ref(torch.randn(tenants, n, k, generator=g))
        scales = torch.rand((tenants, n) if per_row else (tenants,), generator=g) + 0.1
        index = torch.randint(-1, tenants, (m,), generator=g)
        index[0] = tenants - 1  # at least one row with a delta
        y = torch.ops.deltacomp.sign_matmul_multi(x, packed, scales, index, k)
        assert y.dtype == xdtype and y.shape == (m, n)
        for i, t in enumerate(index.tolist()):
            if t < 0:
                assert torch.equal(y[i], torch.zeros(n, dtype=xdtype))
            else:
                w_eff = _signs64(packed[t], k) * _scale_col(scales[t])
                _assert_close64(y[i:i + 1], x[i:i + 1], w_eff, k, f"multi m={m} n={n} k={k} row {i}")


@needs_ext
def test_multi_all_base_rows_and_empty(cpu_path):
    packed = ops.pack_signs_ref(torch.randn(2, 5, 33))
    y = torch.ops.deltacomp.sign_matmul_multi(torch.randn(3, 33), packed, torch.ones(2), torch.full((3,), -1), 33)
    assert torch.equal(y, torch.zeros(3, 5))
    y = torch.ops.deltacomp.sign_matmul_multi(torch.zeros(0, 33), packed, torch.ones(2),
                                              torch.zeros(0, dtype=torch.int64), 33)
    assert y.shape == (0, 5)


@needs_ext
@pytest.mark.parametrize("xdtype", XDTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_ternary_vs_reference(xdtype, per_row, density):
    for m, n, k in itertools.product(MS, NS, KS):
        g = _gen(m * 100000 + n * 1000 + k)
        x = torch.randn(m, k, generator=g).to(xdtype)
        keep = (torch.rand(n, k, generator=g) < density).reshape(-1)
        pos = keep.nonzero().reshape(-1)
        signs = torch.rand(pos.numel(), generator=g) < 0.5
        rp, ns, cols = ops.ternary_runtime(pos, signs, (n, k))
        scale = torch.rand(n if per_row else (), generator=g) + 0.1
        y = torch.ops.deltacomp.ternary_matmul(x, rp, ns, cols, scale, k)
        assert y.dtype == xdtype and y.shape == (m, n)
        w_eff = ops.ternary_dense_ref(rp, ns, cols, k).to(torch.float64) * _scale_col(scale)
        _assert_close64(y, x, w_eff, k, f"ternary m={m} n={n} k={k}")


@needs_ext
def test_public_wrappers_agree_with_references():
    g = _gen(5)
    x = torch.randn(4, 70, generator=g)
    w = torch.randn(9, 70, generator=g)
    p = ops.pack_signs(torch.randn(9, 70, generator=g))
    s = torch.rand(9, dtype=torch.float64, generator=g)  # the wrappers convert scales to fp32
    torch.testing.assert_close(ops.sign_matmul_fused(x, w, p, s, 70), ops.sign_matmul_fused_ref(x, w, p, s.float(), 70))
    stack = torch.stack([p, ops.pack_signs(torch.randn(9, 70, generator=g))])
    idx = torch.tensor([1, -1, 0, 1], dtype=torch.int32)  # the wrapper converts the index to int64
    sc = torch.rand(2, dtype=torch.float64, generator=g)
    torch.testing.assert_close(ops.sign_matmul_multi(x, stack, sc, idx, 70),
                               ops.sign_matmul_multi_ref(x, stack, sc.float(), idx.long(), 70))
    rp, ns, cols = ops.ternary_runtime(torch.tensor([0, 5, 71, 139]), torch.tensor([True, False, True, True]), (2, 70))
    torch.testing.assert_close(ops.ternary_matmul(x, rp, ns, cols, torch.ones(()), 70),
                               ops.ternary_matmul_ref(x, rp, ns, cols, torch.ones(()), 70))


@needs_ext
def test_errors_carry_values():
    p = torch.zeros(4, 2, dtype=torch.uint8)
    x = torch.randn(2, 16)
    f = torch.ops.deltacomp.sign_matmul_fused
    with pytest.raises(RuntimeError, match="w_base must be float32 or bfloat16, got Half"):
        f(x, torch.randn(4, 16).half(), p, torch.ones(()), 16)
    with pytest.raises(RuntimeError, match=r"w_base has 15 columns \(shape \[4, 15\]\) but k=16"):
        f(x, torch.randn(4, 15), p, torch.ones(()), 16)
    with pytest.raises(RuntimeError, match=r"packed must have shape \(5, 2\) .* got \[4, 2\]"):
        f(x, torch.randn(5, 16), p, torch.ones(()), 16)
    with pytest.raises(RuntimeError, match=r"scale must have shape .* or \(4,\).*got \[3\]"):
        f(x, torch.randn(4, 16), p, torch.ones(3), 16)
    with pytest.raises(RuntimeError, match=r"x has 16 columns \(shape \[2, 16\]\) but k=17"):
        f(x, torch.randn(4, 17), torch.zeros(4, 3, dtype=torch.uint8), torch.ones(()), 17)
    with pytest.raises(RuntimeError, match="w_base must be contiguous"):
        f(x, torch.randn(16, 4).T, p, torch.ones(()), 16)

    mp = torch.zeros(3, 4, 2, dtype=torch.uint8)
    mm = torch.ops.deltacomp.sign_matmul_multi
    with pytest.raises(RuntimeError, match=r"index\[1\]=3 is outside \[-1, 3\)"):
        mm(x, mp, torch.ones(3), torch.tensor([0, 3]), 16)
    with pytest.raises(RuntimeError, match=r"index\[0\]=-2 is outside"):
        mm(x, mp, torch.ones(3), torch.tensor([-2, 0]), 16)
    with pytest.raises(RuntimeError, match="index must be int64, got Int"):
        mm(x, mp, torch.ones(3), torch.tensor([0, 1], dtype=torch.int32), 16)
    with pytest.raises(RuntimeError, match="index has 3 entries but x has 2 rows"):
        mm(x, mp, torch.ones(3), torch.tensor([0, 1, 2]), 16)
    with pytest.raises(RuntimeError, match=r"scales must have shape \(3,\) .* or \(3, 4\) .*got \[3, 5\]"):
        mm(x, mp, torch.ones(3, 5), torch.tensor([0, 1]), 16)
    with pytest.raises(RuntimeError, match="packed must be 3-D, got shape"):
        mm(x, p, torch.ones(3), torch.tensor([0, 1]), 16)
    with pytest.raises(RuntimeError, match="k=17 needs 3 bytes per row, but packed has 2"):
        mm(torch.randn(2, 17), mp, torch.ones(3), torch.tensor([0, 1]), 17)

    rp, ns, cols = ops.ternary_runtime(torch.tensor([0, 5, 17]), torch.tensor([True, False, True]), (2, 16))
    tm = torch.ops.deltacomp.ternary_matmul
    with pytest.raises(RuntimeError, match="cols must be int32, got Long"):
        tm(x, rp, ns, cols.long(), torch.ones(()), 16)
    with pytest.raises(RuntimeError, match=r"cols\[1\]=16 is outside \[0, k=16\)"):
        tm(x, rp, ns, torch.tensor([0, 16, 1], dtype=torch.int32), torch.ones(()), 16)
    with pytest.raises(RuntimeError, match="row_ptr must start at 0 and end at nnz=3, got 0 and 4"):
        tm(x, torch.tensor([0, 2, 4]), ns, cols, torch.ones(()), 16)
    with pytest.raises(RuntimeError, match=r"row 0: need row_ptr\[r\] <= neg_start\[r\] <= .*, got 0, 3, 2"):
        tm(x, rp, torch.tensor([3, 2]), cols, torch.ones(()), 16)
    with pytest.raises(RuntimeError, match="neg_start has 1 entries, row_ptr says N=2"):
        tm(x, rp, ns[:1], cols, torch.ones(()), 16)


@needs_ext
def test_opcheck():
    g = _gen(9)
    x = torch.randn(3, 20, generator=g)
    w = torch.randn(5, 20, generator=g)
    p = ops.pack_signs_ref(torch.randn(5, 20, generator=g))
    stack = ops.pack_signs_ref(torch.randn(2, 5, 20, generator=g))
    pos = torch.tensor([0, 3, 21, 40, 41, 99])
    rp, ns, cols = ops.ternary_runtime(pos, torch.tensor([True, False, False, True, True, False]), (5, 20))
    for dtype in XDTYPES:
        xd = x.to(dtype)
        for wd in (torch.float32, torch.bfloat16):
            torch.library.opcheck(torch.ops.deltacomp.sign_matmul_fused.default, (xd, w.to(wd), p, torch.rand(5), 20))
        torch.library.opcheck(torch.ops.deltacomp.sign_matmul_multi.default,
                              (xd, stack, torch.rand(2, 5), torch.tensor([1, -1, 0]), 20))
        torch.library.opcheck(torch.ops.deltacomp.ternary_matmul.default, (xd, rp, ns, cols, torch.rand(()), 20))


@needs_ext
def test_torch_compile():
    x = torch.randn(3, 40)
    w = torch.randn(6, 40)
    p = ops.pack_signs_ref(torch.randn(6, 40))
    s = torch.rand(6)
    f = torch.compile(lambda x: ops.sign_matmul_fused(x, w, p, s, 40) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), ops.sign_matmul_fused_ref(x, w, p, s, 40) * 2)
