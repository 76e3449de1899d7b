"""The path a serving module keeps from its last call (DeltaLinear / MultiDeltaLinear ``_plan``, svd-mixed's
gathered op call) follows every change it depends on: the input's shape and dtype, the settings, the
thread count, ``dispatch.reset``, the delta index, replaced weights and moved buffers. Behaviour only:
each output is compared with a reference computed from the tensors as they are at that call."""
import pytest
import torch
from torch import nn

from deltacomp import ops
from deltacomp import serve as dnn
from deltacomp.codecs import get_codec
from deltacomp.errors import DeltacompError
from deltacomp.serve import dispatch

N, K = 24, 37


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DELTACOMP_FUSED", raising=False)
    dispatch.reset()
    yield
    dispatch.reset()


def _base(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(K, N, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(N, K, generator=g))
        base.bias.copy_(torch.randn(N, generator=g))
    return base.to(dtype)


def _enc(seed=1, **kw):
    g = torch.Generator().manual_seed(seed)
    return get_codec("bitdelta").encode(torch.randn(N, K, generator=g) * 0.01, **kw)


def _want(base, enc, x):
    w = base.weight.double() + get_codec("bitdelta").decode(enc).double()
    return x.double() @ w.T + base.bias.double()


def _counting(monkeypatch):
    calls = {"fused": 0, "sign": 0}
    for key, name in (("fused", "sign_matmul_fused"), ("sign", "sign_matmul")):
        real = getattr(ops, name)

        def op(*a, _key=key, _real=real):
            calls[_key] += 1
            return _real(*a)
        monkeypatch.setattr(ops, name, op)
    return calls


def _fake_timing(monkeypatch, winner):
    """The measurement replaced: ``winner[0]`` ("fused" / "unfused") wins; returns the list of timings made."""
    timed = []

    def fake(fused, unfused, device):
        timed.append(winner[0])
        return (1.0, 2.0) if winner[0] == "fused" else (2.0, 1.0)
    monkeypatch.setattr(dispatch, "_time_pair", fake)
    return timed


def _took(layer, x, calls):
    before = dict(calls)
    y = layer(x)
    return y, {k: calls[k] - before[k] for k in calls}


def test_deltalinear_follows_input_shape_and_dtype():
    enc = _enc()
    layer = dnn.DeltaLinear(_base(), enc)
    g = torch.Generator().manual_seed(2)
    for shape in ((1, 1, K), (1, 1, K), (1, K), (3, 1, K), (2, 5, K), (K,), (1, 1, K)):
        x = torch.randn(*shape, generator=g)
        y = layer(x)
        assert y.shape == (*shape[:-1], N)
        torch.testing.assert_close(y.double(), _want(layer.base, enc, x), rtol=1e-4, atol=1e-4)
    layer.to(torch.bfloat16)  # the base weight's dtype and x's change together
    x = torch.randn(1, 1, K, generator=g).to(torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (1, 1, N)
    torch.testing.assert_close(y.double(), _want(layer.base, enc, x), rtol=3e-2, atol=3e-1)


def test_deltalinear_follows_setting_threads_and_reset(monkeypatch):
    layer = dnn.DeltaLinear(_base(), _enc())
    calls = _counting(monkeypatch)
    winner = ["unfused"]
    timed = _fake_timing(monkeypatch, winner)
    x = torch.randn(1, 1, K)
    monkeypatch.setenv("DELTACOMP_FUSED", "always")
    assert _took(layer, x, calls)[1] == {"fused": 1, "sign": 0}
    assert _took(layer, x, calls)[1] == {"fused": 1, "sign": 0}
    monkeypatch.setenv("DELTACOMP_FUSED", "never")
    assert _took(layer, x, calls)[1] == {"fused": 0, "sign": 1}
    monkeypatch.setenv("DELTACOMP_FUSED", "auto")  # measured (unfused wins), then kept
    layer(x)
    assert _took(layer, x, calls)[1] == {"fused": 0, "sign": 1} and timed == ["unfused"]
    winner[0] = "fused"
    dispatch.reset()  # forgotten: measured again, now the fused path wins
    layer(x)
    assert _took(layer, x, calls)[1] == {"fused": 1, "sign": 0} and timed == ["unfused", "fused"]
    winner[0] = "unfused"
    threads = torch.get_num_threads()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads + 3)  # another thread count: its own decision
    layer(x)
    assert _took(layer, x, calls)[1] == {"fused": 0, "sign": 1} and len(timed) == 3
    monkeypatch.setenv("DELTACOMP_FUSED", "sometimes")  # a bad setting still raises with a kept path
    with pytest.raises(ValueError, match="DELTACOMP_FUSED='sometimes'"):
        layer(x)


def test_deltalinear_follows_replaced_weight_and_moved_delta():
    enc = _enc()
    layer = dnn.DeltaLinear(_base(), enc, fused=True)
    x = torch.randn(1, 1, K)
    layer(x)
    other = _base(seed=5)
    layer.base.weight = nn.Parameter(other.weight.detach().clone())  # a new Parameter object
    layer.base.bias = nn.Parameter(other.bias.detach().clone())
    torch.testing.assert_close(layer(x).double(), _want(other, enc, x), rtol=1e-4, atol=1e-4)
    layer.base.bias = None
    want = _want(other, enc, x) - other.bias.double()
    torch.testing.assert_close(layer(x).double(), want, rtol=1e-4, atol=1e-4)
    layer._apply(lambda t: t.clone())  # new tensors everywhere (what .to() gives)
    layer.delta.t_scale.zero_()  # ... and the new ones are read: the delta now adds nothing
    torch.testing.assert_close(layer(x).double(), x.double() @ other.weight.double().T, rtol=1e-4, atol=1e-4)


def _zeroed(t):
    return torch.zeros_like(t) if t.is_floating_point() else t.clone()


@pytest.mark.parametrize("codec", ["bitdelta", "svd-mixed"])
@pytest.mark.parametrize("fused", [True, None, False])
@torch.no_grad()  # (serving: a call recording autograd takes no layer plan)
def test_deltalinear_follows_a_term_moved_alone(codec, fused, monkeypatch):
    """``layer.delta.to(...)`` without the layer: the path and layer plan the layer kept hold the term's old
    tensors; the next call reads the new ones (here zero scales: the layer adds nothing to its base)."""
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "tables")  # the plans' int8 paths where the build has them
    g = torch.Generator().manual_seed(11)
    k = 64  # (the int8 tables take rows of whole groups)
    base = nn.Linear(k, N)
    delta = torch.randn(N, k, generator=g) * 0.05
    enc = get_codec(codec).encode(delta)
    layer = dnn.DeltaLinear(base, enc, fused=fused if codec == "bitdelta" else (fused and None))
    for shape in ((1, 1, k), (1, 3, k)):
        x = torch.randn(*shape, generator=g)
        for _ in range(3):  # the path kept, then taken again
            y = layer(x)
        assert not torch.allclose(y, base(x), atol=1e-4)
    layer.delta._apply(_zeroed)  # the term alone: new tensors, zero scales
    for shape in ((1, 1, k), (1, 3, k)):
        x = torch.randn(*shape, generator=g)
        for _ in range(2):
            torch.testing.assert_close(layer(x), base(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tenant", [0, 1])
@torch.no_grad()
def test_multidelta_follows_a_term_moved_alone(tenant):
    """As for DeltaLinear: tenant 0 bitdelta (the shared stacks' fused plan), 1 svd-mixed (its own term)."""
    g = torch.Generator().manual_seed(12)
    k = 64
    base = nn.Linear(k, N)
    encs = [get_codec("bitdelta").encode(torch.randn(N, k, generator=g) * 0.05),
            get_codec("svd-mixed").encode(torch.randn(N, k, generator=g) * 0.05)]
    mod = dnn.MultiDeltaLinear(base, encs)
    mod.delta_index = torch.tensor([tenant])  # one index tensor throughout: the kept path stays keyed on it
    x = torch.randn(1, 1, k, generator=g)
    for _ in range(3):
        y = mod(x)
    assert not torch.allclose(y, base(x), atol=1e-4)
    for term in [*mod.shared, *mod.others.values()]:
        term._apply(_zeroed)  # each term alone
    for _ in range(2):
        torch.testing.assert_close(mod(x), base(x), rtol=1e-5, atol=1e-5)


# -- MultiDeltaLinear ----------------------------------------------------------------------------------
def _multi():
    """Tenants: 0 one mask, 1 two masks, 2 nothing in this layer, 3 one mask plus a bias delta."""
    encs = [_enc(1), _enc(2, masks=2), None, _enc(3)]
    bias = [None, None, None, torch.randn(N, generator=torch.Generator().manual_seed(4)) * 0.1]
    return dnn.MultiDeltaLinear(_base(), encs, bias), encs, bias


def _multi_want(layer, encs, bias, x, t):
    w, b = layer.base.weight.double(), layer.base.bias.double()
    if t >= 0 and encs[t] is not None:
        w = w + get_codec("bitdelta").decode(encs[t]).double()
    if t >= 0 and bias[t] is not None:
        b = b + bias[t].double()
    return x.double() @ w.T + b


@pytest.mark.parametrize("setting", ["always", "never", "auto"])
def test_multi_follows_replaced_index_and_shape(monkeypatch, setting):
    monkeypatch.setenv("DELTACOMP_FUSED", setting)
    layer, encs, bias = _multi()
    g = torch.Generator().manual_seed(7)
    for shape in ((1, 1, K), (1, 4, K), (2, 1, K)):
        for t in (0, 0, 3, 1, 2, -1, 0, 3, 3):  # a new index tensor each time, as set_delta_index gives
            layer.delta_index = torch.tensor([t] * shape[0])
            x = torch.randn(*shape, generator=g)
            y = layer(x)
            assert y.shape == (*shape[:-1], N)
            torch.testing.assert_close(y.double(), _multi_want(layer, encs, bias, x, t), rtol=1e-4, atol=1e-4)
    layer.delta_index = torch.tensor([0])
    layer(torch.randn(1, 1, K))
    with pytest.raises(DeltacompError, match="the delta index has 1 entries but the batch has 2 rows"):
        layer(torch.randn(2, 1, K))


def test_multi_follows_reset(monkeypatch):
    layer, encs, bias = _multi()
    winner = ["unfused"]
    timed = _fake_timing(monkeypatch, winner)
    layer.delta_index = torch.tensor([0])
    x = torch.randn(1, 1, K)
    layer(x), layer(x)
    winner[0] = "fused"
    dispatch.reset()
    torch.testing.assert_close(layer(x).double(), _multi_want(layer, encs, bias, x, 0), rtol=1e-4, atol=1e-4)
    assert timed == ["unfused", "fused"]


# -- svd-mixed's gathered op call ----------------------------------------------------------------------
def test_svd_mixed_term_follows_moved_buffers_and_dtype():
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(N, 3, generator=g) @ torch.randn(3, K * 2, generator=g)[:, :K] * 0.01
    codec = get_codec("svd-mixed")
    enc = codec.encode(delta)
    term = codec.serving_term(enc)
    want = codec.decode(enc).double()
    for shape, dtype, tol in (((1, K), torch.float32, 2e-2), ((3, K), torch.float32, 1e-4),
                              ((1, K), torch.bfloat16, 5e-2), ((1, K), torch.float32, 2e-2)):
        x = torch.randn(*shape, generator=g).to(dtype)
        y = term(x)
        assert y.dtype == dtype and y.shape == (shape[0], N)
        ref = x.double() @ want.T
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max() + 1e-6
    x = torch.randn(1, K, generator=g)
    term._apply(lambda t: torch.zeros_like(t) if t.is_floating_point() else t.clone())  # new, zero scales
    assert torch.equal(term(x), torch.zeros(1, N))


# -- MultiDeltaModule ----------------------------------------------------------------------------------
def test_multi_delta_module_follows_index_and_moved_tensors():
    norm = nn.LayerNorm(6)
    d0 = {"weight": torch.randn(6), "bias": torch.randn(6)}
    mod = dnn.MultiDeltaModule(norm, [d0, None])
    x = torch.randn(3, 6)

    def want(t, x=x):
        return torch.nn.functional.layer_norm(x, (6,), d0["weight"], d0["bias"]) if t == 0 else norm(x)

    for t in (0, 0, 1, -1, 0, 1, 0):  # a new index tensor each time, one shape
        mod.delta_index = torch.tensor([t] * 3)
        torch.testing.assert_close(mod(x), want(t))
        torch.testing.assert_close(mod(x), want(t))
    index = torch.tensor([0] * 3)
    mod.delta_index = index
    mod(x)
    index[1] = -1  # changed in place: row 1 is on the base now
    y = mod(x)
    torch.testing.assert_close(y[1], norm(x[1:2])[0])
    torch.testing.assert_close(y[0], want(0)[0])
    index.fill_(0)
    mod(x)
    with pytest.raises(DeltacompError, match="the delta index has 3 entries but the batch has 2 rows"):
        mod(x[:2])
    w2 = 2 * mod.d0_0
    with torch.no_grad():
        mod.d0_0.mul_(2)  # in place: the kept copy holds the same tensors
    torch.testing.assert_close(mod(x), torch.nn.functional.layer_norm(x, (6,), w2, mod.d0_1))
    mod._apply(lambda t: torch.zeros_like(t))  # new tensors: the copy is built again from them
    torch.testing.assert_close(mod(x), torch.zeros(3, 6))
    mod.delta_index = torch.tensor([-1] * 3)
    mod(x)
    other = nn.LayerNorm(6)
    with torch.no_grad():
        other.weight.mul_(3)
    mod.module = other  # the wrapped module replaced, same index: rows on the base run the new one
    torch.testing.assert_close(mod(x), other(x))
