"""Kernel timings on the CPU, every implementation against same-run baselines:

- sign_matmul (1-bit delta term) vs torch fp32 dense ``x @ W.T`` vs the naive unpack-then-matmul;
- sign_matmul_fused (base layer + BitDelta term in one pass, fp32 and bf16 W) vs the dense base matmul
  alone and vs the unfused serving path (dense base matmul + sign_matmul);
- sign_matmul_multi (T deltas, one x row each: the decode batch of T tenants) vs T separate dense fp32
  matmuls (T full fine-tunes) and vs T separate sign_matmul calls;
- kbit_lowrank_matmul (svd-mixed at --lowrank-ratio with the default 8/3/2-bit allocation, through
  SvdMixedCodec.matmul: one op call per bit-width group; ``lowrank_op_generic``: its portable path with
  the AVX2 decode, what an AVX2-only CPU runs) vs torch fp32 dense ``x @ W.T``, vs the
  Python dequantize-then-matmul path it replaced, and vs the bytes-moved bound (the packed bytes at the
  read bandwidth measured in the same run: a single ``sum`` over a 256 MB tensor).

    PYTHONPATH=. python benchmarks/kernels.py --out kernels_cpu.json
    PYTHONPATH=. python benchmarks/kernels.py --shapes 4096x11008 --ms 1 --repeats 30
    PYTHONPATH=. python benchmarks/kernels.py --threads 1 --only fused,multi --out serve_cpu_1thread.json
    PYTHONPATH=. python benchmarks/kernels.py --threads 1 --only lowrank --out lowrank_cpu_1thread.json

Shapes are N x K (output rows x reduction). Each implementation cycles through enough copies of its
weights (and x) that together they exceed the last-level cache, so every call reads its weights from
memory as in a real forward pass; the implementations are interleaved call by call so machine noise
hits them alike. Reported: median (and min) of the repeats, in ms, the ratios to the same-run baselines,
and every op's time over its bytes-moved bound (its packed bytes read once at the measured bandwidth).
Defaults: the layer shapes of 7B/70B models, M = 1, 4, 16, 64 and 1, 4, 16, 64 tenants (the full set
takes a while on a small machine: narrow it with --shapes / --ms / --only).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from deltacomp.codecs.svd_mixed import allocation as al
from deltacomp import ops
from deltacomp.codecs import get_codec
from deltacomp.codecs.base import Encoded
from deltacomp.quant.rtn import n_groups

LAYER_SHAPES = ("4096x4096", "11008x4096", "4096x11008", "8192x8192", "14336x4096", "28672x8192")
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


def bench_shape(n: int, k: int, ms: list[int], repeats: int, naive: bool, generic: bool,
                bandwidth: float) -> list[dict]:
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
        med, low = _time(impls, repeats)
        bound_ms = _bound_ms(p0.nbytes + scale.nbytes, bandwidth)
        row = {"op": "sign_matmul", "n": n, "k": k, "m": m, "median_ms": med, "min_ms": low,
               "packed_bytes": p0.nbytes, "bytes_bound_ms": bound_ms,
               "op_over_bytes_bound": med["sign_matmul"] / bound_ms,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["sign_matmul"],
               "speedup_vs_dense_fp32_min": low["dense_fp32"] / low["sign_matmul"]}
        if naive:
            row["speedup_vs_naive"] = med["naive_unpack_matmul"] / med["sign_matmul"]
        rows.append(row)
        print(f"{n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  dense/sign={row['speedup_vs_dense_fp32']:6.1f}x (min: {row['speedup_vs_dense_fp32_min']:.1f}x)"
              + (f"  naive/sign={row['speedup_vs_naive']:6.1f}x" if naive else "")
              + f"  sign/bound={row['op_over_bytes_bound']:5.1f}", flush=True)
    return rows


def _time(impls: dict, repeats: int) -> tuple[dict, dict]:
    """Median and min ms per implementation, interleaved call by call (after one warm-up call each).
    The min is reported beside the median: on a shared machine the median carries other processes' noise."""
    times = {name: [] for name in impls}
    for fn in impls.values():
        fn(0)
    for i in range(repeats):
        for name, fn in impls.items():
            t0 = time.perf_counter()
            fn(i + 1)
            times[name].append(time.perf_counter() - t0)
    return ({name: statistics.median(ts) * 1e3 for name, ts in times.items()},
            {name: min(ts) * 1e3 for name, ts in times.items()})


def _check(got, want, what: str) -> None:
    # correctness guard: a fast wrong kernel must not produce a table
    tol = 1e-2 * float(want.float().abs().max()) + 1e-3
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=tol), f"{what} disagrees with its reference"


def bench_fused(n: int, k: int, ms: list[int], repeats: int, bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(n, k, generator=g)
    p0 = ops.pack_signs_ref(torch.randn(n, k, generator=g))
    scale = torch.rand((), generator=g)
    rows = []
    for wdtype in (torch.float32, torch.bfloat16):
        wb = w0.to(wdtype)
        copies = _copies(wb.nbytes + p0.nbytes, 8)
        ws = [wb] + [wb.clone() for _ in range(copies - 1)]
        ps = [p0] + [p0.clone() for _ in range(copies - 1)]
        for m in ms:
            xs = [torch.randn(m, k, generator=g).to(wdtype) for _ in range(8)]
            c = len(ws)
            impls = {
                "fused": lambda i: torch.ops.deltacomp.sign_matmul_fused(xs[i % 8], ws[i % c], ps[i % c], scale, k),
                "dense_plus_sign": lambda i: (xs[i % 8] @ ws[i % c].T
                                              + torch.ops.deltacomp.sign_matmul(xs[i % 8], ps[i % c], scale, k)),
                "dense_base": lambda i: xs[i % 8] @ ws[i % c].T,
            }
            _check(impls["fused"](0), ops.sign_matmul_fused_ref(xs[0], ws[0], ps[0], scale, k), "sign_matmul_fused")
            med, low = _time(impls, repeats)
            bound_ms = _bound_ms(wb.nbytes + p0.nbytes, bandwidth)
            row = {"op": "sign_matmul_fused", "n": n, "k": k, "m": m, "w_dtype": str(wdtype).split(".")[-1],
                   "median_ms": med, "min_ms": low, "bytes_bound_ms": bound_ms,
                   "fused_over_bytes_bound": med["fused"] / bound_ms,
                   "fused_over_dense": med["fused"] / med["dense_base"],
                   "unfused_over_dense": med["dense_plus_sign"] / med["dense_base"],
                   "speedup_fused_vs_unfused": med["dense_plus_sign"] / med["fused"]}
            rows.append(row)
            print(f"fused {n:>6}x{k:<6} M={m:<3} W={row['w_dtype']:<8} " + "  ".join(
                f"{nm}={t:8.3f}ms" for nm, t in med.items())
                + f"  fused/dense={row['fused_over_dense']:5.2f}  unfused/dense={row['unfused_over_dense']:5.2f}"
                + f"  fused/bound={row['fused_over_bytes_bound']:5.2f}",
                flush=True)
    return rows


def bench_multi(n: int, k: int, tenants: list[int], repeats: int, bandwidth: float) -> list[dict]:
    """Decode batch of T rows, row t using delta t (one x row per tenant)."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for t_count in tenants:
        w_base = torch.randn(n, k, generator=g)
        dense = [w_base + 0.01 * torch.randn(n, k, generator=g) for _ in range(t_count)]  # T fine-tunes
        d_sets = max(1, _copies(t_count * w_base.nbytes, 4) // 1) if t_count == 1 else 1
        dense_sets = [dense] + [[w.clone() for w in dense] for _ in range(d_sets - 1)]
        stack = ops.pack_signs_ref(torch.randn(t_count, n, k, generator=g))
        stacks = [stack] + [stack.clone() for _ in range(_copies(stack.nbytes) - 1)]
        scales = torch.rand(t_count, generator=g)
        index = torch.arange(t_count)
        xs = [torch.randn(t_count, k, generator=g) for _ in range(8)]
        ns, nd = len(stacks), len(dense_sets)
        impls = {
            "sign_matmul_multi": lambda i: torch.ops.deltacomp.sign_matmul_multi(xs[i % 8], stacks[i % ns], scales,
                                                                                 index, k),
            "sign_matmul_loop": lambda i: torch.cat([torch.ops.deltacomp.sign_matmul(
                xs[i % 8][t:t + 1], stacks[i % ns][t], scales[t], k) for t in range(t_count)]),
            "dense_fp32_loop": lambda i: torch.cat([xs[i % 8][t:t + 1] @ dense_sets[i % nd][t].T
                                                    for t in range(t_count)]),
        }
        _check(impls["sign_matmul_multi"](0), ops.sign_matmul_multi_ref(xs[0], stacks[0], scales, index, k),
               "sign_matmul_multi")
        med, low = _time(impls, repeats)
        bound_ms = _bound_ms(stack.nbytes, bandwidth)
        row = {"op": "sign_matmul_multi", "n": n, "k": k, "tenants": t_count, "m": t_count,
               "median_ms": med, "min_ms": low, "bytes_bound_ms": bound_ms,
               "multi_over_bytes_bound": med["sign_matmul_multi"] / bound_ms,
               "speedup_vs_dense_loop": med["dense_fp32_loop"] / med["sign_matmul_multi"],
               "speedup_vs_sign_loop": med["sign_matmul_loop"] / med["sign_matmul_multi"]}
        rows.append(row)
        print(f"multi {n:>6}x{k:<6} T={t_count:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  dense_loop/multi={row['speedup_vs_dense_loop']:5.1f}x"
              + f"  sign_loop/multi={row['speedup_vs_sign_loop']:5.2f}x"
              + f"  multi/bound={row['multi_over_bytes_bound']:5.1f}", flush=True)
        del dense, dense_sets, stacks
    return rows


def _read_bandwidth() -> float:
    """Bytes per second of one streaming read (``sum`` of a 256 MB fp32 tensor), best of 5."""
    a = torch.ones(64 << 20)
    a.sum()
    best = min(_timed(a.sum) for _ in range(5))
    return a.nbytes / best


def _bound_ms(nbytes: int, bandwidth: float) -> float:
    """The bytes-moved bound: ``nbytes`` read once at the measured read bandwidth, in ms."""
    return nbytes / bandwidth * 1e3


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _random_svd_mixed(n: int, k: int, ratio: float, gs: int, g: torch.Generator) -> Encoded:
    """An svd-mixed Encoded of the default allocation at ``ratio``, with random codes (timings do not
    depend on the values; an SVD of a 4096 x 11008 delta would take minutes here)."""
    alloc = al.default_allocation((n, k), int(n * k * 2 / ratio), gs)
    t: dict[str, torch.Tensor] = {}
    for b, c in alloc:
        for f, length in (("v", k), ("u", n)):
            t[f"{f}_q{b}"] = torch.randint(0, 256, ((c * length * b + 7) // 8,), generator=g, dtype=torch.uint8)
            t[f"{f}_scale{b}"] = (torch.rand(c, n_groups(length, gs), generator=g) * 0.01).half()
            t[f"{f}_zero{b}"] = (-torch.rand(c, n_groups(length, gs), generator=g) * 0.01).half()
    t["s"] = torch.rand(sum(c for _, c in alloc), generator=g)
    return Encoded("svd-mixed", (n, k), t, {"group_size": gs, "alloc": al.format_alloc(alloc)})


def _dequant_matmul(codec, x: torch.Tensor, enc: Encoded) -> torch.Tensor:
    """The path kbit_lowrank_matmul replaced: each group's U and V dequantized in Python, then matmuls."""
    y = x.new_zeros(x.shape[0], enc.shape[0])
    for ut, sv, v in codec._groups(enc):
        y += ((x @ v.T) * sv) @ ut
    return y


def bench_lowrank(n: int, k: int, ms: list[int], repeats: int, ratio: float, bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    codec = get_codec("svd-mixed")
    enc0 = _random_svd_mixed(n, k, ratio, 128, g)
    encs = [enc0] + [Encoded(enc0.codec, enc0.shape, {f: v.clone() for f, v in enc0.tensors.items()}, enc0.params)
                     for _ in range(_copies(enc0.nbytes) - 1)]
    w0 = torch.randn(n, k, generator=g)
    dense = [w0] + [w0.clone() for _ in range(_copies(w0.nbytes, 4) - 1)]
    ne, nd = len(encs), len(dense)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, generator=g) for _ in range(8)]
        impls = {
            "lowrank_op": lambda i: codec.matmul(xs[i % 8], encs[i % ne]),
            "lowrank_op_generic": _with_isa("generic", lambda i: codec.matmul(xs[i % 8], encs[i % ne])),
            "python_dequant": lambda i: _dequant_matmul(codec, xs[i % 8], encs[i % ne]),
            "dense_fp32": lambda i: xs[i % 8] @ dense[i % nd].T,
        }
        _check(impls["lowrank_op"](0), _dequant_matmul(codec, xs[0], encs[0]), "kbit_lowrank_matmul")
        med, low = _time(impls, repeats)
        bound_ms = _bound_ms(enc0.nbytes, bandwidth)
        row = {"op": "kbit_lowrank_matmul", "n": n, "k": k, "m": m, "ratio": ratio, "alloc": enc0.params["alloc"],
               "packed_bytes": enc0.nbytes, "dense_fp32_bytes": w0.nbytes, "bytes_bound_ms": bound_ms,
               "median_ms": med, "min_ms": low,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["lowrank_op"],
               "speedup_vs_dense_fp32_min": low["dense_fp32"] / low["lowrank_op"],
               "speedup_vs_python_dequant": med["python_dequant"] / med["lowrank_op"],
               "op_over_bytes_bound": med["lowrank_op"] / bound_ms}
        rows.append(row)
        print(f"lowrank {n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  bound={bound_ms:6.3f}ms  dense/op={row['speedup_vs_dense_fp32']:5.1f}x"
              + f" (min: {row['speedup_vs_dense_fp32_min']:.1f}x)  py/op={row['speedup_vs_python_dequant']:5.1f}x"
              + f"  op/bound={row['op_over_bytes_bound']:5.1f}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(LAYER_SHAPES), help="N x K, comma separated (default: the "
                    "layers of 7B/8B/70B models: attention, MLP up and down, 70B attention and MLP)")
    ap.add_argument("--ms", default="1,4,16,64", help="rows of x (batch), comma separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the unpack-then-matmul reference")
    ap.add_argument("--no-generic", action="store_true", help="skip the portable (non-AVX-512) kernel path")
    ap.add_argument("--only", default="sign,fused,multi", help="which benchmarks: sign, fused, multi, lowrank")
    ap.add_argument("--fused-ms", default="1,2,4,16", help="rows of x for the fused op")
    ap.add_argument("--multi-shapes", default="4096x4096", help="N x K for the multi-tenant op")
    ap.add_argument("--tenants", default="1,4,16,64", help="deltas in one decode batch (one row each)")
    ap.add_argument("--lowrank-shapes", default=None, help="N x K for the svd-mixed op (default: --shapes)")
    ap.add_argument("--lowrank-ratio", type=float, default=16.0, help="svd-mixed compression ratio vs fp16")
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
    only = set(args.only.split(","))
    bw = _read_bandwidth()
    print(f"# read bandwidth {bw / 1e9:.2f} GB/s (sum over 256 MB): the bytes-moved bounds use it")
    info["read_bandwidth_gb_s"] = bw / 1e9
    rows = []
    for n, k in shapes:
        if "sign" in only:
            rows += bench_shape(n, k, ms, args.repeats, not args.no_naive, not args.no_generic, bw)
        if "fused" in only:
            rows += bench_fused(n, k, [int(v) for v in args.fused_ms.split(",")], args.repeats, bw)
    if "multi" in only:
        for spec in args.multi_shapes.split(","):
            n, k = (int(v) for v in spec.lower().split("x"))
            rows += bench_multi(n, k, [int(v) for v in args.tenants.split(",")], args.repeats, bw)
    if "lowrank" in only:
        for spec in (args.lowrank_shapes or args.shapes).split(","):
            n, k = (int(v) for v in spec.lower().split("x"))
            rows += bench_lowrank(n, k, ms, args.repeats, args.lowrank_ratio, bw)
    info["loadavg_after"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
