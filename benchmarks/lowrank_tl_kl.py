"""Model-level effect of the inexact int8-table path of svd-mixed at one x row (the TL4 layout,
``kbit_lowrank_matmul_groups_tl``): the bundled base patched with an svd-mixed file (``patch_model``),
run token by token with a KV cache (every layer's term at M = 1, the decode case the tables serve) over
windows of held-out text, once with the exact kernels (DELTACOMP_LOWRANK_KERNEL=exact) and once with the
int8 tables, against the dense fine-tune on the same windows. Reported: KL(exact || int8) of the
next-token distributions and top-1 agreement between the two, next to the file's own KL(fine-tune ||
exact) and agreement, so the tables' share of the error can be read off.

    deltacomp compress BASE FT --method svd-mixed --ratio 16 -o svd16.delta.safetensors
    PYTHONPATH=. taskset -c 1 python benchmarks/lowrank_tl_kl.py --delta svd16.delta.safetensors \\
        --tokens 4096 --out benchmarks/results/lowrank_tl_kl_shakespeare_16x.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltacomp import ops, zoo  # noqa: E402
from deltacomp.serve.generate import load_base  # noqa: E402
from deltacomp.serve.patch import patch_model  # noqa: E402


def _stepwise_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """Log-probs (len, vocab) of ``model`` fed ``ids`` one token per forward (KV cache)."""
    out, past = [], None
    with torch.no_grad():
        for i in range(ids.numel()):
            res = model(input_ids=ids[i:i + 1][None], past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(torch.log_softmax(res.logits[0, -1].double(), -1))
    return torch.stack(out)


def _kl(p_log: torch.Tensor, q_log: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, in nats."""
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _windows(text_ids: torch.Tensor, tokens: int, window: int) -> list[torch.Tensor]:
    n = min(tokens, text_ids.numel()) // window
    return [text_ids[i * window:(i + 1) * window] for i in range(n)]


def compare(wins: list[torch.Tensor], dense, logprobs, modes: tuple[str, str]) -> dict:
    """Over the windows: the dense fine-tune's log-probs and ``logprobs(mode, window)`` for the exact and the
    int8 mode (in the order of ``modes``), summed into KL(exact || int8), KL(fine-tune || each) and top-1
    agreements per token; with the machine and the seconds each mode took."""
    sums = dict.fromkeys(("kl_exact_int8", "kl_ft_exact", "kl_ft_int8"), 0.0)
    agree = dict.fromkeys(("exact_int8", "ft_exact", "ft_int8"), 0)
    kl_max, secs, n = 0.0, dict.fromkeys(modes, 0.0), 0
    for w in wins:
        with torch.no_grad():
            ft_log = torch.log_softmax(dense(input_ids=w[None], use_cache=False).logits[0].double(), -1)
        logs = {}
        for mode in modes:
            t0 = time.perf_counter()
            logs[mode] = logprobs(mode, w)
            secs[mode] += time.perf_counter() - t0
        kl = _kl(logs["exact"], logs["int8"])
        kl_max = max(kl_max, float(kl.max()))
        sums["kl_exact_int8"] += float(kl.sum())
        sums["kl_ft_exact"] += float(_kl(ft_log, logs["exact"]).sum())
        sums["kl_ft_int8"] += float(_kl(ft_log, logs["int8"]).sum())
        top = {m: v.argmax(-1) for m, v in (("ft", ft_log), *logs.items())}
        for a, b in (("exact", "int8"), ("ft", "exact"), ("ft", "int8")):
            agree[f"{a}_{b}"] += int((top[a] == top[b]).sum())
        n += w.numel()
        print(f"{n:>5} tokens: KL(exact||int8) {sums['kl_exact_int8'] / n:.3g}, "
              f"KL(ft||exact) {sums['kl_ft_exact'] / n:.4g}", flush=True)
    res = {"tokens": n, "cpu_isa": ops.cpu_isa(), "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(),
           "kl_exact_vs_int8": sums["kl_exact_int8"] / n, "kl_exact_vs_int8_max": kl_max,
           "kl_finetune_vs_exact": sums["kl_ft_exact"] / n, "kl_finetune_vs_int8": sums["kl_ft_int8"] / n,
           **{f"top1_agreement_{k.replace('ft_', 'finetune_')}": v / n for k, v in agree.items()},
           "seconds_stepwise": secs}
    res["int8_kl_share_of_file_kl"] = res["kl_exact_vs_int8"] / res["kl_finetune_vs_exact"]
    return res


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zdir = zoo.cache_dir() / "zoo"
    base = Path(args.base) if args.base else zdir / "smollm2-135m-instruct"
    ft = Path(args.finetuned) if args.finetuned else zdir / "smollm2-135m-instruct-shakespeare-6fca8143e7"
    tok = AutoTokenizer.from_pretrained(str(base))
    text = zoo.corpus_text(args.corpus, split="heldout")
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    wins = _windows(ids, args.tokens, args.window)
    dense = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()
    patched = patch_model(load_base(base, torch.float32), args.delta)

    def logprobs(mode: str, w: torch.Tensor) -> torch.Tensor:
        os.environ["DELTACOMP_LOWRANK_KERNEL"] = mode  # read by the kernel on every call
        return _stepwise_logprobs(patched, w)

    # int8 first: the serving terms repack (TL4) on their first call unless the variable says exact
    res = compare(wins, dense, logprobs, ("int8", "exact"))
    os.environ.pop("DELTACOMP_LOWRANK_KERNEL", None)
    terms = [m for m in patched.modules() if hasattr(m, "_tl") and hasattr(m, "_direct")]
    res.update({"delta": str(args.delta), "corpus": args.corpus, "split": "heldout", "window": args.window,
                "svd_mixed_terms": len(terms), "terms_with_tables": sum(m._tl is not None for m in terms)})
    return res


def main(argv=None, run=run, doc: str = __doc__, what: str = "an svd-mixed") -> None:
    """The command line of this script and of sign_tl_kl.py (``run`` measures, ``what`` names the file)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--delta", required=True, help=f"{what} delta file of the bundled pair")
    ap.add_argument("--base", default=None, help="base model folder (default: the bundled base in the zoo cache)")
    ap.add_argument("--finetuned", default=None, help="fine-tune folder (default: the bundled shakespeare one)")
    ap.add_argument("--corpus", default="shakespeare")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = run(args)
    print(json.dumps(res, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
