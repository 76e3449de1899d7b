"""Figures: the rate-distortion plot of a sweep, and the bits per layer of one delta file (inspect --plot)."""
from __future__ import annotations

import os
import re
from typing import Any


def plot_rate_distortion(result: dict[str, Any], path: str | os.PathLike) -> None:
    """Two panels sharing a log-scale bytes axis, one line per method (points labelled with the ratio
    asked for). The fine-tune is drawn as a vertical line at its own size and as gain 1; the base as
    gain 0 and as its KL from the fine-tune (a delta of 0 bytes). Uses the Agg backend: no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, (ax_g, ax_k) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    by_method: dict[str, list[dict[str, Any]]] = {}
    for row in result["deltas"]:
        by_method.setdefault(row.get("method") or row["path"], []).append(row)
    for method, rows in by_method.items():
        rows = sorted(rows, key=lambda r: r["bytes"])
        for ax, key in ((ax_g, "gain_recovered"), (ax_k, "kl")):
            pts = [(r["bytes"], r[key]) for r in rows
                   if r.get(key) is not None and (key != "kl" or r[key] > 0)]  # KL axis is log
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
    for ax in (ax_g, ax_k):
        for row in result["deltas"]:
            if row.get("ratio_asked") is not None:
                y = row["gain_recovered"] if ax is ax_g else row["kl"]
                if y is not None and (ax is ax_g or y > 0):
                    ax.annotate(f"{row['ratio_asked']:g}x", (row["bytes"], y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7, color="0.35")
    ft, base = result["finetuned"], result["base"]
    for ax in (ax_g, ax_k):
        ax.set_xscale("log")
        fmt = EngFormatter(unit="B", places=0)
        ax.axvline(ft["bytes"], color="k", ls=":", lw=1, label=f"fine-tune size ({fmt(ft['bytes'])})")
        ax.xaxis.set_major_formatter(fmt)
        lo, hi = ax.get_xlim()
        if hi / lo < 10:  # under a decade there is at most one major tick: label the minor ones too
            ax.xaxis.set_minor_formatter(EngFormatter(unit="B", places=0))
            ax.tick_params(axis="x", which="minor", labelsize=7)
        ax.set_xlabel("delta file size (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    if base.get("gain_recovered") is not None:
        ax_g.axhline(1.0, color="tab:green", ls="--", lw=1, label="fine-tune (1)")
        ax_g.axhline(0.0, color="tab:red", ls="--", lw=1, label="base (0)")
    ax_g.set_ylabel("gain recovered  (L_base - L) / (L_base - L_ft)")
    ax_g.set_title("quality recovered vs size")
    if base["kl"] > 0:
        ax_k.axhline(base["kl"], color="tab:red", ls="--", lw=1, label=f"base ({base['kl']:.3g})")
        ax_k.set_yscale("log")
    ax_k.set_ylabel("KL(fine-tune || model), nats / token")
    ax_k.set_title("distance to the fine-tune vs size")
    for ax in (ax_g, ax_k):
        ax.legend(fontsize=8)
    t = result["text"]
    fig.suptitle(f"rate-distortion on {t['scored_tokens']:,} held-out tokens (ctx {t['ctx']})", fontsize=10)
    fig.savefig(path, dpi=120)
    plt.close(fig)


_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def plot_layer_bits(summary: dict[str, Any], path: str | os.PathLike, title: str = "") -> int:
    """Bits per parameter of each decoder layer's compressed tensors, one bar per layer, split by the codec
    that holds them (what ``--method auto`` chose where; any method's file works). Tensors outside the
    numbered layers (embeddings, head, norms) are left out. Returns the number of layers drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits: dict[int, dict[str, float]] = {}
    params: dict[int, int] = {}
    for t in summary["tensors"]:
        m = _LAYER.search(t["name"])
        if m is None or t["codec"].startswith("tied") or len(t["shape"]) != 2:
            continue
        layer, numel = int(m.group(1)), t["shape"][0] * t["shape"][1]
        params[layer] = params.get(layer, 0) + numel
        by = bits.setdefault(layer, {})
        by[t["codec"]] = by.get(t["codec"], 0.0) + 8.0 * t["nbytes"]
    if not bits:
        raise ValueError("no 2-D tensors inside numbered layers (model.layers.N....) to plot")
    layers = sorted(bits)
    codecs = sorted({c for by in bits.values() for c in by})
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(layers) + 2), 3.6), constrained_layout=True)
    bottom = [0.0] * len(layers)
    for codec in codecs:
        h = [bits[l].get(codec, 0.0) / params[l] for l in layers]
        ax.bar(layers, h, bottom=bottom, label=codec, width=0.8)
        bottom = [b + x for b, x in zip(bottom, h)]
    ax.set_xlabel("layer")
    ax.set_ylabel("bits per parameter (2-D tensors)")
    ax.set_title(title or "bits per layer, by codec")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return len(layers)
