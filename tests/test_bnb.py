"""Serving deltas over a bitsandbytes-quantized base (one quantized base, many deltas): the base is
loaded 8-bit (Linear8bitLt) or 4-bit NF4 (Linear4bit) by transformers' BitsAndBytesConfig
(``deltacomp.serve.load_base``), on CPU. Patched logits equal the quantized base's own layer outputs
plus ``x @ decoded_delta^T`` (a reference built from forward hooks and dense decoded deltas, not from
deltacomp.nn), multi-tenant rows equal their single-delta model's, unpatch gives the quantized base
back exactly, float tensors are still fingerprinted, and the 8-bit patched model stays near the float
fine-tune."""
from __future__ import annotations

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import deltacomp  # noqa: E402
from conftest import VOCAB, finetune_of, llama_config, llama_tensors, word_tokenizer, write_folder  # noqa: E402
from deltacomp import serve as dnn  # noqa: E402
from deltacomp.errors import BaseMismatchError, DeltacompError  # noqa: E402
from deltacomp.serve import generate, load_base  # noqa: E402

QUANT = (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)
# the four compressed codecs; lowrank also sends one projection raw (a dense term over a quantized layer)
METHODS = {"bit": ("bitdelta", ()), "svd": ("svd-mixed", ()), "tern": ("ternary:density=0.3", ()),
           "low": ("lowrank:rank=4", (r"down_proj=raw",))}
IDS = torch.tensor([[1, 5, 9, 13, 40, 77, 8], [1, 90, 4, 33, 33, 12, 6]])


@pytest.fixture(autouse=True)
def _no_bnb_bf16_packing(monkeypatch):
    """bitsandbytes 0.50.2 repacks 4-bit weights for CPUs with AVX-512 BF16 on the first forward, and that
    repacking needs in_features to be a multiple of its block size (64): the tiny test model's down_proj
    (K = 96) fails there with "shape '[64, 1]' is invalid". Real layers are multiples of 64; the test
    keeps its small shapes and the plain 4-bit path on every CPU."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: False)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """fp32 tiny Llama base (tied embeddings); fine-tune A changes every tensor (layers, norms,
    embeddings), B only the layers; one delta per codec (A for bit/svd/tern, B for low)."""
    tmp = tmp_path_factory.mktemp("bnb")
    base = llama_tensors(0, dtype=torch.float32)
    write_folder(tmp / "base", base, llama_config())
    word_tokenizer(VOCAB).save_pretrained(tmp / "base")
    write_folder(tmp / "ftA", finetune_of(base, 1, scale=0.02, touch=lambda n: True), llama_config())
    write_folder(tmp / "ftB", finetune_of(base, 2, scale=0.02), llama_config())
    write_folder(tmp / "other", llama_tensors(5, dtype=torch.float32), llama_config())  # not the base
    out = {"dir": tmp}
    for key, (method, rules) in METHODS.items():
        path = tmp / f"{key}.delta.safetensors"
        deltacomp.compress(tmp / "base", tmp / ("ftB" if key == "low" else "ftA"), path, method=method,
                           rules=rules, progress=False)
        out[key] = path
    return out


def _quantized(path, bits):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MatMul8bitLt: fp32 inputs cast to fp16 on CPU
        return load_base(path, torch.float32, bits)


def _logits(model, ids):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(ids).logits


def _reference(model, delta):
    """``model`` (quantized, from the base) turned into the reference in place: every quantized layer
    with a delta gets a forward hook adding ``x @ decoded_delta^T`` (float64, dense) to the layer's own
    output; every other tensor is applied in place."""
    df = deltacomp.load_delta(delta)
    quantized = set()
    for mname, mod in model.named_modules():
        if isinstance(mod, QUANT) and f"{mname}.weight" in df.params:
            quantized.add(f"{mname}.weight")
            d = df.decode(f"{mname}.weight").double()
            mod.register_forward_hook(lambda m, args, out, d=d: out + (args[0].double() @ d.T).to(out.dtype))
    assert len(quantized) == 14  # 7 projections x 2 layers; the tied head stays float
    deltacomp.apply_delta_(model, df, names=[n for n in df.params if n not in quantized])
    return model


def _quant_wrapped(model, cls=dnn.DeltaLinear):
    return [m for m in model.modules() if isinstance(m, cls) and isinstance(m.base, QUANT)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("key", list(METHODS))
def test_patched_quantized_equals_base_output_plus_delta(pair, key, bits, monkeypatch):
    # the exact kernels (the one-row int8 lookup tables of svd-mixed and bitdelta on AVX2 are inexact, see
    # test_ops_lowrank_tl.py and test_ops_sign_tl.py)
    monkeypatch.setenv("DELTACOMP_LOWRANK_KERNEL", "exact")
    monkeypatch.setenv("DELTACOMP_SIGN_KERNEL", "exact")
    base_logits = _logits(_quantized(pair["dir"] / "base", bits), IDS)
    with pytest.warns(UserWarning, match="stored quantized .*fingerprint cannot be checked"):
        model = dnn.patch_model(_quantized(pair["dir"] / "base", bits), pair[key])
    assert len(_quant_wrapped(model)) == 14 and not any(m.fused for m in _quant_wrapped(model))
    got = _logits(model, IDS)
    want = _logits(_reference(_quantized(pair["dir"] / "base", bits), pair[key]), IDS)
    assert (got - base_logits).abs().max() > 100 * (got - want).abs().max()  # the delta is really there
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(_logits(model, IDS[1:, :1]), want[1:, :1], rtol=1e-4, atol=1e-4)  # decode shape


@pytest.mark.parametrize("bits", [8, 4])
def test_multi_tenant_rows_over_quantized_base(pair, bits):
    keys = list(METHODS)
    with pytest.warns(UserWarning, match="stored quantized"):
        model = dnn.patch_model_multi(_quantized(pair["dir"] / "base", bits), [pair[k] for k in keys])
    assert len(_quant_wrapped(model, dnn.MultiDeltaLinear)) == 14
    assert any(isinstance(m, dnn.MultiDeltaModule) for m in model.modules())  # A's norms and embeddings
    index = [0, 1, -1, 2, 3, 0]
    ids = torch.randint(4, VOCAB, (len(index), 6), generator=torch.Generator().manual_seed(0))
    dnn.set_delta_index(model, index)
    got = _logits(model, ids)
    base = _quantized(pair["dir"] / "base", bits)
    singles = {}
    for t, k in enumerate(keys):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            singles[t] = dnn.patch_model(_quantized(pair["dir"] / "base", bits), pair[k])
    for row, t in enumerate(index):
        want = _logits(base if t < 0 else singles[t], ids[row:row + 1])
        torch.testing.assert_close(got[row:row + 1], want, rtol=1e-4, atol=1e-4, msg=f"row {row} (delta {t})")


def test_unpatch_restores_quantized_base(pair):
    model = _quantized(pair["dir"] / "base", 4)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QUANT)}
    base_logits = _logits(model, IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dnn.patch_model(model, pair["bit"])  # A: norms and embeddings applied in place, restored by unpatch
        assert not torch.equal(_logits(model, IDS), base_logits)
        dnn.unpatch_model(model)
        assert {n: m for n, m in model.named_modules() if isinstance(m, QUANT)} == layers  # the same objects
        assert torch.equal(_logits(model, IDS), base_logits)
        dnn.patch_model_multi(model, [pair["bit"], pair["low"]])
        dnn.unpatch_model(model)
    assert torch.equal(_logits(model, IDS), base_logits)


def test_float_tensors_still_fingerprinted(pair):
    """Quantized weights are skipped (one warning) but the float embeddings of another base are caught."""
    with pytest.warns(UserWarning, match="stored quantized"), pytest.raises(BaseMismatchError,
                                                                             match="embed_tokens.*fingerprint"):
        dnn.patch_model(_quantized(pair["dir"] / "other", 8), pair["bit"])
    with warnings.catch_warnings(), pytest.raises(BaseMismatchError, match="embed_tokens.*fingerprint"):
        warnings.simplefilter("ignore")
        dnn.patch_model_multi(_quantized(pair["dir"] / "other", 4), [pair["bit"]])


def test_8bit_patched_near_float_finetune(pair):
    """Loose check against the float fine-tune: LLM.int8 rounds the base weights (per-row absmax int8)
    and, on CPU, casts activations to fp16, so the patched 8-bit model can only match the float model to
    int8 precision. Bound: its error is at most 3x the 8-bit base's own error against the float base
    (the delta term itself is fp32), and far below how much the fine-tune moved the logits."""
    f32 = lambda p: transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()  # noqa: E731
    ft = f32(pair["dir"] / "base")
    ft.load_state_dict(dict(deltacomp.iter_reconstructed(pair["dir"] / "base", pair["bit"])), strict=False)
    ft_logits, base_logits = _logits(ft, IDS), _logits(f32(pair["dir"] / "base"), IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patched = _logits(dnn.patch_model(_quantized(pair["dir"] / "base", 8), pair["bit"]), IDS)
    q_err = float((_logits(_quantized(pair["dir"] / "base", 8), IDS) - base_logits).abs().max())
    err = float((patched - ft_logits).abs().max())
    moved = float((ft_logits - base_logits).abs().max())
    assert err <= 3 * q_err and err < 0.1 * moved, (err, q_err, moved)


def test_cli_generate_base_bits(pair, capsys):
    from deltacomp.cli import main

    prompts, idx = ["w5 w9 w13", "w40 w77"], [1, -1]
    argv = ["generate", str(pair["dir"] / "base"), "--delta", str(pair["bit"]), "--delta", str(pair["low"]),
            "--base-bits", "4", "--max-new-tokens", "4"]
    for p, i in zip(prompts, idx):
        argv += ["--prompt", p, "--prompt-delta", str(i)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(argv) == 0
        out = capsys.readouterr().out.splitlines()
        # the same batch through a base loaded 4-bit by hand and passed in
        want = generate(pair["dir"] / "base", [pair["bit"], pair["low"]], prompts, 4, prompt_delta=idx,
                        model=_quantized(pair["dir"] / "base", 4))
    assert out == [f"[{r}] delta {i}: {p!r} -> {w!r}" for r, (p, i, w) in enumerate(zip(prompts, idx, want))]
    with pytest.raises(SystemExit):
        main(argv[:2] + ["--prompt", "w5", "--base-bits", "3"])
    assert "invalid choice" in capsys.readouterr().err


def test_refuses_added_rows_on_quantized_head(tmp_path):
    """A quantized output head cannot grow rows (added tokens): patch_model refuses before changing
    anything, naming the layer and the fix."""
    base = llama_tensors(0, tied=False, dtype=torch.float32)
    ft = finetune_of(base, 1, scale=0.02, touch=lambda n: True)
    g = torch.Generator().manual_seed(3)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        ft[n] = torch.cat([ft[n], torch.randn(4, ft[n].shape[1], generator=g) * 0.05])
    write_folder(tmp_path / "base", base, llama_config(tied=False))
    write_folder(tmp_path / "ft", ft, llama_config(vocab=VOCAB + 4, tied=False))
    delta = tmp_path / "ft.delta.safetensors"
    deltacomp.compress(tmp_path / "base", tmp_path / "ft", delta, progress=False)
    quant = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                            bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=[])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base"), dtype=torch.float32,
                                                              quantization_config=quant).eval()
    assert isinstance(model.lm_head, bnb.nn.Linear4bit)
    before = _logits(model, IDS)
    with warnings.catch_warnings(), pytest.raises(DeltacompError, match=r"lm_head.weight is stored quantized and "
                                                  r"its delta \(raw, added rows\) cannot be served over it"):
        warnings.simplefilter("ignore")
        dnn.patch_model(model, delta)
    assert torch.equal(_logits(model, IDS), before) and not hasattr(model, "_deltacomp_patch")
