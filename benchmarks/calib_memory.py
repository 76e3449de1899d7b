"""Peak memory of layer-by-layer calibration (`calibrate_layerwise`; ternary's least-squares output scale by
default, cheap, or svd-mixed + GPTQ with --method svd-mixed) against the number of
layers, streamed (each decoder layer read from the checkpoint while it runs) and with the whole model loaded
(the fallback), on synthetic Llama-shaped pairs generated here (bf16, tied embeddings off, real config.json).

Each run is a fresh subprocess; its exact peak RSS comes from rusage. The pairs are deleted at the end.

    python benchmarks/calib_memory.py --layers 2 8 --hidden 1024 --out benchmarks/results/calib_memory.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CHILD = r"""
import sys, torch
import deltacomp
from deltacomp.calibrate import layerwise, streamed
from deltacomp.memory import bounded_malloc
bounded_malloc()  # as the CLI does for batch commands
from deltacomp.calibrate.data import from_ids
base, ft, src, out, mode = sys.argv[1:6]
if mode == "whole":
    layerwise.open_layered = lambda p, c, d, stream=True: streamed.open_layered(p, c, d, stream=False)
calib = from_ids(torch.randint(0, 32000, (32 * 128,), generator=torch.Generator().manual_seed(0)), 32, 128)
layerwise.calibrate_layerwise(base, ft, src, out, calib, progress=False)
"""


def write_pair(root: Path, layers: int, hidden: int, inter: int, vocab: int) -> tuple[Path, Path]:
    """Base and fine-tune folders; the fine-tune moves every linear by 1% noise."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
           "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
           "num_key_value_heads": hidden // 64, "vocab_size": vocab, "max_position_embeddings": 2048,
           "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    g = torch.Generator().manual_seed(0)
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, s in [("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                     ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                     ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                     ("mlp.down_proj", (hidden, inter)), ("input_layernorm", (hidden,)),
                     ("post_attention_layernorm", (hidden,))]:
            shapes[p + n + ".weight"] = s
    base = {n: (torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02).bfloat16() for n, s in shapes.items()}
    ft = {n: (v.float() + torch.randn(v.shape, generator=g) * 2e-4).bfloat16() if ".layers." in n and v.dim() == 2
          else v.clone() for n, v in base.items()}
    out = []
    for name, tensors in (("base", base), ("ft", ft)):
        folder = root / name
        folder.mkdir(parents=True)
        save_file(tensors, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))
        out.append(folder)
    return out[0], out[1]


def run(args: list[str], tree: str) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], env={**os.environ, "PYTHONPATH": tree},
                            cwd=tree, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"calibration failed: {err.strip()[-2000:]}")
    return {"peak_rss_gb": round(usage.ru_maxrss * 1024 / 1024**3, 3), "wall_s": round(time.perf_counter() - start, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--method", default="ternary", help="a codec with a layerwise calibrator: ternary, svd-mixed")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    rows = []
    for layers in args.layers:
        root = Path(tempfile.mkdtemp(prefix="deltacomp-calibmem-"))
        try:
            base, ft = write_pair(root, layers, args.hidden, args.intermediate, args.vocab)
            src = root / "rtn.delta.safetensors"
            sys.path.insert(0, args.tree)
            import deltacomp
            deltacomp.compress(base, ft, src, method=args.method, ratio=16, progress=False)
            for mode in ("streamed", "whole"):
                row = {"layers": layers, "mode": mode, "method": args.method, "hidden": args.hidden, "intermediate": args.intermediate,
                       "vocab": args.vocab, "model_bytes": sum(f.stat().st_size for f in ft.glob("*.safetensors")),
                       **run([str(base), str(ft), str(src), str(root / f"{mode}.delta.safetensors"), mode], args.tree)}
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    result = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
