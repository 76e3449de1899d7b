"""Peak memory of `compress --calib` with the tune stage over the whole model (``--calib-tune-scope model``)
and one decoder layer at a time (``layers``), on synthetic Llama checkpoints of a few layers: the whole-model
stage should grow with the layers, the layer-by-layer one should not.

The pair is random (base ~0.02, fine-tune = base + 0.002 noise) at a chosen width, bf16, with a word-level
tokenizer so that --calib can read a text file of random words; each command runs in a subprocess
(benchmarks/memory.py's ``measure``: exact peak RSS from rusage, CPU seconds). Checkpoints are deleted at
the end.

    PYTHONPATH=. python benchmarks/tune_memory.py --hidden 2048 --inter 5632 --layers 2 6 \\
        --out benchmarks/results/tune_memory.json
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure  # noqa: E402

VOCAB = 32000


def write_pair(root: Path, hidden: int, inter: int, layers: int) -> tuple[Path, Path]:
    """Base and fine-tune folders (bf16, config.json; the fine-tune also has a word-level tokenizer)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    shapes = [("model.embed_tokens.weight", (VOCAB, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (hidden, hidden)),
                   (p + "self_attn.v_proj.weight", (hidden, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                   (p + "post_attention_layernorm.weight", (hidden,))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (VOCAB, hidden))]
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
           "num_key_value_heads": hidden // 128, "vocab_size": VOCAB, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    out = []
    for kind in ("base", "ft"):
        folder = root / kind
        folder.mkdir(parents=True)
        tensors = {}
        for i, (name, shape) in enumerate(shapes):
            g = torch.Generator().manual_seed(1000 + i)
            t = torch.randn(shape, generator=g) * 0.02 + (1.0 if len(shape) == 1 else 0.0)
            if kind == "ft":
                t += torch.randn(shape, generator=g.manual_seed(5000 + i)) * 0.002
            tensors[name] = t.to(torch.bfloat16)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
        out.append(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(out[1])
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=5632)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6])
    ap.add_argument("--scopes", default="model,layers")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/tune_memory.json")
    args = ap.parse_args()
    tree = str(Path(__file__).resolve().parents[1])
    rows = []
    with tempfile.TemporaryDirectory(prefix="tune-memory-") as tmp:
        text = Path(tmp) / "calib.txt"
        g = torch.Generator().manual_seed(0)
        text.write_text(" ".join(f"w{i}" for i in torch.randint(1, VOCAB, (50_000,), generator=g).tolist()))
        for layers in args.layers:
            root = Path(tmp) / f"L{layers}"
            base, ft = write_pair(root, args.hidden, args.inter, layers)
            for scope in args.scopes.split(","):
                out = root / f"{scope}.delta.safetensors"
                cmd = ["compress", str(base), str(ft), "-o", str(out), "--method", "svd-mixed", "--ratio", "16", "-q",
                       "--calib", str(text), "--calib-samples", str(args.samples), "--calib-len", str(args.seq_len),
                       "--calib-tune-steps", str(args.steps), "--calib-tune-scope", scope, "--device", "cpu"]
                rec = {"layers": layers, "scope": scope, **measure(cmd, tree)}
                print(json.dumps(rec), flush=True)
                rows.append(rec)
            shutil.rmtree(root)
    result = {"hidden": args.hidden, "inter": args.inter, "vocab": VOCAB, "samples": args.samples,
              "seq_len": args.seq_len, "steps": args.steps, "cpu": platform.processor() or platform.machine(),
              "torch": torch.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
