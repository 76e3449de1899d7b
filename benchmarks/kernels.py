"""Kernel timings: 1-bit sign_matmul (the C++ extension) vs torch fp32 dense ``x @ W.T`` vs the naive
unpack-then-matmul reference, in one run, on the CPU.

    PYTHONPATH=. python benchmarks/kernels.py --out kernels_cpu.json
    PYTHONPATH=. python benchmarks/kernels.py --shapes 4096x11008 --ms 1 --repeats 30

Shapes are N x K (output rows x reduction). Each implementation cycles through enough copies of its
weights (and x) that together they exceed the last-level cache, so every call reads its weights from
memory as in a real forward pass; the implementations are interleaved call by call so machine noise
hits them alike. Reported: median (and min) of the repeats, in ms, and the ratios to sign_matmul.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from deltacomp import ops

CACHE_BYTES = 64 << 20  # rotate through at least this many bytes per implementation (> LLC here)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _copies(nbytes: int, max_copies: int = 64) -> int:
    return max(2, min(max_copies, -(-CACHE_BYTES // max(nbytes, 1))))


def _with_isa(isa: str, fn):
    def run(i):
        old = os.environ.get("DELTACOMP_CPU_ISA")
        os.environ["DELTACOMP_CPU_ISA"] = isa
        try:
            return fn(i)
        finally:
            if old is None:
                del os.environ["DELTACOMP_CPU_ISA"]
            else:
                os.environ["DELTACOMP_CPU_ISA"] = old
    return run


def bench_shape(n: int, k: int, ms: list[int], repeats: int, naive: bool, generic: bool) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(n, k, generator=g)
    dense = [w0] + [w0.clone() for _ in range(_copies(w0.nbytes, 4) - 1)]  # 4 x 180 MB at most
    p0 = ops.pack_signs_ref(w0)
    packed = [p0] + [p0.clone() for _ in range(_copies(p0.nbytes) - 1)]
    scale = torch.rand(n, generator=g)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, generator=g) for _ in range(8)]
        impls = {
            "sign_matmul": lambda i: torch.ops.deltacomp.sign_matmul(xs[i % 8], packed[i % len(packed)], scale, k),
            "dense_fp32": lambda i: xs[i % 8] @ dense[i % len(dense)].T,
        }
        if generic:
            impls["sign_matmul_generic"] = _with_isa("generic", impls["sign_matmul"])
        if naive:
            impls["naive_unpack_matmul"] = lambda i: ops.sign_matmul_ref(xs[i % 8], packed[i % len(packed)], scale, k)
        # correctness guard: a fast wrong kernel must not produce a table
        want = ops.sign_matmul_ref(xs[0], packed[0], scale, k)
        got = impls["sign_matmul"](0)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max())), "sign_matmul disagrees"
        times = {name: [] for name in impls}
        for name, fn in impls.items():  # warm-up
            fn(0)
        for i in range(repeats):
            for name, fn in impls.items():
                t0 = time.perf_counter()
                fn(i + 1)
                times[name].append(time.perf_counter() - t0)
        med = {name: statistics.median(ts) * 1e3 for name, ts in times.items()}
        # min alongside the median: on a shared machine the median carries other processes' noise
        low = {name: min(ts) * 1e3 for name, ts in times.items()}
        row = {"n": n, "k": k, "m": m, "median_ms": med, "min_ms": low,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["sign_matmul"],
               "speedup_vs_dense_fp32_min": low["dense_fp32"] / low["sign_matmul"]}
        if naive:
            row["speedup_vs_naive"] = med["naive_unpack_matmul"] / med["sign_matmul"]
        rows.append(row)
        print(f"{n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  dense/sign={row['speedup_vs_dense_fp32']:6.1f}x (min: {row['speedup_vs_dense_fp32_min']:.1f}x)"
              + (f"  naive/sign={row['speedup_vs_naive']:6.1f}x" if naive else ""), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="N x K, comma separated")
    ap.add_argument("--ms", default="1,4,16", help="rows of x (batch), comma separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the unpack-then-matmul reference")
    ap.add_argument("--no-generic", action="store_true", help="skip the portable (non-AVX-512) kernel path")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not ops.HAS_EXTENSION:
        raise SystemExit(f"the C++ extension is not built ({ops._EXT_ERROR}); build it first: "
                         "python setup.py build_ext --inplace")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    info = {"device": "cpu", "cpu": _cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "avx512f": "avx512f" in open("/proc/cpuinfo").read()
            if os.path.exists("/proc/cpuinfo") else None,
            "loadavg_before": os.getloadavg(), "repeats": args.repeats}
    print(f"# {info['cpu']}, {info['threads']} threads, torch {info['torch']}, load {info['loadavg_before']}")
    rows = []
    for n, k in shapes:
        rows += bench_shape(n, k, ms, args.repeats, not args.no_naive, not args.no_generic)
    info["loadavg_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
