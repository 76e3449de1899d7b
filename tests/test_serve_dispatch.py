"""serve_dispatch: DeltaLinear's choice between the fused kernel and base matmul + delta term comes
from timings on this machine (cached per key), can be overridden, and never changes the result."""
import pytest
import torch
from torch import nn

from deltacomp import serve as dnn
from deltacomp import ops
from deltacomp.serve import dispatch as serve_dispatch
from deltacomp.codecs import get_codec


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("DELTACOMP_FUSED", raising=False)
    serve_dispatch.reset()
    yield
    serve_dispatch.reset()


def _layer(n=24, k=37, dtype=torch.float32, fused=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(n, k, generator=g))
        base.bias.copy_(torch.randn(n, generator=g))
    base = base.to(dtype)
    enc = get_codec("bitdelta").encode(torch.randn(n, k, generator=g) * 0.01)
    return dnn.DeltaLinear(base, enc, fused=fused), enc


def _want(layer, enc, x):
    w = layer.base.weight.float() + get_codec("bitdelta").decode(enc)
    return x.float() @ w.T + layer.base.bias.float()


def _count(monkeypatch, **ops_by_key):
    """Counts the calls of each op (key -> name in deltacomp.ops), still calling it."""
    calls = dict.fromkeys(ops_by_key, 0)

    def counting(key, real):
        def op(*a):
            calls[key] += 1
            return real(*a)
        return op

    for key, name in ops_by_key.items():
        monkeypatch.setattr(ops, name, counting(key, getattr(ops, name)))
    return calls


def _count_calls(monkeypatch):
    return _count(monkeypatch, fused="sign_matmul_fused", sign="sign_matmul")


@pytest.mark.parametrize("winner", ["fused", "unfused"])
def test_measured_winner_is_taken_and_cached(monkeypatch, winner):
    layer, enc = _layer()
    timed = []

    def fake_time(fused, unfused, device):
        timed.append(1)
        fused(), unfused()  # both paths run once, as in a real measurement
        return (1.0, 2.0) if winner == "fused" else (2.0, 1.0)

    monkeypatch.setattr(serve_dispatch, "_time_pair", fake_time)
    calls = _count_calls(monkeypatch)
    x = torch.randn(3, 37)
    for _ in range(3):  # rows 3 and 4 share a bucket: one measurement
        torch.testing.assert_close(layer(x), _want(layer, enc, x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer(torch.randn(4, 37)).shape, torch.Size([4, 24]))
    assert len(timed) == 1
    rec = serve_dispatch.decisions()
    assert len(rec) == 1 and rec[0]["chosen"] == winner and (rec[0]["n"], rec[0]["k"]) == (24, 37)
    assert rec[0]["rows_bucket"] == 4 and rec[0]["path"] == ops.cpu_isa()
    # after the measurement: every call takes the winner only
    before = dict(calls)
    layer(x)
    took = {k: calls[k] - before[k] for k in calls}
    assert took == ({"fused": 1, "sign": 0} if winner == "fused" else {"fused": 0, "sign": 1})
    layer(torch.randn(17, 37))  # a new bucket: measured again
    assert len(timed) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [1, 2, 5, 17])
def test_real_measurement_gives_the_same_output(m, dtype):
    layer, enc = _layer(dtype=dtype, seed=m)
    x = torch.randn(m, 37).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (m, 24)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(y.float(), _want(layer, enc, x), rtol=tol, atol=tol * 10)
    (rec,) = serve_dispatch.decisions()
    assert rec["chosen"] in ("fused", "unfused") and rec["fused_ms"] > 0 and rec["unfused_ms"] > 0


@pytest.mark.parametrize("setting,want", [("always", {"fused": 1, "sign": 0}), ("never", {"fused": 0, "sign": 1})])
def test_env_overrides_the_measurement(monkeypatch, setting, want):
    monkeypatch.setenv("DELTACOMP_FUSED", setting)
    layer, enc = _layer()
    calls = _count_calls(monkeypatch)
    x = torch.randn(2, 37)
    torch.testing.assert_close(layer(x), _want(layer, enc, x), rtol=1e-4, atol=1e-4)
    assert calls == want and serve_dispatch.decisions() == []


def test_explicit_fused_flag_is_not_measured(monkeypatch):
    layer, _ = _layer(fused=True)
    calls = _count_calls(monkeypatch)
    layer(torch.randn(2, 37))
    assert calls == {"fused": 1, "sign": 0} and serve_dispatch.decisions() == []
    layer, _ = _layer(fused=False)
    calls = _count_calls(monkeypatch)
    layer(torch.randn(2, 37))
    assert calls == {"fused": 0, "sign": 1} and serve_dispatch.decisions() == []


def test_bad_setting_lists_the_choices(monkeypatch):
    monkeypatch.setenv("DELTACOMP_FUSED", "sometimes")
    layer, _ = _layer()
    with pytest.raises(ValueError, match="DELTACOMP_FUSED='sometimes': expected one of auto, always, never"):
        layer(torch.randn(1, 37))


def test_row_bucket():
    assert [serve_dispatch.row_bucket(m) for m in (1, 2, 4, 5, 16, 17, 64, 65)] == [1, 4, 4, 16, 16, 64, 64, 256]


@pytest.mark.parametrize("times,rounds", [((1.0, 1.05), serve_dispatch.ROUNDS), ((1.0, 2.0), 1)])
def test_close_timings_are_timed_again(monkeypatch, times, rounds):
    # near a tie one preempted call would decide: the pair is timed again (minimum over the rounds kept)
    layer, _ = _layer()
    timed = []

    def fake_time(fused, unfused, device):
        timed.append(1)
        return times[0] - 0.01 * len(timed), times[1]  # fused gets faster each round: the minimum is kept

    monkeypatch.setattr(serve_dispatch, "_time_pair", fake_time)
    layer(torch.randn(2, 37))
    (rec,) = serve_dispatch.decisions()
    assert len(timed) == rounds and rec["rounds"] == rounds and rec["chosen"] == "fused"
    assert rec["fused_ms"] == pytest.approx((times[0] - 0.01 * rounds) * 1e3)


# -- MultiDeltaLinear: every row on one delta takes the fused pass where measured faster ----------------
def _multi_layer(dtype=torch.float32, seed=0):
    """Base 24 x 37 with a bias; tenants: 0 one mask (per-row scale), 1 two masks, 2 nothing here, 3 one
    mask plus a bias delta."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(37, 24, bias=True)
    with torch.no_grad():
        base.weight.copy_(torch.randn(24, 37, generator=g))
        base.bias.copy_(torch.randn(24, generator=g))
    base = base.to(dtype)
    codec = get_codec("bitdelta")
    encs = [codec.encode(torch.randn(24, 37, generator=g) * 0.01, scale="row"),
            codec.encode(torch.randn(24, 37, generator=g) * 0.01, masks=2), None,
            codec.encode(torch.randn(24, 37, generator=g) * 0.01)]
    bias = [None, None, None, torch.randn(24, generator=g) * 0.1]
    return dnn.MultiDeltaLinear(base, encs, bias), encs, bias


def _set_index(layer, index):
    """What set_delta_index does for each multi-tenant module of a model: a new index tensor."""
    layer.delta_index = torch.tensor(index, dtype=torch.int64)


def _multi_want(layer, encs, bias, x, t):
    """float64: x @ (W + delta_t)^T + b (+ the bias delta)."""
    w = layer.base.weight.double()
    b = layer.base.bias.double()
    if t >= 0 and encs[t] is not None:
        w = w + get_codec("bitdelta").decode(encs[t]).double()
    if t >= 0 and bias[t] is not None:
        b = b + bias[t].double()
    return x.double() @ w.T + b


def _count_multi_calls(monkeypatch):
    return _count(monkeypatch, fused="sign_matmul_fused", multi="sign_matmul_multi")


@pytest.mark.parametrize("setting", ["always", "never", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_uniform_rows_match_reference(monkeypatch, setting, dtype):
    monkeypatch.setenv("DELTACOMP_FUSED", setting)
    layer, encs, bias = _multi_layer(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for shape in ((1, 37), (3, 1, 37), (2, 5, 37)):  # decode rows, and prefill (tokens share their row's delta)
        x = torch.randn(*shape).to(dtype)
        for t in (-1, 0, 1, 2, 3):
            _set_index(layer, [t] * shape[0])
            y = layer(x)
            assert y.shape == (*shape[:-1], 24) and y.dtype == dtype
            torch.testing.assert_close(y.double(), _multi_want(layer, encs, bias, x, t), rtol=tol, atol=tol * 10)
        idx = [3, -1, 1][:shape[0]]  # mixed rows: the general path
        _set_index(layer, idx)
        y = layer(x).reshape(shape[0], -1, 24)
        for row, t in enumerate(idx):
            torch.testing.assert_close(y[row].double(), _multi_want(layer, encs, bias, x[row].reshape(-1, 37), t),
                                       rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("setting", ["always", "never"])
def test_multi_fused_only_for_one_mask_tenants(monkeypatch, setting):
    monkeypatch.setenv("DELTACOMP_FUSED", setting)
    layer, _, _ = _multi_layer()
    calls = _count_multi_calls(monkeypatch)
    x = torch.randn(2, 37)
    want = {0: (1, 0), 3: (1, 0), 1: (0, 2), 2: (0, 0), -1: (0, 0)}  # tenant -> (fused, multi) calls
    for t, (fused, multi) in want.items():
        before = dict(calls)
        _set_index(layer, [t, t])
        layer(x)
        if setting == "never":
            fused, multi = 0, (1 if t in (0, 3) else multi)
        assert (calls["fused"] - before["fused"], calls["multi"] - before["multi"]) == (fused, multi), t


def test_multi_measured_winner_is_taken_and_kept_apart_from_deltalinear(monkeypatch):
    layer, encs, bias = _multi_layer()
    timed = []

    def fake_time(fused, unfused, device):
        timed.append(1)
        fused(), unfused()
        return 2.0, 1.0  # base + term wins

    monkeypatch.setattr(serve_dispatch, "_time_pair", fake_time)
    calls = _count_multi_calls(monkeypatch)
    _set_index(layer, [0])
    x = torch.randn(1, 37)
    for _ in range(3):
        torch.testing.assert_close(layer(x).double(), _multi_want(layer, encs, bias, x, 0), rtol=1e-4, atol=1e-4)
    (rec,) = serve_dispatch.decisions()
    assert rec["module"] == "multi" and rec["chosen"] == "unfused" and len(timed) == 1
    before = dict(calls)
    layer(x)
    assert (calls["fused"] - before["fused"], calls["multi"] - before["multi"]) == (0, 1)
    single, _ = _layer()  # same shape and dtypes, another module kind: measured on its own
    single(torch.randn(1, 37))
    assert len(timed) == 2 and serve_dispatch.decisions()[1]["module"] == "single"


def test_multi_index_changed_in_place_is_seen(monkeypatch):
    monkeypatch.setenv("DELTACOMP_FUSED", "always")
    layer, encs, bias = _multi_layer()
    index = torch.tensor([0, 0])
    layer.delta_index = index
    x = torch.randn(2, 37)
    torch.testing.assert_close(layer(x).double(), _multi_want(layer, encs, bias, x, 0), rtol=1e-4, atol=1e-4)
    index[1] = 3  # rows now differ: the cached "every row on delta 0" must not be used
    y = layer(x).double()
    torch.testing.assert_close(y[0], _multi_want(layer, encs, bias, x[:1], 0)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y[1], _multi_want(layer, encs, bias, x[1:], 3)[0], rtol=1e-4, atol=1e-4)
    index.fill_(-1)
    torch.testing.assert_close(layer(x).double(), _multi_want(layer, encs, bias, x, -1), rtol=1e-4, atol=1e-4)



def test_multi_fused_one_follows_replaced_and_changed_stacks(monkeypatch):
    """The decode path keeps a tenant's views of the sign stacks between calls: they must follow .to()
    (new tensors) and in-place changes of the stacks."""
    monkeypatch.setenv("DELTACOMP_FUSED", "always")
    layer, encs, bias = _multi_layer()
    _set_index(layer, [0])
    x = torch.randn(1, 37)
    y = layer(x).double()
    torch.testing.assert_close(y, _multi_want(layer, encs, bias, x, 0), rtol=1e-4, atol=1e-4)
    plain = x.double() @ layer.base.weight.double().T + layer.base.bias.double()
    layer.shared[0].scales0.mul_(2)  # in place: the kept views see it
    torch.testing.assert_close(layer(x).double() - plain, 2 * (y - plain), rtol=1e-4, atol=1e-4)
    layer.shared[0].scales0.div_(2)
    layer._apply(lambda t: t.clone())  # new tensors (what .to() gives): the views are built again from them
    torch.testing.assert_close(layer(x).double(), y, rtol=1e-4, atol=1e-4)
    layer.shared[0].scales0.zero_()  # ... and the new stacks are the ones read: tenant 0 now adds nothing
    torch.testing.assert_close(layer(x).double(), plain, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(y, plain, rtol=1e-4, atol=1e-4)
