"""The ``deltacomp`` command: argument parsing and printing only; the work is done by the API."""
from __future__ import annotations

import argparse
import errno
import json
import os
import re
import signal
import sys
import threading
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .. import api, environment, ops
from ..codecs import available
from ..dtypes import DTYPES
from ..plan import DEFAULT_METHOD
from ..summary import summary_text
from .options import add_calibration_options, calibration_from_args
from .serve import positive_int
from .._version import __version__
from ..delta_file import FORMAT
from ..errors import DeltacompError, SettingsError
from ..memory import bounded_malloc

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.I)


def parse_size(text: str) -> int:
    """``5GB`` -> 5e9, ``512MiB`` -> 512 * 2**20, ``1000`` -> 1000 bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 5GB, 500MB, 2GiB)")
    unit = (m.group(2) or "b").lower()
    base = 1024 if "i" in unit else 1000
    power = {"b": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit[0]]
    return int(float(m.group(1)) * base**power)


# -- commands ---------------------------------------------------------------------------------------
def cmd_compress(args: argparse.Namespace) -> int:
    s = api.compress(args.base, args.finetuned, args.output, method=args.method, ratio=args.ratio, rules=args.rule,
                     overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                     calibration=calibration_from_args(args), progress=not args.quiet, device=args.device,
                     allow_nonfinite=args.allow_nonfinite, allow_mismatch=args.allow_mismatch, bits=args.bits)
    print(json.dumps(s, indent=2) if args.json else summary_text(s))
    for name, rep in s.get("calibration", {}).items():
        before, after = rep.get("loss_before"), rep.get("loss_after")
        extra = f": loss {before:.4g} -> {after:.4g}" if before is not None and after is not None else ""
        if rep.get("kept_data_free_scales"):
            extra += " (higher: the data-free scales were kept)"
        if "kept_layers" in rep:  # the tune stage one decoder layer at a time
            kept = f"; {rep['kept_layers']} kept their stored values" if rep["kept_layers"] else ""
            extra = (f", one decoder layer at a time: {rep['layers']} layers, output error on {rep['checked_on']} "
                     f"{before:.4g} -> {after:.4g}{kept}")
        if "output_error_calibrated" in rep:
            extra = (f": {rep['tensors']} tensors, output error on the calibration data "
                     f"{rep['output_error_data_free']:.4g} -> {rep['output_error_calibrated']:.4g}")
        print(f"calibration ({name}){extra}")
    return 0


def _check_plot_out(args: argparse.Namespace) -> None:
    """--plot PNG: a file name with an image extension (matplotlib would add .png to a folder's name or a
    bare name and write elsewhere than told), not a device, not the delta being inspected."""
    from ..storage import refuse_inputs, refuse_special

    out = Path(args.plot)
    refuse_special(out)
    if out.is_dir() or not out.suffix:
        raise SettingsError(f"--plot {out}: give a file name with an image extension, like layers.png")
    refuse_inputs(out, [Path(args.delta), Path(args.delta + ".index.json")])


def cmd_inspect(args: argparse.Namespace) -> int:
    if args.plot:
        _check_plot_out(args)
    with api.load_delta(args.delta) as df:
        if not args.no_verify:
            df.verify()
        s = api.summarize(df)
    print(json.dumps(s, indent=2) if args.json else summary_text(s, per_tensor=args.tensors))
    if args.plot:
        from ..eval.plots import plot_layer_bits

        try:
            n = plot_layer_bits(s, args.plot, title=Path(args.delta).name)
        except ValueError as exc:
            raise SettingsError(f"{args.delta}: --plot: {exc}") from None
        print(f"wrote {args.plot} (bits per parameter of {n} layers, by codec)", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_reconstruct(args: argparse.Namespace) -> int:
    out = api.reconstruct(args.base, args.delta, args.output, overwrite=args.overwrite, force=args.force,
                          max_shard_bytes=args.max_shard_size, progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(out_dir=args.out, method=args.method, ratio=args.ratio, overwrite=args.overwrite,
             progress=not args.quiet, print_fn=print)
    return 0


def cmd_export_lora(args: argparse.Namespace) -> int:
    from .. import lora
    from ..errors import SettingsError

    dtype = DTYPES[args.dtype]
    if args.delta:
        if args.models:
            raise SettingsError("give either BASE FINETUNED or --delta FILE, not both")
        rep = lora.export_lora_from_delta(args.delta, args.output, dtype=dtype, overwrite=args.overwrite)
    elif len(args.models) == 2:
        rep = lora.export_lora(*args.models, args.output, rank=args.rank, dtype=dtype, overwrite=args.overwrite,
                               progress=not args.quiet, allow_mismatch=args.allow_mismatch)
    else:
        raise SettingsError(f"export-lora needs BASE FINETUNED (got {len(args.models)} paths) or --delta FILE")
    ranks = sorted(set(rep["ranks"].values()))
    print(f"wrote {rep['path']}: {rep['modules']} LoRA modules, rank {'/'.join(map(str, ranks))}")
    if rep["not_carried"]:
        shown = ", ".join(rep["not_carried"][:8]) + (" ..." if len(rep["not_carried"]) > 8 else "")
        print(f"not carried by LoRA ({len(rep['not_carried'])} changed tensors; ship them another way): {shown}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from ..serve import generate

    texts = generate(args.base, args.delta, args.prompt, args.max_new_tokens, prompt_delta=args.prompt_delta,
                     dtype=DTYPES[args.dtype], force=args.force,
                     base_bits=args.base_bits)
    idx = args.prompt_delta or [0 if args.delta else -1] * len(args.prompt)
    for i, (prompt, text) in enumerate(zip(args.prompt, texts)):
        print(f"[{i}] delta {idx[i]}: {prompt!r} -> {text!r}")
    return 0


def _add_common_compress(p: argparse.ArgumentParser) -> None:
    p.add_argument("--method", "-m", default=DEFAULT_METHOD,
                   help="codec for 2-D attention/MLP weights, with settings: NAME[:key=value...] "
                        f"(NAME one of {', '.join(available())}; default {DEFAULT_METHOD}), or auto: a codec and "
                        "settings per tensor under one budget (--ratio or --bits); auto:codecs=A+B weighs only those codecs")
    p.add_argument("--ratio", type=float, default=None,
                   help="target 1/RATIO of the fine-tune's bytes on the compressed tensors; the method picks settings")
    p.add_argument("--rule", action="append", default=[], metavar="REGEX=METHOD[:k=v...]",
                   help="per-tensor rule, first match wins (repeatable), e.g. 'mlp\\.=NAME:key=value'")


def _add_compress(sub) -> None:
    p = sub.add_parser("compress", help="compress FINETUNED as a delta over BASE")
    p.add_argument("base", help="base model: HF folder or .safetensors file")
    p.add_argument("finetuned", help="fine-tuned model: HF folder or .safetensors file")
    p.add_argument("-o", "--output", required=True, help="delta file to write, e.g. ft.delta.safetensors")
    _add_common_compress(p)
    add_calibration_options(p, "calibration text (a file, or a bundled corpus name such as 'shakespeare': its "
                            "training split): every codec in the file that uses data runs its calibrator")
    _add_compress_run_options(p)
    p.set_defaults(func=cmd_compress)


def _add_compress_run_options(p: argparse.ArgumentParser) -> None:
    """What compress and compress-many share besides the method: budget, output, device, checks, printing."""
    p.add_argument("--bits", type=float, default=None,
                   help="--method auto's budget in bits per parameter of the tensors it compresses (instead of --ratio)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GB"), help="shard the file above this")
    p.add_argument("--device", default="auto",
                   help="where the codecs' math (and --calib) runs: auto, cpu, cuda, cuda:N (default auto: the CPU "
                        "until a GPU run has checked the CUDA path; see docs/gpu.md)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="store tensors holding NaN/Inf whole (uncompressed) instead of refusing them")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="accept a fine-tune of another architecture or one missing base tensors (warns)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


def _add_inspect(sub) -> None:
    p = sub.add_parser("inspect", help="show what a delta file holds (sizes per codec and tensor)")
    p.add_argument("delta")
    p.add_argument("--tensors", action="store_true", help="one row per tensor")
    p.add_argument("--json", action="store_true", help="print everything as JSON")
    p.add_argument("--no-verify", action="store_true", help="skip checking the checksums")
    p.add_argument("--plot", metavar="PNG", help="also draw bits per parameter per layer, by codec, to PNG")
    p.set_defaults(func=cmd_inspect)


def _add_reconstruct(sub) -> None:
    p = sub.add_parser("reconstruct", help="write the fine-tune (base + delta) as a Hugging Face model folder")
    p.add_argument("base")
    p.add_argument("delta")
    p.add_argument("-o", "--output", required=True, help="folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    p.add_argument("--force", action="store_true", help="apply even if the base's fingerprint differs (warns)")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("5GiB"))
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_reconstruct)


def _add_export_lora(sub) -> None:
    p = sub.add_parser("export-lora", help="write a PEFT LoRA adapter: truncated SVD of the delta, or the factors "
                       "stored in a delta file")
    p.add_argument("models", nargs="*", metavar="BASE FINETUNED", help="base and fine-tuned model")
    p.add_argument("--delta", help="export the factors stored in this delta file instead (codecs that keep factors)")
    p.add_argument("-o", "--output", required=True, help="adapter folder to write")
    p.add_argument("--rank", type=int, default=64, help="LoRA rank (with BASE FINETUNED; default 64)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="accept a fine-tune of another architecture or one missing base tensors (warns)")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_export_lora)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy generation from BASE with several deltas served packed, in one batch")
    p.add_argument("base")
    p.add_argument("--delta", action="append", default=[], help="a delta file (repeatable; indices 0, 1, ... in order)")
    p.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    p.add_argument("--prompt-delta", action="append", type=int, default=None,
                   help="delta index for each --prompt, in order (-1 = the base); default: every prompt uses delta 0")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="tokens generated per prompt (default 32; prompt + these at most the model's "
                        "max_position_embeddings)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars while the model loads")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--base-bits", type=int, choices=(8, 4), default=None,
                   help="quantize the base's linear layers on load with bitsandbytes (8: LLM.int8, 4: NF4 computing "
                        "in --dtype; the output head stays unquantized) and serve every delta as a term over them: "
                        "one quantized base, many deltas (needs pip install 'deltacomp[bnb]'; default: the base as "
                        "stored)")
    p.add_argument("--force", action="store_true", help="serve deltas made against another base anyway")
    p.set_defaults(func=cmd_generate)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="compress -> inspect -> reconstruct -> check on the bundled SmolLM2 pair")
    p.add_argument("--out", default="demo-out", help="working folder (default: ./demo-out)")
    p.add_argument("--method", "-m", default=DEFAULT_METHOD)
    p.add_argument("--ratio", type=float, default=None)
    p.add_argument("--overwrite", action="store_true", default=True, help=argparse.SUPPRESS)
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo)


class _Parser(argparse.ArgumentParser):
    """A command-line mistake is one line too (argparse would print the whole usage block first); the
    subcommands' parsers are of this class as well."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="deltacomp", description="Compress a fine-tuned model as a small delta "
                                     f"over its base (file format {FORMAT}).")
    parser.add_argument("--version", action="version", version=f"deltacomp {__version__} ({FORMAT})")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_compress(sub)
    from .many import add_many_parser  # compress-many

    add_many_parser(sub)
    _add_inspect(sub)
    _add_reconstruct(sub)
    _add_export_lora(sub)
    _add_generate(sub)
    _add_demo(sub)

    from .eval import add_eval_parser  # eval and sweep
    from .serve import add_serve_parser

    add_eval_parser(sub)
    add_serve_parser(sub)
    return parser


_OS_HINTS = {errno.ENOSPC: "the disk is full; free space or write elsewhere",
             errno.EDQUOT: "the disk quota is exceeded; free space or write elsewhere",
             errno.EFBIG: "the file is larger than allowed (ulimit -f or the file system); raise the limit "
                          "or use a smaller --max-shard-size",
             errno.EROFS: "the file system is read-only; choose another output",
             errno.EACCES: "permission denied; choose an output you can write",
             errno.EPERM: "operation not permitted; choose an output you can write"}


def os_error_line(exc: OSError) -> str:
    """``PATH: what went wrong; the fix`` for errors of the user's environment."""
    where = exc.filename if exc.filename is not None else "(unknown path)"
    what = exc.strerror or str(exc)
    hint = _OS_HINTS.get(exc.errno)
    blocking = _file_on_the_way(exc)
    if blocking is not None:
        where, what = blocking, "is a file, so the output cannot be a folder or go inside it"
        hint = "choose another output path"
    return f"{where}: {what}" + (f"; {hint}" if hint else "")


def _file_on_the_way(exc: OSError) -> str | None:
    """The file standing where an output needs a folder (``-o FILE/x``), for "exists" / "not a directory"
    errors; None otherwise."""
    if exc.errno not in (errno.EEXIST, errno.ENOTDIR) or exc.filename is None:
        return None
    path = os.fspath(exc.filename)
    while path and not os.path.exists(path):
        path = os.path.dirname(path.rstrip(os.sep))
    return path if path and os.path.isfile(path) else None


INTERACTIVE = {"generate", "serve"}  # hot loops keep glibc's adaptive allocator
LOADS_MODELS = {"eval", "sweep", "generate", "serve", "demo"}  # build transformers models (its progress bars)


@contextmanager
def _quiet_transformers(args: argparse.Namespace) -> Iterator[None]:
    """-q also hides transformers' own progress bars ("Loading weights") and notices for the command (restored
    after it, for callers that run several commands in one process)."""
    quiet = getattr(args, "quiet", False) and (args.command in LOADS_MODELS or getattr(args, "calib", None))
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # the command itself says what is missing
        quiet = False
    if not quiet:
        yield
        return

    bars, level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    tf_logging.disable_progress_bar()
    tf_logging.set_verbosity_error()
    try:
        yield
    finally:
        if bars:
            tf_logging.enable_progress_bar()
        tf_logging.set_verbosity(level)


_interrupts: list[int] = []


def _on_interrupt(signum, frame):
    """Ctrl-C: noted, then Python's own KeyboardInterrupt. A library interrupted half-way through an import
    (transformers' lazy modules) can turn it into another error on the way up (a RecursionError); with the
    note, main still reports the interrupt instead of asking for a bug report."""
    _interrupts.append(signum)
    signal.default_int_handler(signum, frame)


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit 0 on success; 2 and one line ``deltacomp CMD: error: ...`` for bad input or
    an environment problem (read-only folder, full disk, size limit); 1 and one line asking for a report
    for anything else (a bug); 130 and one line for Ctrl-C; ``--debug`` (anywhere on the line) adds the
    traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    parser = build_parser()
    args = parser.parse_args(argv)
    _interrupts.clear()
    previous = (signal.signal(signal.SIGINT, _on_interrupt)
                if threading.current_thread() is threading.main_thread() else None)
    try:
        return _run(args, f"deltacomp {args.command}", debug)
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _run(args: argparse.Namespace, cmd: str, debug: bool) -> int:
    interrupted = f"{cmd}: interrupted; nothing was written at the output path"
    try:
        for note in environment.check(isa_now=ops.cpu_isa):  # a bad DELTACOMP_* value: one line, before any work
            print(f"{cmd}: {note}", file=sys.stderr)
        if args.command not in INTERACTIVE:
            bounded_malloc()  # batch jobs: memory flat over the layers (deltacomp/memory.py)
        with _quiet_transformers(args):
            return args.func(args)
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except Exception as exc:
        if _interrupts:  # whatever error a Ctrl-C left behind is the interrupt, not a bug or a user error
            print(interrupted, file=sys.stderr)
            return 130
        error, (line, code) = exc, _error_line(cmd, exc)
    if debug:
        traceback.print_exception(type(error), error, error.__traceback__)
    print(" ".join(line.split("\n")), file=sys.stderr)
    return code


def _error_line(cmd: str, exc: Exception) -> tuple[str, int]:
    """The line and exit code of an error: 2 for the user's input and the environment, 1 for a bug."""
    if isinstance(exc, DeltacompError):
        return f"{cmd}: error: {exc}", 2
    if isinstance(exc, OSError):
        return f"{cmd}: error: {os_error_line(exc)}", 2
    if isinstance(exc, MemoryError):
        return f"{cmd}: error: out of memory; free memory or use a smaller model", 2
    return (f"{cmd}: internal error ({type(exc).__name__}: {str(exc)[:200]}); this is a bug: please report it "
            "with the output of the same command run with --debug"), 1


if __name__ == "__main__":
    sys.exit(main())
