"""``deltacomp demo``: the whole path on the bundled real pair (SmolLM2-135M-Instruct + a Shakespeare
fine-tune made by deltacomp.zoo): compress -> inspect -> reconstruct -> check -> evaluate."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from .. import api
from ..checkpoint import open_checkpoint
from ..plan import DEFAULT_METHOD, Plan


def check_reconstruction(base: Path, delta: Path, rec_dir: Path) -> dict[str, Any]:
    """Max |reconstructed - (base + decoded)| over every tensor, streamed (0 means bit-exact)."""
    worst, worst_name, n = 0.0, "", 0
    with open_checkpoint(base) as bck, open_checkpoint(rec_dir) as rck, api.load_delta(delta) as df:
        for name, info in df.params.items():
            src = info.tied_to or name
            sinfo = df.params[src]
            got = rck.get(name).to(torch.float32)
            if not sinfo.has_base:
                want = df.raw_tensors(src)["values"].to(torch.float32)
            else:
                b = bck.get(src).to(torch.float32).reshape(sinfo.encoded_shape)
                want = (b + df.decode(src)).to(getattr(torch, info.dtype)).to(torch.float32)
                if sinfo.base_rows is not None:
                    want = torch.cat([want, df.raw_tensors(src)["new_rows"].to(torch.float32)])
            err = (got.reshape(-1) - want.reshape(-1)).abs().max().item() if got.numel() else 0.0
            n += 1
            if err >= worst:
                worst, worst_name = err, name
    return {"tensors": n, "max_abs_diff": worst, "worst_tensor": worst_name}


def generate_sample(model_dir: Path, prompt: str, max_new_tokens: int = 24) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ids = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def run_demo(out_dir: str | Path = "demo-out", method: str = DEFAULT_METHOD, ratio: float | None = None,
             overwrite: bool = True, progress: bool = True, evaluate: bool = True, eval_tokens: int = 4096,
             print_fn: Callable[[str], None] = print) -> dict[str, Any]:
    from .. import zoo
    from ..summary import format_table, human_bytes, summary_text

    Plan(method, [], ratio)  # a mistaken --method or --ratio fails now, not after the pair is built
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    print_fn("[1/5] bundled pair (built once, then cached)")
    pair = zoo.ensure_pair("shakespeare", progress=progress)
    print_fn(f"      base      {pair.base}\n      fine-tune {pair.finetuned}")

    delta = out_dir / "shakespeare.delta.safetensors"
    print_fn(f"[2/5] compress --method {method}" + (f" --ratio {ratio}" if ratio else ""))
    t0 = time.perf_counter()
    summary = api.compress(pair.base, pair.finetuned, delta, method=method, ratio=ratio, overwrite=overwrite,
                           progress=progress)
    t_compress = time.perf_counter() - t0

    print_fn("[3/5] inspect")
    print_fn(summary_text(summary))

    print_fn("[4/5] reconstruct + check")
    rec_dir = out_dir / "reconstructed"
    t0 = time.perf_counter()
    api.reconstruct(pair.base, delta, rec_dir, overwrite=True, progress=progress)
    t_reconstruct = time.perf_counter() - t0
    check = check_reconstruction(pair.base, delta, rec_dir)
    sample = generate_sample(rec_dir, "To be, or not to be,")

    rows = [["fine-tune weights (bf16 safetensors)", human_bytes(summary["finetuned_bytes"])],
            ["delta file", human_bytes(summary["file_bytes"])],
            ["ratio (whole model)", f"{summary['ratio']:.2f}x"]]
    ct = summary["compressed_tensors"]
    if ct["ratio"]:
        rows.append(["ratio (compressed tensors)", f"{ct['ratio']:.2f}x at {ct['bits_per_param']:.3f} bits/param"])
    for codec, c in sorted(summary["by_codec"].items(), key=lambda kv: -kv[1]["nbytes"]):
        rows.append([f"  {codec}: {c['tensors']} tensors", f"{human_bytes(c['nbytes'])} "
                     f"({c['bits_per_param']:.3f} bits/param)"])
    rows += [["max abs(reconstructed - (base + decoded))", f"{check['max_abs_diff']:.3g} over {check['tensors']} tensors"],
             ["compress / reconstruct time", f"{t_compress:.1f} s / {t_reconstruct:.1f} s"]]
    result: dict[str, Any] = {"summary": summary, "check": check, "sample": sample}

    if evaluate:
        print_fn(f"[5/5] evaluate on held-out Shakespeare ({eval_tokens} tokens)")
        from ..eval.metrics import evaluate as run_eval

        ev = run_eval(pair.base, pair.finetuned, [delta], text=pair.heldout, max_tokens=eval_tokens,
                      progress=progress)
        result["eval"] = ev
        d = ev["deltas"][0]
        gain = d.get("gain_recovered")
        rows += [["perplexity base / fine-tune / reconstructed",
                  f"{ev['base']['ppl']:.2f} / {ev['finetuned']['ppl']:.2f} / {d['ppl']:.2f}"],
                 ["KL(fine-tune || reconstructed) per token", f"{d['kl']:.4f} nats"],
                 ["top-1 agreement with the fine-tune", f"{d['top1']:.3f}"],
                 ["gain recovered", "n/a" if gain is None else f"{gain:.3f}"]]
    print_fn(format_table(["deltacomp demo: " + method, "result"], rows))
    print_fn("reconstructed model, greedy continuation of 'To be, or not to be,':\n  " + repr(sample)[:200])
    return result
