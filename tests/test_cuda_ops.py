"""The CUDA kernels of torch.ops.deltacomp.* (csrc/cuda) against float64 products of the references in
deltacomp/ops.py: random inputs, odd shapes (K not a multiple of 8/32, one row, M = 1..17 and the GEMM
path above), all-zero deltas, every x dtype, both kernel paths (16-byte chunks and one element at a time);
every output element written (outputs are poisoned first); opcheck; a patched model on the GPU equals the
reconstructed one. Skipped without a CUDA device or without the extension's CUDA half."""
from __future__ import annotations

import pytest
import torch

from deltacomp import ops
from deltacomp.quant.bitpack import pack_bits

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.CUDA_KERNELS_BUILT),
    reason="needs a CUDA device and deltacomp._C built with its CUDA kernels (a CUDA build of torch)")

DEV = "cuda"
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
XDTYPES = (torch.float32, torch.float16, torch.bfloat16)
MS = tuple(range(1, 18)) + (33,)


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv("DELTACOMP_CUDA_KERNELS", "1")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _poison(nbytes):
    """Leave a NaN-filled block of this size in the caching allocator, so an output element the kernel
    never writes shows up as NaN instead of a stale value."""
    junk = torch.full((max(nbytes // 4, 1),), float("nan"), device=DEV)
    del junk


def _check(y, x64, w64, what, extra_eps=0.0):
    """y (on the GPU) within fp32 accumulation + rounding of y (and of a rounded weight: extra_eps) of
    x64 @ w64^T, element by element."""
    eps = EPS[y.dtype]
    y = y.double().cpu()
    assert torch.isfinite(y).all(), f"{what}: non-finite output (unwritten element?)"
    want = x64 @ w64.T
    bound = x64.abs() @ w64.abs().T
    k = max(x64.shape[1], 1)
    tol = bound * (eps + extra_eps + 8 * 2.0 ** -23 * k ** 0.5) + 1e-30
    err = (y - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max():.3g} at {divmod(int(err.argmax()), err.shape[1])}"


def _x(m, k, dtype, g):
    return (torch.randn(m, k, generator=g)).to(dtype)


def _packed(n, k, g):
    return ops.pack_signs_ref(torch.randn(n, k, generator=g))


def _scale(kind, n, g):
    return {"tensor": torch.rand((), generator=g) + 0.1, "one": torch.rand(1, generator=g) + 0.1,
            "row": torch.rand(n, generator=g) + 0.1, "zero": torch.zeros(())}[kind]


def _eps_of(dtype):
    return EPS[dtype]


SIGN_SHAPES = [(1, 1), (5, 7), (3, 8), (64, 129), (17, 128), (33, 256), (130, 1000), (64, 4096), (40, 1032)]


@pytest.mark.parametrize("n,k", SIGN_SHAPES)
@pytest.mark.parametrize("dtype", XDTYPES)
def test_sign_matmul(n, k, dtype):
    g = _gen(n * 1000 + k)
    packed = _packed(n, k, g)
    signs = ops.unpack_signs_ref(packed, k, torch.float64)
    for i, m in enumerate(MS):
        kind = ("tensor", "one", "row", "zero")[i % 4]
        scale = _scale(kind, n, g)
        x = _x(m, k, dtype, g)
        s64 = scale.double().reshape(-1, 1) if scale.dim() else scale.double()
        _poison(m * n * x.element_size())
        y = torch.ops.deltacomp.sign_matmul(x.to(DEV), packed.to(DEV), scale.float().to(DEV), k)
        assert y.dtype == dtype and tuple(y.shape) == (m, n)
        gemm = m >= 16  # the dequantize + cuBLAS path rounds the weight to x's dtype
        _check(y, x.double(), signs * s64, f"sign_matmul m={m} n={n} k={k} {dtype} {kind}",
               _eps_of(dtype) if gemm else 0.0)


def test_sign_matmul_unaligned_views():
    """x and packed starting off a 16-byte boundary take the one-byte path and still match."""
    g = _gen(7)
    n, k, m = 9, 256, 3
    packed_big = _packed(n, k + 8, g)[:, 1:].contiguous()  # (n, 32) bytes
    base = torch.zeros(packed_big.numel() + 1, dtype=torch.uint8, device=DEV)
    base[1:] = packed_big.reshape(-1).to(DEV)
    packed = base[1:].view(n, k // 8)                       # data pointer 1 byte past an allocation
    xb = torch.randn(m * k + 1, generator=g)
    x = xb.to(DEV)[1:].view(m, k)
    scale = torch.rand(n, generator=g) + 0.1
    y = torch.ops.deltacomp.sign_matmul(x, packed, scale.to(DEV), k)
    _check(y, xb[1:].view(m, k).double(), ops.unpack_signs_ref(packed.cpu(), k, torch.float64) * scale.double()[:, None],
           "unaligned sign_matmul")


@pytest.mark.parametrize("n,k", [(1, 7), (5, 64), (130, 136), (64, 1024), (33, 33)])
@pytest.mark.parametrize("wdtype", XDTYPES)
@pytest.mark.parametrize("xdtype", XDTYPES)
def test_sign_matmul_fused(n, k, wdtype, xdtype):
    g = _gen(n * 31 + k)
    w = torch.randn(n, k, generator=g).to(wdtype)
    packed = _packed(n, k, g)
    signs = ops.unpack_signs_ref(packed, k, torch.float64)
    for i, m in enumerate(MS):
        kind = ("row", "tensor", "zero")[i % 3]
        scale = _scale(kind, n, g) * 0.1
        s64 = scale.double().reshape(-1, 1) if scale.dim() else scale.double()
        x = _x(m, k, xdtype, g)
        _poison(m * n * x.element_size())
        y = torch.ops.deltacomp.sign_matmul_fused(x.to(DEV), w.to(DEV), packed.to(DEV), scale.float().to(DEV), k)
        assert y.dtype == xdtype and tuple(y.shape) == (m, n)
        split = m > 4  # cuBLAS on the base + the sign term: two roundings to x's dtype
        _check(y, x.double(), w.double() + signs * s64, f"fused m={m} n={n} k={k} x {xdtype} w {wdtype} {kind}",
               _eps_of(xdtype) if split else 0.0)


@pytest.mark.parametrize("n,k", [(1, 9), (7, 128), (65, 300), (32, 2048)])
@pytest.mark.parametrize("dtype", XDTYPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_sign_matmul_multi(n, k, dtype, per_row):
    g = _gen(n + k + per_row)
    tenants = 3
    packed = torch.stack([_packed(n, k, g) for _ in range(tenants)])
    scales = torch.rand((tenants, n) if per_row else (tenants,), generator=g) + 0.1
    scales[1] = 0.0  # an all-zero delta
    for m in (1, 2, 5, 9, 17):
        index = torch.randint(-1, tenants, (m,), generator=g)
        x = _x(m, k, dtype, g)
        _poison(m * n * x.element_size())
        y = torch.ops.deltacomp.sign_matmul_multi(x.to(DEV), packed.to(DEV), scales.to(DEV), index.to(DEV), k).cpu()
        for row in range(m):
            t = int(index[row])
            if t < 0:
                assert torch.equal(y[row], torch.zeros(n, dtype=dtype)), f"row {row}: index -1 must give zeros"
                continue
            s = scales[t].double().reshape(-1, 1) if per_row else scales[t].double()
            _check(y[row:row + 1], x[row:row + 1].double(), ops.unpack_signs_ref(packed[t], k, torch.float64) * s,
                   f"multi m={m} row={row} delta={t} n={n} k={k} {dtype}")


def test_sign_matmul_multi_bad_index_never_reads_outside():
    g = _gen(3)
    packed = torch.stack([_packed(8, 64, g)] * 2).to(DEV)
    x = torch.randn(2, 64, generator=g).to(DEV)
    y = torch.ops.deltacomp.sign_matmul_multi(x, packed, torch.ones(2, device=DEV), torch.tensor([5, 0], device=DEV), 64)
    assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


def _ternary_form(n, k, density, g):
    t = torch.zeros(n * k)
    nnz = int(round(density * n * k))
    pos = torch.randperm(n * k, generator=g)[:nnz].sort().values
    signs = torch.rand(nnz, generator=g) < 0.5
    row_ptr, neg_start, cols = ops.ternary_runtime(pos, signs, (n, k))
    t[pos] = torch.where(signs, 1.0, -1.0)
    return (row_ptr, neg_start, cols), t.reshape(n, k).double()


@pytest.mark.parametrize("n,k,density", [(1, 1, 1.0), (5, 7, 0.3), (64, 129, 0.1), (130, 1000, 0.05),
                                         (9, 64, 0.0), (256, 4096, 0.02)])
@pytest.mark.parametrize("dtype", XDTYPES)
def test_ternary_matmul(n, k, density, dtype):
    g = _gen(n * 7 + k)
    form, dense = _ternary_form(n, k, density, g)
    for i, m in enumerate(MS):
        kind = ("row", "tensor", "one")[i % 3]
        scale = _scale(kind, n, g)
        s64 = scale.double().reshape(-1, 1) if scale.dim() else scale.double()
        x = _x(m, k, dtype, g)
        _poison(m * n * x.element_size())
        y = torch.ops.deltacomp.ternary_matmul(x.to(DEV), *(t.to(DEV) for t in form), scale.float().to(DEV), k)
        _check(y, x.double(), dense * s64, f"ternary m={m} n={n} k={k} density={density} {dtype}")


def _kbit_factors(r, length, bits, gs, g):
    codes = torch.randint(0, 1 << bits, (r * length,), generator=g, dtype=torch.int64).to(torch.uint8)
    groups = -(-length // gs)
    # values zero + code * scale within about +-0.2 at every bit width, as RTN of a unit singular vector
    # gives (so fp16 outputs stay far from overflow)
    scale = ((torch.rand(r, groups, generator=g) * 0.2 + 0.05) / (1 << bits)).half()
    zero = (torch.rand(r, groups, generator=g) * -0.2).half()
    return pack_bits(codes, bits), scale, zero


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k,r,gs", [(64, 128, 5, 32), (96, 4096, 37, 128), (33, 40, 3, 7), (128, 64, 0, 32),
                                      (1, 96, 2, 32), (7, 160, 4, 64)])
@pytest.mark.parametrize("dtype", XDTYPES)
def test_kbit_lowrank_matmul(bits, n, k, r, gs, dtype):
    g = _gen(bits * 100 + n + k + r)
    v_q, v_sc, v_z = _kbit_factors(r, k, bits, gs, g)
    u_q, u_sc, u_z = _kbit_factors(r, n, bits, gs, g)
    s = torch.rand(r, generator=g) + 0.5
    for m in (1, 2, 3, 5, 9, 17):
        x = _x(m, k, dtype, g)
        want = ops.kbit_lowrank_matmul_ref(x.double(), v_q, v_sc, v_z, u_q, u_sc, u_z, s, bits, n, k, gs)
        _poison(m * n * x.element_size())
        y = torch.ops.deltacomp.kbit_lowrank_matmul(
            x.to(DEV), *(t.to(DEV) for t in (v_q, v_sc, v_z, u_q, u_sc, u_z, s)), bits, n, k, gs)
        y = y.double().cpu()
        assert torch.isfinite(y).all()
        # two fp32 reductions (over k, then over r) and the rounding of y
        v = ops._dequant_rows(v_q, v_sc, v_z, bits, r, k, gs, torch.float64)
        ut = ops._dequant_rows(u_q, u_sc, u_z, bits, r, n, gs, torch.float64)
        bound = ((x.double().abs() @ v.abs().T) * s.double()) @ ut.abs()
        tol = bound * (EPS[dtype] + 16 * 2.0 ** -23 * (k + r) ** 0.5) + 1e-30
        err = (y - want).abs()
        assert bool((err <= tol).all()), f"kbit bits={bits} m={m} n={n} k={k} r={r} gs={gs}: max err {err.max():.3g}"


def test_wrappers_route_cuda_tensors_to_kernels(monkeypatch):
    """With the opt-in on, ops.* sends CUDA tensors to the kernels; off, to the references; same result."""
    g = _gen(11)
    x, packed, scale = torch.randn(3, 100, generator=g).to(DEV), _packed(6, 100, g).to(DEV), torch.rand(6).to(DEV)
    on = ops.sign_matmul(x, packed, scale, 100)
    assert ops._ext_on(x, packed, scale)
    monkeypatch.setenv("DELTACOMP_CUDA_KERNELS", "0")
    assert not ops._ext_on(x, packed, scale)
    torch.testing.assert_close(on, ops.sign_matmul(x, packed, scale, 100), rtol=1e-5, atol=1e-5)


_ERROR_CALLS = {
    "cpu": ("torch.ops.deltacomp.sign_matmul(torch.randn(2, 10), torch.zeros(3, 2, dtype=torch.uint8), "
            "torch.ones(1), 12)", "x has 10 columns (shape [2, 10]) but k=12"),
    "columns": ("torch.ops.deltacomp.sign_matmul(torch.randn(2, 10, device='cuda'), "
                "torch.zeros(3, 2, dtype=torch.uint8, device='cuda'), torch.ones(1, device='cuda'), 12)",
                "x has 10 columns (shape [2, 10]) but k=12"),
    "device": ("torch.ops.deltacomp.sign_matmul(torch.randn(2, 10, device='cuda'), "
               "torch.zeros(3, 2, dtype=torch.uint8), torch.ones(1, device='cuda'), 10)",
               "packed must be on a CUDA device"),
    "kbit": ("torch.ops.deltacomp.kbit_lowrank_matmul(torch.randn(1, 8, device='cuda'), "
             "torch.zeros(2, dtype=torch.uint8, device='cuda'), torch.zeros(1, 1, dtype=torch.half, device='cuda'), "
             "torch.zeros(1, 1, dtype=torch.half, device='cuda'), torch.zeros(1, dtype=torch.uint8, device='cuda'), "
             "torch.zeros(1, 1, dtype=torch.half, device='cuda'), torch.zeros(1, 1, dtype=torch.half, device='cuda'), "
             "torch.ones(1, device='cuda'), 2, 4, 8, 8)",
             "codes of 2 bits need"),
}


@pytest.mark.parametrize("case", list(_ERROR_CALLS))
def test_errors_name_shapes(case):
    """Bad inputs raise a RuntimeError that carries the shapes (run in a child process, so that a crash
    in the error path fails this test instead of the whole session)."""
    import subprocess
    import sys
    call, message = _ERROR_CALLS[case]
    code = ("import torch, deltacomp.ops\n"
            f"try:\n    {call}\nexcept RuntimeError as e:\n    print('RAISED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"child exited {proc.returncode}: {proc.stderr[-2000:]}"
    assert "RAISED" in proc.stdout and message in proc.stdout, proc.stdout[-2000:]


def test_opcheck():
    g = _gen(5)
    x = torch.randn(3, 20, generator=g).to(DEV)
    p = _packed(5, 20, g).to(DEV)
    sc = torch.rand(5, generator=g).to(DEV)
    torch.library.opcheck(torch.ops.deltacomp.pack_signs.default, (x,))
    torch.library.opcheck(torch.ops.deltacomp.unpack_signs.default, (p, 20))
    torch.library.opcheck(torch.ops.deltacomp.sign_matmul.default, (x, p, sc, 20))
    torch.library.opcheck(torch.ops.deltacomp.sign_matmul_fused.default, (x, torch.randn(5, 20, device=DEV), p, sc, 20))
    torch.library.opcheck(torch.ops.deltacomp.sign_matmul_multi.default,
                          (x, torch.stack([p, p]), torch.rand(2, device=DEV), torch.tensor([0, -1, 1], device=DEV), 20))
    form, _ = _ternary_form(5, 20, 0.3, g)
    torch.library.opcheck(torch.ops.deltacomp.ternary_matmul.default, (x, *(t.to(DEV) for t in form), sc, 20))
    v = _kbit_factors(4, 20, 3, 8, g)
    u = _kbit_factors(4, 5, 3, 8, g)
    torch.library.opcheck(torch.ops.deltacomp.kbit_lowrank_matmul.default,
                          (x, *(t.to(DEV) for t in v), *(t.to(DEV) for t in u), torch.rand(4, device=DEV), 3, 5, 20, 8))


def test_pack_unpack_match_reference():
    g = _gen(9)
    for n, k in ((1, 1), (7, 13), (64, 4096)):
        x = torch.randn(n, k, generator=g)
        x[0, 0] = 0.0  # zero counts as +1
        p = torch.ops.deltacomp.pack_signs(x.to(DEV)).cpu()
        assert torch.equal(p, ops.pack_signs_ref(x))
        assert torch.equal(torch.ops.deltacomp.unpack_signs(p.to(DEV), k).cpu(), ops.unpack_signs_ref(p, k))
