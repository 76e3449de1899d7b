"""Tiny random Llama-style checkpoints built in the tests (no hub, no downloads)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

HIDDEN, INTER, VOCAB, LAYERS = 64, 96, 128, 2


def llama_tensors(seed: int, vocab: int = VOCAB, tied: bool = True, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.05).to(dtype)  # noqa: E731
    t = {"model.embed_tokens.weight": r(vocab, HIDDEN), "model.norm.weight": torch.ones(HIDDEN, dtype=dtype)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n, shape in [("self_attn.q_proj", (HIDDEN, HIDDEN)), ("self_attn.k_proj", (HIDDEN // 2, HIDDEN)),
                         ("self_attn.v_proj", (HIDDEN // 2, HIDDEN)), ("self_attn.o_proj", (HIDDEN, HIDDEN)),
                         ("mlp.gate_proj", (INTER, HIDDEN)), ("mlp.up_proj", (INTER, HIDDEN)),
                         ("mlp.down_proj", (HIDDEN, INTER))]:
            t[p + n + ".weight"] = r(*shape)
        t[p + "input_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
        t[p + "post_attention_layernorm.weight"] = torch.ones(HIDDEN, dtype=dtype)
    if not tied:
        t["lm_head.weight"] = r(vocab, HIDDEN)
    return t


def finetune_of(base: dict[str, torch.Tensor], seed: int, scale: float = 0.01,
                touch=lambda name: "layers" in name) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, v in base.items():
        if touch(n):
            out[n] = (v.float() + torch.randn(v.shape, generator=g) * scale).to(v.dtype)
        else:
            out[n] = v.clone()
    return out


def llama_config(vocab: int = VOCAB, tied: bool = True) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
            "num_key_value_heads": 2, "vocab_size": vocab, "max_position_embeddings": 128,
            "rms_norm_eps": 1e-6, "tie_word_embeddings": tied, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"}


def write_folder(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                 shards: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        for i in range(shards):
            part = names[i * per:(i + 1) * per]
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(folder / fname))
            weight_map.update({n: fname for n in part})
        (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(config or llama_config()))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return folder


@pytest.fixture
def pair(tmp_path):
    """(base folder, fine-tune folder, base tensors, fine-tune tensors)."""
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    return write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f), b, f


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer over "w4".."w{vocab_size-1}" with [UNK]/[BOS]/[EOS]/[PAD] as ids 0..3."""
    import tokenizers
    import transformers

    vocab = {"[UNK]": 0, "[BOS]": 1, "[EOS]": 2, "[PAD]": 3, **{f"w{i}": i for i in range(4, vocab_size)}}
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="[BOS]",
                                                eos_token="[EOS]", pad_token="[PAD]")


def load_causal_lm(path, dtype=torch.float32):
    """A saved test model folder as an eval-mode transformers causal LM in ``dtype``."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()


WORD_TEXT = " ".join(f"w{4 + (i * 7) % 120}" for i in range(300))  # 300 tokens of word_tokenizer(128)


def word_model(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    """A tiny model folder with a word tokenizer (what eval, generate and serve need)."""
    write_folder(folder, tensors, config)
    word_tokenizer(128).save_pretrained(folder)
    return folder


def word_pair(root: Path) -> tuple[Path, Path, Path, Path]:
    """(base, fine-tune, bitdelta delta, held-out text file): tiny tied Llamas of 128 positions."""
    import deltacomp

    b = llama_tensors(0)
    base, ft = word_model(root / "base", b), word_model(root / "ft", finetune_of(b, 1))
    delta = root / "bitdelta.delta.safetensors"
    deltacomp.compress(base, ft, delta, method="bitdelta", progress=False)
    text = root / "words.txt"
    text.write_text(WORD_TEXT)
    return base, ft, delta, text
