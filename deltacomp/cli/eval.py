"""The ``eval`` and ``sweep`` subcommands (parsing and printing only; the work is in evaluate/sweep).
cli.py registers them with ``add_eval_parser(subparsers)``."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import SettingsError
from .options import add_calibration_options, calibration_from_args
from .serve import positive_int

_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _read_text(path: str | None) -> str:
    if path is None:
        try:  # the bundled pair's held-out text (the same one `deltacomp demo` scores)
            from .. import zoo

            return zoo.ensure_pair("shakespeare").heldout
        except (ImportError, AttributeError):
            raise SettingsError("no --text FILE given and no bundled held-out text (deltacomp.zoo) "
                                "is available; pass --text held_out.txt") from None
    p = Path(path)
    if not p.exists():
        raise SettingsError(f"--text {path}: no such file")
    if not p.is_file():
        raise SettingsError(f"--text {path}: not a regular file; give a UTF-8 text file")
    try:
        return p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"--text {path}: not UTF-8 text (byte {exc.start}: {exc.reason}); convert it, e.g. "
                            "iconv -f latin1 -t utf-8") from None


def _csv(kind):
    def parse(text: str):
        try:
            items = [kind(x.strip()) for x in text.split(",") if x.strip()]
        except ValueError:
            what = "ratios above 1" if kind is _ratio else kind.__name__
            raise argparse.ArgumentTypeError(f"not a comma-separated list of {what}: {text!r}") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items
    return parse


def _ratio(text: str) -> float:
    """One --ratios entry: a finite compression factor above 1 (a ValueError names the entry)."""
    value = float(text)
    if not (math.isfinite(value) and value > 1):
        raise ValueError(text)
    return value


def _add_eval_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", metavar="FILE", help="held-out text to score (UTF-8; default: the bundled one)")
    p.add_argument("--ctx", type=positive_int, default=None,
                   help="tokens per window (default 256, or the models' max_position_embeddings when smaller; "
                        "more than that is refused)")
    p.add_argument("--stride", type=positive_int, default=None,
                   help="window step, 1..ctx (default ctx: non-overlapping); smaller gives every token more context")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--device", default="auto",
                   help="where models run and (sweep) deltas are compressed: auto, cpu, cuda, cuda:N (default auto: "
                        "the CPU until a GPU run has checked the CUDA path; see docs/gpu.md)")
    p.add_argument("--dtype", choices=_DTYPES, default="float32", help="dtype the models run in (default float32)")
    p.add_argument("--cache-dir", default=None,
                   help="keep the fine-tune's log-probs here for later runs (4 bytes x vocab per token)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def add_eval_parser(sub) -> None:
    """Adds ``eval`` and ``sweep`` to the subparsers of the deltacomp command."""
    p = sub.add_parser("eval", help="score deltas against the fine-tune: size, ppl, KL, top-1, gain recovered")
    p.add_argument("base", help="base model folder (Hugging Face)")
    p.add_argument("finetuned", help="fine-tuned model folder (Hugging Face)")
    p.add_argument("deltas", nargs="+", metavar="DELTA", help="delta file(s) made against BASE")
    _add_eval_options(p)
    p.add_argument("--json", metavar="OUT", default=None, help="also write the full results (per tensor) as JSON")
    p.add_argument("--no-weight-metrics", action="store_true", help="skip the weight-space error pass")
    p.set_defaults(func=run_eval)

    p = sub.add_parser("sweep", help="compress with several methods x ratios, evaluate, plot rate vs distortion")
    p.add_argument("base", nargs="?", help="base model folder (Hugging Face); or give --pair")
    p.add_argument("finetuned", nargs="?", help="fine-tuned model folder (Hugging Face); or give --pair")
    p.add_argument("--pair", metavar="NAME", help="a bundled pair instead of BASE FINETUNED (e.g. shakespeare); "
                   "built once and cached; its held-out text is the default --text")
    p.add_argument("--methods", type=_csv(str), required=True,
                   help="comma-separated method specs NAME[:key=value...], e.g. A,B:key=value")
    p.add_argument("--ratios", type=_csv(_ratio), required=True, help="comma-separated ratios, e.g. 8,16,32,64")
    p.add_argument("-o", "--output", required=True, help="folder for deltas/, results.json, results.md, "
                                                          "rate_distortion.png")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier sweep in that folder")
    _add_eval_options(p)
    add_calibration_options(p, "also run every point calibrated on this text (lines labelled METHOD+calib)")
    p.set_defaults(func=run_sweep)


def _torch_dtype(name: str):
    from ..dtypes import DTYPES

    return DTYPES[name]


def _check_json_out(args: argparse.Namespace) -> None:
    """--json OUT is checked before any model runs: not a folder, not a device, not one of the inputs."""
    if not args.json:
        return
    from ..api import model_files
    from ..delta_file import index_path
    from ..errors import OutputExistsError
    from ..storage import refuse_inputs, refuse_special

    out = Path(args.json)
    refuse_special(out)
    if out.is_dir():
        raise OutputExistsError(f"--json {out}: is a folder; give a file name like results.json")
    if out.exists():
        deltas = [Path(d) for d in args.deltas]
        refuse_inputs(out, deltas + [index_path(d) for d in deltas] + model_files(args.base, args.finetuned))


def run_eval(args: argparse.Namespace) -> int:
    from ..eval.metrics import evaluate, format_table, write_json

    _check_json_out(args)
    result = evaluate(args.base, args.finetuned, args.deltas, _read_text(args.text), ctx=args.ctx,
                      batch_size=args.batch_size, device=args.device, max_tokens=args.max_tokens,
                      stride=args.stride, dtype=_torch_dtype(args.dtype), cache_dir=args.cache_dir,
                      weight_metrics=not args.no_weight_metrics, progress=not args.quiet)
    print(format_table(result), end="")
    if args.json:
        write_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from ..eval.sweep import format_sweep, sweep
    from ..plan import Plan

    for m in args.methods:  # a typo in --methods fails now, not as a "skipped" line after the others ran
        Plan(m, [], args.ratios[0])
    base, finetuned, text = args.base, args.finetuned, None
    if args.pair:
        if base or finetuned:
            raise SettingsError("give either BASE FINETUNED or --pair NAME, not both")
        from .. import zoo

        pair = zoo.ensure_pair(args.pair, progress=not args.quiet)
        base, finetuned, text = pair.base, pair.finetuned, pair.heldout
    elif not (base and finetuned):
        raise SettingsError("sweep needs BASE FINETUNED or --pair NAME")
    text = _read_text(args.text) if args.text or text is None else text
    result = sweep(base, finetuned, args.methods, args.ratios, args.output, text,
                   ctx=args.ctx, batch_size=args.batch_size, device=args.device, max_tokens=args.max_tokens,
                   stride=args.stride, cache_dir=args.cache_dir, dtype=_torch_dtype(args.dtype),
                   calibration=calibration_from_args(args), overwrite=args.overwrite,
                   progress=not args.quiet)
    print(format_sweep(result), end="")
    print(f"wrote {Path(args.output) / 'results.json'}, results.md, rate_distortion.png")
    return 0
