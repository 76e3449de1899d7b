"""The sequence-level Fisher of --method auto --calib (calibrate/seqfisher.py): its prediction against the
KL measured in float64, why the per-channel estimate is not enough, the scratch file and refusals."""
from __future__ import annotations

import pytest
import torch
from test_sensitivity import _Mixer, _TwoPaths

from deltacomp.auto import _error, choose
from deltacomp.calibrate import CalibrationOptions
from deltacomp.calibrate import seqfisher
from deltacomp.calibrate.sensitivity import accumulate
from deltacomp.codecs import get_codec
from deltacomp.errors import SettingsError


def _kl_per_token(model, row, name: str, e: torch.Tensor) -> float:
    """KL(model || model with ``name``'s weight minus ``e``) per position of ``row``, float64."""
    w = model.get_parameter(name)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=row).logits[0], -1)
        w.sub_(e)
        q = torch.log_softmax(model(input_ids=row).logits[0], -1)
        w.add_(e)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_sequence_fisher_predicts_the_measured_kl_float64(tmp_path):
    """1/2 sum_w <E, J_w>^2 over many windows with sampled labels converges to the second-order KL, measured
    here with a small E in float64. The per-channel estimate misses it: the model mixes positions (a causal
    running mean), and an error that moves every position the same way adds up across them."""
    torch.manual_seed(4)
    model = _Mixer().double().eval()
    row = torch.randint(0, 17, (1, 6), generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    e = 1e-3 * torch.outer(torch.randn(12, generator=g, dtype=torch.float64),
                           model.emb.weight.detach().mean(0))  # acts on the inputs' common part
    measured = _kl_per_token(model, row, "a.weight", e)
    reps = 2000
    with seqfisher.collect(model, row.repeat(reps, 1), {"a.weight"}, tmp_path, seed=3) as store:
        predicted = 0.5 * float(((store["a.weight"].reshape(reps, -1).double() @ e.reshape(-1)) ** 2).sum())
    assert predicted == pytest.approx(measured, rel=0.12)  # Monte Carlo: sqrt(2 / reps) = 3.2%
    grams, fish = accumulate(model, row.repeat(reps, 1), {"a.weight"}, batch_size=1000, seed=3)
    per_channel = 0.5 * float((fish["a.weight"].double() * ((e @ grams["a.weight"].double()) * e).sum(1)).sum())
    assert abs(per_channel / measured - 1) > 0.3, (per_channel, measured)
    assert list(tmp_path.iterdir()) == []  # the scratch file is gone


def test_auto_error_reads_the_window_gradients():
    """auto._error with a 3-D ``fisher``: 1/2 sum_w <E, J_w>^2, no Gram needed."""
    g = torch.Generator().manual_seed(5)
    d = torch.randn(12, 20, generator=g)
    j = torch.randn(7, 12, 20, generator=g)
    codec = get_codec("raw")
    enc = codec.encode(d, dtype="float16")
    e = (d - codec.decode(enc)).double()
    ref = 0.5 * sum(float((e * w.double()).sum()) ** 2 for w in j)
    assert _error(codec, d, enc, None, j) == pytest.approx(ref, rel=1e-5)


def test_more_sensitive_path_gets_more_bytes(tmp_path):
    torch.manual_seed(0)
    model = _TwoPaths()
    with seqfisher.collect(model, torch.randint(0, 40, (8, 16)), {"a.weight", "b.weight"}, tmp_path) as store:
        a, b = store["a.weight"], store["b.weight"]
        assert a.shape == b.shape == (8, 24, 24)
        ratio = float((b ** 2).sum() / (a ** 2).sum())
        assert 60 < ratio < 160, ratio  # the path 10x stronger: ~100x the Fisher
        d = torch.randn(24, 24, generator=torch.Generator().manual_seed(1)) * 0.01
        items = [("a.weight", d, 24 * 24 / 8), ("b.weight", d.clone(), 24 * 24 / 8)]
        chosen, rep = choose(items, fishers=store)
    assert chosen["b.weight"].nbytes > chosen["a.weight"].nbytes
    assert "J_w" in rep["distortion"] and rep["allocated_bytes"] <= rep["budget_bytes"]


def test_store_round_trip_and_refusals(tmp_path, monkeypatch):
    store = seqfisher.GradientStore(tmp_path, {"x": (3, 5), "y": (2, 2)}, windows=2)
    gx = torch.arange(15.0).reshape(3, 5)
    store.put("x", 1, gx)
    store.put("y", 0, torch.full((2, 2), -2.0))
    assert "x" in store and "z" not in store
    torch.testing.assert_close(store["x"][1], gx)  # small integers are exact in bfloat16
    assert float(store["x"][0].abs().sum()) == 0.0 and float(store["y"][0, 1, 1]) == -2.0
    (path,) = list(tmp_path.iterdir())
    assert path.name.startswith(".deltacomp-fisher-")
    store.close()
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(seqfisher.shutil, "disk_usage", lambda _p: type("U", (), {"free": 1000})())
    with pytest.raises(SettingsError, match=r"keeps 2 weight gradients .* lower --calib-samples"):
        seqfisher.GradientStore(tmp_path, {"x": (30, 50)}, windows=2)
    model = _TwoPaths()
    with pytest.raises(SettingsError, match="c.weight is not a linear layer"):
        seqfisher.collect(model, torch.zeros(1, 4, dtype=torch.int64), {"a.weight", "c.weight"}, tmp_path)
    with pytest.raises(SettingsError, match=r"shape \(0, 4\)"):
        seqfisher.collect(model, torch.zeros(0, 4, dtype=torch.int64), {"a.weight"}, tmp_path)
    assert list(tmp_path.iterdir()) == []
    assert CalibrationOptions("x.txt").sensitivity == "sequence"
