"""Time of `deltacomp compress-many` over N fine-tunes of one base vs one `deltacomp compress` of one of
them, measured in the same run on the same machine (the issue's target: at most 1.6x the time of one
compress for 4 fine-tunes). Each command runs in a subprocess (benchmarks/memory.py's ``measure``: wall
time, CPU seconds, peak RSS of the driver process); single and many runs alternate, ``--repeats`` times,
and the ratio is taken per repeat (the machine is shared: absolute seconds are pessimistic). Every run
also checks that the first fine-tune's file from compress-many is byte-identical to compress's.

Synthetic: Llama-7B-width sharded bf16 checkpoints (memory.py's generator), one base and N fine-tunes,
deleted at the end. Zoo: the bundled pairs that share one base (shakespeare, shakespeare-lora,
python-stdlib).

    python benchmarks/many.py synthetic --layers 2 --fine-tunes 4 --method bitdelta \\
        --out benchmarks/results/many_synthetic_bitdelta.json
    python benchmarks/many.py zoo --pairs shakespeare shakespeare-lora python-stdlib --method svd-mixed \\
        --ratio 16 --out benchmarks/results/many_zoo_svd-mixed.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure, write_checkpoint  # noqa: E402

TREE = str(Path(__file__).resolve().parent.parent)


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _fine_tunes(args, work: Path) -> tuple[Path, list[Path]]:
    if args.source == "synthetic":
        base = work / "base"
        write_checkpoint(base, args.layers, False)
        fts = []
        for v in range(args.fine_tunes):
            fts.append(work / f"ft{v}")
            write_checkpoint(fts[-1], args.layers, True, variant=v)
        return base, fts
    sys.path.insert(0, TREE)
    from deltacomp import zoo

    pairs = [zoo.ensure_pair(n) for n in args.pairs]
    if len({p.base for p in pairs}) != 1:
        raise SystemExit(f"pairs {args.pairs} do not share one base")
    return pairs[0].base, [p.finetuned for p in pairs]


def _options(args) -> list[str]:
    return ["--method", args.method, "-q", "--overwrite"] + (["--ratio", str(args.ratio)] if args.ratio else [])


def run(args, work: Path) -> dict:
    t0 = time.perf_counter()
    base, fts = _fine_tunes(args, work)
    made = round(time.perf_counter() - t0, 1)
    print(f"{len(fts)} fine-tunes ready in {made}s", flush=True)
    single_out, many_dir = work / "single.delta.safetensors", work / "many"
    rows = []
    modes = [("many", [])] + [("many-ray", ["--ray"] + (["--ray-cpus", str(args.ray_cpus)] if args.ray_cpus else []))
                              for _ in [0] if args.ray]
    for r in range(args.repeats):
        order = [("single", None)] + modes if r % 2 == 0 else modes + [("single", None)]
        for kind, extra in order:
            if kind == "single":
                cli = ["compress", str(base), str(fts[0]), "-o", str(single_out)] + _options(args)
            else:
                cli = ["compress-many", str(base), *map(str, fts), "-o", str(many_dir)] + _options(args) + extra
            load = os.getloadavg()[0]
            row = {"repeat": r, "command": kind, "fine_tunes": 1 if kind == "single" else len(fts),
                   "load_before": round(load, 1), **measure(cli, TREE)}
            if kind != "single":
                first = many_dir / f"{fts[0].name}.delta.safetensors"
                row["identical_to_single"] = single_out.exists() and _sha(first) == _sha(single_out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {}
    for kind, _ in modes:
        ratios = [m["wall_s"] / s["wall_s"] for m in rows if m["command"] == kind
                  for s in rows if s["command"] == "single" and s["repeat"] == m["repeat"]]
        cpu = [m["cpu_s"] / s["cpu_s"] for m in rows if m["command"] == kind
               for s in rows if s["command"] == "single" and s["repeat"] == m["repeat"]]
        summary[kind] = {"wall_ratio_per_repeat": [round(x, 2) for x in ratios],
                         "wall_ratio_median": round(statistics.median(ratios), 2),
                         "cpu_ratio_median": round(statistics.median(cpu), 2),
                         "identical": all(m.get("identical_to_single") for m in rows if m["command"] == kind)}
    return {"fine_tunes": [str(f) for f in fts], "base": str(base), "checkpoints_made_s": made, "rows": rows,
            "summary": summary}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", choices=("synthetic", "zoo"))
    ap.add_argument("--layers", type=int, default=2, help="synthetic: layers at 7B widths")
    ap.add_argument("--fine-tunes", type=int, default=4, help="synthetic: how many fine-tunes of the base")
    ap.add_argument("--pairs", nargs="+", default=["shakespeare", "shakespeare-lora", "python-stdlib"])
    ap.add_argument("--method", default="bitdelta")
    ap.add_argument("--ratio", type=float, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--ray", action="store_true", help="also time compress-many --ray (a local Ray per run)")
    ap.add_argument("--ray-cpus", type=int, default=None)
    ap.add_argument("--workdir", default=None, help="where checkpoints and outputs go (deleted after)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="deltacomp-many-", dir=args.workdir))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
           "torch_threads": torch.get_num_threads(), "args": {k: v for k, v in vars(args).items() if k != "out"},
           **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out["summary"], indent=1))


if __name__ == "__main__":
    main()
