"""The packed ops against their references (deltacomp/ops.py): exact for packing, within dtype
tolerance of a float64 product for sign_matmul, on both CPU code paths; error paths; opcheck."""
import itertools

import pytest
import torch

from deltacomp import ops

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION,
                               reason=f"C++ extension deltacomp._C not built ({ops._EXT_ERROR})")

KS = (1, 7, 8, 9, 31, 32, 33, 100, 577)
MS = (1, 2, 3, 17)
NS = (1, 5, 64)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _sign_matmul_f64(x, packed, scale, k):
    """Independent float64 product: dense signs from the reference unpack, scale applied per row."""
    signs = ops.unpack_signs_ref(packed, k, torch.float64)
    s = scale.to(torch.float64).reshape(-1)
    return (x.to(torch.float64) @ signs.T) * s


def _tolerance(x, scale, k, dtype):
    # fp32 accumulation error grows ~ eps32 * sqrt(k) * |x|; the output rounding to dtype adds
    # eps(dtype) * |y|, with |y| <= max|scale| * sum|x| per row.
    bound = x.to(torch.float64).abs().sum(1, keepdim=True) * scale.abs().max().to(torch.float64)
    eps = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}[dtype]
    return bound * (eps + 4 * 2.0 ** -23 * max(k, 1) ** 0.5) + 1e-30


# -- references (always run) ----------------------------------------------------------------------
@pytest.mark.parametrize("k", KS)
def test_pack_ref_layout(k):
    x = torch.randn(3, k, generator=_gen(k))
    packed = ops.pack_signs_ref(x)
    assert packed.dtype == torch.uint8 and packed.shape == (3, (k + 7) // 8)
    for r in range(3):  # bit i of byte j is element 8j + i, 1 for x >= 0, pad bits 0
        for t in range(k):
            assert (int(packed[r, t // 8]) >> (t % 8)) & 1 == int(x[r, t] >= 0)
        for t in range(k, 8 * packed.shape[1]):
            assert (int(packed[r, t // 8]) >> (t % 8)) & 1 == 0
    assert torch.equal(ops.unpack_signs_ref(packed, k), torch.where(x >= 0, 1.0, -1.0))


def test_ref_zero_and_nan_signs():
    x = torch.tensor([[0.0, -0.0, float("nan"), -1.0, 2.0]])
    assert torch.equal(ops.unpack_signs_ref(ops.pack_signs_ref(x), 5), torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]]))


def test_ref_sign_matmul_matches_dense():
    g = _gen(0)
    x, w = torch.randn(4, 50, generator=g), torch.randn(6, 50, generator=g)
    scale = torch.rand(6, generator=g)
    dense = torch.where(w >= 0, 1.0, -1.0) * scale[:, None]
    torch.testing.assert_close(ops.sign_matmul_ref(x, ops.pack_signs_ref(w), scale, 50), x @ dense.T)


def test_ref_errors():
    p = torch.zeros(4, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="uint8"):
        ops.unpack_signs_ref(p.to(torch.int32), 16)
    with pytest.raises(ValueError, match="k=17 needs 3 bytes per row, but packed has 2"):
        ops.unpack_signs_ref(p, 17)
    with pytest.raises(ValueError, match=r"scale must have shape .*\(4,\).*got \(3,\)"):
        ops.sign_matmul_ref(torch.randn(2, 16), p, torch.ones(3), 16)
    with pytest.raises(ValueError, match="x has 15 columns"):
        ops.sign_matmul_ref(torch.randn(2, 15), p, torch.ones(4), 16)


# -- extension vs references ------------------------------------------------------------------------
@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_path(request, monkeypatch):
    """Runs a test on each CPU code path forced through DELTACOMP_ISA (a path the CPU lacks runs its best
    one instead)."""
    monkeypatch.setenv("DELTACOMP_ISA", request.param)
    return request.param


@needs_ext
@pytest.mark.parametrize("n,k", list(itertools.product((1, 5, 64), KS)))
def test_pack_unpack_exact(n, k):
    x = torch.randn(n, k, generator=_gen(n * 1000 + k))
    x[0, 0] = 0.0
    if k > 2:
        x[0, 1], x[0, 2] = -0.0, float("nan")
    packed = torch.ops.deltacomp.pack_signs(x)
    assert torch.equal(packed, ops.pack_signs_ref(x))
    assert torch.equal(torch.ops.deltacomp.unpack_signs(packed, k), ops.unpack_signs_ref(packed, k))


@needs_ext
def test_unpack_ignores_pad_bits():
    packed = torch.full((3, 2), 255, dtype=torch.uint8)  # pad bits set: must not leak into the output
    assert torch.equal(torch.ops.deltacomp.unpack_signs(packed, 11), torch.ones(3, 11))
    x = torch.randn(2, 11)
    y = torch.ops.deltacomp.sign_matmul(x, packed, torch.ones(()), 11)
    torch.testing.assert_close(y, x.sum(1, keepdim=True).expand(2, 3))


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_row", [False, True], ids=["tensor", "row"])
def test_sign_matmul_vs_reference(cpu_path, dtype, per_row):
    for m, n, k in itertools.product(MS, NS, KS):
        g = _gen(m * 100000 + n * 1000 + k)
        x = torch.randn(m, k, generator=g).to(dtype)
        packed = ops.pack_signs_ref(torch.randn(n, k, generator=g))
        scale = torch.rand(n if per_row else (), generator=g) + 0.1
        y = torch.ops.deltacomp.sign_matmul(x, packed, scale, k)
        assert y.dtype == dtype and y.shape == (m, n)
        want = _sign_matmul_f64(x, packed, scale, k)
        err = (y.to(torch.float64) - want).abs()
        tol = _tolerance(x, scale, k, dtype)
        assert bool((err <= tol).all()), f"m={m} n={n} k={k}: max err {err.max():.3g}, tol {tol.min():.3g}"


@needs_ext
def test_sign_matmul_large_k_and_scale_1(cpu_path):
    # several 16-weight chunks per row and the row tiles of 8 and 4, with a (1,) scale
    g = _gen(7)
    x = torch.randn(5, 1000, generator=g)
    packed = ops.pack_signs_ref(torch.randn(37, 1000, generator=g))
    scale = torch.tensor([0.25])
    for m in (1, 2, 5):
        y = torch.ops.deltacomp.sign_matmul(x[:m], packed, scale, 1000)
        err = (y.double() - _sign_matmul_f64(x[:m], packed, scale, 1000)).abs()
        assert bool((err <= _tolerance(x[:m], scale, 1000, torch.float32)).all())


@needs_ext
@pytest.mark.parametrize("kernel", ["default", "simd", "lut8"])
def test_sign_kernel_variants_one_row(cpu_path, monkeypatch, kernel):
    """One x row through each sign kernel (DELTACOMP_SIGN_KERNEL): the default (AVX2: 3-bit lookup
    tables over 8-row tiles, whole 256- and 32-weight blocks, a k % 32 tail, the next tile prefetched),
    the plain SIMD loop, the byte-table variant; ragged row counts and k around the block sizes."""
    if kernel != "default":
        monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", kernel)
    for n, k in itertools.product((1, 7, 8, 9, 16, 17, 40), (31, 32, 63, 96, 256, 257, 288, 300, 1000)):
        _check_one_row_sign(n, k, seed=n * 1000 + k)


def _check_one_row_sign(n: int, k: int, seed: int) -> None:
    """A random (1, k) x through sign_matmul with n random sign rows, against the float64 reference."""
    g = _gen(seed)
    x = torch.randn(1, k, generator=g)
    packed = ops.pack_signs_ref(torch.randn(n, k, generator=g))
    scale = torch.rand(n, generator=g) + 0.1
    y = torch.ops.deltacomp.sign_matmul(x, packed, scale, k)
    err = (y.double() - _sign_matmul_f64(x, packed, scale, k)).abs()
    assert bool((err <= _tolerance(x, scale, k, torch.float32)).all()), f"n={n} k={k}: max err {err.max():.3g}"


@needs_ext
def test_sign_matmul_one_row_bit_patterns(cpu_path):
    """Rows of all +1, all -1, alternating and one set bit per byte (every table entry of every bit
    group, the 2-bit group at bits 30-31 included), x over six orders of magnitude, one x row."""
    k = 1031  # 32 whole blocks (4 steps of 8) and a 7-weight tail
    nb = (k + 7) // 8
    rows = [torch.zeros(nb), torch.full((nb,), 255), torch.full((nb,), 0x55), torch.full((nb,), 0xAA)]
    rows += [torch.full((nb,), 1 << i) for i in range(8)] + [torch.arange(nb) % 256]
    packed = torch.stack(rows).to(torch.uint8)
    packed[:, -1] &= (1 << (k % 8)) - 1  # pad bits written 0, as pack_signs does
    g = _gen(11)
    x = torch.randn(1, k, generator=g) * torch.logspace(-3, 3, k).flip(0)[None]
    scale = torch.rand(packed.shape[0], generator=g) + 0.1
    y = torch.ops.deltacomp.sign_matmul(x, packed, scale, k)
    err = (y.double() - _sign_matmul_f64(x, packed, scale, k)).abs()
    assert bool((err <= _tolerance(x, scale, k, torch.float32)).all()), f"max err {err.max():.3g}"


@needs_ext
def test_sign_matmul_one_row_two_threads(cpu_path):
    """One x row with enough work for the OpenMP split (tiles handed out in chunks, each prefetching a
    tile another thread may take), on two threads: the same as the float64 reference."""
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for n, k in ((257, 4100), (64, 8192)):
            _check_one_row_sign(n, k, seed=n + k)
    finally:
        torch.set_num_threads(old)


@needs_ext
def test_cpu_isa_follows_the_environment(monkeypatch):
    for var in ("DELTACOMP_ISA", "DELTACOMP_CPU_ISA"):  # the suite may run under a forced path
        monkeypatch.delenv(var, raising=False)
    best = ops.cpu_isa()
    assert best in ("avx512", "avx2", "neon", "portable")
    monkeypatch.setenv("DELTACOMP_ISA", "portable")
    assert ops.cpu_isa() == "portable"
    monkeypatch.setenv("DELTACOMP_ISA", "no-such-path")  # unknown: the best path, as unset
    assert ops.cpu_isa() == best
    monkeypatch.delenv("DELTACOMP_ISA")
    monkeypatch.setenv("DELTACOMP_CPU_ISA", "baseline")  # the older variable still works
    assert ops.cpu_isa() == "portable"


@needs_ext
def test_sign_matmul_zeros(cpu_path):
    packed = torch.zeros(5, 5, dtype=torch.uint8)  # all signs -1
    assert torch.equal(torch.ops.deltacomp.sign_matmul(torch.zeros(3, 33), packed, torch.ones(5), 33),
                       torch.zeros(3, 5))
    x = torch.randn(3, 33)
    y = torch.ops.deltacomp.sign_matmul(x, packed, torch.zeros(()), 33)
    assert torch.equal(y.abs(), torch.zeros(3, 5))
    y = torch.ops.deltacomp.sign_matmul(torch.zeros(0, 33), packed, torch.ones(()), 33)
    assert y.shape == (0, 5)


@needs_ext
def test_public_wrappers_use_extension_and_agree():
    x = torch.randn(4, 70)
    p = ops.pack_signs(torch.randn(9, 70))
    assert torch.equal(ops.unpack_signs(p, 70), ops.unpack_signs_ref(p, 70))
    s = torch.rand(9, dtype=torch.float64)  # the wrapper converts the scale to fp32
    torch.testing.assert_close(ops.sign_matmul(x, p, s, 70), ops.sign_matmul_ref(x, p, s.float(), 70))
    # shapes the kernel does not take go to the reference
    assert ops.pack_signs(torch.randn(2, 3, 9)).shape == (2, 3, 2)
    assert ops.unpack_signs(p, 70, torch.bfloat16).dtype == torch.bfloat16


@needs_ext
def test_errors_carry_values():
    p = torch.zeros(4, 2, dtype=torch.uint8)
    x = torch.randn(2, 16)
    with pytest.raises(RuntimeError, match="pack_signs: x must be float32, got Double"):
        torch.ops.deltacomp.pack_signs(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(RuntimeError, match=r"pack_signs: x must be 2-D, got shape \[2, 3, 4\]"):
        torch.ops.deltacomp.pack_signs(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="k=17 needs 3 bytes per row, but packed has 2"):
        torch.ops.deltacomp.unpack_signs(p, 17)
    with pytest.raises(RuntimeError, match="packed must be uint8, got Int"):
        torch.ops.deltacomp.unpack_signs(p.int(), 16)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        torch.ops.deltacomp.sign_matmul(x.double(), p, torch.ones(4), 16)
    with pytest.raises(RuntimeError, match="k=24 needs 3 bytes per row, but packed has 2"):
        torch.ops.deltacomp.sign_matmul(torch.randn(2, 24), p, torch.ones(4), 24)
    with pytest.raises(RuntimeError, match=r"x has 16 columns \(shape \[2, 16\]\) but k=15"):
        torch.ops.deltacomp.sign_matmul(x, p, torch.ones(4), 15)
    with pytest.raises(RuntimeError, match=r"scale must have shape \(\) or \(1,\) .* or \(4,\).*got \[3\]"):
        torch.ops.deltacomp.sign_matmul(x, p, torch.ones(3), 16)
    with pytest.raises(RuntimeError, match="scale must be float32, got Double"):
        torch.ops.deltacomp.sign_matmul(x, p, torch.ones(4, dtype=torch.float64), 16)
    with pytest.raises(RuntimeError, match="x must be contiguous"):
        torch.ops.deltacomp.sign_matmul(torch.randn(16, 2).T, p, torch.ones(4), 16)


@needs_ext
def test_opcheck():
    g = _gen(3)
    x = torch.randn(3, 20, generator=g)
    p = ops.pack_signs_ref(torch.randn(5, 20, generator=g))
    torch.library.opcheck(torch.ops.deltacomp.pack_signs.default, (x,))
    torch.library.opcheck(torch.ops.deltacomp.unpack_signs.default, (p, 20))
    for dtype in DTYPES:
        torch.library.opcheck(torch.ops.deltacomp.sign_matmul.default, (x.to(dtype), p, torch.rand(5, generator=g), 20))
    torch.library.opcheck(torch.ops.deltacomp.sign_matmul.default, (x, p, torch.rand((), generator=g), 20))


@needs_ext
def test_torch_compile():
    x = torch.randn(3, 40)
    p = ops.pack_signs_ref(torch.randn(6, 40))
    s = torch.rand(6)
    f = torch.compile(lambda x: ops.sign_matmul(x, p, s, 40) + 1, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), ops.sign_matmul_ref(x, p, s, 40) + 1)
