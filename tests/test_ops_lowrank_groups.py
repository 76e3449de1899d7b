"""kbit_lowrank_matmul_groups (every bit-width group of an svd-mixed layer in one call) against a float64
dense sum of U_g diag(s_g) V_g built from the unpacked codes, on every CPU code path: mixes of widths,
empty groups, odd shapes, K not a multiple of 8 or 32, one x row (the lookup-table and byte-direct
paths), all-zero deltas; the wrappers' fallbacks, the fake kernel; svd-mixed's serving term through it."""
import itertools

import pytest
import torch

from deltacomp import ops
from deltacomp.codecs import get_codec
from deltacomp.codecs.svd_mixed.serving import group_args

from test_ops_lowrank import EPS, _gen, _group, cpu_path, needs_ext  # noqa: F401 (cpu_path: a fixture)


def _groups(widths, ranks, n, k, gs, seed):
    """Lists of the op's arguments for groups of the given widths and ranks, and the float64 parts."""
    lists, parts, s = [[] for _ in range(6)], [], []
    for q, (b, r) in enumerate(zip(widths, ranks)):
        args, _, p = _group(r, n, k, b, gs, seed=seed * 31 + q)
        for lst, t in zip(lists, args[:6]):
            lst.append(t)
        s.append(args[6])
        parts.append(p)
    return (*lists, torch.cat(s) if s else torch.zeros(0), list(widths)), parts


def _assert_close_groups(y, x, parts, k, n, what):
    x64 = x.to(torch.float64)
    want = torch.zeros(x.shape[0], n, dtype=torch.float64)
    bound = torch.zeros_like(want)
    for v64, ut64, vmag, umag, s64 in parts:
        want += ((x64 @ v64.T) * s64) @ ut64
        bound += ((x64.abs() @ vmag.T) * s64) @ umag
    tol = bound * (EPS[y.dtype] + 4 * 2.0 ** -23 * (max(k, 1) ** 0.5 + max(n, 1) ** 0.5)) + 1e-30
    err = (y.to(torch.float64) - want).abs()
    assert bool((err <= tol).all()), f"{what}: max err {err.max():.3g} (tol there {tol.flatten()[err.argmax()]:.3g})"


MIXES = (((8, 3, 2), (2, 5, 9)), ((8, 4, 3, 2), (1, 0, 3, 17)), ((2,), (9,)), ((4, 1), (3, 8)),
         ((8, 2), (0, 0)), ((3, 2, 1), (4, 0, 2)), ((7, 5, 6), (2, 3, 1)))


def test_ref_equals_float64_dense():
    for (widths, ranks), (n, k), gs in itertools.product(MIXES, ((7, 129), (33, 300), (48, 64)), (5, 32)):
        args, parts = _groups(widths, ranks, n, k, gs, seed=n + k + gs)
        x = torch.randn(3, k, generator=_gen(k), dtype=torch.float64)
        y = ops.kbit_lowrank_matmul_groups_ref(x, *args, n, k, gs)
        assert y.dtype == torch.float64 and y.shape == (3, n)
        _assert_close_groups(y, x, parts, k, n, f"ref {widths} {ranks} n={n} k={k} gs={gs}")


@needs_ext
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_kernel_mixes_odd_shapes(cpu_path, mix):
    widths, ranks = MIXES[mix]
    # (n, k): odd, k not a multiple of 8 or 32; n % 16 == 0 and k % 8 == 0 take the one-row direct
    # paths; k * bits % 32 == 0 the lookup tables (1 and 2 bits); 1040 and 1000 past several 8-lane steps
    shapes = ((1, 1), (7, 129), (129, 7), (33, 300), (160, 45), (48, 1040), (64, 1000), (32, 176))
    for (n, k), gs, m in itertools.product(shapes, (7, 16, 128), (1, 3)):
        args, parts = _groups(widths, ranks, n, k, gs, seed=mix * 1000 + n + k + gs)
        x = torch.randn(m, k, generator=_gen(m + k))
        y = torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, *args, n, k, gs)
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _assert_close_groups(y, x, parts, k, n, f"{widths} {ranks} n={n} k={k} gs={gs} m={m}")


@needs_ext
def test_kernel_large_one_row_and_threads(cpu_path):
    # r * k past the parallel threshold (tiles and column blocks over the OpenMP threads), n past one
    # column block; the 2-bit group by lookup tables on AVX2
    args, parts = _groups((8, 3, 2), (2, 7, 41), 4160, 4096, 128, seed=3)
    for m in (1, 2):
        x = torch.randn(m, 4096, generator=_gen(m))
        _assert_close_groups(torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, *args, 4160, 4096, 128), x, parts,
                             4096, 4160, f"m={m}")


@needs_ext
def test_kernel_matches_one_group_op_sum(cpu_path):
    """The groups op equals the per-group ops summed in fp32, up to rounding (same codes and math)."""
    args, parts = _groups((8, 3, 2), (3, 6, 20), 64, 256, 32, seed=9)
    x = torch.randn(1, 256, generator=_gen(9))
    y = torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, *args, 64, 256, 32)
    i, want = 0, torch.zeros(1, 64)
    for g, b in enumerate(args[7]):
        r = args[1][g].shape[0]
        want += torch.ops.deltacomp.kbit_lowrank_matmul(x, *(lst[g] for lst in args[:6]), args[6][i:i + r], b, 64,
                                                       256, 32)
        i += r
    torch.testing.assert_close(y, want, rtol=1e-4, atol=1e-4)  # fp32 sums in another order


@needs_ext
@pytest.mark.parametrize("xdtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
def test_kernel_dtypes_and_strided_x(cpu_path, xdtype):
    args, parts = _groups((8, 3, 2), (2, 3, 5), 48, 64, 16, seed=5)
    x = torch.randn(64, 4, generator=_gen(4)).to(xdtype).T  # (4, 64), strided
    y = torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, *args, 48, 64, 16)
    assert y.dtype == xdtype and y.shape == (4, 48)
    _assert_close_groups(y, x, parts, 64, 48, str(xdtype))
    assert torch.equal(y, torch.ops.deltacomp.kbit_lowrank_matmul_groups(x.contiguous(), *args, 48, 64, 16))


@needs_ext
def test_kernel_all_zero(cpu_path):
    args, _ = _groups((), (), 13, 21, 8, seed=1)  # no group at all
    assert torch.equal(torch.ops.deltacomp.kbit_lowrank_matmul_groups(torch.randn(2, 21), *args, 13, 21, 8),
                       torch.zeros(2, 13))
    args, _ = _groups((8, 3), (0, 0), 13, 21, 8, seed=1)  # empty groups only
    assert torch.equal(torch.ops.deltacomp.kbit_lowrank_matmul_groups(torch.randn(1, 21), *args, 13, 21, 8),
                       torch.zeros(1, 13))
    args, _ = _groups((4, 2), (3, 5), 64, 256, 32, seed=2)  # zero codes, scales and zeros
    zeros = (*([torch.zeros_like(t) for t in lst] for lst in args[:6]), args[6], args[7])
    for m in (1, 3):
        y = torch.ops.deltacomp.kbit_lowrank_matmul_groups(torch.randn(m, 256), *zeros, 64, 256, 32)
        assert torch.equal(y, torch.zeros(m, 64))
    args, _ = _groups((4, 2), (3, 5), 64, 256, 32, seed=2)
    assert torch.ops.deltacomp.kbit_lowrank_matmul_groups(torch.zeros(0, 256), *args, 64, 256, 32).shape == (0, 64)
    assert torch.equal(torch.ops.deltacomp.kbit_lowrank_matmul_groups(torch.zeros(2, 256), *args, 64, 256, 32),
                       torch.zeros(2, 64))


@needs_ext
def test_errors_carry_values():
    args, _ = _groups((3, 2), (2, 3), 5, 9, 4, seed=0)
    vq, vs, vz, uq, us, uz, s, bits = args
    f = torch.ops.deltacomp.kbit_lowrank_matmul_groups
    x = torch.randn(2, 9)
    with pytest.raises(RuntimeError, match="bits has 2 groups, but the factor lists have 1, 2"):
        f(x, vq[:1], vs, vz, uq, us, uz, s, bits, 5, 9, 4)
    with pytest.raises(RuntimeError, match="the groups have 5 rows in all .*but s has 4"):
        f(x, vq, vs, vz, uq, us, uz, s[:4], bits, 5, 9, 4)
    with pytest.raises(RuntimeError, match="3 x 9 codes of 2 bits need 7 bytes, but v_q has 6"):
        f(x, [vq[0], vq[1][:-1]], vs, vz, uq, us, uz, s, bits, 5, 9, 4)
    with pytest.raises(RuntimeError, match=r"bits\[1\] must be in 1..8, got 9"):
        f(x, vq, vs, vz, uq, us, uz, s, [3, 9], 5, 9, 4)
    with pytest.raises(RuntimeError, match=r"x has 9 columns \(shape \[2, 9\]\) but k=8"):
        f(x, vq, vs, vz, uq, us, uz, s, bits, 5, 8, 4)
    with pytest.raises(RuntimeError, match="u_scale must be float16, got Float"):
        f(x, vq, vs, vz, uq, [us[0].float(), us[1]], uz, s, bits, 5, 9, 4)
    with pytest.raises(ValueError, match="the groups have 5 rows in all"):
        ops.kbit_lowrank_matmul_groups_ref(x, vq, vs, vz, uq, us, uz, s[:4], bits, 5, 9, 4)


@needs_ext
def test_opcheck_and_compile():
    args, _ = _groups((8, 3, 2), (1, 2, 3), 11, 20, 8, seed=4)
    x = torch.randn(3, 20, generator=_gen(5))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        torch.library.opcheck(torch.ops.deltacomp.kbit_lowrank_matmul_groups.default, (x.to(dtype), *args, 11, 20, 8))
    f = torch.compile(lambda x: ops.kbit_lowrank_matmul_groups(x, *args, 11, 20, 8) * 2, fullgraph=True,
                      backend="eager")
    torch.testing.assert_close(f(x), ops.kbit_lowrank_matmul_groups_ref(x, *args, 11, 20, 8) * 2)


def test_wrapper_fallbacks(monkeypatch):
    args, parts = _groups((4, 2), (2, 3), 9, 30, 16, seed=6)
    x = torch.randn(3, 30, generator=_gen(6))
    want = ops.kbit_lowrank_matmul_groups_ref(x, *args, 9, 30, 16)
    x64 = x.double()  # float64 never reaches the kernel
    y64 = ops.kbit_lowrank_matmul_groups(x64, *args, 9, 30, 16)
    assert y64.dtype == torch.float64
    _assert_close_groups(y64, x64, parts, 30, 9, "float64")
    monkeypatch.setattr(ops, "_ext_on", lambda *t: False)  # as without the extension (or on CUDA): per group
    calls = []
    real = ops.kbit_lowrank_matmul
    monkeypatch.setattr(ops, "kbit_lowrank_matmul", lambda *a: calls.append(a[8]) or real(*a))
    torch.testing.assert_close(ops.kbit_lowrank_matmul_groups(x, *args, 9, 30, 16), want)
    assert calls == [4, 2]
    empty, _ = _groups((), (), 9, 30, 16, seed=6)
    assert torch.equal(ops.kbit_lowrank_matmul_groups(x, *empty, 9, 30, 16), torch.zeros(3, 9))


# -- svd-mixed's serving term ------------------------------------------------------------------------
def _encoded(shape=(48, 64), groups="8:2+3:5+2:rest"):
    g = _gen(7)
    delta = torch.randn(*shape, generator=g) @ torch.diag(torch.rand(shape[1], generator=g)) * 0.1
    codec = get_codec("svd-mixed")
    return codec, codec.encode(delta, ratio=3.0, group_size=16, groups=groups)


def test_serving_term_one_call_per_forward(monkeypatch):
    # the exact kernels asked for: on AVX2 the term would otherwise repack its 2-bit group and call
    # kbit_lowrank_matmul_groups_tl (tests/test_ops_lowrank_tl.py)
    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "exact")
    codec, enc = _encoded()
    term = codec.serving_term(enc)
    dense = codec.decode(enc).double()
    x = torch.randn(3, 64, generator=_gen(8))
    calls = []
    if ops.HAS_EXTENSION:  # the op itself, once per forward, no wrapper
        real_op = torch.ops.deltacomp.kbit_lowrank_matmul_groups
        monkeypatch.setattr(torch.ops.deltacomp, "kbit_lowrank_matmul_groups",
                            lambda *a: calls.append(a[8]) or real_op(*a), raising=False)
    for _ in range(2):
        y = term(x)
        torch.testing.assert_close(y.double(), x.double() @ dense.T, rtol=1e-4, atol=1e-5)
    if ops.HAS_EXTENSION:
        assert calls == [[8, 3, 2]] * 2
    yb = term(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.double(), x.bfloat16().double() @ dense.T, rtol=2e-2, atol=2e-2)
    y64 = term(x.double())
    assert y64.dtype == torch.float64
    torch.testing.assert_close(y64, x.double() @ dense.T, rtol=1e-6, atol=1e-7)


def test_serving_term_after_to_and_codec_matmul(monkeypatch):
    codec, enc = _encoded((40, 70), "4:3+1:9")
    term = codec.serving_term(enc)
    x = torch.randn(2, 70, generator=_gen(9))
    want = term(x)
    term.half()  # s becomes fp16: the arguments are gathered again, s widened back to fp32
    assert term.tensor("s").dtype == torch.float16
    args = group_args(enc)
    want16 = ops.kbit_lowrank_matmul_groups_ref(x.double(), *args[:6], args[6].half().double(), *args[7:])
    torch.testing.assert_close(term(x).double(), want16, rtol=1e-4, atol=1e-5)
    calls = []
    real = ops.kbit_lowrank_matmul_groups
    monkeypatch.setattr(ops, "kbit_lowrank_matmul_groups", lambda *a: calls.append(a[8]) or real(*a))
    y = codec.matmul(x.reshape(2, 1, 70), enc)
    assert y.shape == (2, 1, 40) and calls == [[4, 1]]
    torch.testing.assert_close(y.reshape(2, 40), want, rtol=1e-5, atol=1e-6)
    zero = codec.encode(torch.zeros(6, 10))
    assert torch.equal(codec.serving_term(zero)(torch.randn(2, 10)), torch.zeros(2, 6))
