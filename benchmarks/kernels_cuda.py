"""CUDA kernels of torch.ops.deltacomp.* timed against dense fp16/bf16 matmuls and their bytes bound,
on 7B/70B layer shapes, in one run (JSON out). Called by benchmarks/kernels.py --device cuda, or directly:

    python benchmarks/kernels_cuda.py --out results.json [--shapes 4096x4096,...] [--ms 1,4,16,64]

Shapes are N x K (output x input features of the layer). Every time is the median over replays of a CUDA
graph holding `reps` calls that cycle through enough weight copies to pass 3x the L2 cache, so each call
reads its weights from HBM; CUDA events time the replays. The bytes bound is (weights read + x read + y
written) / the device-to-device copy bandwidth measured at the start of the same run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
os.environ.setdefault("DELTACOMP_CUDA_KERNELS", "1")

from deltacomp import ops  # noqa: E402
from deltacomp.codecs import get_codec  # noqa: E402
from deltacomp.quant.bitpack import pack_bits  # noqa: E402

SHAPES = "4096x4096,11008x4096,4096x11008,8192x8192,14336x4096,28672x8192"
DEV = "cuda"


def copy_bandwidth() -> float:
    """Bytes per second of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / statistics.median(times)


def copies_for(nbytes: int) -> int:
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, min(64, math.ceil(3 * l2 / max(nbytes, 1))))


def time_calls(fns, reps: int = 20, replays: int = 15) -> float:
    """Median seconds per call of fns[i % len(fns)] (i < reps), from CUDA-graph replays."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for f in fns[:3]:
            f()  # warm-up: module load, workspace sizes, cuBLAS handles
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    return statistics.median(times)


def _rand_signs(n, k, copies):
    return [torch.randint(0, 256, (n, (k + 7) // 8), dtype=torch.uint8, device=DEV) for _ in range(copies)]


def bench_layer(n: int, k: int, ms, bw: float, dtype=torch.float16) -> list[dict]:
    rows = []
    es = torch.tensor([], dtype=dtype).element_size()
    wc = copies_for(n * k * es)
    dense = [torch.randn(n, k, device=DEV, dtype=dtype) for _ in range(wc)]
    sc = copies_for(n * ((k + 7) // 8))
    signs = _rand_signs(n, k, sc)
    scale = torch.tensor(0.01, device=DEV)
    svd = _svd_mixed_factors(n, k, copies_for(n * k * 2 // 16))
    tern = _ternary_form(n, k, 0.05, copies_for(int(n * k * 0.05 * 4)))
    fused_signs = signs if len(signs) >= wc else (signs * wc)[:wc]
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=dtype)
        io = (m * k + m * n) * es
        t_dense = time_calls([lambda w=w: x @ w.T for w in dense])
        t_sign = time_calls([lambda p=p: torch.ops.deltacomp.sign_matmul(x, p, scale, k) for p in signs])
        t_naive = time_calls([lambda p=p: x @ (ops.unpack_signs(p, k).to(dtype) * scale.to(dtype)).T
                              for p in signs[:2]])
        t_fused = time_calls([lambda w=w, p=p: torch.ops.deltacomp.sign_matmul_fused(x, w, p, scale, k)
                              for w, p in zip(dense, fused_signs)]) if m <= 64 else None
        t_svd = time_calls([lambda f=f: _svd_call(x, f, n, k) for f in svd])
        t_tern = time_calls([lambda f=f: torch.ops.deltacomp.ternary_matmul(x, *f, scale, k) for f in tern])
        sign_bytes = n * ((k + 7) // 8)
        svd_bytes = sum(t.numel() * t.element_size() for t in svd[0][0].values())
        tern_bytes = sum(t.numel() * t.element_size() for t in tern[0])
        rows.append({
            "shape": f"{n}x{k}", "m": m, "dtype": str(dtype).replace("torch.", ""),
            "dense_us": t_dense * 1e6, "dense_bound_us": (n * k * es + io) / bw * 1e6,
            "sign_us": t_sign * 1e6, "sign_bound_us": (sign_bytes + io) / bw * 1e6,
            "naive_unpack_us": t_naive * 1e6,
            "fused_us": None if t_fused is None else t_fused * 1e6,
            "fused_bound_us": (n * k * es + sign_bytes + io) / bw * 1e6,
            "svd_mixed16_us": t_svd * 1e6, "svd_mixed16_bytes": svd_bytes, "svd_bound_us": (svd_bytes + io) / bw * 1e6,
            "ternary5_us": t_tern * 1e6, "ternary5_bytes": tern_bytes, "ternary_bound_us": (tern_bytes + io) / bw * 1e6,
        })
        r = rows[-1]
        print(f"{r['shape']:>11} M={m:<3} dense {r['dense_us']:8.2f}us  sign {r['sign_us']:7.2f} "
              f"(bound {r['sign_bound_us']:.2f})  fused {r['fused_us'] or float('nan'):8.2f} "
              f"({(r['fused_us'] or float('nan')) / r['dense_us']:.2f}x dense)  svd16 {r['svd_mixed16_us']:7.2f} "
              f"(bound {r['svd_bound_us']:.2f})  tern {r['ternary5_us']:7.2f} (bound {r['ternary_bound_us']:.2f})",
              flush=True)
    del dense, signs, svd, tern
    torch.cuda.empty_cache()
    return rows


def _svd_mixed_factors(n, k, copies):
    codec = get_codec("svd-mixed")
    s = codec.resolve_settings({"ratio": 16})
    alloc = codec.allocation_for((n, k), s)
    gs = s["group_size"]
    out = []
    for _ in range(copies):
        groups = {}
        for b, c in alloc:
            def factor(length):
                codes = torch.randint(0, 1 << b, (c * length,), dtype=torch.uint8, device=DEV)
                g = -(-length // gs)
                return (pack_bits(codes, b), torch.rand(c, g, device=DEV).half() * 0.01,
                        torch.randn(c, g, device=DEV).half() * 0.01)
            v, u = factor(k), factor(n)
            groups.update({f"v_q{b}": v[0], f"v_scale{b}": v[1], f"v_zero{b}": v[2], f"u_q{b}": u[0],
                           f"u_scale{b}": u[1], f"u_zero{b}": u[2], f"s{b}": torch.rand(c, device=DEV)})
        out.append((groups, alloc, gs))
    return out


def _svd_call(x, f, n, k):
    t, alloc, gs = f
    y = None
    for b, _ in alloc:
        term = torch.ops.deltacomp.kbit_lowrank_matmul(x, t[f"v_q{b}"], t[f"v_scale{b}"], t[f"v_zero{b}"],
                                                      t[f"u_q{b}"], t[f"u_scale{b}"], t[f"u_zero{b}"], t[f"s{b}"],
                                                      b, n, k, gs)
        y = term if y is None else y + term
    return y


def _ternary_form(n, k, density, copies):
    out = []
    for _ in range(copies):
        per_row = int(k * density)
        cols = torch.stack([torch.randperm(k, device=DEV)[:per_row].sort().values for _ in range(1)]).repeat(n, 1)
        row_ptr = torch.arange(n + 1, device=DEV, dtype=torch.int64) * per_row
        neg_start = row_ptr[:-1] + per_row // 2
        out.append((row_ptr, neg_start, cols.reshape(-1).to(torch.int32)))
    return out


def bench_multi(n, k, tenants_list, bw, dtype=torch.float16) -> list[dict]:
    rows = []
    for t in tenants_list:
        packed = torch.randint(0, 256, (t, n, (k + 7) // 8), dtype=torch.uint8, device=DEV)
        scales = torch.rand(t, device=DEV)
        dense = [torch.randn(n, k, device=DEV, dtype=dtype) for _ in range(t)]
        x = torch.randn(t, k, device=DEV, dtype=dtype)
        index = torch.arange(t, device=DEV)
        t_multi = time_calls([lambda: torch.ops.deltacomp.sign_matmul_multi(x, packed, scales, index, k)])
        t_sep = time_calls([lambda: [x[i:i + 1] @ dense[i].T for i in range(t)]], reps=5)
        rows.append({"shape": f"{n}x{k}", "tenants": t, "multi_us": t_multi * 1e6, "separate_dense_us": t_sep * 1e6,
                     "speedup": t_sep / t_multi, "bound_us": (packed.numel() + 2 * t * (n + k) * 2) / bw * 1e6})
        print(f"multi {n}x{k} tenants={t:<3} one call {t_multi * 1e6:8.2f}us  {t} dense {t_sep * 1e6:8.2f}us  "
              f"speedup {t_sep / t_multi:5.2f}x", flush=True)
        del packed, dense
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default=SHAPES)
    ap.add_argument("--ms", default="1,4,16,64")
    ap.add_argument("--tenants", default="1,4,16,64")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--out", default="benchmarks/results/kernels_cuda.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or not ops.CUDA_KERNELS_BUILT:
        print("kernels_cuda: needs a CUDA device and the extension's CUDA kernels", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False
    dtype = getattr(torch, args.dtype)
    t0 = time.time()
    bw = copy_bandwidth()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}: {props.multi_processor_count} SMs, L2 {props.L2_cache_size >> 20} MiB, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s (read + write)", flush=True)
    ms = [int(v) for v in args.ms.split(",")]
    layers = []
    for shp in args.shapes.split(","):
        n, k = (int(v) for v in shp.split("x"))
        layers += bench_layer(n, k, ms, bw, dtype)
    multi = bench_multi(4096, 4096, [int(v) for v in args.tenants.split(",")], bw, dtype)
    result = {"device": props.name, "sms": props.multi_processor_count, "l2_bytes": props.L2_cache_size,
              "copy_bandwidth_Bps": bw, "torch": torch.__version__, "cuda": torch.version.cuda,
              "dtype": args.dtype, "layers": layers, "multi_tenant": multi, "seconds": time.time() - t0,
              "method": "median over CUDA-graph replays of 20 calls, weights rotated past 3x L2; bounds from "
                        "the copy bandwidth measured in this run"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
