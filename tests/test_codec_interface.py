"""The parts of the codec interface every codec answers: exact size on meta (equal to the bytes encode
writes, for every codec and setting whose size does not depend on the data), LoRA factors where a codec
has them (and a clear refusal where it does not), and the serving term against matmul."""
from __future__ import annotations

import pytest
import torch

from deltacomp.codecs import available, get_codec
from deltacomp.errors import NoFactorsError

CASES = [("bitdelta", {}), ("bitdelta", {"masks": 3, "scale": "row"}), ("raw", {}), ("raw", {"dtype": "bfloat16"}),
         ("zero", {}), ("lowrank", {"rank": 5}), ("lowrank", {"ratio": 7.0, "dtype": "bfloat16"}),
         ("svd-mixed", {}), ("svd-mixed", {"groups": "8:1+3:4+2:rest", "ratio": 6.0, "group_size": 32}),
         ("svd-mixed", {"bits": 3.0, "group_size": 16})]
SHAPES = [(67, 130), (128, 33), (1, 9)]


@pytest.mark.parametrize("name,settings", CASES)
@pytest.mark.parametrize("shape", SHAPES)
def test_exact_size_on_meta_equals_encoded_bytes(name, settings, shape):
    codec = get_codec(name)
    g = torch.Generator().manual_seed(0)
    delta = torch.zeros(shape) if name == "zero" else torch.randn(shape, generator=g)
    if name in ("lowrank", "svd-mixed") and min(shape) == 1:
        pytest.skip("a 1-row delta keeps every singular vector the budget allows: covered by the other shapes")
    want = codec.encode(delta, **settings).nbytes
    assert codec.exact_nbytes(shape, settings) == want


@pytest.mark.parametrize("name,settings", [("ternary", {}), ("dare", {}), ("lowrank", {"energy": 0.9}),
                                           ("svd-mixed", {"allocation": "optimal"})])
def test_data_dependent_sizes_say_so(name, settings):
    assert get_codec(name).exact_nbytes((64, 64), settings) is None


def test_meta_sizing_allocates_nothing():
    t = get_codec("svd-mixed").meta_tensors((4096, 4096), get_codec("svd-mixed").resolve_settings({}))
    assert all(v.device.type == "meta" for v in t.values())


@pytest.mark.parametrize("name", sorted(set(available())))
def test_lora_factors_or_a_clear_refusal(name):
    codec = get_codec(name)
    delta = torch.zeros(24, 40) if name == "zero" else torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    enc = codec.encode(delta, **({"rank": 6} if name == "lowrank" else {}))
    if name in ("lowrank", "svd-mixed"):
        u, s, vh = codec.lora_factors(enc)
        torch.testing.assert_close((u * s) @ vh, codec.decode(enc), rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(NoFactorsError, match=f"{name}: stores no low-rank factors"):
            codec.lora_factors(enc)


@pytest.mark.parametrize("name", sorted(set(available()) - {"zero"}))
def test_serving_term_equals_matmul(name):
    codec = get_codec(name)
    delta = torch.randn(24, 40, generator=torch.Generator().manual_seed(2))
    enc = codec.encode(delta, **({"density": 0.3} if name == "ternary" else {}))
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(codec.serving_term(enc)(x), x @ codec.decode(enc).T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["svd-mixed", "lowrank"])
def test_serving_term_follows_moved_buffers(name):
    # the term keeps its Encoded view between calls; moving or converting its buffers (_apply) must
    # give every later call the new tensors, not the old ones
    codec = get_codec(name)
    g = torch.Generator().manual_seed(4)
    enc = codec.encode(torch.randn(24, 40, generator=g))
    term = codec.serving_term(enc)
    x = torch.randn(3, 40, generator=g)
    want = x.double() @ codec.decode(enc).double().T
    first = term(x)
    assert term.encoded() is term.encoded()  # kept between calls
    term._apply(lambda t: t.clone())  # what .to(other device) does: new tensors in every buffer
    enc2 = term.encoded()
    assert all(enc2.tensors[f] is term.tensor(f) for f in term.fields)
    for f in term.fields:  # the old tensors are no longer read: zero them, the result must not change
        if enc.tensors[f].numel():
            assert enc.tensors[f].data_ptr() != term.tensor(f).data_ptr()
            enc.tensors[f].zero_()
    torch.testing.assert_close(term(x).double(), want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first.double(), want, rtol=1e-4, atol=1e-4)
