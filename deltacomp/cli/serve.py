"""The ``serve`` subcommand: argument parsing only; the server is deltacomp/serve/server.py. main.py
registers it with ``add_serve_parser(subparsers)``."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import resolve_device
from ..dtypes import DTYPES
from ..errors import SettingsError


def _named_delta(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got {text!r} (e.g. --delta chat=chat.delta.safetensors)")
    return name.strip(), path.strip()


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is 0..65535, got {value}")
    return value


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..serve.server import build_app

    deltas: dict[str, str] = {}
    for name, path in args.delta:
        if name in deltas:
            raise SettingsError(f"--delta {name}=... is given twice; each delta needs its own name")
        deltas[name] = path
    if args.device is not None:  # a mistaken --device fails before the model loads
        args.device = str(resolve_device(args.device))
    app = build_app(args.base, deltas, base_name=args.base_name, base_bits=args.base_bits,
                    dtype=DTYPES[args.dtype], device=args.device, max_batch=args.max_batch,
                    max_queue=args.max_queue, context=args.max_model_len)
    names = [args.base_name or Path(args.base).resolve().name] + list(deltas)
    print(f"deltacomp serve: {', '.join(names)} on http://{args.host}:{args.port}/v1", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def add_serve_parser(sub) -> None:
    """Adds ``serve`` to the subparsers of the deltacomp command."""
    p = sub.add_parser("serve", help="serve the base and many deltas over it behind one OpenAI-compatible HTTP API")
    p.add_argument("base", help="base model folder (Hugging Face); served under its folder name (or --base-name)")
    p.add_argument("--delta", action="append", default=[], type=_named_delta, metavar="NAME=FILE",
                   help="a delta file served as model NAME (repeatable; more can be added at run time with "
                        "POST /v1/deltas)")
    p.add_argument("--base-name", default=None, help="the model name of the base itself (default: its folder name)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000)
    p.add_argument("--max-batch", type=positive_int, default=8, help="rows decoded together at most (default 8)")
    p.add_argument("--max-queue", type=positive_int, default=64,
                   help="requests waiting for a batch row at most; more are answered 429 (default 64)")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="context length: prompt + max_tokens at most (default: the model's max_position_embeddings)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: where the base loads, the CPU)")
    p.add_argument("--base-bits", type=int, choices=(8, 4), default=None,
                   help="quantize the base's linear layers on load with bitsandbytes and serve every delta as a "
                        "term over them (needs pip install 'deltacomp[bnb]')")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars while the model loads")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.set_defaults(func=run_serve)
