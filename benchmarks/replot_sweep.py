"""Redraw a sweep's rate-distortion plot with rows measured later (e.g. `--method auto` points evaluated
with the same `eval` settings), from the sweep's markdown table and a JSON of extra rows.

    PYTHONPATH=. python benchmarks/replot_sweep.py docs/shakespeare-sweep/results.md \
        benchmarks/results/auto_datafree_shakespeare_s6.json --text-tokens 4095 --ctx 256 \
        --out docs/shakespeare-sweep/rate_distortion.png

The table's rows "METHOD @Rx" become points (bytes, KL, gain recovered); "base" and "fine-tune" the
reference lines; every row of the JSON's ``rows`` (method, ratio_asked, bytes, kl, gain_recovered) is
added, replacing a table row of the same method and ratio. Nothing is measured here.
"""
from __future__ import annotations

import argparse
import json
import re

from deltacomp.eval.plots import plot_rate_distortion

_ROW = re.compile(r"^\|\s*(?P<label>[^|]+?)\s*\|\s*(?P<bytes>[\d,]+)\s*\|(?P<rest>.*)\|\s*$")


def read_table(path: str) -> tuple[dict, dict, list[dict]]:
    """(base, fine-tune, delta rows) from a sweep's results.md (columns: model, bytes, ratio, weight rel.
    err, ppl, KL, top-1, gain recovered)."""
    base = ft = None
    rows = []
    for line in open(path, encoding="utf-8"):
        m = _ROW.match(line.strip())
        if not m:
            continue
        cells = [c.strip() for c in m["rest"].split("|")]
        entry = {"bytes": int(m["bytes"].replace(",", "")), "kl": float(cells[3]), "top1": float(cells[4]),
                 "gain_recovered": float(cells[5])}
        label = m["label"]
        if label == "base":
            base = entry
        elif label == "fine-tune":
            ft = entry
        elif " @" in label:
            method, ratio = label.rsplit(" @", 1)
            rows.append({**entry, "method": method, "ratio_asked": float(ratio.rstrip("x"))})
    if base is None or ft is None:
        raise SystemExit(f"{path}: no base / fine-tune rows in its table")
    return base, ft, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("table")
    p.add_argument("extra", nargs="*", help="JSON files with a 'rows' list")
    p.add_argument("--text-tokens", type=int, required=True, help="scored tokens of the sweep's evaluation")
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    base, ft, rows = read_table(a.table)
    for path in a.extra:
        for r in json.load(open(path))["rows"]:
            rows = [x for x in rows if (x["method"], x["ratio_asked"]) != (r["method"], float(r["ratio_asked"]))]
            rows.append({k: r[k] for k in ("method", "ratio_asked", "bytes", "kl", "gain_recovered")})
    result = {"base": base, "finetuned": ft, "deltas": rows, "text": {"scored_tokens": a.text_tokens, "ctx": a.ctx}}
    plot_rate_distortion(result, a.out)
    print(f"wrote {a.out}: {len(rows)} points")


if __name__ == "__main__":
    main()
