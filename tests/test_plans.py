"""Layer plans (deltacomp/plans.py, csrc/plans.cpp): a patched layer's CPU forward in one native call.

A plan of mode "torch" or "fused" computes what the module's Python path computes with the same ops in
the same order, so its output is compared for exact equality with the same module's output with plans off
(DELTACOMP_LAYER_PLANS=0), and with a float64 reference within the kernel's tolerance; mode "own" (the
extension's matvec for the base, taken where measured faster; DELTACOMP_FUSED=always forces it, never
forces "torch") sums the base in another order and is compared within fp32 rounding. Checked: svd-mixed
(1 and several rows, 2-D and 3-D x, fp32 and bf16, with and without bias), bitdelta at one x row (fused,
torch and own base, per-tensor and per-row scales), the multi-tenant decode paths with a bias delta; the
calls a plan hands back to the Python path (a non-contiguous x, autograd recording, a replaced weight, signs
changed in place, a moved module); the plan's own argument checks.
"""
import pytest
import torch
from torch import nn

from deltacomp import ops, ops_tl, plans
from deltacomp import serve as dnn
from deltacomp.codecs import get_codec
from deltacomp.serve import dispatch

needs_plans = pytest.mark.skipif(not plans.enabled(), reason="extension not built")


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    for name in ("DELTACOMP_FUSED", plans.ENV, "DELTACOMP_SIGN_KERNEL", "DELTACOMP_LOWRANK_KERNEL"):
        monkeypatch.delenv(name, raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _base(n, k, bias=True, dtype=torch.float32, seed=0):
    base = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=_gen(seed)) * 0.1)
        if bias:
            base.bias.copy_(torch.randn(n, generator=_gen(seed + 1)))
    return base.to(dtype).requires_grad_(False)


def _svd_enc(n, k, seed=3):
    g = _gen(seed)
    delta = torch.randn(n, 6, generator=g) @ torch.randn(6, k, generator=g) * 0.01
    delta += torch.randn(n, k, generator=g) * 1e-3
    return get_codec("svd-mixed").encode(delta, ratio=4)


def _bd_enc(n, k, seed=4, **kw):
    return get_codec("bitdelta").encode(torch.randn(n, k, generator=_gen(seed)) * 0.01, **kw)


def _without_plans(monkeypatch, layer, x):
    """The same layer's output with plans off (its kept path dropped first, and again after)."""
    monkeypatch.setenv(plans.ENV, "0")
    layer._plan = None
    try:
        return layer(x)
    finally:
        monkeypatch.delenv(plans.ENV)
        layer._plan = None


def _served(layer, x):
    """The layer's output from its second call, checking that a plan was kept and served it."""
    layer(x)
    native = layer._plan[-3]
    assert isinstance(native, plans._LayerPlan), layer._plan
    y = native(x)
    assert y is not None
    assert torch.equal(layer(x), y)
    return y


def _ref(base, enc, x):
    w = base.weight.double() + get_codec(enc.codec).decode(enc).double()
    y = x.double() @ w.T
    return y if base.bias is None else y + base.bias.double()


@needs_plans
@pytest.mark.parametrize("shape", [(1, 1, 96), (1, 96), (5, 96), (2, 3, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_svd_mixed_plan_equals_python_path(monkeypatch, shape, dtype, bias):
    monkeypatch.setenv("DELTACOMP_FUSED", "never")  # the torch base: the Python path's arithmetic
    n, k = 70, shape[-1]
    enc = _svd_enc(n, k)
    layer = dnn.DeltaLinear(_base(n, k, bias, dtype), enc)
    x = torch.randn(*shape, generator=_gen(9)).to(dtype)
    with torch.no_grad():
        y = _served(layer, x)
        assert y.shape == (*shape[:-1], n) and y.dtype == dtype
        assert torch.equal(y, _without_plans(monkeypatch, layer, x))
    ref = _ref(layer.base, enc, x)
    tol = 5e-2 if dtype == torch.bfloat16 else 2e-2
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


def _sign_cases():
    return [(n, k, fused, per_row) for (n, k) in ((40, 64), (33, 100), (96, 260))
            for fused in ("always", "never") for per_row in (False, True)]


@needs_plans
@pytest.mark.parametrize("n,k,fused,per_row", _sign_cases())
def test_bitdelta_plan_equals_python_path(monkeypatch, n, k, fused, per_row):
    if not ops_tl.sign_tl_wanted():
        pytest.skip("bitdelta's terms take no int8 tables on this CPU: no sign plans")
    monkeypatch.setenv("DELTACOMP_FUSED", fused)
    enc = _bd_enc(n, k, scale="row" if per_row else "tensor")
    layer = dnn.DeltaLinear(_base(n, k), enc)
    x = torch.randn(1, 1, k, generator=_gen(n))
    with torch.no_grad():
        y = _served(layer, x)
        assert torch.equal(y, _without_plans(monkeypatch, layer, x))
        x3 = torch.randn(3, k, generator=_gen(1))  # three rows: "always" takes the term row by row, "never"
        layer(x3)                                  # the Python path (sign plans serve one row or row by row)
        assert (layer._plan[-3] is None) == (fused == "never")
    ref = _ref(layer.base, enc, x)
    assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


@needs_plans
def test_multi_tenant_plans_with_bias_delta(monkeypatch):
    """MultiDeltaLinear's decode paths: a svd-mixed tenant (base + its term) and, where the int8 tables
    are on, a bitdelta tenant (fused), each with a bias delta: the plan's output equals the Python path's."""
    n, k = 48, 64
    encs = [_svd_enc(n, k), _bd_enc(n, k)]
    bias = [torch.randn(n, generator=_gen(5)) * 0.1, torch.randn(n, generator=_gen(6)) * 0.1]
    layer = dnn.MultiDeltaLinear(_base(n, k), encs, bias)
    x = torch.randn(1, 1, k, generator=_gen(7))
    for t in (0, 1):
        monkeypatch.setenv("DELTACOMP_FUSED", "never" if t == 0 else "always")  # svd: torch base; bitdelta: fused
        layer.delta_index = torch.tensor([t])
        with torch.no_grad():
            if t == 1 and not ops_tl.sign_tl_wanted():
                layer(x)
                assert layer._plan[-3] is None
                continue
            y = _served(layer, x)
            assert torch.equal(y, _without_plans(monkeypatch, layer, x))
        ref = _ref(layer.base, encs[t], x) + bias[t].double()
        assert (y.double() - ref).abs().max() <= 2e-2 * ref.abs().max()


@needs_plans
@pytest.mark.parametrize("codec", ["svd-mixed", "bitdelta"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_own_base_plan_within_rounding_of_python_path(monkeypatch, codec, dtype):
    """DELTACOMP_FUSED=always: the base + term paths take the extension's matvec for the base (mode "own") at
    one x row, its output the Python path's within fp32 rounding (bf16: one bf16 rounding); at several rows
    the term row by row by the int8 tables (mode "rows"), within their error of the exact kernels; never:
    the torch plan (svd-mixed) or none (bitdelta, whose sign plans serve one row or row by row)."""
    if codec == "bitdelta" and not ops_tl.sign_tl_wanted():
        pytest.skip("bitdelta's terms take no int8 tables on this CPU: no sign plans")
    monkeypatch.setenv("DELTACOMP_FUSED", "always")
    n, k = 72, 100
    enc = _svd_enc(n, k) if codec == "svd-mixed" else _bd_enc(n, k)
    base = _base(n, k, True, dtype)
    layer = dnn.DeltaLinear(base, enc, fused=False)  # bitdelta: base + term, not its fused pass
    x = torch.randn(1, 1, k, generator=_gen(3)).to(dtype)
    with torch.no_grad():
        y = _served(layer, x)
        assert "own" in repr(layer._plan[-3])
        want = _without_plans(monkeypatch, layer, x)
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert (y.double() - want.double()).abs().max() <= tol * want.double().abs().max()
        x3 = torch.randn(3, k, generator=_gen(4)).to(dtype)  # several rows: the term row by row ("rows")
        y3 = layer(x3)
        y3 = layer(x3)
        assert "rows" in repr(layer._plan[-3])
        want3 = _without_plans(monkeypatch, layer, x3)  # the exact multi-row kernels
        assert (y3.double() - want3.double()).abs().max() <= 3e-2 * want3.double().abs().max()
        monkeypatch.setenv("DELTACOMP_FUSED", "never")
        y3 = layer(x3)
        assert layer._plan[-3] is None if codec == "bitdelta" else "torch" in repr(layer._plan[-3])


@needs_plans
def test_plan_hands_back_what_it_does_not_serve(monkeypatch):
    monkeypatch.setenv("DELTACOMP_FUSED", "never")
    n, k = 40, 64
    layer = dnn.DeltaLinear(_base(n, k), _svd_enc(n, k))
    x = torch.randn(2, k, generator=_gen(1))
    with torch.no_grad():
        layer(x)
        native = layer._plan[-3]
        assert native(x.T.contiguous().T) is None  # not contiguous
        assert native(x.double()) is None  # not the weight's dtype
        assert native(torch.randn(2, k + 1)) is None  # not K columns
        assert native(x[:0]) is None  # no rows
    w = layer.base.weight.detach().clone().requires_grad_(True)
    layer.base.weight = nn.Parameter(w)
    with torch.enable_grad():
        for _ in range(2):  # the first call drops the plan of the replaced weight, the second keeps a new one
            y = layer(x)
            assert y.requires_grad  # the Python path recorded the base matmul
        assert layer._plan[-3](x) is None  # autograd records the Python path's ops


@needs_plans
def test_plan_follows_replaced_weight_moved_module_and_changed_signs():
    n, k = 40, 64
    enc = _bd_enc(n, k) if ops_tl.sign_tl_wanted() else _svd_enc(n, k)
    layer = dnn.DeltaLinear(_base(n, k), enc)
    x = torch.randn(1, k, generator=_gen(2))
    with torch.no_grad():
        _served(layer, x)
        other = _base(n, k, seed=11)
        layer.base.weight = nn.Parameter(other.weight.clone(), requires_grad=False)
        y = layer(x)
        assert torch.allclose(y.double(), _ref(layer.base, enc, x), rtol=2e-2, atol=2e-2 * y.abs().max().item())
        _served(layer, x)
        layer._apply(lambda t: t.clone())
        assert layer._plan is None
        _served(layer, x)
        if enc.codec == "bitdelta":  # the signs flipped in place: the plan's repack is stale, it hands back
            native = layer._plan[-3]
            layer.delta.t_signs.bitwise_not_()
            y = layer(x)
            assert not native.current() and layer._plan is None
            flipped = get_codec("bitdelta").decode(enc) * -1
            want = x.double() @ (layer.base.weight.double() + flipped.double()).T + layer.base.bias.double()
            assert (y.double() - want).abs().max() <= 2e-2 * want.abs().max()
            _served(layer, x)


@needs_plans
def test_plans_setting_is_followed_mid_process(monkeypatch):
    """DELTACOMP_LAYER_PLANS=0 set after a plan was kept: the next call decides again and keeps none; unset,
    the next call builds one again."""
    monkeypatch.setenv("DELTACOMP_FUSED", "never")
    n, k = 40, 64
    layer = dnn.DeltaLinear(_base(n, k), _svd_enc(n, k))
    x = torch.randn(1, k)
    with torch.no_grad():
        y = _served(layer, x)
        monkeypatch.setenv(plans.ENV, "0")
        assert torch.equal(layer(x), y)
        assert layer._plan[-3] is None and not plans.enabled()
        monkeypatch.delenv(plans.ENV)
        assert torch.equal(_served(layer, x), y)


@needs_plans
def test_plan_checks_its_arguments():
    n, k = 40, 64
    w = torch.randn(n, k)
    s_tl = torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="weight must be a CPU"):
        plans.sign_tl(torch.randn(n, k + 1), None, None, "fused", s_tl, torch.ones(1), [], n, k)
    with pytest.raises(RuntimeError, match="s_tl must be contiguous CPU uint8"):
        plans.sign_tl(w, None, None, "fused", s_tl, torch.ones(1), [], n, k)
    with pytest.raises(RuntimeError, match="bias and extra"):
        plans.sign_tl(w, torch.zeros(n + 1), None, "fused", s_tl, torch.ones(1), [], n, k)
    with pytest.raises(RuntimeError, match="mode must be torch, own, fused or rows"):
        plans.sign_tl(w, None, None, "fast", s_tl, torch.ones(1), [], n, k)
    with pytest.raises(RuntimeError, match="take a contiguous float32 or bfloat16 weight"):
        plans.sign_tl(w.double(), None, None, "own", s_tl, torch.ones(1), [], n, k)
    term = get_codec("svd-mixed").serving_term(_svd_enc(n, k))
    term(torch.randn(1, k))
    if term._args is not None and term._direct:
        bad = (*term._args[:8], n + 1, *term._args[9:])
        with pytest.raises(RuntimeError, match="LayerPlan.lowrank"):
            plans.lowrank(w, None, None, "torch", bad, term._tl)
        with pytest.raises(RuntimeError, match="no fused pass"):
            plans.lowrank(w, None, None, "fused", term._args, term._tl)
    assert ops.HAS_EXTENSION


def test_modules_keep_paths_of_alternating_shapes(monkeypatch):
    """A prompt's shape and the decode step's alternate in generation: each module keeps the paths of its
    last few keys (``kept.KEPT``), so alternating shapes decide (and build plans) once per shape; a
    key pushed out by newer ones is decided again. Outputs are unchanged by it."""
    from deltacomp.serve import kept

    monkeypatch.setenv("DELTACOMP_FUSED", "never")  # the torch base: the first (Python) call's arithmetic
    n, k = 40, 64
    layer = dnn.DeltaLinear(_base(n, k), _svd_enc(n, k))
    multi = dnn.MultiDeltaLinear(_base(n, k), [_svd_enc(n, k)])
    multi.delta_index = torch.tensor([0])
    decided = []
    for cls in (dnn.DeltaLinear, dnn.MultiDeltaLinear):
        real = cls._forward
        monkeypatch.setattr(cls, "_forward", lambda self, x, key=None, _r=real: decided.append(x.shape) or _r(self, x, key))
    a, b = torch.randn(1, 1, k, generator=_gen(1)), torch.randn(1, 5, k, generator=_gen(2))
    with torch.no_grad():
        for mod in (layer, multi):
            decided.clear()
            first = [mod(a), mod(b)]
            for _ in range(3):
                assert torch.equal(mod(a), first[0]) and torch.equal(mod(b), first[1])
            assert len(decided) == 2
            for rows in range(2, 2 + kept.KEPT):  # newer keys push a and b out
                mod(torch.randn(1, rows * 7, k))
            decided.clear()
            assert torch.equal(mod(a), first[0])
            assert len(decided) == 1
