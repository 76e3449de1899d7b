"""Load-time cost of the TL4 repack (svd-mixed's 1- and 2-bit V and U^T codes, built once per layer at a
serving term's first call on AVX2): quant/tl4.py's torch version against the C++ op ``tl4_pack``
(``ops_tl.pack_tl4`` / ``ops_tl.pack_tl4_u``, what serving calls), in the same run, at one and two threads,
per layer at svd-mixed's default allocation for --ratio (random codes: the time does not depend on them;
the two outputs are compared byte for byte once per shape). Medians (and minima) of --repeats runs of
the torch version and --cpp-repeats of the op; each op call allocates its output, as at load time.

    PYTHONPATH=. taskset -c 0,1 python benchmarks/tl4_repack.py --delta svd16.delta.safetensors \
        --out benchmarks/results/tl4_repack_cpu_s9.json

(two cores for the two-thread figure; --delta: every svd-mixed tensor of that file too, at one thread;
--signs: bitdelta's signs of each shape too, ``pack_tl4_signs``.)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deltacomp import ops, ops_tl  # noqa: E402
from deltacomp.codecs.svd_mixed import allocation as al  # noqa: E402
from deltacomp.quant import tl4  # noqa: E402

SHAPES = ("4096x11008", "8192x8192", "8192x28672")


def _layer(n: int, k: int, ratio: float, gs: int) -> list[tuple]:
    """The (bits, v_q, v_scale, u_q, u_scale, u_zero) of each 1- and 2-bit group of a random layer."""
    g = torch.Generator().manual_seed(n + k)
    out = []
    for b, r in al.default_allocation((n, k), int(n * k * 2 / ratio), gs):
        if not tl4.supports(b, gs) or r == 0:
            continue
        q = [torch.randint(0, 256, ((r * length * b + 7) // 8,), generator=g, dtype=torch.uint8) for length in (k, n)]
        sc = [torch.rand(r, (length + gs - 1) // gs, generator=g).half() for length in (k, n, n)]
        out.append((b, q[0], sc[0], q[1], sc[1], sc[2]))
    return out


def _file_layers(path: str) -> list[tuple]:
    """(n, k, gs, groups as ``_layer``) of every svd-mixed tensor of a delta file."""
    from deltacomp.codecs.svd_mixed.serving import group_args
    from deltacomp.delta import load_delta
    out = []
    with load_delta(path) as d:
        for name, info in d.params.items():
            if info.codec != "svd-mixed" or info.tied_to is not None:
                continue
            vq, vs, _, uq, us, uz, _, bits, n, k, gs = group_args(d.encoded(name))
            out.append((n, k, gs, [(b, *(t[g] for t in (vq, vs, uq, us, uz))) for g, b in enumerate(bits)
                                   if tl4.supports(b, gs) and vs[g].shape[0]]))
    return out


def _whole_file(path: str, impls: dict, repeats: int) -> dict:
    """Every svd-mixed tensor of a delta file repacked, both ways (one thread): seconds in all."""
    layers = _file_layers(path)
    same = all(torch.equal(a, b) for n, k, gs, groups in layers
               for x, y in zip(_repack(groups, n, k, gs, impls["torch"]), _repack(groups, n, k, gs, impls["cpp"]))
               for a, b in zip(x, y))
    times = {name: min(_time(lambda impl=impl: [_repack(g, n, k, gs, impl) for n, k, gs, g in layers], repeats))
             for name, impl in impls.items()}
    row = {"delta": path, "terms": len(layers), "identical": same, "torch_min_s": times["torch"],
           "cpp_min_s": times["cpp"], "speedup_min": times["torch"] / times["cpp"]}
    print(f"{path}: {len(layers)} terms: torch {times['torch']:.3f} s  C++ {times['cpp'] * 1e3:.1f} ms  "
          f"identical={same}", flush=True)
    return row


def _signs(n: int, k: int, threads: list[int], repeats: int, cpp_repeats: int) -> list[dict]:
    """bitdelta's signs of one n x k layer repacked (``pack_tl4_signs``): torch against the C++ op."""
    signs = torch.randint(0, 256, (n, (k + 7) // 8), generator=torch.Generator().manual_seed(n * k),
                          dtype=torch.uint8)
    same = torch.equal(tl4.pack_tl4_signs(signs, k), ops_tl.pack_tl4_signs(signs, k))
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        ts = _time(lambda: tl4.pack_tl4_signs(signs, k), repeats)
        tc = _time(lambda: ops_tl.pack_tl4_signs(signs, k), cpp_repeats)
        rows.append({"what": "bitdelta signs", "n": n, "k": k, "threads": t, "identical": same,
                     "torch_s": statistics.median(ts), "cpp_s": statistics.median(tc),
                     "speedup": statistics.median(ts) / statistics.median(tc)})
        print(f"signs {n}x{k} threads {t}: torch {rows[-1]['torch_s']:.3f} s  C++ {rows[-1]['cpp_s'] * 1e3:.1f} ms "
              f" ({rows[-1]['speedup']:.0f}x)  identical={same}", flush=True)
    return rows


def _repack(groups: list[tuple], n: int, k: int, gs: int, impl) -> list[tuple]:
    pack, pack_u = impl
    return [(*pack(vq, vs, b, k, gs), *pack_u(uq, us, uz, b, n, gs)) for b, vq, vs, uq, us, uz in groups]


def _time(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=",".join(SHAPES), help="N x K layers, comma separated")
    ap.add_argument("--ratio", type=float, default=16.0, help="svd-mixed compression ratio vs fp16")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--threads", default="1,2", help="torch/OpenMP thread counts, comma separated")
    ap.add_argument("--repeats", type=int, default=3, help="timings of the torch version (median and min reported)")
    ap.add_argument("--cpp-repeats", type=int, default=20, help="timings of the C++ op")
    ap.add_argument("--delta", default=None, help="also every svd-mixed tensor of this delta file (one thread)")
    ap.add_argument("--signs", action="store_true", help="also bitdelta's signs of each shape (pack_tl4_signs)")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if not ops.HAS_EXTENSION:
        sys.exit(f"tl4_repack: the C++ extension is not built ({ops._EXT_ERROR})")
    impls = {"torch": (tl4.pack_tl4, tl4.pack_tl4_u), "cpp": (ops_tl.pack_tl4, ops_tl.pack_tl4_u)}
    rows, gs = [], args.group_size
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.lower().split("x"))
        groups = _layer(n, k, args.ratio, gs)
        ref, got = _repack(groups, n, k, gs, impls["torch"]), _repack(groups, n, k, gs, impls["cpp"])
        same = all(torch.equal(a, b) for x, y in zip(ref, got) for a, b in zip(x, y))
        del ref, got
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            times = {name: _time(lambda impl=impl: _repack(groups, n, k, gs, impl),
                                 args.repeats if name == "torch" else args.cpp_repeats)
                     for name, impl in impls.items()}
            med = {name: statistics.median(t) for name, t in times.items()}
            row = {"n": n, "k": k, "ratio": args.ratio, "group_size": gs, "threads": threads,
                   "groups": [[b, vs.shape[0]] for b, _, vs, *_ in groups], "identical": same,
                   "torch_s": med["torch"], "cpp_s": med["cpp"], "speedup": med["torch"] / med["cpp"],
                   "torch_min_s": min(times["torch"]), "cpp_min_s": min(times["cpp"]),
                   "speedup_min": min(times["torch"]) / min(times["cpp"])}
            rows.append(row)
            print(f"{n}x{k} groups {row['groups']} threads {threads}: torch {med['torch']:.3f} s  "
                  f"C++ {med['cpp'] * 1e3:.1f} ms  ({row['speedup']:.0f}x)  identical={same}", flush=True)
    for shape in args.shapes.split(",") if args.signs else ():
        n, k = (int(v) for v in shape.lower().split("x"))
        rows += _signs(n, k, [int(t) for t in args.threads.split(",")], args.repeats, args.cpp_repeats)
    files = []
    if args.delta:
        torch.set_num_threads(1)
        files.append(_whole_file(args.delta, impls, args.repeats))
    if args.out:
        meta = {"torch": torch.__version__, "cpu_isa": ops.cpu_isa(), "machine": platform.machine(),
                "processor": platform.processor(), "repeats": args.repeats, "cpp_repeats": args.cpp_repeats,
                "loadavg_after": os.getloadavg(),
                "affinity": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                "argv": sys.argv[1:]}
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows, "files": files}, indent=1) + "\n")


if __name__ == "__main__":
    main()
