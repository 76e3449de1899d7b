"""Time ``--method auto`` against ``--method svd-mixed`` at the same ratio on a bundled pair, and the KL of
both files to the fine-tune.

The two compressions run interleaved (svd-mixed, auto, svd-mixed, auto, ...) as CLI subprocesses, so a
machine shared with other jobs slows both alike; the figure is auto's wall time over svd-mixed's in the
same round. Then ``deltacomp eval BASE FT SVD AUTO --max-tokens N`` on the last round's files.
``--baseline-src DIR`` also times auto's candidate pass (``auto.tensor_table`` on the 2-D tensors of
``--table-layer``) under another source tree, e.g. a checkout from before a change, interleaved with this
tree's.

    PYTHONPATH=. python benchmarks/auto_speed.py --out benchmarks/results/auto_speed_shakespeare.json
    PYTHONPATH=. python benchmarks/auto_speed.py --rounds 1 --baseline-src /path/to/old/checkout
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TABLE_SNIPPET = """
import json, sys, time, torch
from deltacomp import auto
from deltacomp.checkpoint import open_checkpoint
b, f = open_checkpoint(sys.argv[1]), open_checkpoint(sys.argv[2])
names = [n for n in f.names() if f".layers.{sys.argv[3]}." in n and len(f.shape(n)) == 2]
t0 = time.perf_counter()
for n in names:
    d = f.get(n).float() - b.get(n).float()
    auto.tensor_table(d, d.numel() * f.get(n).element_size() / float(sys.argv[4]))
print(json.dumps({"tensors": len(names), "seconds": time.perf_counter() - t0}))
"""


def _run(cmd: list[str], src: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=src, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - t0, done.stdout


def _compress(base: Path, ft: Path, out: Path, method: str, ratio: float) -> dict:
    cmd = [sys.executable, "-m", "deltacomp.cli", "compress", str(base), str(ft), "-o", str(out),
           "--method", method, "--ratio", str(ratio), "--overwrite"]
    seconds, _ = _run(cmd, ROOT)
    return {"method": method, "seconds": round(seconds, 2), "file_bytes": out.stat().st_size}


def _eval(base: Path, ft: Path, files: list[Path], tokens: int, work: Path) -> dict:
    out = work / "eval.json"
    cmd = [sys.executable, "-m", "deltacomp.cli", "eval", str(base), str(ft), *map(str, files),
           "--max-tokens", str(tokens), "--json", str(out)]
    _run(cmd, ROOT)
    return json.loads(out.read_text())


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pair", default="shakespeare")
    ap.add_argument("--ratio", type=float, default=16.0)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved (svd-mixed, auto) rounds")
    ap.add_argument("--max-tokens", type=int, default=4096, help="eval tokens (0: no eval)")
    ap.add_argument("--baseline-src", type=Path, default=None, help="another source tree for the table timing")
    ap.add_argument("--table-layer", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    from deltacomp.zoo import ensure_pair

    pair = ensure_pair(args.pair)
    base, ft = Path(pair.base), Path(pair.finetuned)
    result: dict = {"pair": args.pair, "ratio": args.ratio, "cpus": os.cpu_count(), "machine": platform.machine(),
                    "load_before": _load(), "rounds": []}
    with tempfile.TemporaryDirectory(prefix="auto-speed-") as tmp:
        work = Path(tmp)
        files = {m: work / f"{m}.delta.safetensors" for m in ("svd-mixed", "auto")}
        for _ in range(args.rounds):
            row = {m: _compress(base, ft, files[m], m, args.ratio) for m in ("svd-mixed", "auto")}
            row["auto_over_svd_mixed"] = round(row["auto"]["seconds"] / row["svd-mixed"]["seconds"], 2)
            row["load"] = _load()
            result["rounds"].append(row)
            print(json.dumps(row), flush=True)
        if args.baseline_src is not None:
            table = {}
            for label, src in (("this", ROOT), ("baseline", args.baseline_src.resolve())):
                cmd = [sys.executable, "-c", TABLE_SNIPPET, str(base), str(ft), str(args.table_layer),
                       str(args.ratio)]
                table[label] = json.loads(_run(cmd, src)[1].strip().splitlines()[-1])
            table["baseline_over_this"] = round(table["baseline"]["seconds"] / table["this"]["seconds"], 2)
            result["table_layer"] = {"layer": args.table_layer, **table}
            print(json.dumps(result["table_layer"]), flush=True)
        if args.max_tokens:
            ev = _eval(base, ft, [files["svd-mixed"], files["auto"]], args.max_tokens, work)
            result["eval"] = ev
    result["load_after"] = _load()
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
