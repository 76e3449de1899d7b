"""The output sensitivity of --method auto --calib (calibrate/sensitivity.py): the diagonal Fisher of each
linear's outputs against float64 references, a layer made more sensitive, and the edge cases."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_calibrate import VOCAB, _tiny_llama

from deltacomp.auto import _error, choose
from deltacomp.calibrate import CalibrationOptions
from deltacomp.calibrate.sensitivity import accumulate
from deltacomp.codecs import get_codec
from deltacomp.errors import SettingsError

NAME = "model.layers.1.self_attn.k_proj.weight"  # 16 outputs (2 kv heads of 8)


def _ids(n: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _output_hook(model, name: str, z: torch.Tensor):
    """Adds ``z`` (1, T, out) to the output of the linear ``name``."""
    mod = model.get_submodule(name.removesuffix(".weight"))
    return mod.register_forward_hook(lambda _m, _a, out: out + z)


class _Mixer(torch.nn.Module):
    """A tiny causal LM with no float32 step inside (unlike HF Llama's RMSNorm), so that central
    differences are exact to ~1e-9 in float64: h = tanh(a(x)), causal running mean over positions, then
    b, the head."""

    def __init__(self, d: int = 10, vocab: int = 17):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab)
        self.a, self.b = torch.nn.Linear(d, 12), torch.nn.Linear(12, d)

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        h = torch.tanh(self.a(self.emb(input_ids)))
        h = h.cumsum(1) / torch.arange(1, h.shape[1] + 1, dtype=h.dtype)[:, None]
        return SimpleNamespace(logits=self.head(torch.tanh(self.b(h))))


def test_empirical_fisher_matches_finite_differences_float64():
    """labels='empirical': f_i = sum_s g_si^2 / labelled positions, each g_si = dL/dy_si measured by a
    central difference of the summed next-token NLL in float64 (on every output of both linears)."""
    torch.manual_seed(3)
    model = _Mixer().double().eval()
    ids = torch.randint(0, 17, (3, 7), generator=torch.Generator().manual_seed(0))
    grams, fish = accumulate(model, ids, {"a.weight", "b.weight"}, labels="empirical", batch_size=2)
    eps = 1e-6
    for name in ("a.weight", "b.weight"):
        out = model.get_submodule(name.removesuffix(".weight")).out_features
        ref = torch.zeros(out, dtype=torch.float64)
        for row in ids.split(1):
            def loss(z, row=row):
                h = _output_hook(model, name, z)
                try:
                    with torch.no_grad():
                        lp = torch.log_softmax(model(input_ids=row).logits, -1)
                finally:
                    h.remove()
                return -float(lp[0, :-1].gather(-1, row[0, 1:, None]).sum())

            for s in range(row.shape[1]):
                for i in range(out):
                    z = torch.zeros(1, row.shape[1], out, dtype=torch.float64)
                    z[0, s, i] = eps
                    ref[i] += ((loss(z) - loss(-z)) / (2 * eps)) ** 2
        ref /= ids.shape[0] * (ids.shape[1] - 1)
        assert ref.min() > 0
        torch.testing.assert_close(fish[name].double(), ref, rtol=1e-4, atol=0)
    x = torch.tanh(model.a(model.emb(ids))).detach()  # b's input, by hand (before the running mean)
    x = (x.cumsum(1) / torch.arange(1, 8, dtype=x.dtype)[:, None]).reshape(-1, 12)
    torch.testing.assert_close(grams["b.weight"].double(), x.T @ x / ids.numel(), rtol=1e-5, atol=1e-7)


def test_sampled_fisher_converges_to_the_true_fisher_float64():
    """labels='sampled' is a Monte Carlo estimate of the true Fisher: sum_t J_ts^T (diag p_t - p_t p_t^T)
    J_ts per output channel, J_ts = d logits_t / d y_s from autograd's Jacobian, in float64."""
    torch.manual_seed(4)
    model = _Mixer().double().eval()
    row = torch.randint(0, 17, (1, 5), generator=torch.Generator().manual_seed(1))
    T = row.shape[1]

    def logits(z):
        h = _output_hook(model, "a.weight", z)
        try:
            return model(input_ids=row).logits[0]
        finally:
            h.remove()

    z0 = torch.zeros(1, T, 12, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(logits, z0)[:, :, 0]  # (T, V, T, out)
    with torch.no_grad():
        p = torch.softmax(logits(z0), -1)
    true = torch.zeros(12, dtype=torch.float64)
    for t in range(T):
        cov = torch.diag(p[t]) - torch.outer(p[t], p[t])
        true += torch.einsum("vsi,vw,wsi->i", jac[t], cov, jac[t])
    true /= T
    reps = 20000
    _, fish = accumulate(model, row.repeat(reps, 1), {"a.weight"}, batch_size=5000, seed=7)
    rel = (fish["a.weight"].double() - true).abs() / true
    assert float(rel.max()) < 0.06, rel  # Monte Carlo: about sqrt(2 / reps) = 1% relative per channel
    _, emp = accumulate(model, row.repeat(reps, 1), {"a.weight"}, labels="empirical", batch_size=5000)
    assert float(((emp["a.weight"].double() - true).abs() / true).max()) > 0.1  # the empirical one differs


def test_sampled_labels_are_seeded_on_a_hf_llama():
    model = _tiny_llama(4).eval()
    ids = _ids(3, 8)
    a = accumulate(model, ids, {NAME}, seed=7)[1][NAME]
    c = accumulate(model, ids, {NAME}, seed=8)[1][NAME]
    assert a.shape == (16,) and float(a.min()) > 0
    assert not torch.equal(a, c)
    torch.testing.assert_close(a, accumulate(model, ids, {NAME}, seed=7)[1][NAME], rtol=0, atol=0)


class _TwoPaths(torch.nn.Module):
    """logits = head(x + a(x) + scale * b(x)), x = emb(ids): b's output reaches the logits ``scale`` times
    stronger than a's."""

    def __init__(self, d: int = 24, vocab: int = 40, scale: float = 10.0):
        super().__init__()
        self.emb, self.head = torch.nn.Embedding(vocab, d), torch.nn.Linear(d, vocab, bias=False)
        self.a, self.b = torch.nn.Linear(d, d, bias=False), torch.nn.Linear(d, d, bias=False)
        self.scale = scale

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=False):
        x = self.emb(input_ids)
        return SimpleNamespace(logits=self.head(x + 0.1 * self.a(x) + 0.1 * self.scale * self.b(x)))


def test_a_more_sensitive_layer_gets_a_larger_sensitivity_and_more_bytes():
    torch.manual_seed(0)
    model = _TwoPaths()
    grams, fish = accumulate(model, torch.randint(0, 40, (8, 16)), {"a.weight", "b.weight"})
    torch.testing.assert_close(grams["a.weight"], grams["b.weight"])  # same inputs
    ratio = float(fish["b.weight"].mean() / fish["a.weight"].mean())
    assert 60 < ratio < 160, ratio  # scale^2 = 100 up to the nonlinearity of the softmax
    d = torch.randn(48, 24, generator=torch.Generator().manual_seed(1)) * 0.01  # the same delta for both
    f = {"a": fish["a.weight"].repeat(2), "b": fish["b.weight"].repeat(2)}  # 48 outputs
    g = {"a": grams["a.weight"], "b": grams["b.weight"]}
    items = [("a", d, 48 * 24 / 8), ("b", d.clone(), 48 * 24 / 8)]
    chosen, rep = choose(items, grams=g, fishers=f)
    assert chosen["b"].nbytes > chosen["a"].nbytes
    assert "predicted KL" in rep["distortion"] and rep["allocated_bytes"] <= rep["budget_bytes"]
    plain, _ = choose(items, grams=g)  # output error only: the same inputs, no preference
    assert abs(plain["a"].nbytes - plain["b"].nbytes) < 0.2 * 48 * 24 / 8


def test_error_is_half_the_fisher_weighted_output_error():
    g = torch.Generator().manual_seed(2)
    d = torch.randn(12, 20, generator=g)
    x = torch.randn(50, 20, generator=g, dtype=torch.float64)
    gram, f = (x.T @ x / 50).float(), torch.rand(12, generator=g)
    codec = get_codec("raw")
    enc = codec.encode(d, dtype="float16")
    e = (d - codec.decode(enc)).double()
    ref = 0.5 * float((f.double()[None, :] * (x @ e.T) ** 2).mean(0).sum())  # per token, then mean
    assert _error(codec, d, enc, gram, f) == pytest.approx(ref, rel=1e-5)
    assert _error(codec, d, enc, gram, torch.zeros(12)) == 0.0  # an output nothing downstream reads


def test_all_zero_delta_and_insensitive_outputs_cost_nothing():
    """An all-zero delta (every candidate exact) and a linear whose outputs never reach the logits
    (f = 0) take the cheapest point of their front; the bytes go to the tensor that matters."""
    d = torch.randn(32, 24, generator=torch.Generator().manual_seed(3)) * 0.01
    gram = torch.eye(24)
    items = [("zero", torch.zeros(32, 24), 32 * 24 / 4), ("dead", d, 32 * 24 / 4), ("live", d.clone(), 32 * 24 / 4)]
    chosen, _ = choose(items, grams={n: gram for n in ("zero", "dead", "live")},
                       fishers={"zero": torch.ones(32), "dead": torch.zeros(32), "live": torch.ones(32)})
    assert chosen["zero"].distortion == 0.0 and chosen["dead"].distortion == 0.0
    assert chosen["zero"].nbytes == chosen["dead"].nbytes == 0  # left at the base (lowrank rank 0)
    assert chosen["live"].nbytes > 0


def test_refusals():
    model = _TwoPaths()
    with pytest.raises(SettingsError, match="at least one window of 2"):
        accumulate(model, torch.zeros(1, 1, dtype=torch.int64), {"a.weight"}, labels="empirical")
    with pytest.raises(SettingsError, match=r"shape \(0, 16\)"):
        accumulate(model, torch.zeros(0, 16, dtype=torch.int64), {"a.weight"})
    with pytest.raises(SettingsError, match="c.weight is not a linear layer"):
        accumulate(model, torch.zeros(1, 4, dtype=torch.int64), {"a.weight", "c.weight"})
    with pytest.raises(SettingsError, match="labels 'true' must be one of sampled, empirical"):
        accumulate(model, torch.zeros(1, 4, dtype=torch.int64), {"a.weight"}, labels="true")
    with pytest.raises(SettingsError, match="sensitivity 'kl' must be one of sequence, sampled, empirical, none"):
        CalibrationOptions("x.txt", sensitivity="kl")
