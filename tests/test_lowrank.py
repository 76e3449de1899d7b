import pytest
import torch

from deltacomp.codecs import get_codec
from deltacomp.codecs.lowrank import truncated_svd
from deltacomp.errors import SettingsError


def _lowrank_plus_noise(n, k, r, seed, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) * 0.1 + noise * torch.randn(n, k, generator=g)


@pytest.mark.parametrize("method", ["exact", "randomized"])
@pytest.mark.parametrize("shape", [(60, 45), (45, 60)])
def test_truncated_svd_matches_exact_float64(method, shape):
    d = _lowrank_plus_noise(*shape, 4, 0)
    u, s, vh = truncated_svd(d, 4, method, depth=4)
    ref_s = torch.linalg.svdvals(d.double())[:4]
    assert torch.allclose(s.double(), ref_s, rtol=1e-4)
    # same best rank-4 approximation (singular vectors are defined up to sign)
    ru, rs, rvh = torch.linalg.svd(d.double(), full_matrices=False)
    ref = (ru[:, :4] * rs[:4]) @ rvh[:4]
    assert torch.allclose(((u * s) @ vh).double(), ref, atol=1e-4)
    assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("shape", [(1, 77), (77, 1), (33, 77), (130, 40)])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_round_trip_and_matmul(shape, dtype):
    codec = get_codec("lowrank")
    d = _lowrank_plus_noise(*shape, 3, shape[0] + shape[1])
    d_copy = d.clone()
    r = min(shape)
    enc = codec.encode(d, rank=r, dtype=dtype)
    assert torch.equal(d, d_copy)
    assert set(enc.tensors) == {"u", "s", "v"}
    assert enc.tensors["u"].shape == (shape[0], r) and enc.tensors["v"].shape == (r, shape[1])
    assert enc.nbytes == r * (shape[0] + shape[1]) * 2 + 4 * r
    rec = codec.decode(enc)
    tol = 1e-2 if dtype == "bfloat16" else 2e-3
    assert torch.linalg.matrix_norm(rec - d) <= tol * torch.linalg.matrix_norm(d)  # full rank: storage rounding only
    x = torch.randn(5, shape[1])
    assert torch.allclose(codec.matmul(x, enc), x @ rec.T, atol=1e-4, rtol=1e-4)


def test_rank_energy_ratio():
    codec = get_codec("lowrank")
    d = _lowrank_plus_noise(64, 48, 5, 1, noise=1e-3)
    assert codec.encode(d, rank=5).tensors["s"].numel() == 5
    enc = codec.encode(d, energy=0.99)
    sv = torch.linalg.svdvals(d.double())
    frac = torch.cumsum(sv ** 2, 0) / (sv ** 2).sum()
    want = int((frac < 0.99).sum()) + 1
    assert enc.params["rank"] == want
    enc = codec.encode(d, ratio=8)  # default route: fp16 bytes / 8
    assert enc.nbytes <= 64 * 48 * 2 / 8
    assert enc.nbytes + codec.bytes_per_rank((64, 48)) > 64 * 48 * 2 / 8


def test_budget_and_errors():
    codec = get_codec("lowrank")
    s = codec.settings_for_budget((64, 48), 2000, {})
    enc = codec.encode(_lowrank_plus_noise(64, 48, 2, 3), **s)
    assert enc.nbytes <= 2000 and s["rank"] == 2000 // (112 * 2 + 4)
    with pytest.raises(SettingsError, match="below one rank"):
        codec.settings_for_budget((64, 48), 100, {})
    with pytest.raises(SettingsError, match="not both"):
        codec.settings_for_budget((64, 48), 2000, {"rank": "3"})
    with pytest.raises(SettingsError, match="use raw"):
        codec.encode(torch.ones(10))


def test_zero_delta():
    codec = get_codec("lowrank")
    enc = codec.encode(torch.zeros(7, 9), rank=3)
    assert enc.nbytes == 0 and enc.params["rank"] == 0
    assert torch.equal(codec.decode(enc), torch.zeros(7, 9))
    assert torch.equal(codec.matmul(torch.randn(2, 9), enc), torch.zeros(2, 7))
