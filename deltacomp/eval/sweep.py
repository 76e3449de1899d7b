"""Rate-distortion sweep: compress with each method at each ratio, evaluate all the deltas in one pass
(the fine-tune and the base run once), write results.json, results.md and rate_distortion.png."""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import DeltacompError, SettingsError
from .metrics import eval_context, evaluate, format_table, write_json

if TYPE_CHECKING:
    from ..calibrate.options import CalibrationOptions


def delta_name(method: str, ratio: float) -> str:
    """File name for one sweep point: the method spec made filesystem-safe, then the ratio."""
    return f"{re.sub(r'[^A-Za-z0-9._+-]', '_', method)}-r{ratio:g}.delta.safetensors"


def sweep(base, finetuned, methods: Sequence[str], ratios: Sequence[float], out_dir: str | os.PathLike,
          text, *, ctx: int | None = None, batch_size: int = 8, device: str = "cpu", max_tokens: int | None = None,
          stride: int | None = None, cache_dir: str | os.PathLike | None = None, plot: bool = True,
          calibration: "CalibrationOptions | None" = None,
          progress: bool = True, **eval_kwargs: Any) -> dict[str, Any]:
    """Compresses ``finetuned`` with every method at every ratio into ``out_dir/deltas/`` and evaluates
    them. A (method, ratio) the method cannot reach (a ``DeltacompError`` from compress, e.g. a budget
    below the codec's smallest setting) is recorded under ``skipped`` with the reason, not raised.
    Returns the ``evaluate`` result with ``method``/``ratio_asked``/``label``/``compress_seconds`` on each
    delta entry (``ratio`` there is the one reached: fine-tune bytes / delta file bytes) and ``skipped``.
    The fine-tune's log-probs (4 bytes x vocab per token) are kept in ``cache_dir`` for later runs when one
    is given, else in a temporary folder removed at the end. ``calibration`` (compress's options, e.g.
    ``CalibrationOptions("shakespeare")``) adds a calibrated variant of every point, labelled
    ``METHOD+calib`` (skipped for methods that do not calibrate)."""
    from ..api import compress

    if not methods or not ratios:
        raise SettingsError("sweep needs at least one method and one ratio")
    ctx = eval_context(base, finetuned, ctx)  # a config that lies or a --ctx too long fails before compressing
    out = Path(out_dir)
    (out / "deltas").mkdir(parents=True, exist_ok=True)
    points, skipped = [], []
    variants = [("", {})] + ([("+calib", {"calibration": calibration})] if calibration else [])
    for method in methods:
        for suffix, extra in variants:
            for ratio in ratios:
                name = method + suffix
                path = out / "deltas" / delta_name(name, ratio)
                t0 = time.perf_counter()
                try:
                    compress(base, finetuned, path, method=method, ratio=ratio, overwrite=True,
                             progress=progress, device=device, **extra)
                except DeltacompError as exc:
                    skipped.append({"method": name, "ratio": ratio, "reason": str(exc)})
                    continue
                points.append({"method": name, "ratio_asked": ratio, "label": f"{name} @{ratio:g}x",
                               "compress_seconds": time.perf_counter() - t0, "path": str(path)})
    result = evaluate(base, finetuned, [p["path"] for p in points], text, ctx=ctx, batch_size=batch_size,
                      device=device, max_tokens=max_tokens, stride=stride,
                      cache_dir=cache_dir, progress=progress,
                      **eval_kwargs)
    for p, row in zip(points, result["deltas"]):
        row.update({k: v for k, v in p.items() if k != "path"})
    result["skipped"] = skipped
    result["sweep"] = {"methods": list(methods), "ratios": list(ratios),
                       "calibration": {k: str(v) for k, v in asdict(calibration).items()} if calibration else {}}
    write_json(result, out / "results.json")
    (out / "results.md").write_text(format_sweep(result))
    if plot:
        from .plots import plot_rate_distortion

        plot_rate_distortion(result, out / "rate_distortion.png")
    return result


def format_sweep(result: dict[str, Any]) -> str:
    """The evaluate table plus the list of skipped points."""
    md = format_table(result)
    if result.get("skipped"):
        md += "\nSkipped:\n\n" + "".join(f"- {s['method']} @{s['ratio']:g}x: {s['reason']}\n"
                                          for s in result["skipped"])
    return md
