"""What a delta file holds, counted from the file: sizes per tensor and per codec (``summarize``), and
the text that ``deltacomp compress``/``inspect`` and the demo print (``summary_text``, ``format_table``)."""
from __future__ import annotations

from typing import Any

from .codecs import get_codec
from .delta import Delta
from .dtypes import DTYPES
from .errors import SettingsError


def summarize(df: Delta, stats: bool = True) -> dict[str, Any]:
    """Sizes per tensor and per codec, as counted from the file (``stats``: codec-specific figures such
    as bits per kept entry vs the entropy bound, from ``codec.stats``, which reads the tensors)."""
    if not isinstance(df, Delta):
        raise SettingsError(f"summarize takes an open delta (deltacomp.load_delta(path)), got {type(df).__name__}")
    tensors, by_codec = [], {}
    ft_bytes_total = 0
    for name, info in df.params.items():
        numel = 1
        for s in info.shape:
            numel *= s
        itemsize = DTYPES[info.dtype].itemsize
        ft_bytes = 0 if info.tied_to else numel * itemsize
        ft_bytes_total += ft_bytes
        codec = info.codec or f"tied:{info.tied_to}"
        row = {"name": name, "codec": codec, "shape": list(info.shape), "dtype": info.dtype,
               "nbytes": info.nbytes, "finetuned_bytes": ft_bytes, "settings": info.settings,
               "bits_per_param": (8 * info.nbytes / numel) if numel and not info.tied_to else 0.0}
        tensors.append(row)
        c = by_codec.setdefault(info.codec or "tied", {"tensors": 0, "params": 0, "nbytes": 0, "finetuned_bytes": 0})
        c["tensors"] += 1
        c["params"] += 0 if info.tied_to else numel
        c["nbytes"] += info.nbytes
        c["finetuned_bytes"] += ft_bytes
        st = df.stats(name) if stats and info.codec else {}
        if st:
            row["stats"] = st
        if "kept" in st and "bound_bits_per_param" in st:  # sparse codecs: kept entries vs entropy bound
            c["kept"] = c.get("kept", 0) + int(st["kept"])
            c["bound_bits"] = c.get("bound_bits", 0.0) + st["bound_bits_per_param"] * numel
    for c in by_codec.values():
        c["bits_per_param"] = 8 * c["nbytes"] / c["params"] if c["params"] else 0.0
        if "bound_bits" in c:  # entropy bound of positions + one sign bit per kept entry
            c["bound_bits_per_param"] = c.pop("bound_bits") / c["params"] if c["params"] else 0.0
            c["bits_per_nonzero"] = 8 * c["nbytes"] / c["kept"] if c["kept"] else None
    compressed = [c for k, c in by_codec.items() if k != "tied" and get_codec(k).compresses]
    comp_nbytes = sum(c["nbytes"] for c in compressed)
    comp_ft = sum(c["finetuned_bytes"] for c in compressed)
    file_bytes = df.nbytes
    ft_file_bytes = df.source.get("finetuned_bytes") or ft_bytes_total
    return {
        "path": str(df.path), "format": df.metadata.get("format"),
        "deltacomp_version": df.metadata.get("deltacomp_version"),
        "file_bytes": file_bytes, "finetuned_bytes": ft_file_bytes,
        "ratio": ft_file_bytes / file_bytes if file_bytes else float("inf"),
        "compressed_tensors": {"finetuned_bytes": comp_ft, "nbytes": comp_nbytes,
                               "ratio": comp_ft / comp_nbytes if comp_nbytes else None,
                               "bits_per_param": 8 * comp_nbytes / sum(c["params"] for c in compressed)
                               if compressed and any(c["params"] for c in compressed) else None},
        "by_codec": by_codec, "tensors": tensors, "base_fingerprint": df.base_fingerprint,
        "source": df.source, "files": sorted(df.files), "oversized": _oversized(tensors),
    }


def _oversized(tensors: list[dict[str, Any]]) -> list[str]:
    """Compressed tensors stored in more bytes than the fine-tune holds them in: settings given
    explicitly that cost more than the tensor (a rank above what the bytes of the tensor buy), largest excess first."""
    rows = [t for t in tensors if t["finetuned_bytes"] and t["nbytes"] > t["finetuned_bytes"]
            and get_codec(t["codec"]).compresses]
    return [t["name"] for t in sorted(rows, key=lambda t: t["finetuned_bytes"] - t["nbytes"])]


def _size_notes(s: dict[str, Any]) -> list[str]:
    """Lines that warn when the compression costs more than it saves."""
    notes = []
    if over := s.get("oversized"):
        t = next(t for t in s["tensors"] if t["name"] == over[0])
        notes.append(f"note: {len(over)} compressed tensor(s) take more bytes than in the fine-tune (largest excess: "
                     f"{t['name']}, {t['codec']} {human_bytes(t['nbytes'])} vs {human_bytes(t['finetuned_bytes'])}); "
                     "lower their settings, or store them whole with --rule 'PATTERN=raw'")
    if s["file_bytes"] > s["finetuned_bytes"]:
        notes.append(f"note: the delta file ({human_bytes(s['file_bytes'])}) is larger than the fine-tune's weights "
                     f"({human_bytes(s['finetuned_bytes'])})")
    return notes


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    """A GitHub-markdown table (readable in a terminal too)."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(r) for r in cells[1:]])


def _calibration_line(steps: Any) -> str | None:
    """One line of the calibration steps a file records (source.calibration: a list, or one dict from older
    files): each step's method, with its loss before -> after where it trained."""
    steps = [steps] if isinstance(steps, dict) else list(steps or [])
    parts = []
    for st in steps:
        if not isinstance(st, dict):
            continue
        part = str(st.get("method", "?"))
        if isinstance(st.get("loss_before"), (int, float)) and isinstance(st.get("loss_after"), (int, float)):
            kept = ", stored values kept" if st.get("kept_data_free_scales") else ""
            where = f" on {st['checked_on']}" if st.get("checked_on") else ""
            per = " per layer" if "kept_layers" in st else ""  # the tune stage one decoder layer at a time
            part += (f" ({st.get('steps')} steps{per}, {st.get('loss')} {st['loss_before']:.3g} -> "
                     f"{st['loss_after']:.3g}{where}{kept})")
        parts.append(part)
    return "calibration: " + ", then ".join(parts) if parts else None


def summary_text(s: dict[str, Any], per_tensor: bool = False) -> str:
    lines = [f"{s['path']}  ({s['format']}, written by deltacomp {s['deltacomp_version']})"]
    rows = []
    for codec, c in sorted(s["by_codec"].items(), key=lambda kv: -kv[1]["nbytes"]):
        rows.append([codec, c["tensors"], f"{c['params']:,}", human_bytes(c["nbytes"]), f"{c['bits_per_param']:.3f}"])
    lines.append(format_table(["codec", "tensors", "params", "stored", "bits/param"], rows))
    ct = s["compressed_tensors"]
    lines.append(f"fine-tune weights: {human_bytes(s['finetuned_bytes'])}   delta file: {human_bytes(s['file_bytes'])}"
                 f"   ratio: {s['ratio']:.2f}x")
    if ct["ratio"]:
        lines.append(f"compressed tensors: {human_bytes(ct['finetuned_bytes'])} -> {human_bytes(ct['nbytes'])}"
                     f"   ratio {ct['ratio']:.2f}x   {ct['bits_per_param']:.3f} bits/param")
    auto = s["source"].get("auto") if s["source"].get("method") == "auto" else None
    if auto:
        lines.append(f"auto: {auto['tensors']} tensors, {human_bytes(auto['allocated_bytes'])} of a "
                     f"{human_bytes(auto['budget_bytes'])} budget, "
                     + ", ".join(f"{k} x{v}" for k, v in auto["by_codec"].items())
                     + (f" (chosen among {only} only)" if (only := (s["source"].get("settings") or {}).get("codecs"))
                        else ""))
    if calib := _calibration_line(s["source"].get("calibration")):
        lines.append(calib)
    lines += _size_notes(s)
    for codec, c in s["by_codec"].items():
        if "bound_bits_per_param" in c:
            bnz = f"{c['bits_per_nonzero']:.2f} bits/nonzero, " if c.get("bits_per_nonzero") else ""
            lines.append(f"{codec}: {c['kept']:,} kept ({c['kept'] / max(c['params'], 1):.2%}), {bnz}"
                         f"{c['bits_per_param']:.4f} bits/param vs entropy bound {c['bound_bits_per_param']:.4f} "
                         f"(H(p) + p; stored includes scales)")
    if per_tensor:
        trows = [[t["name"], t["codec"], "x".join(map(str, t["shape"])) or "()", t["dtype"], human_bytes(t["nbytes"]),
                  f"{t['bits_per_param']:.3f}", ",".join(f"{k}={v}" for k, v in t["settings"].items())]
                 for t in s["tensors"]]
        lines.append(format_table(["tensor", "codec", "shape", "dtype", "stored", "bits/param", "settings"], trows))
    return "\n".join(lines)
