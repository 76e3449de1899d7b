"""kbit_lowrank_matmul_groups_tl: svd-mixed at one x row with the 1- and 2-bit groups' V and U^T in the TL4
layout (quant/tl4.py), stages 1 and 3 by int8 lookup tables on the AVX2 and portable paths (inexact).
Checked: the layout round trip; the kernel against a float64 emulation of its int8 tables (tight: only fp32
rounding apart); the kernel against the float64 reference within the bound the table quantization allows
(below); odd K, one row, rank 0 and 1, all-zero codes, every bit width; the exact fallbacks (AVX-512, M > 1,
the environment variable); the wrapper checks; svd-mixed's serving term.

Error bound (the kernel's comment in csrc/cpu/lowrank_tl_avx2.cpp): the tables of one chunk (<= 128
positions of one RTN group) have the scale delta = max |T| / 127 <= max over its position groups p of
sum_t |x[4p + t]| / 127, and each lookup is off by at most delta / 2 (+1e-4 relative for the fp32
products), so a row's dot over the chunk is off by at most |scale| * delta / 2 * (2^B - 1) * (its position
groups). Stage 1's error e_j on t_j = s_j * (dot_j + zero term) goes through U exactly (sum_j |U_jc| e_j);
stage 3 then quantizes a_j = t'_j * u_scale[j][G] (t' = t + e) the same way over chunks of 128 rank rows.
"""
import itertools

import pytest
import torch

from deltacomp import ops
from deltacomp.codecs.svd_mixed.serving import tl4_lists
from deltacomp.quant import tl4
from deltacomp.quant.bitpack import unpack_bits

from test_ops_lowrank import EPS, _gen, needs_ext
from test_ops_lowrank_groups import _groups


@pytest.fixture(params=("avx2", "portable"))
def avx2(request, monkeypatch):
    """Each path with int8-table kernels: AVX2 (lowrank_tl_avx2.cpp) and portable (lowrank_tl_generic.cpp,
    the loops NEON builds too; tests/test_arm.py runs them on aarch64)."""
    monkeypatch.setenv("DELTACOMP_ISA", request.param)
    monkeypatch.delenv("DELTACOMP_LOWRANK_KERNEL", raising=False)
    if ops.cpu_isa() != request.param:
        pytest.skip(f"no {request.param} path on this CPU")
    return request.param


def _lists(args, n, k, gs):
    """tl4_lists as the serving term builds them (on the AVX2 path)."""
    return tl4_lists((*args, n, k, gs))


# -- the layout ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", (1, 2))
def test_pack_round_trip(bits):
    for r, k, gs in itertools.product((1, 31, 33, 70), (1, 4, 7, 129, 300), (4, 16, 128, 200)):
        args, _ = _groups((bits,), (r,), 5, k, gs, seed=r + k + gs)
        v_tl, v_sc = tl4.pack_tl4(args[0][0], args[1][0], bits, k, gs)
        tiles = (r + 31) // 32
        assert v_tl.dtype == torch.uint8 and v_tl.numel() == tiles * tl4.row_groups(k, gs) * 16 * bits
        assert torch.equal(tl4.unpack_tl4(v_tl, bits, r, k, gs), unpack_bits(args[0][0], bits, r * k).reshape(r, k))
        assert v_sc.shape == (tiles, args[1][0].shape[1], 32)
        assert torch.equal(v_sc.transpose(1, 2).reshape(tiles * 32, -1)[:r], args[1][0])
        assert not v_sc.transpose(1, 2).reshape(tiles * 32, -1)[r:].any()
    for n, r in itertools.product((1, 32, 45, 300), (1, 5, 129)):
        args, _ = _groups((bits,), (r,), n, 8, 32, seed=n + r)
        u_tl, u_sc, u_zr = tl4.pack_tl4_u(args[3][0], args[4][0], args[5][0], bits, n, 32)
        codes = unpack_bits(args[3][0], bits, r * n).reshape(r, n)
        assert torch.equal(tl4.unpack_tl4(u_tl, bits, n, r, r), codes.T)
        assert torch.equal(u_sc, args[4][0].T) and torch.equal(u_zr, args[5][0].T)


def test_pack_refuses_other_widths():
    args, _ = _groups((3,), (4,), 5, 16, 8, seed=1)
    with pytest.raises(ValueError, match="no TL4 layout of V for 3-bit codes with group_size 8"):
        tl4.pack_tl4(args[0][0], args[1][0], 3, 16, 8)
    args, _ = _groups((2,), (4,), 5, 16, 6, seed=1)
    with pytest.raises(ValueError, match="needs 1 or 2 bits and group_size % 4 == 0"):
        tl4.pack_tl4(args[0][0], args[1][0], 2, 16, 6)
    with pytest.raises(ValueError, match="no TL4 layout of U for 2-bit codes with group_size 16"):
        tl4.pack_tl4_u(args[3][0], args[4][0], args[5][0], 2, 5, 16)


# -- an emulation of the int8 tables (float64 sums of the exact integers the kernel adds) ----------------
def _chunks(k: int, gs: int):
    for g0 in range(0, k, gs):
        for c0 in range(g0, min(k, g0 + gs), tl4.CHUNK):
            yield c0, min(tl4.CHUNK, min(k, g0 + gs) - c0)


def _tables(x: torch.Tensor, c0: int, n: int):
    """(quantized tables (groups, 16) as float64, delta) of positions [c0, c0 + n) of fp32 x, computed as
    the kernel does (fp32 sums in its order, fp32 1 / delta, round half to even)."""
    npg = (n + 3) // 4
    xx = torch.zeros(npg * 4)
    xx[:n] = x[c0:c0 + n]
    xx = xx.reshape(npg, 4)
    bit = torch.stack([(torch.arange(16) >> t) & 1 for t in range(4)], 1).float()
    x0, x1, x2, x3 = (xx[:, None, i] * bit[:, i] for i in range(4))
    t = ((x0 + x1) + x2) + x3
    d = t.abs().max() / torch.tensor(127.0)
    inv = 1.0 / d if d > 0 else torch.tensor(0.0)
    return torch.round(t * inv).clamp(-128, 127).double(), float(d)


def _dots_emulated(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, bits: int, k: int, gs: int):
    """sum over RTN groups g of scale[j][g] * <codes of row j in g, x> through the int8 tables, (r,)."""
    r = codes.shape[0]
    dots = torch.zeros(r, dtype=torch.float64)
    for c0, n in _chunks(k, gs):
        q, d = _tables(x, c0, n)
        npg = q.shape[0]
        cc = torch.zeros(r, npg * 4, dtype=torch.long)
        cc[:, :n] = codes[:, c0:c0 + n].long()
        cc = cc.reshape(r, npg, 4)
        acc = torch.zeros(r, dtype=torch.float64)
        for b in range(bits):
            nib = sum(((cc[:, :, t] >> b) & 1) << t for t in range(4))
            acc += 2 ** b * torch.gather(q.expand(r, -1, -1), 2, nib[..., None])[..., 0].sum(1)
        dots += acc * d * scale[:, c0 // gs].double()
    return dots


def _dequant(q, scale, zero, bits, rows, length, gs):
    codes = unpack_bits(q, bits, rows * length).reshape(rows, length).double()
    rep = lambda t: t.double().repeat_interleave(gs, dim=1)[:, :length]  # noqa: E731
    return codes, rep(zero) + codes * rep(scale)


@needs_ext
@pytest.mark.parametrize("bits", (1, 2))
def test_stage1_matches_emulation(avx2, bits):
    """Only V repacked: stage 1 by int8 tables, stage 3 exact; the kernel equals the emulation up to fp32
    rounding (a tolerance far below one table step)."""
    for (n, k), gs, r in itertools.product(((48, 1040), (33, 301), (64, 1000), (16, 7)), (16, 128, 200), (1, 33, 70)):
        args, _ = _groups((bits,), (r,), n, k, gs, seed=n + k + gs + r)
        vq, vs, vz, uq, us, uz, s, _ = args
        v_tl, v_sc = tl4.pack_tl4(vq[0], vs[0], bits, k, gs)
        empty = [torch.zeros(0, dtype=torch.uint8)], [torch.zeros(0, 0, dtype=torch.float16)]
        x = torch.randn(1, k, generator=_gen(k + r))
        y = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, n, k, gs, [v_tl], [v_sc], *empty, empty[1])
        codes = unpack_bits(vq[0], bits, r * k).reshape(r, k)
        xs = torch.stack([x[0, g:g + gs].double().sum() for g in range(0, k, gs)])
        t = (_dots_emulated(x[0], codes, vs[0], bits, k, gs) + vz[0].double() @ xs) * s.double()
        _, u64 = _dequant(uq[0], us[0], uz[0], bits, r, n, gs)
        want = t @ u64
        mag = (t.abs() @ u64.abs()).max()
        err = (y[0].double() - want).abs().max()
        assert err <= 1e-5 * mag + 1e-30, f"n={n} k={k} gs={gs} r={r}: {err:.3g} against {mag:.3g}"


def _bound(x, args, n, k, gs, tl):
    """Per output column: the error bound of the int8 tables (module docstring) + the fp32 terms."""
    x64 = x[0].double()
    bound = torch.zeros(n, dtype=torch.float64)
    i = 0
    for g, b in enumerate(args[7]):
        vq, vs, vz, uq, us, uz = (lst[g] for lst in args[:6])
        r = vs.shape[0]
        s = args[6][i:i + r].double()
        i += r
        if r == 0:
            continue
        vc, v64 = _dequant(vq, vs, vz, b, r, k, gs)
        uc, u64 = _dequant(uq, us, uz, b, r, n, gs)
        rep = lambda t, length: t.double().abs().repeat_interleave(gs, 1)[:, :length]  # noqa: E731
        vmag, umag = rep(vz, k) + vc * rep(vs, k), rep(uz, n) + uc * rep(us, n)
        t = (v64 @ x64) * s
        e = torch.zeros(r, dtype=torch.float64)
        if tl[0][g].numel():
            for c0, m in _chunks(k, gs):
                sums = x64[c0:c0 + m].abs()
                d = torch.nn.functional.pad(sums, (0, (-m) % 4)).reshape(-1, 4).sum(1).max() / 127
                e += vs[:, c0 // gs].double().abs() * d * 0.5001 * (2 ** b - 1) * ((m + 3) // 4)
            e *= s.abs()
        tmag = (vmag @ x64.abs()) * s.abs()
        bound += umag.T @ (e + 1e-5 * tmag)
        if tl[2][g].numel():
            a = (t.abs() + e + 1e-5 * tmag)[:, None] * us.double().abs()  # |t'| * |scale|, (r, groups of n)
            for c0, m in _chunks(r, r):
                part = torch.nn.functional.pad(a[c0:c0 + m], (0, 0, 0, (-m) % 4))
                d = part.reshape(-1, 4, a.shape[1]).sum(1).max(0).values / 127
                bound += (d * 0.5001 * (2 ** b - 1) * ((m + 3) // 4)).repeat_interleave(gs)[:n]
    return bound


MIXES = (((2,), (1,)), ((1,), (40,)), ((8, 3, 2), (2, 5, 40)), ((3, 2, 1), (4, 0, 33)), ((2, 1), (0, 1)),
         ((8, 7, 6, 5, 4, 3, 2, 1), (1, 2, 1, 2, 3, 2, 9, 7)), ((4, 2), (3, 70)))


@needs_ext
@pytest.mark.parametrize("mix", range(len(MIXES)))
def test_kernel_within_table_bound(avx2, mix):
    widths, ranks = MIXES[mix]
    for (n, k), gs in itertools.product(((64, 1000), (33, 301), (160, 45), (1, 7), (96, 129)), (16, 32, 128, 7)):
        args, _ = _groups(widths, ranks, n, k, gs, seed=mix * 100 + n + k + gs)
        tl = _lists(args, n, k, gs)
        x = torch.randn(1, k, generator=_gen(n + k))
        want = ops.kbit_lowrank_matmul_groups_ref(x.double(), *args, n, k, gs)[0]
        if tl is None:  # no 1- or 2-bit group with a layout (gs = 7): the exact op
            assert not any(b <= 2 and r for b, r in zip(widths, ranks)) or gs % 4
            continue
        y = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, n, k, gs, *tl)[0].double()
        bound = _bound(x, args, n, k, gs, tl) * (1 + 1e-6) + 1e-30
        err = (y - want).abs()
        assert bool((err <= bound).all()), f"{widths} {ranks} n={n} k={k} gs={gs}: {(err / bound).max():.3g} of bound"


@needs_ext
def test_zero_codes_rank_zero_and_zero_x(avx2):
    args, _ = _groups((2, 1), (40, 3), 64, 256, 32, seed=2)
    zeros = (*([torch.zeros_like(t) for t in lst] for lst in args[:6]), args[6], args[7])
    tl = _lists(zeros, 64, 256, 32)
    y = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(torch.randn(1, 256), *zeros, 64, 256, 32, *tl)
    assert torch.equal(y, torch.zeros(1, 64))
    tl = _lists(args, 64, 256, 32)
    y = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(torch.zeros(1, 256), *args, 64, 256, 32, *tl)
    assert torch.equal(y, torch.zeros(1, 64))
    empty, _ = _groups((2, 1), (0, 0), 64, 256, 32, seed=2)
    assert _lists(empty, 64, 256, 32) is None  # nothing to repack: the plain op


@needs_ext
@pytest.mark.parametrize("path", ("avx512", "exact", "direct", "rows"))
def test_exact_fallbacks(avx2, monkeypatch, path):
    """The same lists on the AVX-512 path, with the exact kernels asked for, or at M > 1: the plain op's
    result, bit for bit."""
    args, _ = _groups((8, 3, 2, 1), (2, 5, 40, 9), 64, 1000, 32, seed=4)
    tl = _lists(args, 64, 1000, 32)
    x = torch.randn(3 if path == "rows" else 1, 1000, generator=_gen(4))
    if path == "avx512":
        monkeypatch.setenv("DELTACOMP_ISA", path)
        if ops.cpu_isa() != path:
            pytest.skip(f"no {path} path on this CPU")
    elif path in ("exact", "direct"):
        monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", path)
    want = torch.ops.deltacomp.kbit_lowrank_matmul_groups(x, *args, 64, 1000, 32)
    assert torch.equal(torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, 64, 1000, 32, *tl), want)
    if path in ("exact", "direct", "avx512"):  # and the serving term then repacks nothing
        assert _lists(args, 64, 1000, 32) is None


@needs_ext
def test_errors_carry_values(avx2):
    args, _ = _groups((3, 2), (2, 40), 64, 100, 32, seed=0)
    tl = _lists(args, 64, 100, 32)
    f = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl
    x = torch.randn(1, 100)
    with pytest.raises(RuntimeError, match="bits has 2 groups, but the TL4 lists have 1, 2, 2, 2, 2 entries"):
        f(x, *args, 64, 100, 32, tl[0][:1], *tl[1:])
    bad = [tl[0][0], tl[0][1][:-1]]
    with pytest.raises(RuntimeError, match=r"v_tl\[1\] must be uint8 of 1664 bytes, got Byte of 1663"):
        f(x, *args, 64, 100, 32, bad, *tl[1:])
    with pytest.raises(RuntimeError, match=r"group 0 \(3 bits, group_size 32\) has no TL4 layout of V"):
        f(x, *args, 64, 100, 32, [tl[0][1], tl[0][1]], *tl[1:])
    with pytest.raises(RuntimeError, match=r"u_tl_scale\[1\] must be float16 of shape \[2, 40\]"):
        f(x, *args, 64, 100, 32, *tl[:3], [tl[3][0], tl[3][1].float()], tl[4])


@needs_ext
def test_opcheck(avx2):
    args, _ = _groups((8, 2, 1), (1, 33, 2), 64, 40, 32, seed=4)
    tl = _lists(args, 64, 40, 32)
    for m in (1, 2):
        torch.library.opcheck(torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl.default,
                              (torch.randn(m, 40), *args, 64, 40, 32, *tl))


@needs_ext
def test_serving_term_takes_the_tables(avx2, monkeypatch):
    from deltacomp.codecs import get_codec
    g = _gen(7)
    delta = torch.randn(64, 96, generator=g) @ torch.diag(torch.rand(96, generator=g)) * 0.1
    codec = get_codec("svd-mixed")
    enc = codec.encode(delta, ratio=3.0, group_size=32, groups="8:2+2:rest")
    calls = []
    real = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl
    monkeypatch.setattr(torch.ops.deltacomp, "kbit_lowrank_matmul_groups_tl", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    term = codec.serving_term(enc)
    x = torch.randn(1, 96, generator=_gen(8))
    y = term(x)
    assert calls == [1]
    exact = codec.serving_term(enc)
    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "exact")
    want = exact(x)
    assert calls == [1]  # gathered with the exact kernel asked for: the plain op
    assert torch.equal(term(x), want)  # the kernel reads the variable per call too
    torch.testing.assert_close(y, want, rtol=0.05, atol=0.05 * float(want.abs().max()))


@needs_ext
def test_wrapper(avx2):
    args, parts = _groups((8, 2), (2, 40), 64, 100, 32, seed=6)
    tl = _lists(args, 64, 100, 32)
    x = torch.randn(1, 100, generator=_gen(6))
    assert torch.equal(ops.kbit_lowrank_matmul_groups_tl(x, *args, 64, 100, 32, *tl),
                       torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, 64, 100, 32, *tl))
    y64 = ops.kbit_lowrank_matmul_groups_tl(x.double(), *args, 64, 100, 32, *tl)  # float64: the exact reference
    torch.testing.assert_close(y64, ops.kbit_lowrank_matmul_groups_ref(x.double(), *args, 64, 100, 32))


@needs_ext
@pytest.mark.parametrize("bad", (float("nan"), float("inf")))
def test_nonfinite_x_is_not_hidden(avx2, bad):
    """A NaN or infinite x entry makes every output NaN (the exact kernel gives NaN or inf there), rather
    than the zero tables a non-finite table scale would give."""
    args, _ = _groups((2, 1), (40, 3), 64, 256, 32, seed=3)
    tl = _lists(args, 64, 256, 32)
    x = torch.randn(1, 256, generator=_gen(3))
    x[0, 100] = bad
    assert torch.isnan(torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, 64, 256, 32, *tl)).all()


@needs_ext
def test_large_one_row_threads(avx2):
    """Past the parallel threshold (tiles and column groups over the OpenMP threads): the same bits with
    one thread and with two, and within the table bound of the float64 reference."""
    args, _ = _groups((8, 3, 2, 1), (2, 7, 300, 40), 4160, 4096, 128, seed=3)
    tl = _lists(args, 4160, 4096, 128)
    x = torch.randn(1, 4096, generator=_gen(1))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, 4160, 4096, 128, *tl)
        torch.set_num_threads(2)
        y2 = torch.ops.deltacomp.kbit_lowrank_matmul_groups_tl(x, *args, 4160, 4096, 128, *tl)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2)
    want = ops.kbit_lowrank_matmul_groups_ref(x.double(), *args, 4160, 4096, 128)[0]
    err = (y1[0].double() - want).abs()
    assert bool((err <= _bound(x, args, 4160, 4096, 128, tl) * (1 + 1e-6)).all())
