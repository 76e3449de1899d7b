"""svd-sparse (svd-mixed + a ternary residual in one budget): the budget, the two parts against their own
codecs, the serving term against a float64 reference, damaged files refused, the calibrator, and the
whole path compress -> file -> reconstruct on a tiny model."""
from __future__ import annotations

import pytest
import torch

import deltacomp
from deltacomp.codecs import get_codec
from deltacomp.codecs.calibrator import LayerwiseOptions, output_error
from deltacomp.codecs.svd_sparse.codec import PREFIX, join, parts
from deltacomp.errors import DeltaFormatError, SettingsError
from conftest import finetune_of, llama_tensors, write_folder


def _low_rank_plus_spikes(n, k, seed=0, rank=6, spikes=40):
    """A fine-tune-like delta: a few broad directions plus a few large single entries."""
    g = torch.Generator().manual_seed(seed)
    d = (torch.randn(n, rank, generator=g) @ torch.randn(rank, k, generator=g)) * 0.02
    d += torch.randn(n, k, generator=g) * 0.002
    idx = torch.randperm(n * k, generator=g)[:spikes]
    d.view(-1)[idx] += torch.randn(spikes, generator=g).sign() * 0.3
    return d


def _rel(d, approx):
    return float(((d.double() - approx.double()) ** 2).sum() / (d.double() ** 2).sum())


@pytest.mark.parametrize("shape", [(64, 96), (67, 130), (96, 33), (1, 200)])
@pytest.mark.parametrize("ratio", [4.0, 8.0, 16.0])
def test_budget_and_parts(shape, ratio):
    codec = get_codec("svd-sparse")
    d = _low_rank_plus_spikes(*shape)
    before = d.clone()
    enc = codec.encode(d, ratio=ratio)
    assert torch.equal(d, before)
    assert enc.nbytes <= shape[0] * shape[1] * 2 / ratio
    assert all(codec.field_allowed(f) for f in enc.tensors)
    lr, sp = parts(enc)
    want = get_codec("svd-mixed").decode(lr).double() + get_codec("ternary").decode(sp).double()
    torch.testing.assert_close(codec.decode(enc).double(), want, rtol=1e-6, atol=1e-7)
    assert lr.nbytes + sp.nbytes == enc.nbytes
    again = join(lr, sp, enc.params["sparse"])
    assert again.tensors.keys() == enc.tensors.keys() and again.params == enc.params


def test_beats_svd_mixed_on_a_delta_with_spikes():
    d = _low_rank_plus_spikes(128, 256)
    for ratio in (8.0, 16.0):
        sparse = get_codec("svd-sparse").encode(d, ratio=ratio)
        mixed = get_codec("svd-mixed").encode(d, ratio=ratio)
        assert sparse.nbytes <= 128 * 256 * 2 / ratio and mixed.nbytes <= 128 * 256 * 2 / ratio
        assert _rel(d, get_codec("svd-sparse").decode(sparse)) < 0.8 * _rel(d, get_codec("svd-mixed").decode(mixed))


def test_split_setting_moves_bytes_between_parts():
    d = _low_rank_plus_spikes(96, 160, seed=2)
    codec = get_codec("svd-sparse")
    small, large = (parts(codec.encode(d, ratio=8.0, sparse=f))[1].nbytes for f in (0.1, 0.6))
    assert small < large
    with pytest.raises(SettingsError, match="sparse"):
        codec.encode(d, sparse=1.0)


def test_zero_delta_and_serving_term_against_float64(monkeypatch):
    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "exact")  # (one x row: not svd-mixed's inexact int8 tables)
    codec = get_codec("svd-sparse")
    zero = codec.encode(torch.zeros(40, 72), ratio=4.0)
    assert torch.equal(codec.decode(zero), torch.zeros(40, 72))
    d = _low_rank_plus_spikes(40, 75, seed=3)  # K not a multiple of 8
    enc = codec.encode(d, ratio=4.0)
    want = codec.decode(enc).double()
    for rows in (1, 5):
        x = torch.randn(rows, 75, generator=torch.Generator().manual_seed(rows))
        ref = x.double() @ want.T
        got = codec.serving_term(enc)(x)
        assert got.dtype == torch.float32
        assert float((got.double() - ref).abs().max()) <= 1e-4 * float(ref.abs().max()) + 1e-6
        torch.testing.assert_close(codec.matmul(x.double(), enc), ref, rtol=1e-5, atol=1e-6)  # (want: fp32 decode)


def test_damaged_parts_are_refused():
    codec = get_codec("svd-sparse")
    enc = codec.encode(_low_rank_plus_spikes(48, 64, seed=4), ratio=4.0)
    codec.check_stored(enc)
    bad = dict(enc.tensors)
    bad[PREFIX + "scale"] = torch.tensor(float("nan"))
    with pytest.raises(DeltaFormatError, match="NaN or Inf"):
        codec.check_stored(type(enc)(enc.codec, enc.shape, bad, enc.params))
    bad = {f: t for f, t in enc.tensors.items() if f != "s"}
    with pytest.raises(DeltaFormatError, match="field s is missing"):
        codec.check_stored(type(enc)(enc.codec, enc.shape, bad, enc.params))


def test_calibrator_lowers_output_error_in_the_same_bytes():
    g = torch.Generator().manual_seed(5)
    d = _low_rank_plus_spikes(64, 96, seed=5)
    x = torch.randn(512, 96, generator=g) * torch.linspace(0.1, 3.0, 96)  # uneven input energy
    h = (x.T @ x).double()
    codec = get_codec("svd-sparse")
    enc = codec.encode(d, ratio=6.0)
    cal = codec.calibrator().calibrate(d, enc, h, LayerwiseOptions())
    assert cal.nbytes == enc.nbytes
    assert {f: t.shape for f, t in cal.tensors.items()} == {f: t.shape for f, t in enc.tensors.items()}
    assert output_error(d, codec.decode(cal), h) < output_error(d, codec.decode(enc), h)


def test_compress_reconstruct_inspect(tmp_path):
    b = llama_tensors(0, dtype=torch.float32)
    f = finetune_of(b, 1)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    out = tmp_path / "ft.delta.safetensors"
    summary = deltacomp.compress(base, ft, out, method="svd-sparse", ratio=4, progress=False)
    assert summary["by_codec"]["svd-sparse"]["tensors"] > 0
    df = deltacomp.load_delta(out)
    names = [n for n, p in df.params.items() if p.codec == "svd-sparse"]
    for n in names:
        enc = df.encoded(n)
        torch.testing.assert_close(df.decode(n), get_codec("svd-sparse").decode(enc))
        assert enc.nbytes <= b[n].numel() * b[n].element_size() / 4  # (--ratio: of the stored bytes)
    rec = deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    assert (rec / "config.json").is_file()


def test_auto_weighs_it_only_when_named(tmp_path):
    from deltacomp.codecs import auto_defaults

    assert "svd-sparse" not in auto_defaults() and "svd-mixed" in auto_defaults()
    b = llama_tensors(2, dtype=torch.float32)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", finetune_of(b, 3))
    out = tmp_path / "auto.delta.safetensors"
    deltacomp.compress(base, ft, out, method="auto:codecs=svd-mixed+svd-sparse", ratio=4, progress=False)
    df = deltacomp.load_delta(out)
    chosen = {p.codec for p in df.params.values()}
    assert chosen & {"svd-mixed", "svd-sparse"}
    assert chosen <= {"svd-mixed", "svd-sparse", "raw", "zero"}
    assert df.source["auto"]["codecs"] == ["svd-mixed", "svd-sparse"]


def test_tune_student_is_the_layer_and_writes_the_same_fields():
    """The tune stage's student computes base + low-rank + sparse as decode does; after a step on a loss it
    writes new scales into the same fields (codes, support and signs byte-identical, same bytes)."""
    from torch import nn

    codec = get_codec("svd-sparse")
    d = _low_rank_plus_spikes(48, 80, seed=6)
    enc = codec.encode(d, ratio=4.0)
    base = nn.Linear(80, 48)
    student = codec.calibrator().student(base, enc)
    x = torch.randn(7, 80, generator=torch.Generator().manual_seed(7))
    want = x.double() @ (base.weight.double() + codec.decode(enc).double()).T + base.bias.double()
    torch.testing.assert_close(student(x).double(), want, rtol=1e-4, atol=1e-5)
    assert codec.calibrator().encoded(student, enc).tensors.keys() == enc.tensors.keys()
    opt = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.1)
    (student(x) - x @ (base.weight + d).T - base.bias).pow(2).sum().backward()
    opt.step()
    new = codec.calibrator().encoded(student, enc)
    assert new.nbytes == enc.nbytes and new.params == enc.params
    changed = [f for f in enc.tensors if not torch.equal(new.tensors[f], enc.tensors[f])]
    assert PREFIX + "scale" in changed and "s" in changed
    assert all("scale" in f or "zero" in f or f == "s" for f in changed), changed
    with torch.no_grad():  # the written values are the trained ones (fp32 fields exactly; fp16 ones rounded)
        assert torch.equal(new.tensors[PREFIX + "scale"], student.sparse.scale().clamp_min(0))
        assert torch.equal(new.tensors["s"], student.lowrank.s())
        got = x.double() @ (base.weight.double() + codec.decode(new).double()).T + base.bias.double()
        torch.testing.assert_close(got, student(x).double(), rtol=1e-2, atol=1e-2)
