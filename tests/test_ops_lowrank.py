"""kbit_lowrank_matmul (svd-mixed, one bit-width group) against a float64 dense U diag(s) V built
independently from the unpacked codes, on both CPU code paths; every bit width 1..8, odd shapes,
group sizes that do not divide K or N, r = 0; the reference; the codec and DeltaLinear through it."""
import itertools

import pytest
import torch

from deltacomp import ops
from deltacomp.codecs import get_codec
from deltacomp.serve import DeltaLinear
from deltacomp.quant.bitpack import pack_bits
from deltacomp.quant.rtn import quantize

needs_ext = pytest.mark.skipif(not ops.HAS_EXTENSION,
                               reason=f"C++ extension deltacomp._C not built ({ops._EXT_ERROR})")

EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -52}
SHAPES = ((1, 1), (7, 129), (129, 7), (33, 300), (300, 17), (160, 45))  # (n, k); n % 16 == 0: the fused m=1 path


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _factor(rows: int, length: int, bits: int, gs: int, g: torch.Generator):
    """Quantized random rows: (packed, scale, zero) and the float64 dense values and their magnitudes
    |zero| + code * scale (what the kernel's fp32 terms are bounded by)."""
    codes, scale, zero = quantize(torch.randn(rows, length, generator=g), bits, gs)
    rep = lambda t: t.double().repeat_interleave(gs, dim=1)[:, :length]  # noqa: E731
    dense = rep(zero) + codes.double() * rep(scale)
    mag = rep(zero).abs() + codes.double() * rep(scale)
    return (pack_bits(codes, bits), scale, zero), dense, mag


def _group(r: int, n: int, k: int, bits: int, gs: int, seed: int):
    g = _gen(seed)
    (vq, vs, vz), v64, vmag = _factor(r, k, bits, gs, g)
    (uq, us, uz), ut64, umag = _factor(r, n, bits, gs, g)
    s = torch.rand(r, generator=g) + 0.5
    args = (vq, vs, vz, uq, us, uz, s)
    dense = (ut64.T * s.double()) @ v64  # (n, k): the delta this group stands for
    return args, dense, (v64, ut64, vmag, umag, s.double())


def _assert_close64(y, x, parts, k, n, what):
    v64, ut64, vmag, umag, s64 = parts
    x64 = x.to(torch.float64)
    want = ((x64 @ v64.T) * s64) @ ut64
    bound = ((x64.abs() @ vmag.T) * s64) @ umag
    tol = bound * (EPS[y.dtype] + 4 * 2.0 ** -23 * (max(k, 1) ** 0.5 + max(n, 1) ** 0.5)) + 1e-30
    err = (y.to(torch.float64) - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max():.3g} (tol there {tol.flatten()[err.argmax()]:.3g})"


@pytest.fixture(params=["avx512", "avx2", "portable"])
def cpu_path(request, monkeypatch):
    """Each CPU code path forced through DELTACOMP_ISA: AVX-512, AVX2 (decode and one-row axpy), the
    portable loops (a path the CPU lacks runs its best one instead)."""
    monkeypatch.setenv("DELTACOMP_ISA", request.param)
    return request.param


# -- the reference (always runs) -------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
def test_ref_equals_float64_dense(bits):
    for (n, k), gs in itertools.product(SHAPES, (5, 128)):
        args, dense, _ = _group(3, n, k, bits, gs, seed=bits * 1000 + n + k)
        x = torch.randn(4, k, generator=_gen(k), dtype=torch.float64)
        y = ops.kbit_lowrank_matmul_ref(x, *args, bits, n, k, gs)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, x @ dense.T, rtol=1e-12, atol=1e-12)


def test_ref_errors():
    args, _, _ = _group(2, 5, 9, 3, 4, seed=0)
    vq, vs, vz, uq, us, uz, s = args
    f = ops.kbit_lowrank_matmul_ref
    with pytest.raises(ValueError, match=r"x must be \(M, k=9\), got shape \(2, 8\)"):
        f(torch.randn(2, 8), *args, 3, 5, 9, 4)
    with pytest.raises(ValueError, match="2 x 9 codes of 3 bits need 7 bytes, but v_q has shape"):
        f(torch.randn(2, 9), vq[:-1], vs, vz, uq, us, uz, s, 3, 5, 9, 4)
    with pytest.raises(ValueError, match=r"u_scale and u_zero must have shape \(2, 2\), got \(2, 1\)"):
        f(torch.randn(2, 9), vq, vs, vz, uq, us[:, :1], uz, s, 3, 5, 9, 4)
    with pytest.raises(ValueError, match="bits=9"):
        f(torch.randn(2, 9), *args, 9, 5, 9, 4)


# -- the kernel -------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_every_width_odd_shapes(cpu_path, bits):
    for (n, k), gs, m in itertools.product(SHAPES, (7, 32, 128), (1, 5)):
        r = 1 + (n + k + gs) % 6
        args, _, parts = _group(r, n, k, bits, gs, seed=bits * 100000 + n * 100 + k + gs)
        x = torch.randn(m, k, generator=_gen(m + k))
        y = torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, bits, n, k, gs)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _assert_close64(y, x, parts, k, n, f"bits={bits} n={n} k={k} gs={gs} m={m}")


@needs_ext
@pytest.mark.parametrize("xdtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_kernel_dtypes_and_several_column_blocks(cpu_path, xdtype):
    # n past the kernel's column blocks, k of many 16-code chunks, rows not byte-aligned (k odd);
    # n = 4160 (a multiple of 16) takes the fused one-row path at m = 1, the panels otherwise
    for bits, m, n in itertools.product((2, 3, 8), (1, 4, 17), (1100, 4160)):
        k, gs = 301, 128
        args, _, parts = _group(9, n, k, bits, gs, seed=bits + m + n)
        x = torch.randn(m, k, generator=_gen(m)).to(xdtype)
        y = torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, bits, n, k, gs)
        assert y.dtype == xdtype and y.shape == (m, n)
        _assert_close64(y, x, parts, k, n, f"{xdtype} bits={bits} m={m}")


@needs_ext
@pytest.mark.parametrize("bits", range(1, 9))
def test_kernel_byte_direct_paths(cpu_path, bits):
    # k and group_size multiples of 8 (AVX2) or 16 (AVX-512), n of 16: at m = 1 stage 1 dots V rows and
    # stage 3 adds U^T rows (1..4 per pass) straight from the packed bytes, the last blocks of each
    # stream read by copy; r = 1 (one row: the stream ends in its first row) up to several rows
    shapes = ((16, 8), (48, 24), (160, 136), (32, 1000), (64, 176), (16, 1024))
    for (n, k), gs, r in itertools.product(shapes, (8, 16, 128), (1, 2, 7)):
        args, _, parts = _group(r, n, k, bits, gs, seed=bits * 7919 + n + k + gs + r)
        for m in (1, 2):
            x = torch.randn(m, k, generator=_gen(m + k + r))
            y = torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, bits, n, k, gs)
            _assert_close64(y, x, parts, k, n, f"bits={bits} n={n} k={k} gs={gs} r={r} m={m}")


@needs_ext
def test_kernel_every_m_and_zero_factors(cpu_path):
    args, _, parts = _group(5, 64, 88, 2, 8, seed=11)
    for m in range(1, 18):
        x = torch.randn(m, 88, generator=_gen(m))
        _assert_close64(torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, 2, 64, 88, 8), x, parts, 88, 64, f"m={m}")
    vq, vs, vz, uq, us, uz, s = args  # zero codes, scales and zeros: an all-zero delta of rank 5
    zeros = (torch.zeros_like(vq), torch.zeros_like(vs), torch.zeros_like(vz), torch.zeros_like(uq),
             torch.zeros_like(us), torch.zeros_like(uz), s)
    for m in (1, 3):
        y = torch.ops.deltacomp.kbit_lowrank_matmul(torch.randn(m, 88), *zeros, 2, 64, 88, 8)
        assert torch.equal(y, torch.zeros(m, 64))


@needs_ext
def test_kernel_empty_and_pad_bits(cpu_path):
    args, _, _ = _group(0, 13, 21, 3, 8, seed=1)  # r = 0: an all-zero delta
    y = torch.ops.deltacomp.kbit_lowrank_matmul(torch.randn(3, 21), *args, 3, 13, 21, 8)
    assert torch.equal(y, torch.zeros(3, 13))
    args, _, parts = _group(2, 13, 21, 3, 8, seed=2)
    assert torch.ops.deltacomp.kbit_lowrank_matmul(torch.zeros(0, 21), *args, 3, 13, 21, 8).shape == (0, 13)
    x = torch.randn(2, 21, generator=_gen(3))
    want = torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, 3, 13, 21, 8)
    vq, vs, vz, uq, us, uz, s = args
    vq, uq = vq.clone(), uq.clone()  # 2*21*3 = 126 and 2*13*3 = 78 bits: set the unused pad bits
    vq[-1] |= 0b11000000
    uq[-1] |= 0b11000000
    assert torch.equal(torch.ops.deltacomp.kbit_lowrank_matmul(x, vq, vs, vz, uq, us, uz, s, 3, 13, 21, 8), want)


@needs_ext
def test_errors_carry_values():
    args, _, _ = _group(2, 5, 9, 3, 4, seed=0)
    vq, vs, vz, uq, us, uz, s = args
    f = torch.ops.deltacomp.kbit_lowrank_matmul
    x = torch.randn(2, 9)
    with pytest.raises(RuntimeError, match="2 x 9 codes of 3 bits need 7 bytes, but v_q has 6"):
        f(x, vq[:-1], vs, vz, uq, us, uz, s, 3, 5, 9, 4)
    with pytest.raises(RuntimeError, match=r"u_zero must have shape \(2, 2\) .*got \[2, 1\]"):
        f(x, vq, vs, vz, uq, us, uz[:, :1].contiguous(), s, 3, 5, 9, 4)
    with pytest.raises(RuntimeError, match="v_scale must be float16, got Float"):
        f(x, vq, vs.float(), vz, uq, us, uz, s, 3, 5, 9, 4)
    with pytest.raises(RuntimeError, match=r"x has 9 columns \(shape \[2, 9\]\) but k=8"):
        f(x, vq, vs, vz, uq, us, uz, s, 3, 5, 8, 4)
    with pytest.raises(RuntimeError, match="bits must be in 1..8, got 0"):
        f(x, vq, vs, vz, uq, us, uz, s, 0, 5, 9, 4)
    with pytest.raises(RuntimeError, match="x must be float32, bfloat16 or float16, got Double"):
        f(x.double(), *args, 3, 5, 9, 4)
    with pytest.raises(RuntimeError, match="s must be float32, got Double"):
        f(x, vq, vs, vz, uq, us, uz, s.double(), 3, 5, 9, 4)


@needs_ext
def test_opcheck_and_compile():
    args, _, _ = _group(3, 11, 20, 3, 8, seed=4)
    x = torch.randn(3, 20, generator=_gen(5))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.library.opcheck(torch.ops.deltacomp.kbit_lowrank_matmul.default, (x.to(dtype), *args, 3, 11, 20, 8))
    f = torch.compile(lambda x: ops.kbit_lowrank_matmul(x, *args, 3, 11, 20, 8) * 2, fullgraph=True, backend="eager")
    torch.testing.assert_close(f(x), ops.kbit_lowrank_matmul_ref(x, *args, 3, 11, 20, 8) * 2)


def test_wrapper_falls_back_to_reference(monkeypatch):
    args, _, _ = _group(2, 9, 30, 4, 16, seed=6)
    x = torch.randn(3, 30, generator=_gen(6))
    want = ops.kbit_lowrank_matmul_ref(x, *args, 4, 9, 30, 16)
    monkeypatch.setattr(ops, "_ext_on", lambda *t: False)  # as without the extension
    assert torch.equal(ops.kbit_lowrank_matmul(x, *args, 4, 9, 30, 16), want)
    x64 = x.double()  # float64 never reaches the kernel
    assert ops.kbit_lowrank_matmul(x64, *args, 4, 9, 30, 16).dtype == torch.float64


# -- the codec and DeltaLinear through the op -------------------------------------------------------
@pytest.mark.parametrize("shape,groups", [((40, 70), "8:2+3:5+2:rest"), ((33, 129), None), ((64, 48), "4:3+1:9")])
def test_codec_matmul_uses_op(monkeypatch, shape, groups):
    g = _gen(7)
    delta = torch.randn(*shape, generator=g) @ torch.diag(torch.rand(shape[1], generator=g)) * 0.1
    codec = get_codec("svd-mixed")
    settings = {"ratio": 4.0, "group_size": 32} | ({"groups": groups} if groups else {})
    enc = codec.encode(delta, **settings)
    calls = []
    real = ops.kbit_lowrank_matmul_groups  # every group in one call
    monkeypatch.setattr(ops, "kbit_lowrank_matmul_groups", lambda *a: calls.append(a[8]) or real(*a))
    dense = codec.decode(enc).double()
    x = torch.randn(2, 3, shape[1], generator=g)
    y = codec.matmul(x, enc)
    assert y.shape == (2, 3, shape[0]) and calls == [[b for b, _ in _alloc(enc)]]
    torch.testing.assert_close(y.double(), x.double() @ dense.T, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(codec.matmul(x.double(), enc), x.double() @ dense.T, rtol=1e-5, atol=1e-6)
    yb = codec.matmul(x.bfloat16(), enc)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), x.bfloat16().double() @ dense.T, rtol=2e-2, atol=2e-2)


def _alloc(enc):
    from deltacomp.codecs.svd_mixed import allocation as al
    return al.parse_groups(enc.params["alloc"])


def test_zero_delta_codec_and_delta_linear():
    codec = get_codec("svd-mixed")
    enc = codec.encode(torch.zeros(6, 10))
    assert torch.equal(codec.matmul(torch.randn(2, 10), enc), torch.zeros(2, 6))
    g = _gen(8)
    base = torch.nn.Linear(10, 6)
    delta = torch.randn(6, 10, generator=g)
    enc = codec.encode(delta, ratio=2.0, group_size=4)
    layer = DeltaLinear(base, enc)
    for m in (1, 5):
        x = torch.randn(m, 10, generator=g)
        want = base(x).double() + x.double() @ codec.decode(enc).double().T
        torch.testing.assert_close(layer(x).double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_kernel_fp16_scale_classes(cpu_path):
    """Scales and zeros of every fp16 class (subnormal, signed zero, negative, large) through each path's
    fp16 -> fp32 conversion (F16C on AVX2, 8 at a time, and its scalar tail), m = 1 and 2."""
    n, k, gs, r, bits = 64, 1000, 8, 3, 2  # 125 groups per V row, 8 per U^T row
    args, _, _ = _group(r, n, k, bits, gs, seed=5)
    vq, vs, vz, uq, us, uz, s = args
    special = torch.tensor([6e-8, -6e-8, 3e-5, -0.0, 0.0, 1000.0, -2.5, 1.0, 0.125], dtype=torch.float16)
    fill = lambda t, shift: special.roll(shift).repeat(t.numel() // special.numel() + 1)[:t.numel()].view_as(t)  # noqa: E731
    vs, vz, us, uz = fill(vs, 0), fill(vz, 3), fill(us, 5), fill(uz, 7)
    v64 = ops._dequant_rows(vq, vs, vz, bits, r, k, gs, torch.float64)
    ut64 = ops._dequant_rows(uq, us, uz, bits, r, n, gs, torch.float64)
    vmag = ops._dequant_rows(vq, vs.abs(), vz.abs(), bits, r, k, gs, torch.float64)
    umag = ops._dequant_rows(uq, us.abs(), uz.abs(), bits, r, n, gs, torch.float64)
    for m in (1, 2):
        x = torch.randn(m, k, generator=_gen(m))
        y = torch.ops.deltacomp.kbit_lowrank_matmul(x, vq, vs, vz, uq, us, uz, s, bits, n, k, gs)
        _assert_close64(y, x, (v64, ut64, vmag, umag, s.double()), k, n, f"m={m}")


@needs_ext
@pytest.mark.parametrize("kernel", ["default", "direct"])
def test_kernel_one_row_lookup_tables(cpu_path, monkeypatch, kernel):
    """One x row, 1- and 2-bit codes with k * bits and gs * bits multiples of 32: stage 1 by lookup
    tables on AVX2 (8-row tiles, ragged last tile, whole and partial 8-lane steps, a partial last
    group, the next tile prefetched), or dotted from the bytes (DELTACOMP_LOWRANK_KERNEL=direct); 3 bits
    and k not a multiple of 16 take the byte-direct dot either way."""
    if kernel == "direct":
        monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "direct")
    cases = list(itertools.product((1, 2, 3), (16, 176, 1024, 1040, 1000), (16, 48, 128), (1, 8, 9, 17)))
    cases += [(2, 4096, 128, 41), (1, 8192, 128, 9)]  # r * k >= 65536: tiles split over the OpenMP threads
    for bits, k, gs, r in cases:
        n = 48
        args, _, parts = _group(r, n, k, bits, gs, seed=bits * 31 + k + gs + r)
        x = torch.randn(1, k, generator=_gen(k + r))
        y = torch.ops.deltacomp.kbit_lowrank_matmul(x, *args, bits, n, k, gs)
        _assert_close64(y, x, parts, k, n, f"bits={bits} k={k} gs={gs} r={r}")
