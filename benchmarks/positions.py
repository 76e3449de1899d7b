"""Stored bits per parameter vs the entropy bound, and encode/decode times, for the ternary codec's
position storages (and DARE at the same density) on random Laplace/Gaussian deltas.

    PYTHONPATH=. python benchmarks/positions.py --out positions.json
    PYTHONPATH=. python benchmarks/positions.py --shapes 576x1536 --repeats 1     # quick

Bound per parameter: H(p) + p (positions + one sign per kept entry; the ternary size also holds its
fp32 scale). Times are the minimum over --repeats runs, wall clock, with torch limited to --threads.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

from deltacomp.codecs import get_codec
from deltacomp.codecs.ternary import topk_positions
from deltacomp.quant import positions as P


def _timed(fn, repeats):
    """(min wall seconds, min CPU seconds of this process, result). CPU time is reported too because the
    shared 2-core machine is often oversubscribed, which inflates wall time but not CPU time much."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return (best, best_cpu), out


def _sample(dist, shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if dist == "laplace":  # inverse CDF of a uniform: Laplace(0, 1)
        u = torch.rand(shape, generator=g) - 0.5
        x = -torch.sign(u) * torch.log1p(-2 * u.abs().clamp(max=0.5 - 2 ** -24))  # u=-0.5 -> -inf
    return (x * 1e-3).contiguous()


def run(shapes, densities, dists, repeats):
    ternary, dare = get_codec("ternary"), get_codec("dare")
    rows = []
    for shape in shapes:
        for dist in dists:
            d = _sample(dist, shape, seed=0)
            for density in densities:
                k = max(1, round(density * d.numel()))
                t_select, _ = _timed(lambda: topk_positions(d, k), repeats)
                for storage in ("auto",) + P.available_storages():
                    t_enc, enc = _timed(lambda: ternary.encode(d, density=density, storage=storage), repeats)
                    t_dec, out = _timed(lambda: ternary.decode(enc), repeats)
                    t_pos, _ = _timed(lambda: P.decode_support(enc.tensors, enc.params, d.numel()), repeats)
                    st = ternary.stats(enc)
                    rows.append({"codec": "ternary", "shape": list(shape), "dist": dist, "density_asked": density,
                                 "storage_asked": storage, **st, "encode_s": t_enc[0], "encode_cpu_s": t_enc[1],
                                 "select_s": t_select[0], "select_cpu_s": t_select[1],
                                 "decode_s": t_dec[0], "decode_cpu_s": t_dec[1],
                                 "decode_positions_s": t_pos[0], "decode_positions_cpu_s": t_pos[1]})
                t_enc, enc = _timed(lambda: dare.encode(d, p=1 - density), repeats)
                t_dec, _ = _timed(lambda: dare.decode(enc), repeats)
                rows.append({"codec": "dare", "shape": list(shape), "dist": dist, "density_asked": density,
                             "storage_asked": "auto", **dare.stats(enc), "encode_s": t_enc[0],
                             "encode_cpu_s": t_enc[1], "decode_s": t_dec[0], "decode_cpu_s": t_dec[1]})
                for r in rows[-len(P.available_storages()) - 2:]:
                    print(f"{r['codec']:8s} {'x'.join(map(str, shape)):>11s} {dist:8s} p={r['density_asked']:<5} "
                          f"{r['storage_asked']:>6s}->{r['storage']:7s} {r['bits_per_param']:.4f} bit/param "
                          f"(bound {r['bound_bits_per_param']:.4f}, +{100 * r['over_bound']:.2f}%)  "
                          f"enc {r['encode_s']:.3f}s (cpu {r['encode_cpu_s']:.3f}) dec {r['decode_s']:.3f}s (cpu {r['decode_cpu_s']:.3f})", file=sys.stderr)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="576x1536,4096x11008", help="comma-separated RxC")
    ap.add_argument("--densities", default="0.05,0.1")
    ap.add_argument("--dists", default="laplace,gaussian")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the target machine has 2 cores)")
    ap.add_argument("--out", help="JSON file to write (default: stdout)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    rows = run(shapes, [float(x) for x in a.densities.split(",")], a.dists.split(","), a.repeats)
    report = {"benchmark": "positions", "machine": platform.machine(), "cpus": os.cpu_count(),
              "threads": a.threads, "torch": torch.__version__, "repeats": a.repeats,
              "load_average": os.getloadavg(), "rows": rows}
    text = json.dumps(report, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
