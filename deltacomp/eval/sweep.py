"""Rate-distortion sweep: compress with each method at each ratio, evaluate all the deltas in one pass
(the fine-tune and the base run once), write results.json, results.md and rate_distortion.png."""
from __future__ import annotations

import os
import re
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import DeltacompError, OutputExistsError, SettingsError
from .metrics import check_eval_settings, evaluate, format_table, write_json

if TYPE_CHECKING:
    from ..calibrate.options import CalibrationOptions


def delta_name(method: str, ratio: float) -> str:
    """File name for one sweep point: the method spec made filesystem-safe, then the ratio."""
    return f"{re.sub(r'[^A-Za-z0-9._+-]', '_', method)}-r{ratio:g}.delta.safetensors"


def sweep(base, finetuned, methods: Sequence[str], ratios: Sequence[float], out_dir: str | os.PathLike,
          text, *, ctx: int | None = None, batch_size: int = 8, device: str = "cpu", max_tokens: int | None = None,
          stride: int | None = None, cache_dir: str | os.PathLike | None = None, plot: bool = True,
          calibration: "CalibrationOptions | None" = None, overwrite: bool = False,
          progress: bool = True, **eval_kwargs: Any) -> dict[str, Any]:
    """Compresses ``finetuned`` with every method at every ratio into ``out_dir/deltas/`` and evaluates
    them. A (method, ratio) the method cannot reach (a ``DeltacompError`` from compress, e.g. a budget
    below the codec's smallest setting) is recorded under ``skipped`` with the reason, not raised.
    Returns the ``evaluate`` result with ``method``/``ratio_asked``/``label``/``compress_seconds`` on each
    delta entry (``ratio`` there is the one reached: fine-tune bytes / delta file bytes) and ``skipped``.
    The fine-tune's log-probs (4 bytes x vocab per token) are kept in ``cache_dir`` for later runs when one
    is given, else in a temporary folder removed at the end. ``calibration`` (compress's options, e.g.
    ``CalibrationOptions("shakespeare")``) adds a calibrated variant of every point, labelled
    ``METHOD+calib`` (skipped for methods that do not calibrate). Two points that would write one file
    (a method or ratio given twice) are refused, and so is an ``out_dir`` already holding a sweep's
    outputs unless ``overwrite``."""
    from ..api import compress

    if not methods or not ratios:
        raise SettingsError("sweep needs at least one method and one ratio")
    # a config that lies, a --ctx too long or another bad evaluate setting fails before compressing
    ctx = check_eval_settings(base, finetuned, ctx, batch_size, max_tokens, stride, cache_dir)
    out = Path(out_dir)
    variants = [("", {})] + ([("+calib", {"calibration": calibration})] if calibration else [])
    grid = [(method, suffix, extra, ratio) for method in methods for suffix, extra in variants for ratio in ratios]
    _check_outputs(out, [(method + suffix, ratio) for method, suffix, _, ratio in grid], overwrite)
    (out / "deltas").mkdir(parents=True, exist_ok=True)
    points, skipped = [], []
    for method, suffix, extra, ratio in grid:
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


OUTPUTS = ("results.json", "results.md", "rate_distortion.png")


def _check_outputs(out: Path, points: list[tuple[str, float]], overwrite: bool) -> None:
    """Before any work: no two points write one delta file, and nothing of an earlier sweep in ``out``
    is replaced unless ``overwrite``."""
    seen: dict[str, tuple[str, float]] = {}
    for name, ratio in points:
        file = delta_name(name, ratio)
        if file in seen:
            raise SettingsError(f"--methods/--ratios: {seen[file][0]} @{seen[file][1]!r} and {name} @{ratio!r} would "
                                f"both write deltas/{file}; give each method and ratio once")
        seen[file] = (name, ratio)
    if overwrite:
        return
    for path in [out / n for n in OUTPUTS] + [out / "deltas" / f for f in seen]:
        if os.path.lexists(path):
            raise OutputExistsError(f"{path}: exists (an earlier sweep wrote to {out}); pass --overwrite to "
                                    "replace it, or give another -o")


def format_sweep(result: dict[str, Any]) -> str:
    """The evaluate table plus the list of skipped points."""
    md = format_table(result)
    if result.get("skipped"):
        md += "\nSkipped:\n\n" + "".join(f"- {s['method']} @{s['ratio']:g}x: {s['reason']}\n"
                                          for s in result["skipped"])
    return md
