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


def _count_calls(monkeypatch):
    calls = {"fused": 0, "sign": 0}
    real_fused, real_sign = ops.sign_matmul_fused, ops.sign_matmul

    def fused(*a):
        calls["fused"] += 1
        return real_fused(*a)

    def sign(*a):
        calls["sign"] += 1
        return real_sign(*a)

    monkeypatch.setattr(ops, "sign_matmul_fused", fused)
    monkeypatch.setattr(ops, "sign_matmul", sign)
    return calls


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
