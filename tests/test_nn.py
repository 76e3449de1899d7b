"""Serving deltas on a model loaded from the base (deltacomp.nn, deltacomp.serve): patched logits and
greedy generations equal the reconstructed fine-tune's, multi-tenant rows equal their single-delta
model's, unpatch restores the base, and misuse raises."""
from __future__ import annotations

import pytest
import torch

import deltacomp
from deltacomp import serve as dnn
from deltacomp.errors import BaseMismatchError, DeltacompError
from deltacomp.serve import generate

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import word_tokenizer, load_causal_lm  # noqa: E402

VOCAB = 96
METHODS = {"bit": "bitdelta", "tern": "ternary:density=0.3", "svd": "svd-mixed", "bit2": "bitdelta:masks=2",
           "bitrow": "bitdelta:scale=row"}


def _tiny_llama(seed: int, dtype=torch.float32):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _finetune(seed: int, touch, dtype=torch.float32):
    ft = _tiny_llama(0, dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if touch(n):
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))
    return ft


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """fp32 base; fine-tune A changes layers, norms and the (tied) embeddings, B only the layers; deltas
    of A with several codecs and of B with per-row BitDelta scales; their reconstructed folders."""
    tmp = tmp_path_factory.mktemp("serve")
    _tiny_llama(0).save_pretrained(tmp / "base")
    word_tokenizer(VOCAB).save_pretrained(tmp / "base")
    _finetune(1, lambda n: True).save_pretrained(tmp / "ftA")
    _finetune(2, lambda n: "layers" in n and "norm" not in n).save_pretrained(tmp / "ftB")
    out = {"dir": tmp}
    for key, method in METHODS.items():
        ft = "ftB" if key == "bitrow" else "ftA"
        path = tmp / f"{key}.delta.safetensors"
        deltacomp.compress(tmp / "base", tmp / ft, path, method=method, progress=False)
        out[key] = path
        out[f"rec_{key}"] = deltacomp.reconstruct(tmp / "base", path, tmp / f"rec_{key}", progress=False)
    return out


def _load(path, dtype=torch.float32):
    return load_causal_lm(path, dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[1, 5, 9, 13, 40, 77, 8], [1, 90, 4, 33, 33, 12, 6]])


@pytest.mark.parametrize("key", ["bit", "tern", "svd", "bit2", "bitrow"])
def test_patched_logits_equal_reconstructed(pair, key, monkeypatch):
    # the exact kernels: at one row on AVX2, svd-mixed's and bitdelta's default int8 lookup tables are
    # inexact (their error is tested in test_ops_lowrank_tl.py and test_ops_sign_tl.py; the decode shape
    # with them is checked below)
    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "exact")
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "exact")
    model = dnn.patch_model(_load(pair["dir"] / "base"), pair[key])
    wrapped = [m for m in model.modules() if isinstance(m, dnn.DeltaLinear)]
    assert len(wrapped) == 14  # 7 projections x 2 layers; embeddings and norms applied in place
    want = _logits(_load(pair[f"rec_{key}"]), IDS)
    torch.testing.assert_close(_logits(model, IDS), want, rtol=1e-4, atol=1e-4)
    for row in range(2):  # one row, one token: the decode shape
        torch.testing.assert_close(_logits(model, IDS[row:row + 1, :1]), want[row:row + 1, :1], rtol=1e-4, atol=1e-4)
    monkeypatch.delenv("DELTACOMP_LOWRANK_KERNEL")
    monkeypatch.delenv("DELTACOMP_SIGN_KERNEL")
    model = dnn.patch_model(_load(pair["dir"] / "base"), pair[key])  # the default kernels
    for row in range(2):
        torch.testing.assert_close(_logits(model, IDS[row:row + 1, :1]), want[row:row + 1, :1], rtol=1e-2, atol=1e-2)


def test_fused_and_unfused_agree(pair):
    fused = dnn.patch_model(_load(pair["dir"] / "base"), pair["bit"], fused=True)
    plain = dnn.patch_model(_load(pair["dir"] / "base"), pair["bit"], fused=False)
    assert all(m.fused for m in fused.modules() if isinstance(m, dnn.DeltaLinear))
    torch.testing.assert_close(_logits(fused, IDS), _logits(plain, IDS), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fused=True needs a plain nn.Linear and a delta whose term fuses"):
        dnn.patch_model(_load(pair["dir"] / "base"), pair["tern"], fused=True)


def test_bf16_patched_within_dtype_tolerance(tmp_path):
    """bf16 base (fused kernel widening bf16 weights): the patched model adds the delta unrounded, the
    reconstructed one rounds W to bf16; both stay within bf16 error of the fp32 fine-tune."""
    _tiny_llama(0, torch.bfloat16).save_pretrained(tmp_path / "base")
    _finetune(1, lambda n: "layers" in n, torch.bfloat16).save_pretrained(tmp_path / "ft")
    delta = tmp_path / "ft.delta.safetensors"
    deltacomp.compress(tmp_path / "base", tmp_path / "ft", delta, method="bitdelta", progress=False)
    rec_dir = deltacomp.reconstruct(tmp_path / "base", delta, tmp_path / "rec", progress=False)
    model = dnn.patch_model(_load(tmp_path / "base", torch.bfloat16), delta)
    assert all(m.fused for m in model.modules() if isinstance(m, dnn.DeltaLinear))
    ref = _logits(dnn.patch_model(_load(tmp_path / "base"), delta), IDS)  # fp32 compute, same weights
    scale = float(ref.abs().max())
    for ids in (IDS, IDS[:1, :1]):  # batched (base GEMM + sign_matmul) and one row (fused)
        got = _logits(model, ids).float()
        want = _logits(_load(rec_dir, torch.bfloat16), ids).float()
        err_got = float((got - ref[: ids.shape[0], : ids.shape[1]]).abs().max())
        err_rec = float((want - ref[: ids.shape[0], : ids.shape[1]]).abs().max())
        assert err_got <= 0.03 * scale and err_rec <= 0.03 * scale, (err_got, err_rec, scale)


def test_unpatch_restores_base(pair):
    base_logits = _logits(_load(pair["dir"] / "base"), IDS)
    model = dnn.patch_model(_load(pair["dir"] / "base"), pair["bit"])
    assert not torch.equal(_logits(model, IDS), base_logits)
    dnn.unpatch_model(model)
    assert not any(isinstance(m, dnn.DeltaLinear) for m in model.modules())
    assert torch.equal(_logits(model, IDS), base_logits)
    dnn.patch_model_multi(model, [pair["bit"]])
    dnn.unpatch_model(model)
    assert torch.equal(_logits(model, IDS), base_logits)


def test_multi_tenant_rows_equal_single_delta_models(pair, monkeypatch):
    # the exact kernels: a single delta's decode row would take bitdelta's inexact int8 tables on AVX2,
    # which rows of several tenants never do (test_ops_sign_tl.py checks the tables on the multi path)
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "exact")
    keys = ["bit", "tern", "svd", "bitrow", "bit2"]
    model = dnn.patch_model_multi(_load(pair["dir"] / "base"), [pair[k] for k in keys])
    assert any(isinstance(m, dnn.MultiDeltaModule) for m in model.modules())  # A's norms and embeddings
    index = [0, 1, 2, 3, -1, 4, 3, 0]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (len(index), 6), generator=g)
    dnn.set_delta_index(model, index)
    got = _logits(model, ids)
    base = _load(pair["dir"] / "base")
    singles = {t: dnn.patch_model(_load(pair["dir"] / "base"), pair[k]) for t, k in enumerate(keys)}
    for row, t in enumerate(index):
        want = _logits(base if t < 0 else singles[t], ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-4, atol=1e-4, msg=f"row {row} (delta {t})")
    # decode-shaped step: one token per row
    got1 = _logits(model, ids[:, :1])
    for row, t in enumerate(index):
        torch.testing.assert_close(got1[row:row + 1], _logits(base if t < 0 else singles[t], ids[row:row + 1, :1]),
                                   rtol=1e-4, atol=1e-4)


def _greedy(model, tok, prompts, n):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
    return out[:, enc["input_ids"].shape[1]:]


PROMPTS = ["w5 w9 w13", "w40 w77 w8 w8 w60", "w90"]


@pytest.mark.parametrize("key", ["bit", "tern", "svd"])
def test_greedy_generation_equals_reconstructed(pair, key):
    tok = word_tokenizer(VOCAB)
    model = dnn.patch_model(_load(pair["dir"] / "base"), pair[key])
    rec = _load(pair[f"rec_{key}"])
    for p in PROMPTS:  # batch of one: decode steps take the fused path for bitdelta
        assert torch.equal(_greedy(model, tok, [p], 8), _greedy(rec, tok, [p], 8)), p


def test_generate_multi_tenant_batch(pair):
    keys = ["bit", "tern", "bitrow"]
    prompt_delta = [0, 1, 2, -1]
    prompts = PROMPTS + ["w7 w7"]
    texts = generate(pair["dir"] / "base", [pair[k] for k in keys], prompts, 6, prompt_delta=prompt_delta)
    tok = word_tokenizer(VOCAB)
    for i, t in enumerate(prompt_delta):  # the same padded batch through each reconstructed model
        rec = _load(pair["dir"] / "base") if t < 0 else _load(pair[f"rec_{keys[t]}"])
        want = tok.batch_decode(_greedy(rec, tok, prompts, 6), skip_special_tokens=True)[i]
        assert texts[i] == want, (i, t)
    with pytest.raises(DeltacompError, match="delta index 3 is out of range; 3 delta"):
        generate(pair["dir"] / "base", [pair[k] for k in keys], prompts, 2, prompt_delta=[0, 1, 2, 3])
    with pytest.raises(DeltacompError, match="4 prompts but 2 delta indices"):
        generate(pair["dir"] / "base", [pair["bit"]], prompts, 2, prompt_delta=[0, 0])


def test_misuse_raises(pair):
    model = dnn.patch_model_multi(_load(pair["dir"] / "base"), [pair["bit"], pair["tern"]])
    with pytest.raises(DeltacompError, match="no delta index set"):
        _logits(model, IDS)
    with pytest.raises(DeltacompError, match=r"values must be in \[-1, 2\) \(2 deltas patched"):
        dnn.set_delta_index(model, [0, 2])
    dnn.set_delta_index(model, [0, 1, -1])
    with pytest.raises(DeltacompError, match="the delta index has 3 entries but the batch has 2 rows"):
        _logits(model, IDS)
    with pytest.raises(DeltacompError, match="already patched"):
        dnn.patch_model(model, pair["bit"])
    with pytest.raises(DeltacompError, match="is not patched"):
        dnn.unpatch_model(_load(pair["dir"] / "base"))
    other = _tiny_llama(5)  # not the base the deltas were made from
    with pytest.raises(BaseMismatchError, match="fingerprint mismatch"):
        dnn.patch_model(other, pair["bit"])
    with pytest.raises(BaseMismatchError, match="fingerprint mismatch"):
        dnn.patch_model_multi(_tiny_llama(5), [pair["bit"]])
    with pytest.warns(UserWarning, match="applying anyway"):
        dnn.patch_model(_tiny_llama(5), pair["bit"], force=True)


class _Toy(torch.nn.Module):
    """Biases and a LayerNorm (the Llama pair has neither), odd widths."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(33, 17)
        self.norm = torch.nn.LayerNorm(17)
        self.fc2 = torch.nn.Linear(17, 9, bias=False)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@pytest.mark.parametrize("methods", [("bitdelta", "ternary:density=0.4:per_row=true"),
                                     ("bitdelta:scale=row", "svd-mixed")])
def test_toy_biases_and_norms_single_and_multi(tmp_path, methods):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    base = _Toy()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(tmp_path / "base.safetensors"))
    fts, deltas = [], []
    for i, method in enumerate(methods):
        ft = _Toy()
        ft.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in ft.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        save_file({k: v.contiguous() for k, v in ft.state_dict().items()}, str(tmp_path / f"ft{i}.safetensors"))
        out = tmp_path / f"d{i}.delta.safetensors"
        deltacomp.compress(tmp_path / "base.safetensors", tmp_path / f"ft{i}.safetensors", out, method=method,
                           progress=False)
        rec = _Toy()
        rec.load_state_dict(dict(deltacomp.iter_reconstructed(tmp_path / "base.safetensors", out)))
        fts.append(rec)
        deltas.append(out)
    x = torch.randn(4, 5, 33)
    with torch.no_grad():
        for ft, d in zip(fts, deltas):
            model = _Toy()
            model.load_state_dict(base.state_dict())
            dnn.patch_model(model, d)
            torch.testing.assert_close(model(x), ft(x), rtol=1e-5, atol=1e-5)
        model = _Toy()
        model.load_state_dict(base.state_dict())
        dnn.patch_model_multi(model, deltas)
        assert isinstance(model.norm, dnn.MultiDeltaModule) and isinstance(model.fc1, dnn.MultiDeltaLinear)
        index = [1, -1, 0, 1]
        dnn.set_delta_index(model, index)
        y = model(x)
        for row, t in enumerate(index):
            torch.testing.assert_close(y[row], (base if t < 0 else fts[t])(x[row:row + 1])[0], rtol=1e-5, atol=1e-5)
        for t in (0, 1, -1):  # every row on one delta (the norm runs that delta's weights only) or the base
            dnn.set_delta_index(model, [t] * 4)
            torch.testing.assert_close(model(x), (base if t < 0 else fts[t])(x), rtol=1e-5, atol=1e-5)


def test_cli_generate(pair, capsys):
    from deltacomp.cli import main

    argv = ["generate", str(pair["dir"] / "base"), "--delta", str(pair["bit"]), "--delta", str(pair["tern"]),
            "--prompt", PROMPTS[0], "--prompt-delta", "1", "--prompt", PROMPTS[0], "--prompt-delta", "-1",
            "--max-new-tokens", "4"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    want = generate(pair["dir"] / "base", [pair["bit"], pair["tern"]], [PROMPTS[0]] * 2, 4, prompt_delta=[1, -1])
    assert out == [f"[0] delta 1: {PROMPTS[0]!r} -> {want[0]!r}", f"[1] delta -1: {PROMPTS[0]!r} -> {want[1]!r}"]
    assert main(argv[:4] + ["--prompt", "x", "--prompt-delta", "5"]) == 2
    assert "out of range" in capsys.readouterr().err


def test_multi_delta_module_one_delta_for_every_row():
    # every row on delta 0: the module runs with delta 0's tensors (a copy of it holding them); after
    # .to() the copy holds the moved tensors; a tensor of a submodule goes through functional_call
    norm = torch.nn.LayerNorm(6)
    d = {"weight": torch.randn(6), "bias": torch.randn(6)}
    mod = dnn.MultiDeltaModule(norm, [d, None])
    x = torch.randn(3, 6)
    for t, want in ((0, torch.nn.functional.layer_norm(x, (6,), d["weight"], d["bias"])), (1, norm(x)), (-1, norm(x))):
        mod.delta_index = torch.tensor([t] * 3)
        torch.testing.assert_close(mod(x), want)
    mod.delta_index = torch.tensor([0, 1, 0])
    y = mod(x)
    torch.testing.assert_close(y[1], norm(x[1:2])[0])
    torch.testing.assert_close(y[0], torch.nn.functional.layer_norm(x[0], (6,), d["weight"], d["bias"]))
    mod.to(torch.float64)
    mod.delta_index = torch.tensor([0] * 3)
    y = mod(x.double())
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.nn.functional.layer_norm(x.double(), (6,), d["weight"].double(),
                                                                  d["bias"].double()))
    seq = torch.nn.Sequential(torch.nn.Linear(4, 5))
    w = torch.randn(5, 4)
    nested = dnn.MultiDeltaModule(seq, [{"0.weight": w}])
    nested.delta_index = torch.tensor([0, 0])
    x = torch.randn(2, 4)
    torch.testing.assert_close(nested(x), x @ w.T + seq[0].bias)
    torch.testing.assert_close(seq(x), x @ seq[0].weight.T + seq[0].bias)  # the base module is unchanged
