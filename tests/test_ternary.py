"""Ternary (ComPEFT) codec: exact top-k support, scales, global threshold, storages, errors."""
import numpy as np
import pytest
import torch

from deltacomp.codecs import get_codec
from deltacomp.codecs.ternary import TernaryCodec, topk_positions
from deltacomp.errors import SettingsError
from deltacomp.quant import positions as P

SHAPES = [(13, 33), (1, 7), (37,), (1,), (64, 40)]


def _delta(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(torch.float32)


def _k(density, numel):
    return min(numel, max(1, int(np.floor(density * numel + 0.5))))


def _reference(d, density, alpha=None, per_row=False):
    """float64 reference: top-k by torch.topk, value sign * scale."""
    flat = d.reshape(-1).double()
    idx = torch.topk(flat.abs(), _k(density, flat.numel())).indices.sort().values
    mat = d.reshape(1, -1) if d.dim() == 1 else d
    rows, cols = mat.shape
    out = torch.zeros_like(flat)
    if alpha is not None:
        std = mat.double().std(dim=1, correction=0) if per_row else mat.double().std(correction=0)
        scale = alpha * std
    elif per_row:
        scale = torch.zeros(rows, dtype=torch.float64)
        for r in range(rows):
            sel = idx[idx // cols == r]
            scale[r] = flat[sel].abs().mean() if sel.numel() else 0.0
    else:
        scale = flat[idx].abs().mean()
    out[idx] = torch.sign(flat[idx]) * (scale[idx // cols] if per_row else scale)
    return idx, out.reshape(d.shape)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_top_k_and_mean_scale(shape, density):
    d = _delta(shape)
    before = d.clone()
    enc = get_codec("ternary").encode(d, density=density)
    assert torch.equal(d, before)  # input untouched
    idx, ref = _reference(d, density)
    out = get_codec("ternary").decode(enc)
    assert out.dtype == torch.float32 and out.shape == d.shape
    assert torch.equal(torch.nonzero(out.reshape(-1)).squeeze(1), idx)  # exactly the top-k
    assert enc.params["kept"] == idx.numel()
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=0)
    assert enc.nbytes == sum(t.numel() * t.element_size() for t in enc.tensors.values())
    assert set(enc.tensors) == {"scale", "signs", *P.STORAGE_FIELDS[enc.params["storage"]]}
    assert all(TernaryCodec.field_allowed(f) for f in enc.tensors)


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("scale", ["std", "std:0.5", "std:2"])
def test_std_scale(scale, per_row):
    d = _delta((12, 20), seed=1)
    alpha = float(scale.split(":")[1]) if ":" in scale else 1.0
    enc = get_codec("ternary").encode(d, density=0.2, scale=scale, per_row=per_row)
    want = alpha * (d.double().std(dim=1, correction=0) if per_row else d.double().std(correction=0))
    torch.testing.assert_close(enc.tensors["scale"].double(), want, rtol=1e-6, atol=0)
    _, ref = _reference(d, 0.2, alpha=alpha, per_row=per_row)
    torch.testing.assert_close(get_codec("ternary").decode(enc).double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(9, 31), (40,)])
def test_per_row_mean(shape):
    d = _delta(shape, seed=2)
    if len(shape) == 2:
        d[3] *= 1e-3  # a row that keeps nothing: its scale is 0
    enc = get_codec("ternary").encode(d, density=0.15, per_row=True)
    rows = shape[0] if len(shape) == 2 else 1
    assert enc.tensors["scale"].shape == (rows,)
    if len(shape) == 2:
        assert enc.tensors["scale"][3] == 0
    _, ref = _reference(d, 0.15, per_row=True)
    torch.testing.assert_close(get_codec("ternary").decode(enc).double(), ref, rtol=1e-6, atol=0)


def test_ties_keep_exactly_k_lowest_index_first():
    d = torch.tensor([0.5, -1.0, 1.0, 0.25, -1.0, 1.0, 0.0, 1.0])
    pos = topk_positions(d, 3)
    assert pos.tolist() == [1, 2, 4]
    enc = get_codec("ternary").encode(d, density=3 / 8)
    out = get_codec("ternary").decode(enc)
    assert out.tolist() == [0.0, -1.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0]


def test_zeros_are_never_kept():
    d = torch.zeros(5, 9)
    enc = get_codec("ternary").encode(d, density=0.5)
    assert enc.params["kept"] == 0
    assert torch.equal(get_codec("ternary").decode(enc), d)
    d = torch.tensor([[0.0, 2.0, 0.0, -3.0]])
    enc = get_codec("ternary").encode(d, density=1.0)
    assert enc.params["kept"] == 2
    assert get_codec("ternary").decode(enc).tolist() == [[0.0, 2.5, 0.0, -2.5]]


@pytest.mark.parametrize("storage", P.STORAGES)
def test_every_storage_decodes_the_same(storage):
    d = _delta((50, 70), seed=3)
    auto = get_codec("ternary").encode(d, density=0.08)
    enc = get_codec("ternary").encode(d, density=0.08, storage=storage)
    assert enc.params["storage"] == storage
    assert torch.equal(get_codec("ternary").decode(enc), get_codec("ternary").decode(auto))
    assert auto.nbytes <= enc.nbytes


def test_global_threshold_matches_concatenation():
    ts = [_delta(s, seed=i) * (i + 1) for i, s in enumerate([(7, 5), (33,), (4, 16), (1,)])]
    flat = torch.cat([t.reshape(-1) for t in ts]).abs()
    for density in (0.01, 0.1, 0.37, 1.0):
        k = _k(density, flat.numel())
        want = float(torch.kthvalue(flat, flat.numel() - k + 1).values)
        assert TernaryCodec.global_threshold(ts, density) == want
        assert TernaryCodec.global_threshold(lambda: iter(ts), density) == want
        encs = [get_codec("ternary").encode(t, scope="global", threshold=want) for t in ts]
        assert sum(e.params["kept"] for e in encs) == k  # no ties in continuous data
        for t, e in zip(ts, encs):
            kept = get_codec("ternary").decode(e) != 0
            assert torch.equal(kept, t.abs() >= want)


def test_global_threshold_with_ties_and_zeros():
    ts = [torch.tensor([0.0, 1.0, -2.0, 2.0]), torch.tensor([[2.0, 0.0], [1.0, 3.0]])]
    flat = torch.cat([t.reshape(-1) for t in ts]).abs()
    for density in (0.125, 0.25, 0.5, 0.75, 1.0):
        k = _k(density, flat.numel())
        assert TernaryCodec.global_threshold(ts, density) == float(torch.kthvalue(flat, flat.numel() - k + 1).values)
    enc = get_codec("ternary").encode(ts[0], scope="global", threshold=0.0)
    assert enc.params["kept"] == 3  # threshold 0 keeps every nonzero, never a zero


def test_global_scope_needs_a_threshold_and_a_reiterable():
    with pytest.raises(SettingsError, match="scope=global needs threshold="):
        get_codec("ternary").encode(_delta((4, 4)), scope="global")
    with pytest.raises(TypeError, match="reads the deltas twice"):
        TernaryCodec.global_threshold((t for t in [_delta((3,))]), 0.1)
    with pytest.raises(ValueError, match="no tensors"):
        TernaryCodec.global_threshold([], 0.1)


def test_threshold_between_float32_values_is_exact():
    d = torch.tensor([1.0, 1.0 + 2 ** -23, 0.5])
    enc = get_codec("ternary").encode(d, threshold=1.0 + 2 ** -30)  # not a float32: rounds up, not down
    assert (get_codec("ternary").decode(enc) != 0).tolist() == [False, True, False]


def test_settings_from_strings():
    d = _delta((6, 8))
    enc = get_codec("ternary").encode(d, density="0.25", per_row="true", storage="golomb")
    assert enc.params["density"] == 0.25 and enc.params["per_row"] is True and enc.params["storage"] == "golomb"


@pytest.mark.parametrize("given,match", [
    ({"density": 0}, r"density=0 must be in \(0, 1\]"),
    ({"density": 1.5}, r"density=1.5 must be in \(0, 1\]"),
    ({"storage": "lz4"}, "storage='lz4' must be one of auto, golomb, rans, bitmap, zstd"),
    ({"scale": "median"}, "scale='median' must be mean, std or std:ALPHA"),
    ({"scale": "std:-1"}, "scale='std:-1' must be mean, std or std:ALPHA"),
    ({"scope": "layer"}, "scope='layer' must be one of tensor, global"),
    ({"threshold": -1.0}, "threshold=-1.0 must be a finite number >= 0"),
    ({"bits": 2}, "unknown setting"),
])
def test_bad_settings(given, match):
    with pytest.raises(SettingsError, match=match):
        get_codec("ternary").encode(_delta((4, 4)), **given)


def test_non_finite_delta_raises():
    d = _delta((4, 4))
    d[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_codec("ternary").encode(d)
    with pytest.raises(ValueError, match="NaN or Inf"):
        get_codec("ternary").encode(d, threshold=0.5)


def test_stats_report_bound():
    d = torch.distributions.Laplace(0.0, 1.0).sample((64, 300))
    enc = get_codec("ternary").encode(d, density=0.1)
    st = get_codec("ternary").stats(enc)
    assert st["kept"] == enc.params["kept"] and st["storage"] == enc.params["storage"]
    assert st["bits_per_param"] == pytest.approx(8 * enc.nbytes / d.numel())
    assert st["bound_bits_per_param"] == pytest.approx(P.bound_bits(st["kept"], d.numel()) / d.numel())
    assert 0 <= st["over_bound"] < 0.1


@pytest.mark.parametrize("shape", [(64, 300), (20_000,)])
def test_budget_density_fits_and_uses_the_budget(shape):
    g = torch.Generator().manual_seed(5)
    smooth = torch.randn(shape, generator=g)
    clustered = smooth.clone()
    clustered.reshape(-1)[: clustered.numel() // 4] *= 50  # the large entries all sit in one block
    codec = get_codec("ternary")
    numel = smooth.numel()
    for d in (smooth, clustered):  # clustered supports code below the bound: only the fit is checked
        for bpp in (0.05, 0.3, 0.6, 1.2):
            nbytes = int(bpp * numel / 8) + 4
            s = codec.settings_for_budget(shape, nbytes, {})
            enc = codec.encode(d, **s)
            assert enc.nbytes <= nbytes
            if d is smooth and s["density"] < 1 and nbytes >= 500:  # small budgets are dominated by the fixed slack
                assert enc.nbytes >= 0.9 * nbytes
            assert codec.encode(d, **{**s, "storage": "rans"}).nbytes <= nbytes


def test_budget_errors():
    codec = get_codec("ternary")
    with pytest.raises(SettingsError, match="below one kept entry"):
        codec.settings_for_budget((10, 10), 4, {})
    with pytest.raises(SettingsError, match="scope=global"):
        codec.settings_for_budget((10, 10), 100, {"scope": "global"})
    with pytest.raises(SettingsError, match="storage=auto or rans"):
        codec.settings_for_budget((10, 10), 100, {"storage": "golomb"})


@pytest.mark.parametrize("p", [1e-4, 0.003, 0.05, 0.3, 0.66, 0.9, 1.0])
def test_rans_bound_holds(p):
    numel = 50_000
    rng = np.random.default_rng(0)
    for pos in (np.flatnonzero(rng.random(numel) < p), np.arange(max(1, int(p * numel)))):
        tensors, _ = P.encode_support(pos, numel, None, storage="rans")
        assert tensors["rans"].numel() <= P.rans_nbytes_bound(pos.size, numel)


@pytest.mark.parametrize("seed", range(4))
def test_topk_matches_brute_force_with_ties_and_zeros(seed, monkeypatch):
    import deltacomp.codecs.ternary.codec as T

    monkeypatch.setattr(T, "_CHUNK", 64)  # many chunks: positions must be offset and merged right
    g = torch.Generator().manual_seed(seed)
    d = torch.randint(-3, 4, (23, 19), generator=g).float() * 0.5
    d[0, :5] = torch.tensor([1e-40, -1e-40, 1e-38, 0.0, 7.0])  # denormals land in the lowest bucket
    flat = d.reshape(-1).tolist()
    order = sorted((i for i in range(len(flat)) if flat[i] != 0), key=lambda i: (-abs(flat[i]), i))
    for k in (1, 7, 50, 200, 300, len(flat)):
        assert topk_positions(d, k).tolist() == sorted(order[:k])


@pytest.mark.parametrize("method", ["ternary:density=0.1", "ternary:density=0.05:scale=std:0.5:per_row=true",
                                    "ternary:storage=zstd", "dare:p=0.5:storage=golomb"])
def test_through_the_delta_file(tmp_path, method):
    """compress -> file -> decode gives exactly the codec's own decode (fields and params survive)."""
    import deltacomp
    from conftest import finetune_of, llama_tensors, write_folder
    from deltacomp.plan import parse_method

    b = llama_tensors(0)
    f = finetune_of(b, 1)
    out = tmp_path / "x.delta.safetensors"
    deltacomp.compress(write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f), out,
                       method=method, progress=False)
    name, settings = parse_method(method)
    df = deltacomp.load_delta(out)
    df.verify()
    checked = 0
    for n, info in df.params.items():
        if info.codec == name:
            delta = (f[n].float() - b[n].float()).reshape(info.shape)
            want = get_codec(name).decode(get_codec(name).encode(delta, **settings))
            assert torch.equal(df.decode(n).reshape(want.shape), want), n
            checked += 1
    assert checked > 0


def test_ratio_through_compress(tmp_path):
    import deltacomp
    from conftest import finetune_of, llama_tensors, write_folder

    b = llama_tensors(0)
    f = finetune_of(b, 1)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    s = deltacomp.compress(base, ft, tmp_path / "r.delta.safetensors", method="ternary", ratio=32, progress=False)
    t = s["by_codec"]["ternary"]
    assert 0.4 < t["bits_per_param"] <= 16 / 32
