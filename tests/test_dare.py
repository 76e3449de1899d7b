"""DARE codec: reproducible seeded masks, unbiased rescale, fp16 values, storages, errors."""
import pytest
import torch

from deltacomp.codecs import get_codec
from deltacomp.codecs.dare import DareCodec, drop_mask, mask_seed
from deltacomp.errors import SettingsError
from deltacomp.quant import positions as P


def _delta(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.01


def _reference(d, p, seed):
    keep = drop_mask(tuple(d.shape), p, seed).reshape(d.shape) & (d != 0)
    return torch.where(keep, (d.double() / (1 - p)).to(torch.float16).float(), 0.0)


@pytest.mark.parametrize("shape", [(13, 33), (1, 7), (37,), (1,), (64, 40)])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
def test_round_trip_matches_reference(shape, p):
    d = _delta(shape)
    before = d.clone()
    enc = get_codec("dare").encode(d, p=p, seed=3)
    assert torch.equal(d, before)
    out = get_codec("dare").decode(enc)
    assert out.dtype == torch.float32 and out.shape == d.shape
    assert torch.equal(out, _reference(d, p, 3))
    assert enc.tensors["values"].dtype == torch.float16
    assert set(enc.tensors) == {"values", *P.STORAGE_FIELDS[enc.params["storage"]]}
    assert all(DareCodec.field_allowed(f) for f in enc.tensors)
    assert enc.nbytes == sum(t.numel() * t.element_size() for t in enc.tensors.values())


def test_p_zero_keeps_everything_in_fp16():
    d = _delta((5, 6))
    assert torch.equal(get_codec("dare").decode(get_codec("dare").encode(d, p=0)), d.half().float())


def test_reproducible_and_seed_dependent():
    d = _delta((32, 48))
    codec = get_codec("dare")
    state = torch.get_rng_state()
    a = codec.decode(codec.encode(d, seed=7))
    assert torch.equal(torch.get_rng_state(), state)  # no global RNG touched
    torch.manual_seed(123)  # global RNG state does not matter either
    b = codec.decode(codec.encode(d, seed=7))
    c = codec.decode(codec.encode(d, seed=8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_mask_depends_on_shape_only():
    assert mask_seed(0, (4, 6)) == mask_seed(0, (4, 6))
    assert mask_seed(0, (4, 6)) != mask_seed(0, (6, 4))
    assert mask_seed(0, (4, 6)) != mask_seed(1, (4, 6))
    assert torch.equal(drop_mask((4, 6), 0.5, 0), drop_mask((4, 6), 0.5, 0))


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_unbiased_in_expectation(p):
    d = _delta((16, 24), seed=1)
    codec = get_codec("dare")
    seeds = 400
    mean = sum(codec.decode(codec.encode(d, p=p, seed=s)).double() for s in range(seeds)) / seeds
    # per entry the mean has relative std sqrt(p / (1 - p) / seeds): 0.05 at p=0.5, 0.15 at p=0.9
    rel = float((mean - d.double()).norm() / d.double().norm())
    assert rel < 2.5 * (p / (1 - p) / seeds) ** 0.5
    kept = sum(int(codec.encode(d, p=p, seed=s).params["kept"]) for s in range(50)) / (50 * d.numel())
    assert abs(kept - (1 - p)) < 0.02


def test_zeros_and_edges():
    codec = get_codec("dare")
    z = torch.zeros(6, 9)
    enc = codec.encode(z, p=0.5)
    assert enc.params["kept"] == 0 and torch.equal(codec.decode(enc), z)
    one = torch.tensor([0.25])
    assert torch.equal(codec.decode(codec.encode(one, p=0.0)), one)


@pytest.mark.parametrize("storage", P.STORAGES)
def test_every_storage_decodes_the_same(storage):
    d = _delta((30, 50), seed=2)
    enc = get_codec("dare").encode(d, p=0.8, storage=storage)
    assert enc.params["storage"] == storage
    auto = get_codec("dare").encode(d, p=0.8)
    assert torch.equal(get_codec("dare").decode(enc), get_codec("dare").decode(auto))
    assert auto.nbytes <= enc.nbytes


@pytest.mark.parametrize("given,match", [
    ({"p": 1.0}, r"p=1.0 must be in \[0, 1\)"),
    ({"p": -0.1}, r"p=-0.1 must be in \[0, 1\)"),
    ({"storage": "lz4"}, "storage='lz4' must be one of"),
    ({"seed": "x"}, "seed='x' is not a valid int"),
])
def test_bad_settings(given, match):
    with pytest.raises(SettingsError, match=match):
        get_codec("dare").encode(_delta((4, 4)), **given)


def test_fp16_overflow_raises():
    with pytest.raises(ValueError, match="overflows fp16"):
        get_codec("dare").encode(torch.full((4,), 60000.0), p=0.5, seed=0)


def test_stats():
    d = _delta((40, 50))
    enc = get_codec("dare").encode(d, p=0.9)
    st = get_codec("dare").stats(enc)
    assert st["bound_bits_per_param"] == pytest.approx(P.bound_bits(enc.params["kept"], d.numel(), 16) / d.numel())
    assert st["bits_per_param"] == pytest.approx(8 * enc.nbytes / d.numel())
