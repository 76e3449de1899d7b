"""Time compression of one 7B-shaped transformer layer (q,k,v,o 4096x4096; gate,up,down 11008x4096)
with lowrank and svd-mixed at a given ratio (default 16x vs fp16), and bitdelta for reference.

Deltas are synthetic: a rank-64 component plus Gaussian noise (half of the energy each), a stand-in
for a fine-tune delta; the relative Frobenius error of each codec is reported beside its time.

    PYTHONPATH=. python benchmarks/compress_speed.py --scale 0.125 --out speed.json
    PYTHONPATH=. python benchmarks/compress_speed.py --device cuda --methods svd-mixed
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from deltacomp.codecs import get_codec
from deltacomp.errors import SettingsError

LAYER = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]


def synthetic_delta(n: int, k: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    r = 64
    low = torch.randn(n, r, generator=g, device=device) @ torch.randn(r, k, generator=g, device=device)
    noise = torch.randn(n, k, generator=g, device=device)
    low *= 1e-3 / low.std()
    noise *= 1e-3 / noise.std()
    return low + noise


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--scale", type=float, default=1.0, help="shrink every dimension by this factor")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--methods", default="lowrank,svd-mixed,bitdelta",
                    help="comma list; settings ride on the name, e.g. svd-mixed:allocation=optimal")
    ap.add_argument("--out", default=None, help="JSON output path (default: print)")
    args = ap.parse_args()
    rows = []
    for i, (name, n, k) in enumerate(LAYER):
        n, k = max(1, round(n * args.scale)), max(1, round(k * args.scale))
        delta = synthetic_delta(n, k, i, args.device)
        budget = n * k * 2 // int(args.ratio) if args.ratio.is_integer() else int(n * k * 2 / args.ratio)
        for spec in args.methods.split(","):
            method, _, rest = spec.partition(":")
            given = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
            codec = get_codec(method)
            try:
                settings = codec.settings_for_budget((n, k), budget, given)
            except SettingsError:  # e.g. bitdelta: one sign mask + its scale is 4 bytes over 1/16
                settings = codec.resolve_settings(given)
            _sync(args.device)
            t0 = time.perf_counter()
            enc = codec.encode(delta, **settings)
            _sync(args.device)
            seconds = time.perf_counter() - t0
            rel = float(torch.linalg.matrix_norm(codec.decode(enc).to(delta.device) - delta)
                        / torch.linalg.matrix_norm(delta))
            row = {"tensor": name, "shape": [n, k], "method": spec, "seconds": round(seconds, 4),
                   "nbytes": enc.nbytes, "ratio_vs_fp16": round(n * k * 2 / max(enc.nbytes, 1), 3),
                   "rel_frobenius_error": round(rel, 5), "alloc": enc.params.get("alloc", enc.params.get("rank"))}
            rows.append(row)
            print(json.dumps(row), flush=True)
    totals = {}
    for row in rows:
        totals[row["method"]] = round(totals.get(row["method"], 0.0) + row["seconds"], 3)
    report = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "scale": args.scale, "ratio": args.ratio,
              "seconds_per_layer": totals, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps({"seconds_per_layer": totals}))


if __name__ == "__main__":
    main()
