"""Time compression of one 7B-shaped transformer layer (q,k,v,o 4096x4096; gate,up,down 11008x4096)
with lowrank and svd-mixed at a given ratio (default 16x vs fp16), and bitdelta for reference.

Deltas are synthetic: a rank-64 component plus Gaussian noise (half of the energy each), a stand-in
for a fine-tune delta, made on the CPU (the same numbers whatever the device) and moved to ``--device``
before encode; the relative Frobenius error of each codec is reported beside its time.
``--compare-exact`` also runs every SVD codec with svd=exact (the float64 reference path) in the same
run and reports time ratios exact / default and both errors.

    PYTHONPATH=. python benchmarks/compress_speed.py --scale 0.125 --out speed.json
    PYTHONPATH=. python benchmarks/compress_speed.py --device cuda --methods svd-mixed --compare-exact
    PYTHONPATH=. python benchmarks/compress_speed.py --tensors q_proj,gate_proj --methods svd-mixed,lowrank \
        --compare-exact --threads 1 --out benchmarks/results/compress_speed_cpu_1thread.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time

import torch

from deltacomp.codecs import get_codec
from deltacomp.errors import SettingsError

LAYER = [("q_proj", 4096, 4096), ("k_proj", 4096, 4096), ("v_proj", 4096, 4096), ("o_proj", 4096, 4096),
         ("gate_proj", 11008, 4096), ("up_proj", 11008, 4096), ("down_proj", 4096, 11008)]


POWER = 0.4  # s_i ~ (1 + i)^-0.4: the bundled pair's deltas (s_10 / s_0 ~ 0.37, s_100 / s_0 ~ 0.15, s_m/2 ~ 0.1)


def synthetic_delta(n: int, k: int, seed: int, device: str = "cpu", spectrum: str = "lowrank") -> torch.Tensor:
    """``lowrank``: rank 64 + Gaussian noise, half the energy each; ``powerlaw``: singular values
    (1 + i)^-POWER on random orthonormal vectors, a decaying spectrum like a fine-tune's."""
    g = torch.Generator(device=device).manual_seed(seed)
    if spectrum == "powerlaw":
        m = min(n, k)
        u = torch.linalg.qr(torch.randn(n, m, generator=g, device=device)).Q
        v = torch.linalg.qr(torch.randn(k, m, generator=g, device=device)).Q
        sigma = (1 + torch.arange(m, device=device, dtype=torch.float32)) ** -POWER
        d = (u * sigma) @ v.T
        return d * (1e-3 * (n * k) ** 0.5 / torch.linalg.matrix_norm(d))
    r = 64
    low = torch.randn(n, r, generator=g, device=device) @ torch.randn(r, k, generator=g, device=device)
    noise = torch.randn(n, k, generator=g, device=device)
    low *= 1e-3 / low.std()
    noise *= 1e-3 / noise.std()
    return low + noise


def _exact_spec(method: str) -> str:
    return method + ("," if ":" in method else ":") + "svd=exact"


def _compare(rows: list[dict], ref_name=_exact_spec) -> dict:
    """Per method and tensor: time ratio reference / default and both relative errors (same run); the
    reference of a method is ``ref_name(method)`` (default: the same method with svd=exact)."""
    by = {(r["tensor"], r["method"]): r for r in rows}
    out: dict = {}
    for (tensor, method), row in by.items():
        ref = by.get((tensor, ref_name(method)))
        if ref is None:
            continue
        entry = out.setdefault(method, {"seconds_default": 0.0, "seconds_reference": 0.0, "tensors": {}})
        entry["seconds_default"] = round(entry["seconds_default"] + row["seconds"], 3)
        entry["seconds_reference"] = round(entry["seconds_reference"] + ref["seconds"], 3)
        entry["speedup"] = round(entry["seconds_reference"] / max(entry["seconds_default"], 1e-9), 2)
        if "cpu_seconds" in row and "cpu_seconds" in ref:
            for key, r_ in (("cpu_seconds_default", row), ("cpu_seconds_reference", ref)):
                entry[key] = round(entry.get(key, 0.0) + r_["cpu_seconds"], 3)
            entry["cpu_speedup"] = round(entry["cpu_seconds_reference"] / max(entry["cpu_seconds_default"], 1e-9), 2)
        entry["tensors"][tensor] = {"speedup": round(ref["seconds"] / max(row["seconds"], 1e-9), 2),
                                    "cpu_speedup": round(ref.get("cpu_seconds", 0) / max(row.get("cpu_seconds", 0), 1e-9), 2),
                                    "rel_error_default": row["rel_frobenius_error"],
                                    "rel_error_reference": ref["rel_frobenius_error"]}
    return out


@contextlib.contextmanager
def stage_timer(stages: dict[str, float]):
    """Adds the CPU seconds (process_time: all threads) spent in each svd-mixed stage to ``stages``:
    svd (truncated_svd), quantize (RTN of the U/V rows), refit (U least squares), errors (candidate
    fit errors), pack (bit packing). The codec's functions are wrapped for the duration."""
    from deltacomp.codecs.svd_mixed import codec as sm

    def timed(name, fn):
        def wrapper(*a, **kw):
            t0 = time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                stages[name] = stages.get(name, 0.0) + time.process_time() - t0
        return wrapper

    cls = sm.SvdMixedCodec
    saved = {n: getattr(sm, n) for n in ("truncated_svd", "_refit", "_fit_error", "pack_encoded")}
    saved_q = cls.__dict__["_quantize_rows"]
    for n, stage in (("truncated_svd", "svd"), ("_refit", "refit"), ("_fit_error", "errors"),
                     ("pack_encoded", "pack")):
        setattr(sm, n, timed(stage, saved[n]))
    cls._quantize_rows = staticmethod(timed("quantize", saved_q.__func__))
    try:
        yield
    finally:
        for n, fn in saved.items():
            setattr(sm, n, fn)
        cls._quantize_rows = saved_q


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
    ap.add_argument("--tensors", default=None, help="comma list of layer tensors (default: all 7)")
    ap.add_argument("--compare-exact", action="store_true",
                    help="also run lowrank/svd-mixed with svd=exact and report exact/default time ratios")
    ap.add_argument("--reference-repo", default=None,
                    help="also time the same encodes with the deltacomp package of this checkout (e.g. a worktree "
                         "of an older commit), in a subprocess just before each tensor's own runs")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--spectrum", default="lowrank", choices=("lowrank", "powerlaw"),
                    help="synthetic deltas: rank 64 + noise, or a power-law spectrum (see synthetic_delta)")
    ap.add_argument("--stages", action="store_true",
                    help="CPU seconds per svd-mixed stage (svd, quantize, refit, errors, pack) in each row")
    ap.add_argument("--layers", type=int, default=32,
                    help="layers for the full-model CPU-minutes extrapolation (when all 7 tensors are run)")
    ap.add_argument("--out", default=None, help="JSON output path (default: print)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.tensors.split(",")) if args.tensors else None
    specs = []
    for spec in args.methods.split(","):
        specs.append(spec)
        if args.compare_exact and spec.partition(":")[0] in ("lowrank", "svd-mixed") and "svd=" not in spec:
            specs.append(spec + ("," if ":" in spec else ":") + "svd=exact")
    rows = []
    for i, (name, n, k) in enumerate(LAYER):
        if wanted is not None and name not in wanted:
            continue
        n, k = max(1, round(n * args.scale)), max(1, round(k * args.scale))
        if args.reference_repo:
            rows += _reference_rows(args, name)
        delta = synthetic_delta(n, k, i, spectrum=args.spectrum).to(args.device)
        budget = n * k * 2 // int(args.ratio) if args.ratio.is_integer() else int(n * k * 2 / args.ratio)
        for spec in specs:
            method, _, rest = spec.partition(":")
            given = dict(kv.split("=", 1) for kv in rest.split(",") if kv) if rest else {}
            codec = get_codec(method)
            try:
                settings = codec.settings_for_budget((n, k), budget, given)
            except SettingsError:  # e.g. bitdelta: one sign mask + its scale is 4 bytes over 1/16
                settings = codec.resolve_settings(given)
            stages: dict[str, float] = {}
            timer = stage_timer(stages) if args.stages and method == "svd-mixed" else contextlib.nullcontext()
            _sync(args.device)
            t0, c0 = time.perf_counter(), time.process_time()
            with timer:
                enc = codec.encode(delta, **settings)
            _sync(args.device)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            rel = float(torch.linalg.matrix_norm(codec.decode(enc).to(delta.device) - delta)
                        / torch.linalg.matrix_norm(delta))
            row = {"tensor": name, "shape": [n, k], "method": spec, "seconds": round(seconds, 4),
                   "cpu_seconds": round(cpu, 3), "loadavg": [round(x, 2) for x in os.getloadavg()],
                   "nbytes": enc.nbytes, "ratio_vs_fp16": round(n * k * 2 / max(enc.nbytes, 1), 3),
                   "rel_frobenius_error": round(rel, 5), "alloc": enc.params.get("alloc", enc.params.get("rank"))}
            if stages:
                row["stages_cpu"] = {k: round(v, 3) for k, v in stages.items()}
            rows.append(row)
            print(json.dumps(row), flush=True)
    totals, cpu_totals = {}, {}
    for row in rows:
        totals[row["method"]] = round(totals.get(row["method"], 0.0) + row["seconds"], 3)
        cpu_totals[row["method"]] = round(cpu_totals.get(row["method"], 0.0) + row.get("cpu_seconds", 0.0), 3)
    full_layer = {r["tensor"] for r in rows} == {t for t, _, _ in LAYER} and args.scale == 1.0
    report = {"device": args.device, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "machine": platform.processor() or platform.machine(), "scale": args.scale, "ratio": args.ratio,
              "spectrum": args.spectrum, "tensors": sorted({r["tensor"] for r in rows}),
              "seconds_per_layer": totals, "cpu_seconds_per_layer": cpu_totals,
              "cpu_minutes_for_layers": ({m: round(v * args.layers / 60, 1) for m, v in cpu_totals.items()}
                                         if full_layer else None), "layers": args.layers,
              "exact_vs_default": _compare(rows),
              "reference_vs_default": _compare(rows, lambda m: "reference:" + m) if args.reference_repo else None,
              "reference_repo": args.reference_repo, "rows": rows}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1)
    print(json.dumps({k: report[k] for k in ("seconds_per_layer", "cpu_seconds_per_layer", "cpu_minutes_for_layers",
                                             "exact_vs_default", "reference_vs_default")},
                     indent=1))


def _reference_rows(args, tensor: str) -> list[dict]:
    """This script's rows for one tensor, run with the package of ``args.reference_repo``."""
    cmd = [sys.executable, os.path.abspath(__file__), "--tensors", tensor, "--methods", args.methods,
           "--device", args.device, "--scale", str(args.scale), "--ratio", str(args.ratio),
           "--spectrum", args.spectrum] + (["--stages"] if args.stages else [])
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": os.path.abspath(args.reference_repo)}
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"tensor"')]
    for row in rows:
        row["method"] = "reference:" + row["method"]
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
