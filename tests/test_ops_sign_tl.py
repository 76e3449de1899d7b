"""sign_matmul_tl: bitdelta's sign delta at one x row by int8 lookup tables (AVX2, inexact), on the signs
repacked into the TL4 layout as 1-bit codes with one RTN group per row (quant/tl4.py). Checked: the layout
round trip; the kernel against a float64 emulation of its int8 tables (only fp32 rounding apart) and
against the float64 reference within the bound the tables allow; with and without the base (fp32 and
bf16), per-row and per-tensor scales, K a multiple of 4 but not of 8, 32 or 128, one row, N not a
multiple of 32, all-zero scales, NaN x; the argument checks; the serving terms (DeltaLinear and the
multi-tenant decode path) taking it at one x row and DELTACOMP_SIGN_KERNEL=exact keeping the exact op.

Error bound: sign . x = 2 (bits . x) - sum(x), sum(x) exact in float64 then rounded; bits . x goes
through the tables of each chunk of <= 128 positions, whose step delta <= max over the chunk's position
groups of sum |x| / 127, each of its ceil(len / 4) lookups off by at most delta / 2 (the module docstring
of test_ops_lowrank_tl.py). So |error| <= |s| * 2 * sum over chunks of delta / 2 * ceil(len / 4).
"""
import itertools

import pytest
import torch

from deltacomp import ops, ops_tl
from deltacomp.codecs import get_codec
from deltacomp.quant import tl4
from deltacomp.serve.modules import DeltaLinear

from test_ops_lowrank import _gen, needs_ext
from test_ops_lowrank_tl import _chunks, _tables

SHAPES = ((1, 4), (31, 100), (33, 132), (64, 1028), (70, 260), (5, 12), (96, 4100))


@pytest.fixture(params=("avx2", "portable"))
def avx2(request, monkeypatch):
    """Each path with int8-table kernels: AVX2 (lowrank_tl_avx2.cpp) and portable (lowrank_tl_generic.cpp,
    the loops NEON builds too; tests/test_arm.py runs them on aarch64)."""
    monkeypatch.setenv("DELTACOMP_ISA", request.param)
    monkeypatch.delenv("DELTACOMP_SIGN_KERNEL", raising=False)
    if ops.cpu_isa() != request.param:
        pytest.skip(f"no {request.param} path on this CPU")
    return request.param


def _signs(n, k, seed):
    return torch.randint(0, 256, (n, (k + 7) // 8), dtype=torch.uint8, generator=_gen(seed))


def _bits(packed, k):
    return (ops.unpack_signs(packed, k, torch.float64) > 0).long()


def test_pack_round_trip():
    for (n, k) in SHAPES:
        packed = _signs(n, k, n + k)
        tl = tl4.pack_tl4_signs(packed, k)
        assert tl.dtype == torch.uint8 and tl.numel() == (n + 31) // 32 * tl4.row_groups(k, k) * 16
        assert torch.equal(tl4.unpack_tl4(tl, 1, n, k, k).long(), _bits(packed, k))


@needs_ext
def test_native_repack_equals_the_reference():
    """ops_tl.pack_tl4_signs (the C++ tl4_pack where rows are one stream: k % 8 == 0) gives the torch
    reference's bytes; other k take the reference."""
    for (n, k) in ((1, 8), (31, 96), (33, 1024), (70, 264), (5, 12), (40, 100)):
        packed = _signs(n, k, n * k)
        assert torch.equal(ops_tl.pack_tl4_signs(packed, k), tl4.pack_tl4_signs(packed, k)), (n, k)


def test_pack_refuses():
    with pytest.raises(ValueError, match="k a positive multiple of 4"):
        tl4.pack_tl4_signs(_signs(3, 10, 1), 10)
    with pytest.raises(ValueError, match=r"needs uint8 \(n, ceil\(k / 8\)\)"):
        tl4.pack_tl4_signs(_signs(3, 16, 1), 24)
    assert not tl4.supports_signs(0) and not tl4.supports_signs(6) and tl4.supports_signs(12)


def _emulated(x, packed, scale, k):
    """scale * (2 (bits . x) - sum(x)) with bits . x through the kernel's int8 tables, float64 (n,)."""
    bits = _bits(packed, k)
    n = bits.shape[0]
    dots = torch.zeros(n, dtype=torch.float64)
    for c0, m in _chunks(k, k):
        q, d = _tables(x, c0, m)
        cc = torch.zeros(n, q.shape[0] * 4, dtype=torch.long)
        cc[:, :m] = bits[:, c0:c0 + m]
        nib = sum(cc.reshape(n, -1, 4)[:, :, t] << t for t in range(4))
        dots += torch.gather(q.expand(n, -1, -1), 2, nib[..., None])[..., 0].sum(1) * d
    return scale.double().reshape(-1) * (2 * dots - x.double().sum())


def _bound(x, scale, k):
    x64 = x.double().abs()
    e = 0.0
    for c0, m in _chunks(k, k):
        d = torch.nn.functional.pad(x64[c0:c0 + m], (0, (-m) % 4)).reshape(-1, 4).sum(1).max() / 127
        e += float(d) * 0.5001 * ((m + 3) // 4)
    return 2 * e * scale.double().abs().reshape(-1) + 1e-5 * scale.double().abs().reshape(-1) * float(x64.sum())


@needs_ext
@pytest.mark.parametrize("per_row", (True, False))
@pytest.mark.parametrize("w_dtype", (None, torch.float32, torch.bfloat16))
def test_kernel_against_emulation_and_bound(avx2, per_row, w_dtype):
    for i, (n, k) in enumerate(SHAPES):
        packed = _signs(n, k, 7 * i)
        scale = torch.rand(n if per_row else 1, generator=_gen(i)) + 0.1
        x = torch.randn(1, k, generator=_gen(100 + i))
        w = None if w_dtype is None else torch.randn(n, k, generator=_gen(200 + i)).to(w_dtype)
        y = ops_tl.sign_matmul_tl(x, w, tl4.pack_tl4_signs(packed, k), scale, n, k)[0].double()
        base = torch.zeros(n, dtype=torch.float64) if w is None else w.double() @ x[0].double()
        base_mag = 0.0 if w is None else w.double().abs() @ x[0].double().abs()
        term_mag = scale.double().abs().reshape(-1) * x.double().abs().sum()
        slop = 1e-5 * (base_mag + term_mag) + 1e-30
        emu = base + _emulated(x[0], packed, scale, k)
        assert bool(((y - emu).abs() <= slop).all()), f"n={n} k={k}: {(y - emu).abs().max():.3g} from the emulation"
        exact = base + scale.double().reshape(-1, 1).mul(ops.unpack_signs(packed, k, torch.float64)).matmul(
            x[0].double())
        err = (y - exact).abs()
        bound = _bound(x[0], scale, k) + slop
        assert bool((err <= bound).all()), f"n={n} k={k}: {(err / bound).max():.3g} of the bound"


@needs_ext
def test_edge_cases(avx2):
    n, k = 40, 132
    packed = _signs(n, k, 3)
    tl = tl4.pack_tl4_signs(packed, k)
    x = torch.randn(1, k, generator=_gen(4))
    w = torch.randn(n, k, generator=_gen(5))
    zero_row, zero_tensor = (ops_tl.sign_matmul_tl(x, w, tl, s, n, k) for s in (torch.zeros(n), torch.zeros(())))
    assert torch.equal(zero_row, zero_tensor)
    torch.testing.assert_close(ops_tl.sign_matmul_tl(x, w, tl, torch.zeros(n), n, k), x @ w.T, rtol=1e-5, atol=1e-5)
    assert not ops_tl.sign_matmul_tl(torch.zeros(1, k), None, tl, torch.ones(n), n, k).any()
    xn = x.clone()
    xn[0, 7] = float("nan")
    assert ops_tl.sign_matmul_tl(xn, None, tl, torch.ones(n), n, k).isnan().all()
    empty = ops_tl.sign_matmul_tl(x, torch.zeros(0, k), torch.zeros(0, dtype=torch.uint8), torch.ones(0), 0, k)
    assert empty.shape == (1, 0)
    y16 = ops_tl.sign_matmul_tl(x.bfloat16(), w, tl, torch.ones(n), n, k)
    assert y16.dtype == torch.bfloat16 and y16.shape == (1, n)
    for t in (1, 2):  # threads split the row tiles and the dense pass: the same sums
        torch.set_num_threads(t)
        big = ops_tl.sign_matmul_tl(torch.randn(1, 4096, generator=_gen(9)), torch.randn(300, 4096, generator=_gen(8)),
                                 tl4.pack_tl4_signs(_signs(300, 4096, 6), 4096), torch.ones(300), 300, 4096)
        if t == 1:
            one = big
    torch.testing.assert_close(big, one, rtol=0, atol=0)


@needs_ext
def test_checks(avx2):
    n, k = 8, 64
    tl = tl4.pack_tl4_signs(_signs(n, k, 1), k)
    x, s = torch.randn(1, k), torch.ones(n)
    with pytest.raises(RuntimeError, match="x must have one row"):
        ops_tl.sign_matmul_tl(torch.randn(2, k), None, tl, s, n, k)
    with pytest.raises(RuntimeError, match="k must be a positive multiple of 4"):
        ops_tl.sign_matmul_tl(torch.randn(1, 6), None, tl, s, n, 6)
    with pytest.raises(RuntimeError, match=r"s_tl must have \d+ bytes for n=8, k=64, got 5"):
        ops_tl.sign_matmul_tl(x, None, tl[:5], s, n, k)
    with pytest.raises(RuntimeError, match=r"w_base must have shape \(8, 64\)"):
        ops_tl.sign_matmul_tl(x, torch.randn(9, k), tl, s, n, k)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops_tl.sign_matmul_tl(x, None, tl, torch.ones(3), n, k)


@needs_ext
@pytest.mark.parametrize("xdtype", (torch.float32, torch.bfloat16), ids=str)
def test_rows_op_equals_the_one_row_op(avx2, xdtype):
    """sign_matmul_tl_rows: each row as sign_matmul_tl computes it alone (bit for bit), per-row and tensor
    scales mixed in one call, zero rows where s_tl is empty; and its checks."""
    n, k = 70, 260
    tls = [tl4.pack_tl4_signs(_signs(n, k, seed), k) for seed in (1, 2)]
    scales = [torch.rand(n) + 0.5, torch.tensor(0.7)]
    x = torch.randn(4, k, generator=_gen(3)).to(xdtype)
    rows = [(0, 0), (None, None), (1, 1), (0, 1)]  # (signs, scale) per row; None: no tenant
    s_tl = [torch.empty(0, dtype=torch.uint8) if a is None else tls[a] for a, _ in rows]
    sc = [torch.empty(0) if b is None else scales[b] for _, b in rows]
    got = ops_tl.sign_matmul_tl_rows(x, s_tl, sc, n, k)
    assert got.dtype == xdtype and got.shape == (4, n)
    for i, (a, b) in enumerate(rows):
        want = torch.zeros(1, n, dtype=xdtype) if a is None else ops_tl.sign_matmul_tl(
            x[i:i + 1], None, tls[a], scales[b], n, k)
        assert torch.equal(got[i:i + 1], want), i
    torch.library.opcheck(torch.ops.deltacomp.sign_matmul_tl_rows.default, (x.float(), s_tl, sc, n, k))
    with pytest.raises(RuntimeError, match="x has 4 rows, but s_tl and scale have 3 and 4 entries"):
        ops_tl.sign_matmul_tl_rows(x, s_tl[:3], sc, n, k)
    with pytest.raises(RuntimeError, match=r"s_tl\[2\] must be uint8 of \d+ bytes for n=70, k=260, got Byte of 5"):
        ops_tl.sign_matmul_tl_rows(x, [s_tl[0], s_tl[1], tls[1][:5], s_tl[3]], sc, n, k)
    with pytest.raises(RuntimeError, match="scale must have shape"):
        ops_tl.sign_matmul_tl_rows(x, s_tl, [sc[0], sc[1], torch.ones(3), sc[3]], n, k)


def _layer(n, k, seed):
    torch.manual_seed(seed)
    base = torch.nn.Linear(k, n, bias=True)
    enc = get_codec("bitdelta").encode(torch.randn(n, k) * 0.01)
    return base, enc


@needs_ext
def test_delta_linear_takes_tables_at_one_row(avx2, monkeypatch):
    base, enc = _layer(48, 260, 1)
    x1, x4 = torch.randn(1, 260), torch.randn(4, 260)
    tables = DeltaLinear(base, enc)
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "exact")
    exact = DeltaLinear(base, enc)
    signs, scale = enc.tensors["signs"], enc.tensors["scale"]
    with torch.no_grad():
        want = ops.sign_matmul_fused(x1, base.weight, signs, scale, 260) + base.bias
        torch.testing.assert_close(exact(x1), want, rtol=0, atol=0)
        torch.testing.assert_close(tables(x4), exact(x4), rtol=0, atol=0)  # more rows: the exact op
        got = tables(x1)
        emu = base.weight.double() @ x1[0].double() + _emulated(x1[0], signs, scale, 260) + base.bias.double()
        torch.testing.assert_close(got[0].double(), emu, rtol=1e-5, atol=1e-5)
        assert not torch.equal(got, want)
        term = tables.delta(x1)[0].double()  # the term alone (base + term path)
        torch.testing.assert_close(term, _emulated(x1[0], signs, scale, 260), rtol=1e-5, atol=1e-5)
    assert exact.delta._tl_kept is None and tables.delta._tl_kept is not None


@needs_ext
def test_tables_follow_changed_signs(avx2):
    base, enc = _layer(40, 128, 2)
    layer = DeltaLinear(base, enc)
    x = torch.randn(1, 128)
    with torch.no_grad():
        layer(x)
        layer.delta.t_signs.bitwise_not_()  # in place: the repack must follow
        signs = layer.delta.t_signs
        want = (base.weight.double() @ x[0].double() + base.bias.double()
                + _emulated(x[0], signs, enc.tensors["scale"], 128))
        torch.testing.assert_close(layer(x)[0].double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_multi_tenant_decode_takes_tables(avx2):
    from deltacomp.serve.modules import MultiDeltaLinear

    base, enc0 = _layer(64, 132, 3)
    _, enc1 = _layer(64, 132, 4)
    layer = MultiDeltaLinear(base, [enc0, enc1])
    x = torch.randn(1, 132)
    with torch.no_grad():
        for t, enc in enumerate((enc0, enc1)):
            layer.delta_index = torch.tensor([t])
            want = (base.weight.double() @ x[0].double() + base.bias.double()
                    + _emulated(x[0], enc.tensors["signs"], enc.tensors["scale"], 132))
            torch.testing.assert_close(layer(x)[0].double(), want, rtol=1e-5, atol=1e-5)


@needs_ext
def test_mixed_tenant_rows_take_tables(avx2, monkeypatch):
    """Rows of several single-mask tenants (and rows of none): each row's sign dots through the int8 tables
    when measured faster (forced here: DELTACOMP_FUSED=always), the exact multi-tenant kernel otherwise
    (never), and always where a row's tenant has two masks."""
    from deltacomp.serve.modules import MultiDeltaLinear

    base, enc0 = _layer(64, 132, 3)
    _, enc1 = _layer(64, 132, 4)
    enc2 = get_codec("bitdelta").encode(torch.randn(64, 132, generator=_gen(5)), masks=2)
    layer = MultiDeltaLinear(base, [enc0, enc1, None, enc2])
    x = torch.randn(5, 132, generator=_gen(6))
    idx = torch.tensor([1, 0, -1, 1, 0])
    layer.delta_index = idx
    with torch.no_grad():
        monkeypatch.setenv("DELTACOMP_FUSED", "never")
        exact = layer(x)
        monkeypatch.setenv("DELTACOMP_FUSED", "always")
        got = layer(x)
        assert not torch.equal(got, exact)  # the tables (inexact) were taken
        for i, t in enumerate(idx.tolist()):
            want = base.weight.double() @ x[i].double() + base.bias.double()
            if t >= 0:
                enc = (enc0, enc1)[t]
                want = want + _emulated(x[i], enc.tensors["signs"], enc.tensors["scale"], 132)
            torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)
        layer.delta_index = torch.tensor([0, 3, 1, -1, 0])  # tenant 3 has two masks: the exact kernel
        monkeypatch.setenv("DELTACOMP_FUSED", "never")
        exact = layer(x)
        monkeypatch.setenv("DELTACOMP_FUSED", "always")
        assert torch.equal(layer(x), exact)


@needs_ext
@pytest.mark.parametrize("rows", (1, 5))
def test_one_tenant_plan_where_the_fused_kernel_loses(avx2, monkeypatch, rows):
    """Rows all of one tenant's, the fused kernel and its plans measured slower: base + the term's layer plan
    (at one row the "torch" plan, at several the "rows" plan: the term row by row through the tables) is
    taken and kept, not the general Python path."""
    from deltacomp.serve import dispatch
    from deltacomp.serve.modules import _GENERAL, MultiDeltaLinear

    base, enc = _layer(64, 132, 3)
    layer = MultiDeltaLinear(base, [enc])
    layer.delta_index = torch.zeros(rows, dtype=torch.long)
    x = torch.randn(rows, 132, generator=_gen(7))
    kinds = []
    slower = ("multi", "multi-fused-rows", "multi-plans")  # the fused candidates lose every measurement
    monkeypatch.setattr(dispatch, "prefer_fused",
                        lambda x2, w, f, u, kind="single": kinds.append(kind) or kind not in slower)
    with torch.no_grad():
        got = layer(x)
        again = layer(x)
    # one row: the fused plan (no measurement) against base + term's; several: the fused path's rows plan
    # lost to the fused kernel, so only base + term's is left to measure against the general path
    want_kinds = (["multi", "multi-general-base", "multi-plans"] if rows == 1 else
                  ["multi", "multi-fused-rows", "multi-general-rows"])
    assert kinds == want_kinds, kinds  # decided once, then kept
    assert layer._plan[2] == _GENERAL and layer._plan[6] is not None
    assert torch.equal(again, got)
    for i in range(rows):
        want = (base.weight.double() @ x[i].double() + base.bias.double()
                + _emulated(x[i], enc.tensors["signs"], enc.tensors["scale"], 132))
        torch.testing.assert_close(got[i].double(), want, rtol=1e-5, atol=1e-5)
