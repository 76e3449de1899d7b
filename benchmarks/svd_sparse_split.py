"""svd-mixed alone against svd-mixed + a ternary residual (svd-sparse) in the same bytes, tensor by tensor on
a bundled pair: the weight error and the output error trace(E H E^T) (H: the fine-tune's input Gram of that
linear over --windows windows of 256 training tokens), each relative to the delta's own, for several
splits of the budget (``sparse`` = the residual's share).

    PYTHONPATH=. taskset -c 1 python benchmarks/svd_sparse_split.py --pair python-docs \
        --out benchmarks/results/svd_sparse_split_python-docs.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltacomp import zoo  # noqa: E402
from deltacomp.checkpoint import open_checkpoint  # noqa: E402
from deltacomp.codecs import get_codec  # noqa: E402

LINEARS = [f"model.layers.{layer}.{m}.weight" for layer in (2, 12, 22, 28)
           for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")]


def grams(pair, names: list[str], windows: int) -> dict[str, torch.Tensor]:
    """sum x^T x (float64) of each linear's inputs, the fine-tune run on its training text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(pair.finetuned), dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(pair.base))(zoo.corpus_text(pair.name, "train")[:400_000],
                                                        return_tensors="pt").input_ids[0]
    out: dict[str, torch.Tensor] = {}
    mods = dict(model.named_modules())

    def hook(name):
        def f(_m, inp, _o):
            x = inp[0].reshape(-1, inp[0].shape[-1]).double()
            out[name] = out.get(name, 0) + x.T @ x
        return f
    handles = [mods[n[:-len(".weight")]].register_forward_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(windows):
            model(ids[i * 256:(i + 1) * 256][None])
    for h in handles:
        h.remove()
    return out


def errors(d: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    e, dd = (d - approx).double(), d.double()
    return float((e ** 2).sum() / (dd ** 2).sum()), float(torch.trace(e @ h @ e.T) / torch.trace(dd @ h @ dd.T))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pair", default="python-docs")
    ap.add_argument("--ratios", default="16,32")
    ap.add_argument("--splits", default="0.1,0.25,0.4")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    pair = zoo.ensure_pair(args.pair, progress=False)
    h = grams(pair, LINEARS, args.windows)
    mixed, sparse = get_codec("svd-mixed"), get_codec("svd-sparse")
    rows = []
    with open_checkpoint(pair.base) as b, open_checkpoint(pair.finetuned) as f:
        for name in LINEARS:
            d = f.get(name).float() - b.get(name).float()
            for ratio in (float(r) for r in args.ratios.split(",")):
                enc = mixed.encode(d, ratio=ratio)
                row = {"tensor": name, "ratio": ratio, "svd-mixed": [enc.nbytes, *errors(d, mixed.decode(enc), h[name])]}
                for split in (float(s) for s in args.splits.split(",")):
                    enc = sparse.encode(d, ratio=ratio, sparse=split)
                    row[f"svd-sparse:sparse={split}"] = [enc.nbytes, *errors(d, sparse.decode(enc), h[name])]
                rows.append(row)
                print(name, ratio, {k: [round(v, 4) for v in x[1:]] for k, x in row.items() if isinstance(x, list)},
                      flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"pair": args.pair, "windows": args.windows, "rows": rows}, indent=1))
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
