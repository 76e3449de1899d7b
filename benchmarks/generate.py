"""End-to-end decoding speed on the bundled pair, per CPU code path: greedy generation tokens/s of the
base patched with the packed delta against the dense fine-tune reconstructed from the same delta.

For each method (``--methods``, compressed once from the bundled base and fine-tune), three models:

- ``dense``: the reconstructed fine-tune (``deltacomp reconstruct``), a plain transformers model;
- ``multi``: the base patched the way ``deltacomp generate`` patches it (``patch_model_multi`` +
  ``set_delta_index``, MultiDeltaLinear layers);
- ``single``: the base patched with ``patch_model`` (DeltaLinear layers, fused or separate delta term as
  the measured dispatch in deltacomp/serve/dispatch.py picks).

Every path in ``--isas`` is forced in turn (DELTACOMP_ISA; the kernels read it on every call) and every
(path, model) pair is timed once per round, round after round, so machine noise hits them alike. One
timing is ``model.generate`` of ``--max-new-tokens`` tokens (forced: no early stop) for ``--batch``
copies of one prompt. Reported: median tokens/s per (path, model), and each patched model's time over
the dense one's in the same rounds (< 1: the patched model is faster). The greedy tokens of each
patched model are compared with the dense model's (recorded, not asserted: fp32 sums in another order
can flip a near tie).

    PYTHONPATH=. python benchmarks/generate.py --threads 1 --out benchmarks/results/generate_cpu_1thread.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import deltacomp  # noqa: E402
from deltacomp import ops, zoo  # noqa: E402
from deltacomp.serve import dispatch  # noqa: E402
from deltacomp.serve.generate import load_base  # noqa: E402
from deltacomp.serve.patch import patch_model, patch_model_multi, set_delta_index  # noqa: E402

PROMPT = "To be, or not to be, that is the question:"


def _models(pair, method: str, tmp: Path, dtype: torch.dtype) -> tuple[dict, dict]:
    """The dense reconstruction and the two patched bases for ``method``, and the delta's summary."""
    from transformers import AutoModelForCausalLM

    delta = tmp / f"{method.replace(':', '_')}.delta.safetensors"
    summary = deltacomp.compress(pair.base, pair.finetuned, delta, method=method, progress=False)
    rec = deltacomp.reconstruct(pair.base, delta, tmp / f"rec_{method.replace(':', '_')}", progress=False)
    dense = AutoModelForCausalLM.from_pretrained(str(rec), dtype=dtype).eval()
    multi = patch_model_multi(load_base(pair.base, dtype), [delta])
    single = patch_model(load_base(pair.base, dtype), delta)
    info = {"delta_bytes": delta.stat().st_size, "ratio": summary.get("ratio")}
    return {"dense": dense, "multi": multi, "single": single}, info


def _generate(model, enc: dict, tokens: int, pad: int) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    return time.perf_counter() - t0, out[:, enc["input_ids"].shape[1]:]


def bench_method(pair, method: str, isas: list[str], args, tmp: Path) -> list[dict]:
    from transformers import AutoTokenizer

    dtype = getattr(torch, args.dtype)
    models, info = _models(pair, method, tmp, dtype)
    tok = AutoTokenizer.from_pretrained(str(pair.base))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    enc = dict(tok([PROMPT] * args.batch, return_tensors="pt"))
    set_delta_index(models["multi"], [0] * args.batch)
    times: dict[tuple[str, str], list[float]] = {(i, m): [] for i in isas for m in models}
    outs: dict[tuple[str, str], torch.Tensor] = {}
    for isa in isas:  # warm-up: first-call allocations, DeltaLinear's one-time dispatch timing per path
        os.environ["DELTACOMP_ISA"] = isa
        for name, model in models.items():
            outs[isa, name] = _generate(model, enc, args.max_new_tokens, pad)[1]
    for _ in range(args.repeats):
        for isa in isas:
            os.environ["DELTACOMP_ISA"] = isa
            for name, model in models.items():
                times[isa, name].append(_generate(model, enc, args.max_new_tokens, pad)[0])
    rows = []
    new_tokens = args.max_new_tokens * args.batch
    for isa in isas:
        med = {name: statistics.median(times[isa, name]) for name in models}
        row = {"method": method, "isa": isa, "batch": args.batch, "new_tokens": args.max_new_tokens,
               "delta_bytes": info["delta_bytes"],
               "median_s": med, "min_s": {name: min(times[isa, name]) for name in models},
               "tokens_per_s": {name: new_tokens / med[name] for name in models},
               "multi_over_dense": med["multi"] / med["dense"], "single_over_dense": med["single"] / med["dense"],
               "same_tokens_as_dense": {name: bool(torch.equal(outs[isa, name], outs[isa, "dense"]))
                                        for name in ("multi", "single")}}
        rows.append(row)
        tps = row["tokens_per_s"]
        print(f"{method:<12} {isa:<9} tokens/s dense {tps['dense']:6.1f}  multi {tps['multi']:6.1f} "
              f"({row['multi_over_dense']:.2f}x the dense time)  single {tps['single']:6.1f} "
              f"({row['single_over_dense']:.2f}x)  same tokens: {row['same_tokens_as_dense']}", flush=True)
    return rows


def common_args(ap: argparse.ArgumentParser) -> None:
    """The options this script shares with benchmarks/decode_step.py."""
    ap.add_argument("--pair", default="shakespeare", help="the bundled pair (deltacomp.zoo)")
    ap.add_argument("--methods", default="bitdelta,svd-mixed", help="comma separated method specs")
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--out", default=None, help="write the results as JSON here")


def start(args) -> None:
    """Refuse to run without the extension; set the thread count."""
    if not ops.HAS_EXTENSION:
        raise SystemExit(f"the C++ extension is not built ({ops._EXT_ERROR}); build it first")
    if args.threads:
        torch.set_num_threads(args.threads)


def finish(args, info: dict, rows: list) -> None:
    """The load after and the dispatch's decisions into ``info``; the JSON written where --out asks."""
    info["loadavg_after"] = os.getloadavg()
    info["deltalinear_decisions"] = dispatch.decisions()
    print(f"# load after {info['loadavg_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
        print(f"# wrote {args.out}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    ap.add_argument("--isas", default=None, help="CPU code paths to force, comma separated (default: avx512, "
                    "avx2, neon, portable, those this CPU runs)")
    ap.add_argument("--batch", type=int, default=1, help="prompts decoded together (rows per step)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds (every path and model once per round)")
    args = ap.parse_args(argv)
    start(args)
    isas = args.isas.split(",") if args.isas else []
    if not isas:  # the paths this CPU runs: forcing one it lacks would time the best one again
        for isa in ("avx512", "avx2", "neon", "portable"):
            os.environ["DELTACOMP_ISA"] = isa
            if ops.cpu_isa() == isa:
                isas.append(isa)
    pair = zoo.ensure_pair(args.pair, progress=False)
    info = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "pair": args.pair, "dtype": args.dtype, "isas": isas,
            "repeats": args.repeats, "loadavg_before": os.getloadavg()}
    print(f"# {args.pair}: paths {isas}, {info['threads']} threads, load {info['loadavg_before']}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltacomp-generate-") as tmp:
        for method in args.methods.split(","):
            rows += bench_method(pair, method, isas, args, Path(tmp))
    finish(args, info, rows)


if __name__ == "__main__":
    main()
