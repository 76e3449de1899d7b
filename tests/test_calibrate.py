"""Calibration: sample windows, refusals, and BitDelta scale distillation on a tiny random Llama."""
from __future__ import annotations

import hashlib

import pytest
import torch

import deltacomp
from deltacomp import ops
from deltacomp.calibrate import (CalibData, CalibrationOptions, build_student, distill_scales, from_file, from_ids, from_text,
                                 load_calibration, train_scales)
from deltacomp.calibrate.distill import _loss, teacher_logits
from deltacomp.codecs.bitdelta.calibrate import SignScaledLinear
from deltacomp.errors import SettingsError

transformers = pytest.importorskip("transformers")

VOCAB = 64
WORDS = [f"w{i}" for i in range(VOCAB - 2)]


# -- fixtures ---------------------------------------------------------------------------------------
def _tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


def _text(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g).tolist())


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    """Base and fine-tune folders (float32, tokenizer saved with the fine-tune)."""
    root = tmp_path_factory.mktemp("calib")
    base = _tiny_llama(0)
    base.save_pretrained(root / "base")
    ft = _tiny_llama(0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "layers" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.03)
    ft.save_pretrained(root / "ft")
    _tokenizer().save_pretrained(root / "ft")
    return root


# -- data -------------------------------------------------------------------------------------------
def test_windows_are_seeded_slices_of_the_stream():
    stream = torch.arange(1000)
    a = from_ids(stream, n_samples=5, seq_len=32, seed=3)
    b = from_ids(stream, n_samples=5, seq_len=32, seed=3)
    c = from_ids(stream, n_samples=5, seq_len=32, seed=4)
    assert a.ids.shape == (5, 32) and a.ids.dtype == torch.int64
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    for row in a.ids:  # each window is a contiguous run of the stream
        assert torch.equal(row, torch.arange(int(row[0]), int(row[0]) + 32))
    starts = sorted(int(r[0]) for r in a.ids)
    assert all(s2 - s1 >= 32 for s1, s2 in zip(starts, starts[1:]))  # no overlap
    exact = from_ids(torch.arange(64), n_samples=2, seq_len=32)  # exactly enough tokens
    assert torch.equal(exact.ids, torch.arange(64).reshape(2, 32))


def test_refuses_short_or_empty_data(tmp_path):
    with pytest.raises(SettingsError, match=r"has 100 tokens, but 4 samples of 32 tokens need at least 128"):
        from_ids(torch.arange(100), n_samples=4, seq_len=32)
    with pytest.raises(SettingsError, match=r"has 32 tokens, but 1 samples of 32 tokens need at least 33"):
        from_ids(torch.arange(32), n_samples=1, seq_len=32)
    with pytest.raises(SettingsError, match="is empty"):
        from_ids([], n_samples=1, seq_len=8)
    tok = _tokenizer()
    with pytest.raises(SettingsError, match="is empty"):
        from_text("  \n", tok, n_samples=1, seq_len=8)
    short = tmp_path / "short.txt"
    short.write_text(_text(20))
    with pytest.raises(SettingsError, match=r"short\.txt has 20 tokens, but 2 samples of 16 tokens need at least 32"):
        from_file(short, tok, n_samples=2, seq_len=16)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SettingsError, match=r"empty\.txt is empty"):
        from_file(empty, tok, n_samples=2, seq_len=16)
    with pytest.raises(SettingsError, match="neither a text file nor a bundled corpus"):
        load_calibration(tmp_path / "missing.txt", tmp_path, n_samples=1, seq_len=8)
    with pytest.raises(SettingsError, match="seq_len must be a positive integer"):
        from_ids(torch.arange(100), n_samples=1, seq_len=0)


def test_text_file_uses_the_finetunes_tokenizer(tmp_path, llama_pair):
    text = _text(300)
    f = tmp_path / "calib.txt"
    f.write_text(text)
    data = load_calibration(f, llama_pair / "ft", n_samples=4, seq_len=16, seed=0)
    want = _tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert data.ids.shape == (4, 16)
    stream = torch.tensor(want)
    for row in data.ids:
        hits = [s for s in range(len(want) - 15) if torch.equal(stream[s:s + 16], row)]
        assert hits, "window is not a slice of the tokenized text"
    d = data.describe()
    assert d["data"] == "calib.txt" and d["sha256"] == hashlib.sha256(text.encode()).hexdigest()
    assert d["n_samples"] == 4 and d["seq_len"] == 16 and d["tokens"] == 300


# -- distillation -----------------------------------------------------------------------------------
def _student(llama_pair, delta):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "base", dtype=torch.float32)
    df = deltacomp.load_delta(delta)
    names = build_student(model, df)
    return model, df, names


@pytest.mark.parametrize("method", ["bitdelta", "bitdelta:scale=row:masks=2"])
def test_student_trains_only_the_scales(tmp_path, llama_pair, method):
    delta = tmp_path / "ft.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", delta, method=method, progress=False)
    model, df, names = _student(llama_pair, delta)
    assert len(names) == 14  # 7 projections x 2 layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".scales." in n for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    # the student's initial weights are exactly base + decoded delta (what reconstruct gives)
    rec = transformers.AutoModelForCausalLM.from_pretrained(
        deltacomp.reconstruct(llama_pair / "base", delta, tmp_path / "rec", progress=False), dtype=torch.float32)
    ids = from_ids(torch.randint(0, VOCAB, (400,), generator=torch.Generator().manual_seed(0)), 6, 16).ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, rec(input_ids=ids).logits, rtol=1e-4, atol=1e-5)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "ft", dtype=torch.float32)
    cache = teacher_logits(teacher, ids, 3, 1 << 30, progress=False)
    scales_before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    hist = train_scales(model, ids, cache.data, steps=25, lr=2e-3, batch_size=3, loss="mse")
    assert len(hist) == 25
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), f"{n} changed"
            assert p.grad is None, f"{n} got a gradient"
    scales_after = [p.detach() for p in model.parameters() if p.requires_grad]
    assert any(not torch.equal(a, b) for a, b in zip(scales_before, scales_after))
    for m in model.modules():  # signs buffers are exactly the file's signs
        if isinstance(m, SignScaledLinear):
            assert set(torch.unique(m.sign_0).tolist()) <= {-1.0, 1.0}


@pytest.mark.parametrize("method,loss", [("bitdelta", "mse"), ("bitdelta:scale=row:masks=2", "kl")])
def test_distill_scales_writes_a_better_file(tmp_path, llama_pair, method, loss):
    delta = tmp_path / "ft.delta.safetensors"
    out = tmp_path / "ft.distilled.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", delta, method=method, progress=False)
    text = tmp_path / "train.txt"
    text.write_text(_text(600, seed=5))
    calib = from_file(text, llama_pair / "ft", n_samples=12, seq_len=16)
    rep = distill_scales(llama_pair / "base", llama_pair / "ft", delta, out, calib, steps=40, lr=2e-3,
                         batch_size=4, loss=loss, progress=False)
    assert rep["loss_after"] < rep["loss_before"]
    assert rep["steps"] == 40 and len(rep["loss_history"]) == 40 and rep["seconds_per_step"] > 0

    old, new = deltacomp.load_delta(delta), deltacomp.load_delta(out)
    new.verify()
    assert list(old.params) == list(new.params)
    changed = 0
    for name, info in old.params.items():
        ni = new.params[name]
        assert (ni.codec, ni.shape, ni.dtype, ni.settings, ni.fields) == (info.codec, info.shape, info.dtype,
                                                                          info.settings, info.fields)
        if info.tied_to:
            continue
        a, b = old.raw_tensors(name), new.raw_tensors(name)
        for f in a:
            if f.startswith("scale") and info.codec == "bitdelta":
                assert a[f].shape == b[f].shape and a[f].dtype == b[f].dtype
                changed += not torch.equal(a[f], b[f])
            else:  # signs and every other tensor: bit-identical
                assert torch.equal(a[f], b[f]), f"{name}.{f} changed"
    assert changed > 0
    for key in ("base", "files"):
        assert new.metadata[key] == old.metadata[key]
    cal = new.source["calibration"][-1]
    assert cal["data"]["data"] == "train.txt" and cal["data"]["sha256"] == calib.source["sha256"]
    assert cal["data"]["n_samples"] == 12 and cal["data"]["seq_len"] == 16
    assert (cal["steps"], cal["lr"], cal["loss"]) == (40, 2e-3, loss)
    assert cal["loss_after"] == rep["loss_after"] and new.source["method"] == old.source["method"]

    # the distilled file reconstructs, and its model scores the loss the report says
    rec_dir = deltacomp.reconstruct(llama_pair / "base", out, tmp_path / "rec", progress=False)
    rec = transformers.AutoModelForCausalLM.from_pretrained(rec_dir, dtype=torch.float32)
    teacher = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "ft", dtype=torch.float32)
    with torch.no_grad():
        got = float(_loss(rec(input_ids=calib.ids).logits, teacher(input_ids=calib.ids).logits.half(), loss))
    assert got == pytest.approx(rep["loss_after"], rel=1e-3)


def test_distill_that_raises_the_loss_keeps_the_data_free_scales(tmp_path, llama_pair):
    """A learning rate far too large for the data: training ends at a higher loss than it started, so the
    file keeps its data-free scales (bit-identical tensors) and says so."""
    delta = tmp_path / "ft.delta.safetensors"
    out = tmp_path / "ft.distilled.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", delta, method="bitdelta", progress=False)
    text = tmp_path / "train.txt"
    text.write_text(_text(600, seed=5))
    calib = from_file(text, llama_pair / "ft", n_samples=8, seq_len=16)
    rep = distill_scales(llama_pair / "base", llama_pair / "ft", delta, out, calib, steps=6, lr=50.0,
                         batch_size=4, progress=False)
    assert rep["loss_after"] > rep["loss_before"] and rep["kept_data_free_scales"]
    old, new = deltacomp.load_delta(delta), deltacomp.load_delta(out)
    for name, info in old.params.items():
        if not info.tied_to:
            a, b = old.raw_tensors(name), new.raw_tensors(name)
            assert all(torch.equal(a[f], b[f]) for f in a), name
    assert new.source["calibration"][-1]["kept_data_free_scales"] is True


def test_distill_refuses_bad_settings(tmp_path, llama_pair):
    delta = tmp_path / "ft.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", delta, method="bitdelta", progress=False)
    ids = CalibData(torch.zeros(2, 8, dtype=torch.int64))
    with pytest.raises(SettingsError, match="loss 'l1' must be one of mse, kl"):
        distill_scales(llama_pair / "base", llama_pair / "ft", delta, tmp_path / "o.delta.safetensors", ids, loss="l1")
    raw = tmp_path / "raw.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", raw, method="raw", progress=False)
    with pytest.raises(SettingsError, match=r"calibration \(distill\): the delta has no bitdelta tensors to distill"):
        distill_scales(llama_pair / "base", llama_pair / "ft", raw, tmp_path / "o.delta.safetensors", ids,
                       steps=1, progress=False)
    assert not (tmp_path / "o.delta.safetensors").exists()


def test_teacher_cache_on_disk_matches_memory(llama_pair):
    teacher = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "ft", dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (5, 8), generator=torch.Generator().manual_seed(1))
    mem = teacher_logits(teacher, ids, 2, 1 << 30, progress=False)
    disk = teacher_logits(teacher, ids, 2, 0, progress=False)
    assert disk.on_disk and not mem.on_disk
    assert torch.equal(mem.data, disk.data)
    mem.close()
    disk.close()


def test_sign_scaled_linear_matches_reference():
    torch.manual_seed(0)
    lin = torch.nn.Linear(13, 5, bias=True)
    delta = torch.randn(5, 13)
    packed = ops.pack_signs(delta)
    signs = ops.unpack_signs(packed, 13)
    scale = delta.abs().mean(1)
    m = SignScaledLinear(lin, [signs], [scale])
    x = torch.randn(3, 13, dtype=torch.float64)
    want = x @ (lin.weight.double() + scale.double()[:, None] * signs.double()).T + lin.bias.double()
    torch.testing.assert_close(m(x.float()).double(), want, rtol=1e-5, atol=1e-6)
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["scales.0"]


# -- GPTQ for svd-mixed -----------------------------------------------------------------------------
def _layer(seed: int, n: int = 80, k: int = 96, samples: int = 1500):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) * torch.logspace(0, -2, k)  # correlated, anisotropic inputs
    x = torch.randn(samples, k, generator=g) @ mix
    delta = torch.randn(n, 8, generator=g) @ torch.randn(8, k, generator=g) * 0.1 + torch.randn(n, k, generator=g) * 0.01
    return x, delta


def test_gptq_with_identity_hessian_is_rtn():
    from deltacomp.codecs.svd_mixed.gptq import gptq_rows
    from deltacomp.quant.rtn import quantize

    w = torch.randn(12, 70, generator=torch.Generator().manual_seed(0))
    alloc = [(8, 2), (3, 4), (2, 6)]
    i = 0
    for (b, c), got in zip(alloc, gptq_rows(w, torch.eye(70), alloc, group_size=32)):
        for a, want in zip(got, quantize(w[i:i + c], b, 32)):
            assert torch.equal(a, want)
        i += c


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape,groups,gs", [((80, 96), "8:2+3:8+2:16", 32), ((37, 53), "4:3+2:9", 16)])
def test_gptq_beats_rtn_at_the_same_bytes(act_order, shape, groups, gs):
    from deltacomp.codecs.svd_mixed.gptq import encode_gptq, output_error
    from deltacomp.codecs.svd_mixed import SvdMixedCodec

    x, delta = _layer(1, *shape)
    h = x.double().T @ x.double()
    codec = SvdMixedCodec()
    rtn = codec.encode(delta, groups=groups, group_size=gs)
    enc = encode_gptq(delta, h, groups=groups, group_size=gs, act_order=act_order)
    assert enc.nbytes == rtn.nbytes and set(enc.tensors) == set(rtn.tensors)
    for f, t in rtn.tensors.items():
        assert enc.tensors[f].shape == t.shape and enc.tensors[f].dtype == t.dtype, f
    err_gptq = output_error(delta, codec.decode(enc), h)
    err_rtn = output_error(delta, codec.decode(rtn), h)
    assert err_gptq < 0.9 * err_rtn
    # the codec's own matmul agrees with the dense decode (the format is svd-mixed's, unchanged)
    torch.testing.assert_close(codec.matmul(x[:5], enc), x[:5] @ codec.decode(enc).T, rtol=1e-4, atol=1e-5)


def test_whitened_svd_is_the_best_rank_r_in_output_error():
    """Eckart-Young in the whitened space: at every rank the whitened truncation has the lowest output
    error trace(E H E^T) (damp=0), the factors reproduce it (unit U columns and V rows), and for H = I
    it is the plain truncated SVD."""
    from deltacomp.codecs.svd_mixed.gptq import output_error, whitened_svd
    from deltacomp.codecs.lowrank import truncated_svd

    x, delta = _layer(4, 40, 56)
    h = x.double().T @ x.double()
    for r in (1, 5, 20):
        u, s, v, big_s = whitened_svd(delta, h, r, damp=0.0)
        assert u.shape == (40, r) and s.shape == (r,) and v.shape == (r, 56)
        torch.testing.assert_close(torch.linalg.vector_norm(u, dim=0), torch.ones(r))
        torch.testing.assert_close(torch.linalg.vector_norm(v, dim=1), torch.ones(r))
        assert torch.all(big_s[:-1] >= big_s[1:])
        approx = (u * s) @ v
        pu, ps, pv = truncated_svd(delta, r, "exact")
        plain = (pu * ps) @ pv
        assert output_error(delta, approx, h) < 0.9 * output_error(delta, plain, h)
        # the whitened singular values are the output error's spectrum: the dropped part is what remains
        rest = torch.linalg.svdvals(delta.double() @ torch.linalg.cholesky(h))[r:]
        assert output_error(delta, approx, h) == pytest.approx(float((rest ** 2).sum()), rel=1e-3)
    u, s, v, _ = whitened_svd(delta, torch.eye(56, dtype=torch.float64), 6)
    pu, ps, pv = truncated_svd(delta, 6, "exact")
    torch.testing.assert_close((u * s) @ v, (pu * ps) @ pv, rtol=1e-4, atol=1e-5)


def test_gptq_whitened_optimal_beats_plain_gptq_at_the_same_budget():
    from deltacomp.codecs.svd_mixed.gptq import encode_gptq, output_error
    from deltacomp.codecs.svd_mixed import SvdMixedCodec

    x, delta = _layer(5)
    h = x.double().T @ x.double()
    codec = SvdMixedCodec()
    plain = encode_gptq(delta, h, ratio=8, group_size=32)
    white = encode_gptq(delta, h, ratio=8, group_size=32, whiten=True, allocation="optimal")
    assert white.nbytes <= SvdMixedCodec.budget((80, 96), codec.resolve_settings({"ratio": 8}))
    assert output_error(delta, codec.decode(white), h) < output_error(delta, codec.decode(plain), h)


def test_gptq_zero_delta_and_dead_inputs():
    from deltacomp.codecs.svd_mixed.gptq import encode_gptq
    from deltacomp.codecs.svd_mixed import SvdMixedCodec

    x, delta = _layer(2)
    x[:, 5] = 0  # an input that never fires
    h = x.double().T @ x.double()
    codec = SvdMixedCodec()
    enc = encode_gptq(delta, h, groups="3:4+2:8", group_size=32)
    assert torch.isfinite(codec.decode(enc)).all()
    zero = encode_gptq(torch.zeros(80, 96), h, groups="3:4", group_size=32)
    assert torch.equal(codec.decode(zero), torch.zeros(80, 96))
    with pytest.raises(ValueError, match="Hessian has shape"):
        encode_gptq(delta, h[:5, :5], groups="3:4")


@pytest.mark.parametrize("whiten", [False, True])
def test_layerwise_gptq_keeps_format_and_lowers_error(tmp_path, llama_pair, whiten):
    from deltacomp.calibrate import calibrate_layerwise

    rtn = tmp_path / "rtn.delta.safetensors"
    out = tmp_path / "gptq.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", rtn, method="svd-mixed:groups=4:3+2:6:group_size=16",
                       progress=False)
    calib = from_ids(torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(3)), 24, 32)
    rep = calibrate_layerwise(llama_pair / "base", llama_pair / "ft", rtn, out, calib, act_order=True, whiten=whiten,
                              progress=False)
    assert rep["tensors"] == 14 and rep["output_error_calibrated"] < rep["output_error_data_free"]
    old, new = deltacomp.load_delta(rtn), deltacomp.load_delta(out)
    new.verify()
    assert new.nbytes - old.nbytes < 2048  # same tensors; only the metadata grows
    for name, info in old.params.items():
        ni = new.params[name]
        assert (ni.codec, ni.shape, ni.fields, ni.nbytes) == (info.codec, info.shape, info.fields, info.nbytes)
        if info.codec != "svd-mixed":
            assert ni.checksum == info.checksum
        else:
            assert ni.settings["alloc"] == info.settings["alloc"]
    assert [c["method"] for c in new.source["calibration"]] == ["layerwise"]
    assert new.source["calibration"][0]["whiten"] is whiten
    # the reconstructed model is closer to the fine-tune on the calibration data than the RTN one
    ft = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "ft", dtype=torch.float32)
    with torch.no_grad():
        teacher = ft(input_ids=calib.ids).logits
        kl = {}
        for tag, path in (("rtn", rtn), ("gptq", out)):
            m = transformers.AutoModelForCausalLM.from_pretrained(llama_pair / "base", dtype=torch.float32)
            deltacomp.apply_delta_(m, path)
            kl[tag] = float(_loss(m(input_ids=calib.ids).logits, teacher, "kl"))
    assert kl["gptq"] < kl["rtn"]


@pytest.mark.parametrize("per_row", [False, True])
def test_ternary_ls_scale_is_the_output_least_squares_fit(per_row):
    from deltacomp.codecs.ternary import ternary_ls_scale
    from deltacomp.codecs.svd_mixed.gptq import output_error
    from deltacomp.codecs.ternary import TernaryCodec

    x, delta = _layer(6, 30, 45)
    h = x.double().T @ x.double()
    codec = TernaryCodec()
    enc = codec.encode(delta, density=0.2, per_row=per_row)
    fit = ternary_ls_scale(delta, enc, h)
    assert set(fit.tensors) == set(enc.tensors) and fit.nbytes == enc.nbytes
    for f, t in enc.tensors.items():
        if f != "scale":
            assert torch.equal(fit.tensors[f], t), f
    assert fit.tensors["scale"].shape == enc.tensors["scale"].shape and fit.tensors["scale"].dtype == torch.float32
    best = output_error(delta, codec.decode(fit), h)
    assert best < output_error(delta, codec.decode(enc), h)
    # the optimum: nudging any scale up or down raises the output error
    for sign in (1.01, 0.99):
        moved = dict(fit.tensors, scale=fit.tensors["scale"] * sign)
        nudged = type(fit)(fit.codec, fit.shape, moved, fit.params)
        assert output_error(delta, codec.decode(nudged), h) > best
    # a row whose inputs never fire keeps its stored scale (nothing to fit)
    zero_h = torch.zeros_like(h)
    kept = ternary_ls_scale(delta, enc, zero_h)
    assert torch.equal(kept.tensors["scale"], enc.tensors["scale"])


def test_layerwise_ternary_changes_only_scales(tmp_path, llama_pair):
    from deltacomp.calibrate import calibrate_layerwise

    src = tmp_path / "t.delta.safetensors"
    out = tmp_path / "tc.delta.safetensors"
    deltacomp.compress(llama_pair / "base", llama_pair / "ft", src, method="ternary:density=0.1:per_row=true",
                       progress=False)
    calib = from_ids(torch.randint(0, VOCAB, (2000,), generator=torch.Generator().manual_seed(4)), 24, 32)
    rep = calibrate_layerwise(llama_pair / "base", llama_pair / "ft", src, out, calib, progress=False)
    assert rep["tensors"] == 14 and rep["output_error_calibrated"] < rep["output_error_data_free"]
    old, new = deltacomp.load_delta(src), deltacomp.load_delta(out)
    new.verify()
    changed = 0
    for name, info in old.params.items():
        a, b = old.raw_tensors(name), new.raw_tensors(name)
        for f in a:
            if f == "scale" and info.codec == "ternary":
                changed += not torch.equal(a[f], b[f])
            else:
                assert torch.equal(a[f], b[f]), f"{name}.{f} changed"
    assert changed == 14


def test_compress_with_calib_end_to_end(tmp_path, llama_pair):
    """`compress --calib` distills bitdelta scales, runs GPTQ on svd-mixed tensors, then tunes them end to
    end; stages leave nothing."""
    import deltacomp
    from deltacomp.cli import main

    base, ft = llama_pair / "base", llama_pair / "ft"
    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    out = tmp_path / "c.delta.safetensors"
    s = deltacomp.compress(base, ft, out, method="bitdelta", rules=["mlp\\.=svd-mixed:ratio=4"], calibration=CalibrationOptions(text, samples=4, seq_len=16, steps=3, tune_steps=2),
                           progress=False)
    assert set(s["calibration"]) == {"distill", "layerwise", "tune"}
    assert s["calibration"]["distill"]["loss_after"] < s["calibration"]["distill"]["loss_before"]
    src = deltacomp.load_delta(out).source
    assert [c["method"] for c in src["calibration"]] == ["distill", "layerwise", "tune"]  # every step, in order
    assert src["calibration"][1]["whiten"] is True and src["calibration"][1]["allocation"] == "keep"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.delta.safetensors", "calib.txt"]
    # a bad calibration text fails before any work and leaves nothing
    (tmp_path / "short.txt").write_text("too short")
    assert main(["compress", str(base), str(ft), "-o", str(tmp_path / "x.delta.safetensors"),
                 "--calib", str(tmp_path / "short.txt"), "-q"]) == 2
    assert not (tmp_path / "x.delta.safetensors").exists()
    with pytest.raises(deltacomp.SettingsError, match="no tensor uses a codec that calibrates"):
        deltacomp.compress(base, ft, tmp_path / "t.delta.safetensors", method="raw", calibration=CalibrationOptions(text, samples=4, seq_len=16), progress=False)
    assert not list(tmp_path.glob(".t.delta*"))


def test_sweep_with_calibrated_variants(tmp_path, llama_pair):
    from deltacomp.eval.sweep import sweep

    text = tmp_path / "calib.txt"
    text.write_text(_text(3000, seed=5))
    res = sweep(llama_pair / "base", llama_pair / "ft", ["ternary", "raw"], [8], tmp_path / "sw",
                _text(600, seed=9), ctx=32, progress=False, plot=False,
                calibration=CalibrationOptions(str(text), samples=4, seq_len=16, steps=5))
    methods = [r["method"] for r in res["deltas"]]
    assert methods == ["ternary", "ternary+calib", "raw"]
    assert [s["method"] for s in res["skipped"]] == ["raw+calib"]
    import deltacomp

    rows = {r["method"]: r for r in res["deltas"]}
    stored = {m: deltacomp.summarize(deltacomp.load_delta(rows[m]["path"]))["compressed_tensors"]["nbytes"]
              for m in ("ternary", "ternary+calib")}
    assert stored["ternary+calib"] == stored["ternary"]  # same support and signs, new scales: same bytes
