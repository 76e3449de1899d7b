import pytest
import torch

from deltacomp.codecs.svd_mixed import allocation as al
from deltacomp.codecs import get_codec
from deltacomp.errors import SettingsError


def _lowrank_plus_noise(n, k, r, seed, noise=0.01):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, r, generator=g) @ torch.randn(r, k, generator=g) * 0.1 + noise * torch.randn(n, k, generator=g)


def _rel(a, b):
    return float(torch.linalg.matrix_norm(a - b) / torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("shape", [(1, 300), (300, 1), (33, 77), (130, 200)])
@pytest.mark.parametrize("settings", [{}, {"groups": "8:2+3:5+2:rest"}, {"allocation": "optimal", "ratio": "4"},
                                      {"refit": "false", "group_size": "32", "bits": "2"}])
def test_consistency(shape, settings):
    codec = get_codec("svd-mixed")
    d = _lowrank_plus_noise(*shape, 3, sum(shape))
    d_copy = d.clone()
    enc = codec.encode(d, **settings)
    assert torch.equal(d, d_copy)
    alloc = al.parse_groups(enc.params["alloc"]) if enc.params["alloc"] else []
    r = sum(c for _, c in alloc)
    assert r <= min(shape)
    assert enc.nbytes == al.alloc_nbytes(shape, alloc, enc.params["group_size"])
    assert enc.nbytes <= codec.budget(shape, codec.resolve_settings(settings)) or "groups" in settings
    assert all(codec.field_allowed(f) for f in enc.tensors)
    assert enc.tensors["s"].dtype == torch.float32 and enc.tensors["s"].shape == (r,)
    for b, c in alloc:
        assert enc.tensors[f"v_q{b}"].dtype == torch.uint8
        assert enc.tensors[f"v_q{b}"].numel() == -(-c * shape[1] * b // 8)
        assert enc.tensors[f"u_scale{b}"].shape == (c, -(-shape[0] // enc.params["group_size"]))
    rec = codec.decode(enc)
    assert rec.shape == shape and rec.dtype == torch.float32
    x = torch.randn(4, shape[1])
    assert torch.allclose(codec.matmul(x, enc), x @ rec.T, atol=1e-4, rtol=1e-4)
    x3 = torch.randn(2, 3, shape[1])
    assert codec.matmul(x3, enc).shape == (2, 3, shape[0])


def test_default_allocation_matches_delta_come():
    # 4096 x 4096 at 1/16 of fp16: 2 vectors at 8 bits, 32 at 3 bits, the rest at 2 (overheads counted)
    alloc = al.default_allocation((4096, 4096), 4096 * 4096 * 2 // 16, 128)
    assert alloc[:2] == [(8, 2), (3, 32)] and alloc[2][0] == 2
    # Delta-CoMe's payload alone fits 968; fp16 scale+zero per 128 (0.25 bit/param) and fp32 sigma cost ~12%
    assert 968 / 1.14 < alloc[2][1] <= 968
    assert al.alloc_nbytes((4096, 4096), alloc, 128) <= 4096 * 4096 * 2 // 16
    assert al.alloc_nbytes((4096, 4096), alloc[:2] + [(2, alloc[2][1] + 1)], 128) > 4096 * 4096 * 2 // 16
    mlp = al.default_allocation((11008, 4096), 11008 * 4096 * 2 // 16, 128)
    assert mlp[:2] == [(8, 2), (3, 32)] and 1428 / 1.14 < mlp[2][1] <= 1428


def test_encoded_size_equals_helper_large():
    codec = get_codec("svd-mixed")
    d = _lowrank_plus_noise(300, 260, 8, 5)
    for groups in ["8:3+4:7+3:11+2:rest", "5:4+1:rest", "2:1000"]:
        enc = codec.encode(d, groups=groups, group_size=64)
        alloc = al.parse_groups(enc.params["alloc"])
        assert enc.nbytes == al.alloc_nbytes((300, 260), alloc, 64)


def test_svd_mixed_optimal_beats_lowrank_on_lowrank_plus_noise():
    # (the default 8/3/2 split can lose to lowrank on small matrices: it spends most bytes on 2-bit noise)
    d = _lowrank_plus_noise(256, 192, 24, 7, noise=0.02)
    sm = get_codec("svd-mixed")
    lr = get_codec("lowrank")
    e_sm = sm.encode(d, ratio=8, allocation="optimal")
    e_lr = lr.encode(d, ratio=8)
    assert e_sm.nbytes <= 256 * 192 * 2 / 8 and e_lr.nbytes <= 256 * 192 * 2 / 8
    assert _rel(sm.decode(e_sm), d) < _rel(lr.decode(e_lr), d)


def test_refit_never_hurts():
    d = _lowrank_plus_noise(200, 150, 10, 9)
    codec = get_codec("svd-mixed")
    a = _rel(codec.decode(codec.encode(d, refit=True)), d)
    b = _rel(codec.decode(codec.encode(d, refit=False)), d)
    assert a <= b + 1e-7


def test_budget_route():
    codec = get_codec("svd-mixed")
    d = _lowrank_plus_noise(140, 90, 6, 11)
    for nbytes in [600, 1500, 5000]:
        for given in [{}, {"allocation": "optimal"}, {"groups": "4:2+2:rest"}]:
            s = codec.settings_for_budget((140, 90), nbytes, given)
            assert codec.encode(d, **s).nbytes <= nbytes
    with pytest.raises(SettingsError, match="over the budget"):
        codec.settings_for_budget((140, 90), 600, {"groups": "8:20"})
    with pytest.raises(SettingsError, match="holds no singular vector"):
        codec.settings_for_budget((140, 90), 10, {})
    with pytest.raises(SettingsError, match="use raw"):
        codec.settings_for_budget((140,), 600, {})


def test_zero_delta_and_bad_settings():
    codec = get_codec("svd-mixed")
    enc = codec.encode(torch.zeros(20, 30))
    assert set(enc.tensors) == {"s"} and enc.nbytes == 0
    assert torch.equal(codec.decode(enc), torch.zeros(20, 30))
    assert torch.equal(codec.matmul(torch.randn(3, 30), enc), torch.zeros(3, 20))
    with pytest.raises(SettingsError, match="strictly decreasing"):
        codec.encode(torch.randn(8, 8), groups="2:3+8:1")
    with pytest.raises(SettingsError, match="bad group"):
        codec.encode(torch.randn(8, 8), groups="9:3")
    with pytest.raises(SettingsError, match="only the last"):
        codec.encode(torch.randn(8, 8), groups="8:rest+2:3")
    with pytest.raises(SettingsError, match="use raw"):
        codec.encode(torch.randn(8))
