"""The tune stage: svd-mixed's student (codecs/svd_mixed/tune.py) and the end-to-end pass after GPTQ."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import deltacomp
from deltacomp.calibrate import CalibrationOptions
from deltacomp.calibrate.options import stages_for
from deltacomp.codecs import get_codec
from deltacomp.codecs.svd_mixed.tune import LowRankTunedLinear

from test_calibrate import _text, llama_pair  # noqa: F401  (a tiny HF pair with a tokenizer)


def _linear(n: int, k: int, seed: int) -> nn.Linear:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g))
        lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def _lowrank_delta(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 6, generator=g) @ torch.randn(6, k, generator=g)) * 0.05 + \
        torch.randn(n, k, generator=g) * 1e-3


@pytest.mark.parametrize("shape", [(40, 72), (1, 33), (130, 7)])
def test_student_at_zero_offsets_is_base_plus_decoded_delta(shape):
    """Before any training the student computes x (W + decode(enc))^T + b (float64; the decoded factors
    are float32, one rounding of zero + code * scale away from the student's float64 ones)."""
    n, k = shape
    codec = get_codec("svd-mixed")
    enc = codec.encode(_lowrank_delta(n, k, 1), ratio=2, group_size=16)
    lin = _linear(n, k, 2).double()
    student = LowRankTunedLinear(lin, enc).double()
    x = torch.randn(5, 3, k, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    u, sv, v = codec.lora_factors(enc)
    want = x @ (lin.weight + (u.double() * sv.double()) @ v.double()).T + lin.bias
    torch.testing.assert_close(student(x), want, rtol=1e-6, atol=1e-6)
    assert [p.shape for p in student.parameters() if p.requires_grad]  # only the offsets train
    assert not lin.weight.requires_grad and not lin.bias.requires_grad


def test_encoded_writes_what_the_student_computes():
    """Moved offsets land in the stored fields (fp16 scales/zeros, fp32 s): the decoded file equals the
    student's delta to fp16 rounding, the codes are byte-identical and the size is unchanged."""
    n, k = 48, 80
    codec = get_codec("svd-mixed")
    enc = codec.encode(_lowrank_delta(n, k, 4), ratio=2, group_size=16)
    lin = _linear(n, k, 5)
    student = LowRankTunedLinear(lin, enc)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    new = student.encoded(enc)
    eye = torch.eye(k)
    with torch.no_grad():
        student_delta = (student(eye) - lin(eye)).T      # (n, k): the student's W_delta
    tol = float(2e-3 * student_delta.abs().max())
    torch.testing.assert_close(codec.decode(new), student_delta, rtol=0, atol=tol)
    assert not torch.allclose(codec.decode(new), codec.decode(enc))
    for key, t in enc.tensors.items():
        assert new.tensors[key].dtype == t.dtype and new.tensors[key].shape == t.shape
        if "_q" in key:
            assert torch.equal(new.tensors[key], t), key
    assert sum(t.numel() * t.element_size() for t in new.tensors.values()) == \
        sum(t.numel() * t.element_size() for t in enc.tensors.values())


def test_all_zero_delta_student_is_the_base():
    codec = get_codec("svd-mixed")
    enc = codec.encode(torch.zeros(8, 16), ratio=2)
    lin = _linear(8, 16, 7)
    student = LowRankTunedLinear(lin, enc)
    x = torch.randn(3, 16)
    torch.testing.assert_close(student(x), lin(x))
    assert student.encoded(enc).tensors.keys() == enc.tensors.keys()


def test_gradients_reach_every_offset():
    n, k = 24, 40
    enc = get_codec("svd-mixed").encode(_lowrank_delta(n, k, 8), ratio=2, group_size=8)
    student = LowRankTunedLinear(_linear(n, k, 9), enc)
    student(torch.randn(4, k)).pow(2).sum().backward()
    for name, p in student.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_stages_for_tune():
    assert stages_for(["svd-mixed"]) == ["layerwise", "tune"]
    assert stages_for(["svd-mixed"], tune=False) == ["layerwise"]
    assert stages_for(["bitdelta", "ternary"]) == ["distill", "layerwise", "tune"]
    assert stages_for(["bitdelta"]) == ["distill", "tune"]
    assert stages_for(["bitdelta"], tune=False) == ["distill"]
    assert stages_for(["lowrank"]) == ["layerwise", "tune"]
    with pytest.raises(deltacomp.SettingsError, match="no tensor uses a codec that calibrates"):
        stages_for(["raw", "zero"])
    assert stages_for(["bitdelta", "svd-mixed"]) == ["distill", "layerwise", "tune"]
    with pytest.raises(deltacomp.SettingsError, match="tune_steps"):
        CalibrationOptions("x.txt", tune_steps=-1)


def test_compress_calib_tunes_after_gptq(tmp_path, llama_pair):  # noqa: F811
    """`compress --calib` on svd-mixed: GPTQ, then the tune stage, recorded in order; the codes are GPTQ's,
    the bytes are the same; the tuned values are kept only if the loss on the held-out window fell;
    --calib-tune-steps 0 skips the stage."""
    base, ft = llama_pair / "base", llama_pair / "ft"
    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    opts = dict(samples=8, seq_len=16)
    plain, tuned = tmp_path / "gptq.delta.safetensors", tmp_path / "tuned.delta.safetensors"
    deltacomp.compress(base, ft, plain, method="svd-mixed:ratio=4", progress=False,
                       calibration=CalibrationOptions(text, tune_steps=0, **opts))
    s = deltacomp.compress(base, ft, tuned, method="svd-mixed:ratio=4", progress=False,
                           calibration=CalibrationOptions(text, tune_steps=6, tune_lr=1e-2, **opts))
    assert set(s["calibration"]) == {"layerwise", "tune"}
    rep = s["calibration"]["tune"]
    assert rep["loss"] == "kl" and rep["distilled_tensors"] > 0
    assert (rep["checked_on"], rep["check_windows"]) == ("held-out windows", 1)
    assert rep["kept_data_free_scales"] == (rep["loss_after"] > rep["loss_before"])
    a, b = deltacomp.load_delta(plain), deltacomp.load_delta(tuned)
    assert [c["method"] for c in a.source["calibration"]] == ["layerwise"]
    assert [c["method"] for c in b.source["calibration"]] == ["layerwise", "tune"]
    from deltacomp.summary import summary_text

    assert "calibration: layerwise, then tune (6 steps, kl " in summary_text(deltacomp.summarize(b))  # inspect
    assert "calibration: layerwise\n" in summary_text(deltacomp.summarize(a)) + "\n"
    changed = 0
    for name, info in a.params.items():
        ta, tb = a.raw_tensors(name), b.raw_tensors(name)
        assert ta.keys() == tb.keys()
        for f in ta:
            if info.codec != "svd-mixed" or "_q" in f:
                assert torch.equal(ta[f], tb[f]), f"{name}.{f}"
            else:
                changed += not torch.equal(ta[f], tb[f])
    assert changed > 0 if not rep["kept_data_free_scales"] else changed == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "gptq.delta.safetensors",
                                                          "tuned.delta.safetensors"]


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_student_and_encoded(per_row):
    """ternary's student is W + alpha T at a = 0 (float64) and writes its trained scale(s) back, >= 0;
    support and signs unchanged."""
    from deltacomp.codecs.ternary.calibrate import LeastSquaresScale

    n, k = 12, 70
    codec = get_codec("ternary")
    enc = codec.encode(_lowrank_delta(n, k, 10), density=0.2, per_row=per_row)
    lin = _linear(n, k, 11).double()
    cal = LeastSquaresScale()
    student = cal.student(lin, enc).double()
    x = torch.randn(4, k, dtype=torch.float64)
    torch.testing.assert_close(student(x), x @ (lin.weight + codec.decode(enc).double()).T + lin.bias)
    with torch.no_grad():
        student.a.copy_(torch.linspace(-2, 0.5, student.a.numel()).reshape(student.a.shape))
    new = cal.encoded(student, enc)
    want = (enc.tensors["scale"].double() * (1 + student.a.detach())).clamp_min(0)
    torch.testing.assert_close(new.tensors["scale"].double(), want.to(torch.float32).double())
    assert (new.tensors["scale"] >= 0).all()
    for key in enc.tensors:
        if key != "scale":
            assert torch.equal(new.tensors[key], enc.tensors[key])


@pytest.mark.parametrize("scope", ["model", "auto"])
def test_tune_where_the_model_does_not_fit(tmp_path, llama_pair, monkeypatch, capsys, scope):  # noqa: F811
    """Where the whole model in float32 would not fit: asked for the whole model, the tune stage is skipped
    (the layerwise file is the output) with a one-line note, and the report says why; by default (auto) it
    runs one decoder layer at a time instead, and says so."""
    import deltacomp.memory

    monkeypatch.setattr(deltacomp.memory, "available_bytes", lambda device="cpu": 10 * 1024**2)
    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    out = tmp_path / "t.delta.safetensors"
    s = deltacomp.compress(llama_pair / "base", llama_pair / "ft", out, method="svd-mixed:ratio=4", progress=False,
                           calibration=CalibrationOptions(text, samples=4, seq_len=16, tune_steps=3, tune_scope=scope))
    err = capsys.readouterr().err
    methods = [c["method"] for c in deltacomp.load_delta(out).source["calibration"]]
    if scope == "model":
        assert "tune stage skipped" in s["calibration"]["tune"]["skipped"]
        assert "tune stage skipped: training the whole model in float32 needs" in err
        assert methods == ["layerwise"]
    else:
        assert "tune stage runs one decoder layer at a time: training the whole model" in err
        assert methods == ["layerwise", "tune-blockwise"] and s["calibration"]["tune"]["steps"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "t.delta.safetensors"]


def test_tune_scope_checked():
    with pytest.raises(deltacomp.SettingsError, match="tune_scope 'layer' must be one of auto, model, layers"):
        CalibrationOptions("x.txt", tune_scope="layer")


def test_held_out_split():
    from deltacomp.calibrate.distill import held_out_split

    train, check = held_out_split(32)
    assert len(check) == 4 and not set(train) & set(check) and sorted(train + check) == list(range(32))
    assert held_out_split(32) == (train, check)  # seeded
    assert held_out_split(5) == (list(range(5)), list(range(5)))  # too few to hold any out


def test_training_heap_restores_the_fixed_threshold():
    """training_heap() is a no-op without bounded_malloc() and restores the fixed mmap threshold after."""
    import deltacomp.memory as mem

    with mem.training_heap():
        x = torch.ones(1 << 20)
    assert float(x.sum()) == 1 << 20
    if mem.bounded_malloc():
        calls = []
        real = mem._libc
        class Spy:
            def mallopt(self, param, value):
                calls.append((param, value))
                return real.mallopt(param, value)
            def malloc_trim(self, pad):
                return real.malloc_trim(pad)
        mem._libc = Spy()
        try:
            with mem.training_heap():
                pass
        finally:
            mem._libc = real
        assert calls[:2] == [(mem.M_MMAP_THRESHOLD, mem.TRAINING_MMAP_THRESHOLD),
                             (mem.M_TRIM_THRESHOLD, mem.TRAINING_TRIM_THRESHOLD)]
        assert calls[2:] == [(mem.M_MMAP_THRESHOLD, mem.THRESHOLD), (mem.M_TRIM_THRESHOLD, mem.THRESHOLD)]


def test_a_diverging_tune_keeps_the_stored_values(tmp_path, llama_pair):  # noqa: F811
    """A learning rate that makes the loss NaN: the tune stage keeps the layerwise values (NaN is not "lower")
    and writes a valid file, instead of failing on the NaN it would have recorded."""
    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    out = tmp_path / "t.delta.safetensors"
    s = deltacomp.compress(llama_pair / "base", llama_pair / "ft", out, method="svd-mixed:ratio=4", progress=False,
                           calibration=CalibrationOptions(text, samples=4, seq_len=16, tune_steps=3, tune_lr=1e6,
                                                          tune_scope="model"))
    rep = s["calibration"]["tune"]
    assert rep["kept_data_free_scales"] and rep["loss_after"] is None
    assert deltacomp.load_delta(out).source["calibration"][-1]["kept_data_free_scales"]
