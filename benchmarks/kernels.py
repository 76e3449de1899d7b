"""Kernel timings on the CPU, every implementation against same-run baselines:

- sign_matmul (1-bit delta term) vs torch fp32 dense ``x @ W.T`` vs the naive unpack-then-matmul;
- sign_matmul_fused (base layer + BitDelta term in one pass, fp32 and bf16 W) vs the dense base matmul
  alone and vs the unfused serving path (dense base matmul + sign_matmul);
- sign_matmul_multi (T deltas, one x row each: the decode batch of T tenants) vs T separate dense fp32
  matmuls (T full fine-tunes) and vs T separate sign_matmul calls;
- kbit_lowrank_matmul (svd-mixed at --lowrank-ratio with the default 8/3/2-bit allocation, through
  its serving term, what a patched layer runs: one ``kbit_lowrank_matmul_groups`` call for all the
  bit-width groups; before it, one op call per group) vs torch fp32 dense ``x @ W.T``, vs the
  Python dequantize-then-matmul path it replaced, and vs the bytes-moved bound (the packed bytes at the
  read bandwidth measured in the same run: a single ``sum`` over a 256 MB tensor);
- ternary_matmul (TERNARY_CSR at --ternary-density) vs torch fp32 and bf16 dense.

Every op is also timed against torch bf16 dense ``x @ W.T`` (bf16 x and W). ``--isa avx512|avx2|neon|
portable`` forces the CPU code path of the deltacomp kernels (it sets DELTACOMP_ISA; the torch baselines
are unchanged); the JSON records the path taken, the CPU model and its SIMD flags. One run per path
gives the per-path columns of docs/cpu-kernels.md. The fused rows also record which path DeltaLinear's measured
dispatch (deltacomp/serve/dispatch.py) picks for that shape, and its time over the dense base.

    PYTHONPATH=. python benchmarks/kernels.py --out kernels_cpu.json
    PYTHONPATH=. python benchmarks/kernels.py --shapes 4096x11008 --ms 1 --repeats 30
    PYTHONPATH=. python benchmarks/kernels.py --threads 1 --only fused,multi --out serve_cpu_1thread.json
    PYTHONPATH=. python benchmarks/kernels.py --threads 1 --only lowrank --out lowrank_cpu_1thread.json
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 \
        PYTHONPATH=. python benchmarks/kernels.py --threads 1 --isa avx2 --shapes 4096x11008 --ms 1 --fused-ms 1
      (an AVX2 machine emulated on an AVX-512 one: the torch baselines limited to AVX2 as well)

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
import sys

import torch

from deltacomp import ops, ops_tl
from deltacomp.codecs.svd_mixed import allocation as al
from deltacomp.serve import dispatch as serve_dispatch
from deltacomp.codecs import get_codec
from deltacomp.codecs.base import Encoded
from deltacomp.quant.rtn import n_groups
from deltacomp.quant import tl4
from kernel_timing import (bytes_bound_ms, check, check_tables, copies_for, cpu_flags, cpu_name, read_bandwidth,
                           time_interleaved, with_env)

LAYER_SHAPES = ("4096x4096", "11008x4096", "4096x11008", "8192x8192", "14336x4096", "28672x8192")


def bench_shape(n: int, k: int, ms: list[int], repeats: int, naive: bool, lut: bool,
                bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    w0 = torch.randn(n, k, generator=g)
    dense = [w0] + [w0.clone() for _ in range(copies_for(w0.nbytes, 4) - 1)]  # 4 x 180 MB at most
    dense16 = [w.bfloat16() for w in dense]
    p0 = ops.pack_signs_ref(w0)
    packed = [p0] + [p0.clone() for _ in range(copies_for(p0.nbytes) - 1)]
    scale = torch.rand(n, generator=g)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, generator=g) for _ in range(8)]
        xs16 = [x.bfloat16() for x in xs]
        impls = {
            "sign_matmul": lambda i: torch.ops.deltacomp.sign_matmul(xs[i % 8], packed[i % len(packed)], scale, k),
            "dense_fp32": lambda i: xs[i % 8] @ dense[i % len(dense)].T,
            "dense_bf16": lambda i: xs16[i % 8] @ dense16[i % len(dense16)].T,
        }
        if lut and m == 1:  # the other kernels of one x row (csrc/cpu/sign_kernels.h): plain SIMD, byte tables
            for variant in ("simd", "lut8"):
                impls[f"sign_matmul_{variant}"] = with_env("DELTACOMP_SIGN_KERNEL", variant, impls["sign_matmul"])
                check(impls[f"sign_matmul_{variant}"](0), ops.sign_matmul_ref(xs[0], packed[0], scale, k),
                       f"sign_matmul ({variant})")
        if m == 1 and ops_tl.sign_tl_wanted() and tl4.supports_signs(k):  # int8 tables (bitdelta's decode default)
            tls = [ops_tl.pack_tl4_signs(p, k) for p in packed]
            impls["sign_matmul_tl"] = lambda i: ops_tl.sign_matmul_tl(xs[i % 8], None, tls[i % len(tls)], scale, n, k)
            check_tables(impls["sign_matmul_tl"](0), ops.sign_matmul_ref(xs[0], packed[0], scale, k), "sign_matmul_tl")
        if naive:
            impls["naive_unpack_matmul"] = lambda i: ops.sign_matmul_ref(xs[i % 8], packed[i % len(packed)], scale, k)
        # correctness guard: a fast wrong kernel must not produce a table
        want = ops.sign_matmul_ref(xs[0], packed[0], scale, k)
        got = impls["sign_matmul"](0)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-3 * float(want.abs().max())), "sign_matmul disagrees"
        med, low = time_interleaved(impls, repeats)
        bound_ms = bytes_bound_ms(p0.nbytes + scale.nbytes, bandwidth)
        row = {"op": "sign_matmul", "n": n, "k": k, "m": m, "median_ms": med, "min_ms": low,
               "packed_bytes": p0.nbytes, "bytes_bound_ms": bound_ms,
               "op_over_bytes_bound": med["sign_matmul"] / bound_ms,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["sign_matmul"],
               "speedup_vs_dense_fp32_min": low["dense_fp32"] / low["sign_matmul"],
               "speedup_vs_dense_bf16": med["dense_bf16"] / med["sign_matmul"]}
        if "sign_matmul_tl" in med:
            row["tl_speedup_vs_dense_fp32"] = med["dense_fp32"] / med["sign_matmul_tl"]
            row["tl_speedup_vs_dense_fp32_min"] = low["dense_fp32"] / low["sign_matmul_tl"]
            row["tl_over_bytes_bound"] = med["sign_matmul_tl"] / bound_ms
        if "sign_matmul_lut8" in med:  # each variant's time over the default kernel's
            row["simd_over_default"] = med["sign_matmul_simd"] / med["sign_matmul"]
            row["lut8_over_default"] = med["sign_matmul_lut8"] / med["sign_matmul"]
        if naive:
            row["speedup_vs_naive"] = med["naive_unpack_matmul"] / med["sign_matmul"]
        rows.append(row)
        print(f"{n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  dense/sign={row['speedup_vs_dense_fp32']:6.1f}x (min: {row['speedup_vs_dense_fp32_min']:.1f}x)"
              + f"  bf16/sign={row['speedup_vs_dense_bf16']:5.1f}x"
              + (f"  naive/sign={row['speedup_vs_naive']:6.1f}x" if naive else "")
              + f"  sign/bound={row['op_over_bytes_bound']:5.1f}"
              + (f"  dense/tl={row['tl_speedup_vs_dense_fp32']:5.1f}x  tl/bound={row['tl_over_bytes_bound']:4.1f}"
                 if "sign_matmul_tl" in med else ""), flush=True)
    return rows


def bench_fused(n: int, k: int, ms: list[int], repeats: int, bandwidth: float) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(n, k, generator=g)
    p0 = ops.pack_signs_ref(torch.randn(n, k, generator=g))
    scale = torch.rand((), generator=g)
    copies = copies_for(w0.nbytes + p0.nbytes, 8)
    ws = {torch.float32: [w0] + [w0.clone() for _ in range(copies - 1)]}
    ws[torch.bfloat16] = [w.bfloat16() for w in ws[torch.float32]]
    ps = [p0] + [p0.clone() for _ in range(copies - 1)]
    c = copies
    rows = []
    for wdtype in (torch.float32, torch.bfloat16):
        wl = ws[wdtype]
        for m in ms:
            xs = [torch.randn(m, k, generator=g) for _ in range(8)]
            xs16 = [x.bfloat16() for x in xs]
            xw = xs if wdtype == torch.float32 else xs16
            fused = lambda i: torch.ops.deltacomp.sign_matmul_fused(xw[i % 8], wl[i % c], ps[i % c], scale, k)  # noqa: E731
            unfused = lambda i: xw[i % 8] @ wl[i % c].T + ops.sign_matmul(xw[i % 8], ps[i % c], scale, k)  # noqa: E731
            impls = {
                "fused": fused,
                "dense_plus_sign": unfused,
                "dense_fp32": lambda i: xs[i % 8] @ ws[torch.float32][i % c].T,
                "dense_bf16": lambda i: xs16[i % 8] @ ws[torch.bfloat16][i % c].T,
            }
            if m == 1 and ops_tl.sign_tl_wanted() and tl4.supports_signs(k):  # int8 tables (the decode default)
                tls = [ops_tl.pack_tl4_signs(p, k) for p in ps]
                impls["fused_tl"] = lambda i: ops_tl.sign_matmul_tl(xw[i % 8], wl[i % c], tls[i % c], scale, n, k)
                # its delta term, on fp32 x (the kernel widens x; a bf16 result's rounding would hide the term)
                got = ops_tl.sign_matmul_tl(xs[0], wl[0], tls[0], scale, n, k) - xs[0] @ wl[0].float().T
                check_tables(got, ops.sign_matmul_ref(xs[0], ps[0], scale, k), "fused_tl's delta term")
            check(fused(0), ops.sign_matmul_fused_ref(xw[0], wl[0], ps[0], scale, k), "sign_matmul_fused")
            # what DeltaLinear's measured dispatch picks for this shape (it times both paths once)
            chosen = "fused" if serve_dispatch.prefer_fused(xw[0], wl[0], lambda: fused(1), lambda: unfused(1)) \
                else "dense_plus_sign"
            med, low = time_interleaved(impls, repeats)
            base = "dense_fp32" if wdtype == torch.float32 else "dense_bf16"
            bound_ms = bytes_bound_ms(wl[0].nbytes + p0.nbytes, bandwidth)
            row = {"op": "sign_matmul_fused", "n": n, "k": k, "m": m, "w_dtype": str(wdtype).split(".")[-1],
                   "median_ms": med, "min_ms": low, "bytes_bound_ms": bound_ms,
                   "fused_over_bytes_bound": med["fused"] / bound_ms,
                   "fused_over_dense": med["fused"] / med[base],
                   "fused_over_dense_fp32": med["fused"] / med["dense_fp32"],
                   "fused_over_dense_bf16": med["fused"] / med["dense_bf16"],
                   "unfused_over_dense": med["dense_plus_sign"] / med[base],
                   "speedup_fused_vs_unfused": med["dense_plus_sign"] / med["fused"],
                   "deltalinear_path": chosen, "deltalinear_over_dense": med[chosen] / med[base],
                   "deltalinear_over_best": med[chosen] / min(med["fused"], med["dense_plus_sign"])}
            if "fused_tl" in med:
                row["fused_tl_over_dense"] = med["fused_tl"] / med[base]
                row["fused_tl_over_dense_min"] = low["fused_tl"] / low[base]
            rows.append(row)
            print(f"fused {n:>6}x{k:<6} M={m:<3} W={row['w_dtype']:<8} " + "  ".join(
                f"{nm}={t:8.3f}ms" for nm, t in med.items())
                + f"  fused/dense={row['fused_over_dense']:5.2f}  unfused/dense={row['unfused_over_dense']:5.2f}"
                + f"  fused/bound={row['fused_over_bytes_bound']:5.2f}"
                + (f"  fused_tl/dense={row['fused_tl_over_dense']:5.2f}" if "fused_tl" in med else "")
                + f"  DeltaLinear: {chosen}"
                + f" ({row['deltalinear_over_best']:.2f}x the faster)", flush=True)
    return rows


def bench_multi(n: int, k: int, tenants: list[int], repeats: int, bandwidth: float) -> list[dict]:
    """Decode batch of T rows, row t using delta t (one x row per tenant)."""
    g = torch.Generator().manual_seed(2)
    rows = []
    for t_count in tenants:
        w_base = torch.randn(n, k, generator=g)
        dense = [w_base + 0.01 * torch.randn(n, k, generator=g) for _ in range(t_count)]  # T fine-tunes
        d_sets = max(1, copies_for(t_count * w_base.nbytes, 4) // 1) if t_count == 1 else 1
        dense_sets = [dense] + [[w.clone() for w in dense] for _ in range(d_sets - 1)]
        stack = ops.pack_signs_ref(torch.randn(t_count, n, k, generator=g))
        stacks = [stack] + [stack.clone() for _ in range(copies_for(stack.nbytes) - 1)]
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
        if ops_tl.sign_tl_wanted() and tl4.supports_signs(k) and ops_tl.rows_op_built():  # each row by tables
            tls = [[ops_tl.pack_tl4_signs(st[t], k) for t in range(t_count)] for st in stacks]
            row_scales = list(scales.unbind())
            impls["sign_matmul_tl_rows"] = lambda i: ops_tl.sign_matmul_tl_rows(xs[i % 8], tls[i % ns], row_scales,
                                                                                n, k)
        want = ops.sign_matmul_multi_ref(xs[0], stacks[0], scales, index, k)
        check(impls["sign_matmul_multi"](0), want, "sign_matmul_multi")
        if "sign_matmul_tl_rows" in impls:
            check_tables(impls["sign_matmul_tl_rows"](0), want, "sign_matmul_tl_rows")
        med, low = time_interleaved(impls, repeats)
        bound_ms = bytes_bound_ms(stack.nbytes, bandwidth)
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


def _random_svd_mixed(n: int, k: int, ratio: float, gs: int, g: torch.Generator, groups: str | None = None) -> Encoded:
    """An svd-mixed Encoded of the default allocation at ``ratio`` (or of ``groups``, "bits:rank+..."), with
    random codes (timings do not depend on the values; an SVD of a 4096 x 11008 delta would take minutes here)."""
    budget = int(n * k * 2 / ratio)
    alloc = (al.resolve_groups((n, k), al.parse_groups(groups), budget, gs) if groups
             else al.default_allocation((n, k), budget, gs))
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


def bench_lowrank(n: int, k: int, ms: list[int], repeats: int, ratio: float, bandwidth: float,
                  groups: str | None = None) -> list[dict]:
    g = torch.Generator().manual_seed(3)
    codec = get_codec("svd-mixed")
    enc0 = _random_svd_mixed(n, k, ratio, 128, g, groups)
    encs = [enc0] + [Encoded(enc0.codec, enc0.shape, {f: v.clone() for f, v in enc0.tensors.items()}, enc0.params)
                     for _ in range(copies_for(enc0.nbytes) - 1)]
    w0 = torch.randn(n, k, generator=g)
    dense = [w0] + [w0.clone() for _ in range(copies_for(w0.nbytes, 4) - 1)]
    dense16 = [w.bfloat16() for w in dense]
    terms = [codec.serving_term(e) for e in encs]  # what serving runs per layer (no copies of the tensors)
    for term in terms:  # a term gathers its arguments (and repacks, see SvdMixedTerm) on its first call
        term(torch.zeros(1, k))
    ne, nd = len(encs), len(dense)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, generator=g) for _ in range(8)]
        xs16 = [x.bfloat16() for x in xs]
        impls = {
            "lowrank_op": lambda i: terms[i % ne](xs[i % 8]),
            "python_dequant": lambda i: _dequant_matmul(codec, xs[i % 8], encs[i % ne]),
            "dense_fp32": lambda i: xs[i % 8] @ dense[i % nd].T,
            "dense_bf16": lambda i: xs16[i % 8] @ dense16[i % nd].T,
        }
        check(impls["lowrank_op"](0), _dequant_matmul(codec, xs[0], encs[0]), "kbit_lowrank_matmul")
        med, low = time_interleaved(impls, repeats)
        bound_ms = bytes_bound_ms(enc0.nbytes, bandwidth)
        row = {"op": "kbit_lowrank_matmul", "n": n, "k": k, "m": m, "ratio": ratio, "alloc": enc0.params["alloc"],
               "packed_bytes": enc0.nbytes, "dense_fp32_bytes": w0.nbytes, "bytes_bound_ms": bound_ms,
               "median_ms": med, "min_ms": low,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["lowrank_op"],
               "speedup_vs_dense_fp32_min": low["dense_fp32"] / low["lowrank_op"],
               "speedup_vs_dense_bf16": med["dense_bf16"] / med["lowrank_op"],
               "speedup_vs_python_dequant": med["python_dequant"] / med["lowrank_op"],
               "op_over_bytes_bound": med["lowrank_op"] / bound_ms}
        rows.append(row)
        print(f"lowrank {n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  bound={bound_ms:6.3f}ms  dense/op={row['speedup_vs_dense_fp32']:5.1f}x"
              + f" (min: {row['speedup_vs_dense_fp32_min']:.1f}x)  py/op={row['speedup_vs_python_dequant']:5.1f}x"
              + f"  op/bound={row['op_over_bytes_bound']:5.1f}", flush=True)
    return rows


def bench_ternary(n: int, k: int, ms: list[int], repeats: int, density: float, bandwidth: float) -> list[dict]:
    """ternary_matmul on a random TERNARY_CSR form with ``density`` of the weights nonzero."""
    g = torch.Generator().manual_seed(4)
    pos = (torch.rand(n * k, generator=g) < density).nonzero().reshape(-1)
    signs = torch.rand(pos.numel(), generator=g) < 0.5
    rt0 = ops.ternary_runtime(pos, signs, (n, k))
    rts = [rt0] + [tuple(t.clone() for t in rt0) for _ in range(copies_for(sum(t.nbytes for t in rt0)) - 1)]
    scale = torch.rand((), generator=g)
    w0 = torch.randn(n, k, generator=g)
    dense = [w0] + [w0.clone() for _ in range(copies_for(w0.nbytes, 4) - 1)]
    dense16 = [w.bfloat16() for w in dense]
    nr, nd = len(rts), len(dense)
    rows = []
    for m in ms:
        xs = [torch.randn(m, k, generator=g) for _ in range(8)]
        xs16 = [x.bfloat16() for x in xs]
        impls = {
            "ternary": lambda i: torch.ops.deltacomp.ternary_matmul(xs[i % 8], *rts[i % nr], scale, k),
            "dense_fp32": lambda i: xs[i % 8] @ dense[i % nd].T,
            "dense_bf16": lambda i: xs16[i % 8] @ dense16[i % nd].T,
        }
        check(impls["ternary"](0), ops.ternary_matmul_ref(xs[0], *rts[0], scale, k), "ternary_matmul")
        med, low = time_interleaved(impls, repeats)
        bound_ms = bytes_bound_ms(sum(t.nbytes for t in rt0), bandwidth)
        row = {"op": "ternary_matmul", "n": n, "k": k, "m": m, "density": density, "median_ms": med, "min_ms": low,
               "bytes_bound_ms": bound_ms, "op_over_bytes_bound": med["ternary"] / bound_ms,
               "speedup_vs_dense_fp32": med["dense_fp32"] / med["ternary"],
               "speedup_vs_dense_bf16": med["dense_bf16"] / med["ternary"]}
        rows.append(row)
        print(f"ternary {n:>6}x{k:<6} M={m:<3} " + "  ".join(f"{nm}={t:8.3f}ms" for nm, t in med.items())
              + f"  dense/op={row['speedup_vs_dense_fp32']:5.1f}x  bf16/op={row['speedup_vs_dense_bf16']:5.1f}x"
              + f"  op/bound={row['op_over_bytes_bound']:5.1f}", flush=True)
    return rows


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--device" in argv:  # the CUDA kernels have their own benchmark (CUDA graphs, L2 rotation, GPU bounds)
        i = argv.index("--device")
        device = argv[i + 1] if i + 1 < len(argv) else ""
        del argv[i:i + 2]
        if device.startswith("cuda"):
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from kernels_cuda import main as cuda_main

            raise SystemExit(cuda_main(argv))
        if device != "cpu":
            raise SystemExit(f"--device {device!r}: use cpu or cuda")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="--device cuda runs benchmarks/kernels_cuda.py with the remaining arguments")
    ap.add_argument("--shapes", default=",".join(LAYER_SHAPES), help="N x K, comma separated (default: the "
                    "layers of 7B/8B/70B models: attention, MLP up and down, 70B attention and MLP)")
    ap.add_argument("--ms", default="1,4,16,64", help="rows of x (batch), comma separated")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch/OpenMP threads (default: torch's)")
    ap.add_argument("--no-naive", action="store_true", help="skip the unpack-then-matmul reference")
    ap.add_argument("--no-lut", action="store_true", help="skip the other sign kernels of one x row (simd, lut8)")
    ap.add_argument("--isa", choices=("avx512", "avx2", "neon", "portable"), default=None,
                    help="force this CPU code path of the deltacomp kernels (sets DELTACOMP_ISA; default: the "
                    "best the CPU has)")
    ap.add_argument("--only", default="sign,fused,multi",
                    help="which benchmarks: sign, fused, multi, lowrank, ternary")
    ap.add_argument("--ternary-density", type=float, default=0.05, help="nonzero fraction of the ternary delta")
    ap.add_argument("--fused-ms", default="1,2,4,16", help="rows of x for the fused op")
    ap.add_argument("--multi-shapes", default="4096x4096", help="N x K for the multi-tenant op")
    ap.add_argument("--tenants", default="1,4,16,64", help="deltas in one decode batch (one row each)")
    ap.add_argument("--lowrank-shapes", default=None, help="N x K for the svd-mixed op (default: --shapes)")
    ap.add_argument("--lowrank-ratio", type=float, default=16.0, help="svd-mixed compression ratio vs fp16")
    ap.add_argument("--lowrank-groups", default=None,
                    help="svd-mixed bit groups instead of the default allocation, e.g. 3:64 or 8:2+3:32+2:rest")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not ops.HAS_EXTENSION:
        raise SystemExit(f"the C++ extension is not built ({ops._EXT_ERROR}); build it first: "
                         "python setup.py build_ext --inplace")
    if args.isa:
        os.environ["DELTACOMP_ISA"] = args.isa
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    ms = [int(v) for v in args.ms.split(",")]
    info = {"device": "cpu", "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "avx512f": "avx512f" in open("/proc/cpuinfo").read()
            if os.path.exists("/proc/cpuinfo") else None,
            "loadavg_before": os.getloadavg(), "repeats": args.repeats,
            "isa_requested": args.isa, "isa": ops.cpu_isa(), "cpu_flags": cpu_flags(), "machine": platform.machine(),
            # the torch baselines' own ISA limits (set them to emulate a CPU without AVX-512, see docs/cpu-kernels.md)
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_isa_env": {v: os.environ.get(v) for v in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA",
                                                             "MKL_ENABLE_INSTRUCTIONS")}}
    print(f"# torch baselines: cpu capability {info['torch_cpu_capability']}, {info['torch_isa_env']}")
    if args.isa and info["isa"] != args.isa:
        raise SystemExit(f"--isa {args.isa}: this CPU/build runs the {info['isa']} path instead (flags: "
                         f"{' '.join(info['cpu_flags'])}); nothing to measure")
    print(f"# {info['cpu']} ({' '.join(info['cpu_flags'])}), deltacomp path {info['isa']}, {info['threads']} threads, "
          f"torch {info['torch']}, load {info['loadavg_before']}")
    only = set(args.only.split(","))
    bw = read_bandwidth()
    print(f"# read bandwidth {bw / 1e9:.2f} GB/s (sum over 256 MB): the bytes-moved bounds use it")
    info["read_bandwidth_gb_s"] = bw / 1e9
    rows = []
    for n, k in shapes:
        if "sign" in only:
            rows += bench_shape(n, k, ms, args.repeats, not args.no_naive, not args.no_lut, bw)
        if "fused" in only:
            rows += bench_fused(n, k, [int(v) for v in args.fused_ms.split(",")], args.repeats, bw)
    if "multi" in only:
        for spec in args.multi_shapes.split(","):
            n, k = (int(v) for v in spec.lower().split("x"))
            rows += bench_multi(n, k, [int(v) for v in args.tenants.split(",")], args.repeats, bw)
    if "lowrank" in only:
        for spec in (args.lowrank_shapes or args.shapes).split(","):
            n, k = (int(v) for v in spec.lower().split("x"))
            rows += bench_lowrank(n, k, ms, args.repeats, args.lowrank_ratio, bw, args.lowrank_groups)
    if "ternary" in only:
        for n, k in shapes:
            rows += bench_ternary(n, k, ms, args.repeats, args.ternary_density, bw)
    info["loadavg_after"] = os.getloadavg()
    info["deltalinear_decisions"] = serve_dispatch.decisions()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"info": info, "results": rows}, f, indent=1)
        print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
