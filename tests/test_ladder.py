"""Codec.ladder: the candidate ladders --method auto encodes from shared work (one SVD, one sort, one mask
chain) give what encoding each rung on its own gives.

Stated tolerances: the same settings offered, the same bytes exactly, the same field names, shapes and
dtypes; packed tensors bit-identical, except svd-mixed's fp32 singular values ``s`` (the refit's norms come
from a product over more rows: within 1e-5 relative); reconstructions within 1e-5 relative Frobenius; a
weight error reported by the ladder within 1e-5 relative of the float64 ||delta - decode||^2. Then the
pruning (auto.tensor_table, data-free) leaves the Pareto front as measuring every rung does.
"""
from __future__ import annotations

import pytest
import torch

from deltacomp import auto
from deltacomp.codecs import get_codec
from deltacomp.codecs.ternary import codec as ternary_codec
from deltacomp.errors import SettingsError

SHAPES = [(67, 130), (130, 67), (1, 257), (257, 1), (96, 96)]


def _delta(shape, seed=0, zero=False):
    if zero:
        return torch.zeros(shape)
    g = torch.Generator().manual_seed(seed)
    n, k = shape
    r = max(1, min(shape) // 4)
    low = torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) / r ** 0.5
    return (low + 0.5 * torch.randn(n, k, generator=g)) * 1e-2


def _extra(name: str) -> list[dict]:
    """Settings beyond the auto ladder: other kinds of rung, and rungs the shared path leaves to encode."""
    return {
        "bitdelta": [{"masks": 4, "scale": "row"}, {"masks": 2}],
        "lowrank": [{"rank": 3}, {"rank": 10_000}, {"rank": 2, "dtype": "bfloat16"}, {"energy": 0.9},
                    {"rank": 1, "svd": "exact"}],
        "svd-mixed": [{"groups": "8:1+3:4+2:rest", "ratio": 6.0, "group_size": 32}, {"bits": 3.0},
                      {"allocation": "optimal", "ratio": 8.0}, {"ratio": 8.0, "refit": False}],
        "ternary": [{"density": 0.3, "per_row": True}, {"density": 0.2, "scale": "std:2"},
                    {"threshold": 0.01}, {"density": 1.0}, {"scope": "global"}],
        "raw": [{"dtype": "bfloat16"}],
    }[name]


def _check(codec, delta, settings):
    rungs = list(codec.ladder(delta, settings))
    encs = {}
    for s in settings:
        try:
            encs[repr(sorted(s.items()))] = codec.encode(delta, **s)
        except (ValueError, SettingsError):
            pass
    got = sorted(repr(sorted(r.settings.items())) for r in rungs)
    assert got == sorted(k for k, _ in [(repr(sorted(s.items())), s) for s in settings] if k in encs)
    for rung in rungs:
        enc = encs[repr(sorted(rung.settings.items()))]
        packed = rung.pack()
        assert rung.nbytes == enc.nbytes == packed.nbytes
        assert packed.params == enc.params or codec.name == "svd-mixed"
        assert packed.tensors.keys() == enc.tensors.keys()
        for field, want in enc.tensors.items():
            have = packed.tensors[field]
            assert have.dtype == want.dtype and have.shape == want.shape, field
            if codec.name == "svd-mixed" and field == "s":
                torch.testing.assert_close(have, want, rtol=1e-5, atol=0)
            else:
                assert torch.equal(have, want), (codec.name, rung.settings, field)
        dec = codec.decode(enc)
        rec = rung.reconstruction(codec)
        assert rec.shape == dec.shape and rec.dtype == torch.float32
        assert float((rec - dec).norm()) <= 1e-5 * max(float(dec.norm()), 1e-30)
        if rung.weight_error is not None:
            err = float(((delta.double() - dec.double()) ** 2).sum())
            assert rung.weight_error == pytest.approx(err, rel=1e-5, abs=1e-12)
    return rungs


@pytest.mark.parametrize("name", ["bitdelta", "lowrank", "svd-mixed", "ternary", "raw"])
@pytest.mark.parametrize("shape", SHAPES)
def test_ladder_equals_encoding_each_rung(name, shape):
    codec = get_codec(name)
    delta = _delta(shape)
    settings = codec.candidates(shape, max(1, delta.numel() * 2 // 16)) + _extra(name)
    rungs = _check(codec, delta, settings)
    if min(shape) > 1 or name in ("bitdelta", "ternary", "raw"):
        assert rungs  # the comparison above ran on something


@pytest.mark.parametrize("name", ["bitdelta", "lowrank", "svd-mixed", "ternary"])
def test_ladder_of_an_all_zero_delta(name):
    codec = get_codec(name)
    shape = (40, 24)
    _check(codec, _delta(shape, zero=True), codec.candidates(shape, 120) + _extra(name))


def test_ternary_ties_keep_the_lowest_indices_as_encode_does():
    codec = get_codec("ternary")
    delta = torch.tensor([[0.5, -0.5, 0.25, 0.5], [-0.25, 0.0, 0.5, -0.0]])
    _check(codec, delta, [{"density": d} for d in (0.125, 0.25, 0.375, 0.5, 0.75, 1.0)])


def test_ternary_small_densities_sort_only_the_top_and_match_encode():
    # rungs all under a quarter of the entries take the partial sort (_leading): many ties at the cut
    codec = get_codec("ternary")
    g = torch.Generator().manual_seed(9)
    delta = (torch.randint(-6, 7, (64, 90), generator=g) * 0.125).float()  # 13 values: ties everywhere
    _check(codec, delta, [{"density": d} for d in (0.01, 0.05, 0.1, 0.2)])
    mags = delta.reshape(-1).abs()
    full = torch.sort(mags, descending=True, stable=True).indices.numpy()
    for kmax in (0, 1, 7, 100, 1000, 1439):
        assert (ternary_codec._leading(mags, kmax) == full[:kmax]).all()


def test_svd_mixed_prune_floor_is_below_every_error_and_prunes():
    codec = get_codec("svd-mixed")
    delta = _delta((80, 150), seed=3)
    settings = codec.candidates(tuple(delta.shape), delta.numel() * 2 // 16)
    full = {repr(sorted(r.settings.items())): r for r in codec.ladder(delta, settings)}
    asked = []

    def prune(nbytes, floor):
        asked.append((nbytes, floor))
        return nbytes > 3000

    kept = list(codec.ladder(delta, settings, prune))
    assert len(asked) == len(full) and 0 < len(kept) < len(full)
    assert all(r.nbytes <= 3000 for r in kept)
    for r in full.values():  # Eckart-Young: no rung's error is under the floor it was asked with
        floor = next(f for b, f in asked if b == r.nbytes)
        assert floor <= r.weight_error


def test_pruned_table_has_the_front_of_measuring_every_rung(monkeypatch):
    delta = _delta((96, 160), seed=5)
    hint = delta.numel() * 2 / 16
    pruned = auto.tensor_table(delta, hint)
    counted = []
    real = auto._error
    monkeypatch.setattr(auto, "_error", lambda *a: counted.append(1) or real(*a))
    auto.tensor_table(delta, hint)
    measured_pruned = len(counted)
    monkeypatch.setattr(auto, "_Beaten", lambda: None)  # no pruning: every rung is measured
    counted.clear()
    everything = auto.tensor_table(delta, hint)
    assert measured_pruned < len(counted)
    assert [(c.codec, c.settings, c.nbytes) for c in pruned] == [(c.codec, c.settings, c.nbytes) for c in everything]
    for a, b in zip(pruned, everything):
        assert a.distortion == pytest.approx(b.distortion, rel=1e-9)
