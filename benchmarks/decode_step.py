"""One decode step and one prompt, timed apart, on the bundled pair: the patched base against the dense
fine-tune reconstructed from the same delta (the models of benchmarks/generate.py: dense, multi, single).

``generate.py`` times whole generations, whose prompt (one forward pass of ``--prompt-tokens`` rows) and
decode steps (one row each) take different code paths; here they are timed separately, with less noise:

- decode step: one token on a cache of ``--prompt-tokens`` tokens, the cache cropped back after every
  ``--steps`` steps, so each round times the same work;
- prompt: the forward pass of ``--prompt-tokens`` tokens without a cache.

Every model once per round, round after round (``--rounds``), so machine noise hits them alike; reported
per model: the fastest and the median time, and each over the dense model's. The settings in the
environment (DELTACOMP_ISA, DELTACOMP_FUSED, DELTACOMP_LAYER_PLANS, ...) apply to every model.

    PYTHONPATH=. taskset -c 1 python benchmarks/decode_step.py --threads 1 --out benchmarks/results/decode_step.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltacomp import ops, zoo  # noqa: E402
from deltacomp.serve.patch import set_delta_index  # noqa: E402

from generate import _models, common_args, finish, start  # noqa: E402  (the same three models)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def bench_method(pair, method: str, args, tmp: Path) -> dict:
    from transformers import DynamicCache

    models, info = _models(pair, method, tmp, getattr(torch, args.dtype))
    set_delta_index(models["multi"], [0])
    ids = torch.arange(100, 100 + args.prompt_tokens)[None]
    token = torch.tensor([[7]])
    caches = {}
    steps = {name: [] for name in models}
    prompts = {name: [] for name in models}

    def decode(model, cache):
        for _ in range(args.steps):
            model(token, past_key_values=cache, use_cache=True)
        cache.crop(-args.steps)

    with torch.no_grad():
        for name, model in models.items():  # warm-up: first-call allocations, dispatch timings, plans
            caches[name] = DynamicCache()
            model(ids, past_key_values=caches[name], use_cache=True)
            decode(model, caches[name])
            model(ids)
        for _ in range(args.rounds):
            for name, model in models.items():
                steps[name].append(_timed(lambda: decode(model, caches[name])) / args.steps)
                prompts[name].append(_timed(lambda: model(ids)))
    row = {"method": method, "delta_bytes": info["delta_bytes"], "prompt_tokens": args.prompt_tokens}
    for what, times in (("step", steps), ("prompt", prompts)):
        best = {name: min(v) for name, v in times.items()}
        med = {name: statistics.median(v) for name, v in times.items()}
        row[what] = {"min_ms": best, "median_ms": med,
                     "min_over_dense": {n: best[n] / best["dense"] for n in ("multi", "single")},
                     "median_over_dense": {n: med[n] / med["dense"] for n in ("multi", "single")}}
        print(f"{method:<10} {what:<6} dense {best['dense']:7.2f} ms (median {med['dense']:7.2f})  "
              + "  ".join(f"{n} {best[n] / best['dense']:.3f} ({med[n] / med['dense']:.3f})"
                          for n in ("multi", "single")) + "  [time / dense: fastest (median)]", flush=True)
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    ap.add_argument("--prompt-tokens", type=int, default=12)
    ap.add_argument("--steps", type=int, default=3, help="decode steps per timing (the cache cropped back after)")
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args(argv)
    start(args)
    pair = zoo.ensure_pair(args.pair, progress=False)
    info = {"threads": torch.get_num_threads(), "torch": torch.__version__, "pair": args.pair,
            "dtype": args.dtype, "cpu_isa": ops.cpu_isa(), "rounds": args.rounds, "steps": args.steps,
            "settings": {k: v for k, v in os.environ.items() if k.startswith("DELTACOMP_")},
            "loadavg_before": os.getloadavg()}
    print(f"# {args.pair}: path {info['cpu_isa']}, {info['threads']} threads, load {info['loadavg_before']}",
          flush=True)
    with tempfile.TemporaryDirectory(prefix="deltacomp-decode-") as tmp:
        rows = [bench_method(pair, m, args, Path(tmp)) for m in args.methods.split(",")]
    finish(args, info, rows)


if __name__ == "__main__":
    main()
