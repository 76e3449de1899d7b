"""The reconstructed folder is a normal Hugging Face model: transformers loads it and generates."""
from __future__ import annotations

import pytest
import torch

import deltacomp

transformers = pytest.importorskip("transformers")


def _tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)


def _pair_and_delta(tmp_path, edit_ft=lambda ft: None):
    """Save a base and a fine-tune of it (layers perturbed, then ``edit_ft``), compress, reconstruct.
    Returns (base model, delta path, reconstructed model)."""
    base = _tiny_llama(0)
    base.save_pretrained(tmp_path / "base")
    ft = _tiny_llama(0)
    edit_ft(ft)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "layers" in n:
                p.add_(torch.randn_like(p) * 0.02)
    ft.save_pretrained(tmp_path / "ft")
    out = tmp_path / "ft.delta.safetensors"
    deltacomp.compress(tmp_path / "base", tmp_path / "ft", out, progress=False)
    rec = transformers.AutoModelForCausalLM.from_pretrained(
        deltacomp.reconstruct(tmp_path / "base", out, tmp_path / "rec", progress=False), dtype=torch.bfloat16)
    return base, out, rec


def test_reconstructed_model_loads_and_generates(tmp_path):
    base, out, rec = _pair_and_delta(tmp_path)
    df = deltacomp.load_delta(out)
    base_sd = base.state_dict()
    for n, p in rec.named_parameters():
        want = (base_sd[n].float() + df.decode(n).reshape(p.shape)).to(torch.bfloat16)
        assert torch.equal(p.data, want), n
    ids = torch.tensor([[1, 5, 9, 13]])
    gen = rec.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 9)
    # apply_delta_ on a model loaded from the base gives the same logits as the reconstructed folder
    patched = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    deltacomp.apply_delta_(patched, df)
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, rec(ids).logits)


def test_apply_delta_grows_vocabulary_for_added_tokens(tmp_path):
    def add_tokens(ft):
        ft.resize_token_embeddings(100)
        with torch.no_grad():
            ft.model.embed_tokens.weight[96:] = torch.randn(4, 32).to(torch.bfloat16)

    _, out, rec = _pair_and_delta(tmp_path, add_tokens)
    patched = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)
    deltacomp.apply_delta_(patched, out)
    assert patched.model.embed_tokens.weight.shape == (100, 32)
    ids = torch.tensor([[1, 97, 99, 5]])
    with torch.no_grad():
        assert torch.equal(patched(ids).logits, rec(ids).logits)
