"""The tune stage for every codec that stores continuous numbers: lowrank (its factors, after an
output-error refit in the layerwise stage) and bitdelta (its scales, relative to the distilled ones)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacomp
from deltacomp.calibrate import CalibrationOptions
from deltacomp.codecs import get_codec
from deltacomp.codecs.bitdelta.serving import field
from deltacomp.codecs.calibrator import LayerwiseOptions, output_error

from test_calibrate import _text, llama_pair  # noqa: F401  (a tiny HF pair with a tokenizer)
from test_tune import _linear, _lowrank_delta


def _moved(student: nn.Module, seed: int, size: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * size)


def _student_delta(student: nn.Module, lin: nn.Linear, k: int) -> torch.Tensor:
    eye = torch.eye(k, dtype=lin.weight.dtype)
    with torch.no_grad():
        return (student(eye) - lin(eye)).T


@pytest.mark.parametrize("shape,rank", [((40, 72), 5), ((1, 33), 1), ((130, 7), 7), ((9, 11), 0)])
def test_lowrank_student_at_zero_offsets_is_base_plus_decoded_delta(shape, rank):
    n, k = shape
    codec = get_codec("lowrank")
    enc = codec.encode(_lowrank_delta(n, k, 1), rank=rank)
    lin = _linear(n, k, 2).double()
    student = codec.calibrator().tune_student(lin, enc).double()
    x = torch.randn(5, 3, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    t = enc.tensors  # the stored factors, multiplied in float64
    want = x @ (lin.weight + (t["u"].double() * t["s"].double()) @ t["v"].double()).T + lin.bias
    torch.testing.assert_close(student(x), want, rtol=1e-9, atol=1e-9)
    assert not lin.weight.requires_grad and not lin.bias.requires_grad


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_lowrank_encoded_writes_what_the_student_computes(dtype):
    """Moved offsets land in u, s, v in their stored dtypes: the decoded file is the student's delta to the
    storage dtype's rounding, with the same fields, shapes and bytes."""
    n, k = 48, 80
    codec = get_codec("lowrank")
    cal = codec.calibrator()
    enc = codec.encode(_lowrank_delta(n, k, 4), rank=6, dtype=dtype)
    lin = _linear(n, k, 5)
    student = cal.tune_student(lin, enc)
    _moved(student, 6)
    new = cal.tune_encoded(student, enc)
    want = _student_delta(student, lin, k)
    eps = torch.finfo(getattr(torch, dtype)).eps
    torch.testing.assert_close(codec.decode(new), want, rtol=0, atol=float(8 * eps * want.abs().max()))
    assert not torch.allclose(codec.decode(new), codec.decode(enc))
    for key, t in enc.tensors.items():
        assert new.tensors[key].dtype == t.dtype and new.tensors[key].shape == t.shape
    assert new.params == enc.params


def test_lowrank_gradients_reach_every_offset():
    n, k = 24, 40
    enc = get_codec("lowrank").encode(_lowrank_delta(n, k, 8), rank=4)
    student = get_codec("lowrank").calibrator().tune_student(_linear(n, k, 9), enc)
    student(torch.randn(4, k)).pow(2).sum().backward()
    trained = [(name, p) for name, p in student.named_parameters() if p.requires_grad]
    assert sorted(name for name, _ in trained) == ["a", "du", "dv"]
    for name, p in trained:
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lowrank_refit_lowers_the_output_error_at_the_same_bytes():
    """The layerwise refit is the whitened rank-r SVD: output error no higher than the stored factors',
    lower on correlated inputs; same rank, dtype and bytes; None when whitening is off or rank 0."""
    n, k, r = 30, 50, 4
    g = torch.Generator().manual_seed(11)
    delta = torch.randn(n, k, generator=g) * 0.01
    x = torch.randn(400, k, generator=g) @ torch.randn(k, k, generator=g)  # correlated inputs
    h = (x.T @ x).double() / x.shape[0]
    codec, cal = get_codec("lowrank"), get_codec("lowrank").calibrator()
    enc = codec.encode(delta, rank=r)
    new = cal.calibrate(delta, enc, h, LayerwiseOptions())
    assert new is not None and new.params == enc.params
    for key, t in enc.tensors.items():
        assert new.tensors[key].dtype == t.dtype and new.tensors[key].shape == t.shape
    before = output_error(delta, codec.decode(enc), h)
    after = output_error(delta, codec.decode(new), h)
    assert after < 0.9 * before
    assert cal.calibrate(delta, enc, h, LayerwiseOptions(whiten=False)) is None
    assert cal.calibrate(delta, codec.encode(delta, rank=0), h, LayerwiseOptions()) is None


@pytest.mark.parametrize("per_row,masks", [(False, 1), (True, 1), (True, 2)])
def test_bitdelta_tune_student_is_relative(per_row, masks):
    """In the tune stage bitdelta trains a_i with scale_i = scale_i0 (1 + a_i): at a = 0 it is the
    distill student (float64 reference); moved, the file gets scale_i0 (1 + a_i), signs byte-identical."""
    n, k = 12, 70
    codec, cal = get_codec("bitdelta"), get_codec("bitdelta").calibrator()
    enc = codec.encode(_lowrank_delta(n, k, 12), scale="row" if per_row else "tensor", masks=masks)
    lin = _linear(n, k, 13).double()
    student = cal.tune_student(lin, enc).double()
    x = torch.randn(4, k, dtype=torch.float64)
    torch.testing.assert_close(student(x), x @ (lin.weight + codec.decode(enc).double()).T + lin.bias)
    assert all(float(p.detach().abs().sum()) == 0 for p in student.scales)  # offsets start at 0
    _moved(student, 14)
    new = cal.tune_encoded(student, enc)
    for i, a in enumerate(student.scales):
        key = field("scale", i)
        want = enc.tensors[key].double() * (1 + a.detach())
        torch.testing.assert_close(new.tensors[key].double(), want.to(enc.tensors[key].dtype).double())
    for key, t in enc.tensors.items():
        if "sign" in key:
            assert torch.equal(new.tensors[key], t)


@pytest.mark.parametrize("method", ["lowrank:ratio=4", "bitdelta"])
def test_compress_calib_tunes_lowrank_and_bitdelta(tmp_path, llama_pair, method):  # noqa: F811
    """`compress --calib` runs the tune stage for lowrank (after its refit) and bitdelta (after its
    distillation); the bytes are unchanged and the tuned file is kept only if the held-out loss fell."""
    base, ft = llama_pair / "base", llama_pair / "ft"
    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    opts = dict(samples=8, seq_len=16)
    plain, tuned = tmp_path / "a.delta.safetensors", tmp_path / "b.delta.safetensors"
    deltacomp.compress(base, ft, plain, method=method, progress=False,
                       calibration=CalibrationOptions(text, tune_steps=0, **opts))
    s = deltacomp.compress(base, ft, tuned, method=method, progress=False,
                           calibration=CalibrationOptions(text, tune_steps=6, tune_lr=1e-2, **opts))
    first = "distill" if method == "bitdelta" else "layerwise"
    assert list(s["calibration"]) == [first, "tune"]
    rep = s["calibration"]["tune"]
    assert rep["distilled_tensors"] > 0 and rep["trained_scalars"] > 0
    assert rep["kept_data_free_scales"] == (rep["loss_after"] > rep["loss_before"])
    a, b = deltacomp.load_delta(plain), deltacomp.load_delta(tuned)
    assert [c["method"] for c in b.source["calibration"]] == [first, "tune"]
    changed = 0
    for name, info in a.params.items():
        ta, tb = a.raw_tensors(name), b.raw_tensors(name)
        assert {f: (t.dtype, t.shape) for f, t in ta.items()} == {f: (t.dtype, t.shape) for f, t in tb.items()}
        changed += any(not torch.equal(ta[f], tb[f]) for f in ta)
    assert (changed > 0) != rep["kept_data_free_scales"]
