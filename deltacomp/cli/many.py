"""The ``compress-many`` subcommand (parsing and printing only; the work is in deltacomp/many.py).
main.py registers it with ``add_many_parser(subparsers)``."""
from __future__ import annotations

import argparse
import json

from ..errors import SettingsError
from ..summary import human_bytes


def cmd_compress_many(args: argparse.Namespace) -> int:
    from ..many import compress_many, read_manifest

    if bool(args.finetuned) == bool(args.manifest):
        raise SettingsError("give the fine-tunes either as paths after BASE or with --manifest FILE (one of the two)")
    finetuned = read_manifest(args.manifest) if args.manifest else args.finetuned
    if args.ray_address and args.ray:
        raise SettingsError("give --ray (a local Ray) or --ray-address ADDR (a cluster), not both")
    ray = args.ray_address or args.ray
    out = compress_many(args.base, finetuned, args.output, method=args.method, ratio=args.ratio, rules=args.rule,
                        bits=args.bits, overwrite=args.overwrite, max_shard_bytes=args.max_shard_size,
                        progress=not args.quiet, device=args.device, allow_nonfinite=args.allow_nonfinite,
                        allow_mismatch=args.allow_mismatch, ray=ray, ray_cpus=args.ray_cpus,
                        retries=args.ray_retries, ray_threads=args.ray_threads)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    for name, s in out.items():
        print(f"{s['path']}: {human_bytes(s['file_bytes'])}, ratio {s['ratio']:.2f}x "
              f"(fine-tune {name}: {human_bytes(s['finetuned_bytes'])})")
    return 0


def add_many_parser(sub) -> None:
    from .main import _add_common_compress, _add_compress_run_options

    p = sub.add_parser("compress-many", help="compress several fine-tunes of one BASE in one job (each base "
                       "tensor read once); one delta file per fine-tune in DIR")
    p.add_argument("base", help="base model: HF folder or .safetensors file")
    p.add_argument("finetuned", nargs="*", metavar="FINETUNED",
                   help="fine-tuned models (HF folders or .safetensors files); each writes "
                        "DIR/<folder or file name>.delta.safetensors")
    p.add_argument("--manifest", metavar="FILE",
                   help="instead of FINETUNED paths: a text file of name=path lines (# comments; a relative path is "
                        "relative to FILE's folder); each writes DIR/<name>.delta.safetensors")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder for the delta files")
    _add_common_compress(p)
    _add_compress_run_options(p)
    p.add_argument("--ray", action="store_true", help="encode as tasks on a local Ray started for this job")
    p.add_argument("--ray-address", metavar="ADDR",
                   help="encode as tasks on the Ray cluster at ADDR (e.g. HEAD_IP:6379, from `ray start --head`)")
    p.add_argument("--ray-cpus", type=int, default=None, help="CPUs of the local Ray (--ray; default all)")
    p.add_argument("--ray-retries", type=int, default=3, help="re-runs of a task whose worker died (default 3)")
    p.add_argument("--ray-threads", type=int, default=None,
                   help="torch threads per task (default this process's, which makes every file byte-identical to "
                        "compress run here; fewer runs more tasks per node)")
    p.set_defaults(func=cmd_compress_many)
