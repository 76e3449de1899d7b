"""Position/sign storage: exact round trips for every storage, auto = smallest, bounds, bad input."""
import math

import numpy as np
import pytest
import torch

from deltacomp.errors import DeltaFormatError, SettingsError
from deltacomp.quant import positions as P


def _support(numel, p, seed=0):
    rng = np.random.default_rng(seed)
    pos = np.flatnonzero(rng.random(numel) < p)
    return pos, rng.random(pos.size) < 0.5


CASES = [
    ("random 5%", 10_007, 0.05),
    ("random 10%", 4_099, 0.10),
    ("random 60%", 1_001, 0.60),
    ("one of one", 1, 1.0),
]


@pytest.mark.parametrize("storage", P.STORAGES)
@pytest.mark.parametrize("label,numel,p", CASES)
def test_round_trip_random(storage, label, numel, p):
    pos, signs = _support(numel, p)
    tensors, params = P.encode_support(torch.from_numpy(pos), numel, torch.from_numpy(signs), storage=storage)
    assert params["storage"] == storage and params["kept"] == pos.size
    assert set(tensors) == set(P.STORAGE_FIELDS[storage]) | {"signs"}
    got_pos, got_signs = P.decode_support(tensors, params, numel)
    assert torch.equal(got_pos, torch.from_numpy(pos).to(torch.int64))
    assert torch.equal(got_signs, torch.from_numpy(signs))


@pytest.mark.parametrize("storage", P.STORAGES)
@pytest.mark.parametrize("numel,pos", [
    (1, []), (1, [0]), (9, []), (9, list(range(9))), (8, [0, 7]), (100_000, [99_999]), (70_001, [0, 70_000]),
    (33, [3, 4, 5, 31, 32]),
])
def test_round_trip_edges(storage, numel, pos):
    pos = np.array(pos, dtype=np.int64)
    signs = np.arange(pos.size) % 3 == 0
    tensors, params = P.encode_support(pos, numel, signs, storage=storage)
    got_pos, got_signs = P.decode_support(tensors, params, numel)
    assert got_pos.tolist() == pos.tolist()
    assert got_signs.tolist() == signs.tolist()


def test_without_signs_and_auto_picks_smallest():
    pos, _ = _support(20_000, 0.07, seed=3)
    sizes = {}
    for storage in P.STORAGES:
        tensors, params = P.encode_support(pos, 20_000, None, storage=storage)
        assert "signs" not in tensors
        sizes[storage] = sum(t.numel() for t in tensors.values())
        got, none = P.decode_support(tensors, params, 20_000, with_signs=False)
        assert none is None and got.tolist() == pos.tolist()
    tensors, params = P.encode_support(pos, 20_000, None, storage="auto")
    assert sum(t.numel() for t in tensors.values()) == min(sizes.values())
    assert params["storage"] == min(sizes, key=sizes.get)
    # dense supports: never above the 1 bit/param bitmap (Rice with r = 0 is the bitmap's equal)
    pos, _ = _support(5_000, 0.5, seed=4)
    tensors, _ = P.encode_support(pos, 5_000, None)
    assert sum(t.numel() for t in tensors.values()) <= (5_000 + 7) // 8


def test_rice_parameter_is_optimal():
    pos, _ = _support(50_000, 0.05, seed=1)
    gaps = np.diff(pos, prepend=-1) - 1
    _, params = P.encode_support(pos, 50_000, None, storage="golomb")
    cost = lambda r: gaps.size * (1 + r) + int((gaps >> r).sum())  # noqa: E731
    assert all(cost(params["rice"]) <= cost(r) for r in range(20))


@pytest.mark.parametrize("p", [0.05, 0.1])
def test_near_entropy_bound(p):
    """i.i.d. supports: rans within 1% of numel*H(p) + kept, golomb within 3%."""
    numel = 200_000
    pos, signs = _support(numel, p, seed=2)
    bound = P.bound_bits(pos.size, numel)
    for storage, slack in (("rans", 0.01), ("golomb", 0.03)):
        tensors, _ = P.encode_support(pos, numel, signs, storage=storage)
        bits = 8 * sum(t.numel() for t in tensors.values())
        assert bound <= bits <= bound * (1 + slack), (storage, bits, bound)


def test_bound_and_stats():
    assert P.entropy_bits(0.0) == 0.0 and P.entropy_bits(1.0) == 0.0
    assert P.entropy_bits(0.5) == pytest.approx(1.0)
    h = -(0.1 * math.log2(0.1) + 0.9 * math.log2(0.9))
    assert P.bound_bits(100, 1000) == pytest.approx(1000 * h + 100)
    assert P.bound_bits(100, 1000, value_bits=16) == pytest.approx(1000 * h + 1600)
    st = P.storage_stats(nbytes=100, kept=100, numel=1000)
    assert st["bits_per_param"] == pytest.approx(0.8) and st["bits_per_nonzero"] == pytest.approx(8.0)
    assert st["bound_bits_per_param"] == pytest.approx(h + 0.1)
    assert st["bound_bits_per_nonzero"] == pytest.approx(h / 0.1 + 1)
    assert st["over_bound"] == pytest.approx(800 / (1000 * h + 100) - 1)
    assert P.storage_stats(0, 0, 10)["bits_per_nonzero"] is None


def test_bad_input():
    with pytest.raises(SettingsError, match="unknown position storage 'lz4'"):
        P.encode_support(np.array([1]), 10, None, storage="lz4")
    with pytest.raises(ValueError, match="strictly increasing"):
        P.encode_support(np.array([3, 1]), 10, None)
    with pytest.raises(ValueError, match="strictly increasing"):
        P.encode_support(np.array([10]), 10, None)
    with pytest.raises(ValueError, match="2 signs for 1 positions"):
        P.encode_support(np.array([1]), 10, np.array([True, False]))


def test_corrupt_streams_raise():
    pos, signs = _support(1000, 0.1)
    for storage in P.STORAGES:
        tensors, params = P.encode_support(pos, 1000, signs, storage=storage)
        with pytest.raises(DeltaFormatError):
            P.decode_support(tensors, {**params, "kept": 10_000}, 1000)
        with pytest.raises(DeltaFormatError, match="missing field"):
            P.decode_support({"signs": tensors["signs"]}, params, 1000)
    with pytest.raises(DeltaFormatError, match="unknown position storage"):
        P.decode_support(tensors, {**params, "storage": "gzip"}, 1000)
    tensors, params = P.encode_support(pos, 1000, signs, storage="golomb")
    with pytest.raises(DeltaFormatError, match="unary stream ends"):
        P.decode_support({**tensors, "rice_q": tensors["rice_q"][:2]}, params, 1000)
