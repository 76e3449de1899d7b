"""Tiny random base/fine-tune pairs of many transformers families, saved as HF folders with the bundled
SmolLM2 tokenizer (build the bundled pair first: python -m deltacomp.zoo shakespeare).

    python scripts/families/make_pairs.py /tmp/families [FAMILY ...]
"""
import os
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

TOK = Path(os.environ.get("DELTACOMP_CACHE", Path.home() / ".cache/deltacomp")) / "zoo/smollm2-135m-instruct"
V = 49152
COMMON = dict(vocab_size=V, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, head_dim=16)
ARCHS = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "phi3": {},
    "phi": {}, "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=512),
    "gpt_neox": {}, "opt": dict(ffn_dim=160, word_embed_proj_dim=64),
    "falcon": dict(head_dim=None), "bloom": dict(n_layer=2, n_head=4), "starcoder2": {}, "olmo2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64),
    "granite": {}, "stablelm": {}, "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
}

def build(arch, out: Path, tie=None):
    kw = {k: v for k, v in {**COMMON, **ARCHS[arch]}.items() if v is not None}  # None: not a setting here
    if tie is not None:
        kw["tie_word_embeddings"] = tie
    cfg = AutoConfig.for_model(arch, **kw)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(cfg).float()
    ft = AutoModelForCausalLM.from_config(cfg).float()
    ft.load_state_dict(base.state_dict())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.dim() >= 2 and "embed" not in name and "wte" not in name:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    for m, d in ((base, out / "base"), (ft, out / "ft")):
        m.save_pretrained(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOK / f, d / f)

if __name__ == "__main__":
    root = Path(sys.argv[1])
    for arch in (sys.argv[2:] or ARCHS):
        try:
            build(arch, root / arch)
            print("OK", arch)
        except Exception as e:
            print("BUILD-FAIL", arch, type(e).__name__, str(e)[:200])
