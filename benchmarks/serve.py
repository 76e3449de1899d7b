"""``deltacomp serve`` under load: concurrent clients on loopback, one stream of requests spread over
1, 4, 16 tenants, served (a) by one server holding the base and every delta (tenants batched together),
and (b) one model at a time by the reconstructed fine-tunes (a server per fine-tune, its requests only,
then the next: the way one would serve full fine-tunes without deltas).

    python benchmarks/serve.py --tenants 1,4,16 --requests 48 --clients 8 --max-tokens 32 -o serve.json

Reported per run: output tokens/s over the wall time, request latency and time to first token (p50, p90,
p99), and for (b) the time spent loading models, which (a) does not pay. In (b) a request's latency is
counted from when its model's turn starts, not from when it entered the stream: this favours (b).
By default the models are a random Llama built here (``--hidden``, ``--layers``) and fine-tunes made by
perturbing it (the weights' values do not change the speed); ``--base DIR`` uses a real base folder
instead (its fine-tunes still synthesized). Everything runs on this machine, on 127.0.0.1; every run is
bounded by ``--requests`` and ``--max-seconds``.
"""
from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deltacomp  # noqa: E402
from deltacomp.serve.server import ServerThread, build_app  # noqa: E402
from tests.conftest import word_tokenizer  # noqa: E402  (the tests' tiny word-level tokenizer)


def make_models(tmp: Path, args) -> tuple[Path, list[Path], list[Path], list[str]]:
    """The base folder, one delta file and one reconstructed folder per tenant, and prompt words."""
    import transformers

    if args.base:
        base = Path(args.base)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
        tok = transformers.AutoTokenizer.from_pretrained(str(base))
        words = [w for w in "the quick brown fox jumps over a lazy dog while it rains".split()]
    else:
        torch.manual_seed(0)
        cfg = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                                       num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                                       max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
                                       eos_token_id=2, pad_token_id=3)
        model, tok = transformers.LlamaForCausalLM(cfg), word_tokenizer(args.vocab)
        base = tmp / "base"
        model.save_pretrained(base)
        tok.save_pretrained(base)
        words = [f"w{i}" for i in range(4, args.vocab)]
    deltas, recs = [], []
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(max(args.tenants)):
        g = torch.Generator().manual_seed(100 + t)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "layers" in n:
                    p.copy_(state[n] + torch.randn(p.shape, generator=g).to(p.dtype) * 0.01 * state[n].std())
        ft = tmp / f"ft{t}"
        model.save_pretrained(ft)
        tok.save_pretrained(ft)
        deltas.append(tmp / f"t{t}.delta.safetensors")
        deltacomp.compress(base, ft, deltas[-1], method=args.method, progress=False)
        recs.append(deltacomp.reconstruct(base, deltas[-1], tmp / f"rec{t}", progress=False))
    return base, deltas, recs, words


def drive(url: str, jobs: list[tuple[str, str]], clients: int, max_tokens: int, deadline: float) -> list[dict]:
    """Send ``jobs`` (model, prompt) from ``clients`` threads, streaming; one record per request."""
    import httpx

    it, lock, out = iter(jobs), threading.Lock(), []

    def client():
        with httpx.Client(timeout=300) as http:
            while time.monotonic() < deadline:
                with lock:
                    job = next(it, None)
                if job is None:
                    return
                body = {"model": job[0], "prompt": job[1], "max_tokens": max_tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                t0, first, tokens = time.perf_counter(), None, 0
                with http.stream("POST", url + "/v1/completions", json=body) as r:
                    for line in r.iter_lines():
                        if not line.startswith("data: {"):
                            continue
                        ev = json.loads(line[6:])
                        if first is None and ev.get("choices"):
                            first = time.perf_counter()
                        if ev.get("usage"):
                            tokens = ev["usage"]["completion_tokens"]
                end = time.perf_counter()
                with lock:
                    out.append({"status": r.status_code, "latency": end - t0, "ttft": (first or end) - t0,
                                "tokens": tokens, "end": end})

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


def summarize(records: list[dict], wall: float, load: float = 0.0) -> dict:
    ok = [r for r in records if r["status"] == 200]
    tokens = sum(r["tokens"] for r in ok)
    lat, ttft = [r["latency"] for r in ok], [r["ttft"] for r in ok]
    return {"requests": len(records), "ok": len(ok), "output_tokens": tokens, "wall_s": wall, "load_s": load,
            "tokens_per_s": tokens / wall if wall else 0.0,
            "tokens_per_s_incl_load": tokens / (wall + load) if wall + load else 0.0,
            **{f"latency_p{q}_s": pct(lat, q) for q in (50, 90, 99)},
            **{f"ttft_p{q}_s": pct(ttft, q) for q in (50, 90, 99)},
            "latency_mean_s": statistics.fmean(lat) if lat else float("nan")}


def run(args) -> dict:
    results = {"config": {k: v for k, v in vars(args).items() if k != "output"},
               "machine": {"python": platform.python_version(), "torch": torch.__version__,
                           "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()},
               "runs": []}
    with tempfile.TemporaryDirectory(prefix="deltacomp-bench-") as tmp:
        base, deltas, recs, words = make_models(Path(tmp), args)
        rng = random.Random(0)
        prompts = [" ".join(rng.choice(words) for _ in range(args.prompt_words)) for _ in range(args.requests)]
        for T in args.tenants:
            names = [f"t{t}" for t in range(T)]
            jobs = [(names[i % T], p) for i, p in enumerate(prompts)]
            app = build_app(base, dict(zip(names, deltas)), max_batch=args.max_batch, max_queue=args.requests)
            with ServerThread(app) as s:
                drive(s.url, jobs[:min(len(jobs), T)], 1, 2, time.monotonic() + args.max_seconds)  # load every delta
                t0 = time.perf_counter()
                recs_a = drive(s.url, jobs, args.clients, args.max_tokens, time.monotonic() + args.max_seconds)
                wall = time.perf_counter() - t0
                stats = app.state.server.engine.stats()
            a = summarize(recs_a, wall)
            a["mean_batch_rows"] = stats.get("batched_rows", 0) / max(1, stats.get("steps", 1))
            results["runs"].append({"tenants": T, "mode": "deltacomp serve (one base, all deltas)", **a})
            all_recs, wall_b, load_b = [], 0.0, 0.0
            for t in range(T):
                mine = [(recs[t].name, p) for (n, p) in jobs if n == names[t]]
                t0 = time.perf_counter()
                app = build_app(recs[t], {}, max_batch=args.max_batch, max_queue=args.requests)
                with ServerThread(app) as s:
                    load_b += time.perf_counter() - t0
                    t0 = time.perf_counter()
                    all_recs += drive(s.url, mine, args.clients, args.max_tokens, time.monotonic() + args.max_seconds)
                    wall_b += time.perf_counter() - t0
            b = summarize(all_recs, wall_b, load_b)
            results["runs"].append({"tenants": T, "mode": "reconstructed, one model at a time", **b})
            print(f"{T:>3} tenants  serve: {a['tokens_per_s']:8.1f} tok/s p50 {a['latency_p50_s']:.3f}s "
                  f"p99 {a['latency_p99_s']:.3f}s | one at a time: {b['tokens_per_s']:8.1f} tok/s "
                  f"({b['tokens_per_s_incl_load']:.1f} with {load_b:.1f}s of loading) p50 {b['latency_p50_s']:.3f}s "
                  f"p99 {b['latency_p99_s']:.3f}s", flush=True)
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tenants", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=48, help="requests per run (bounded)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=16)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-seconds", type=float, default=300, help="stop sending new requests after this")
    p.add_argument("--method", default="bitdelta")
    p.add_argument("--base", default=None, help="a real base folder (default: a random Llama built here)")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("-o", "--output", default="serve.json")
    args = p.parse_args(argv)
    res = run(args)
    Path(args.output).write_text(json.dumps(res, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
