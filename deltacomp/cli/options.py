"""Command-line options shared by several commands: calibration (compress, sweep)."""
from __future__ import annotations

import argparse
from dataclasses import fields

from ..calibrate.distill import training_codecs
from ..calibrate.options import SENSITIVITIES, TUNE_SCOPES, CalibrationOptions

_DEFAULTS = {f.name: f.default for f in fields(CalibrationOptions) if f.name not in ("data", "device")}


def add_calibration_options(p: argparse.ArgumentParser, what: str) -> None:
    """--calib FILE|CORPUS and its settings; defaults are CalibrationOptions' own."""
    d = _DEFAULTS
    p.add_argument("--calib", metavar="FILE|CORPUS", default=None, help=what)
    p.add_argument("--calib-samples", type=int, default=d["samples"], help=f"calibration sequences (default {d['samples']})")
    p.add_argument("--calib-len", type=int, default=d["seq_len"], help=f"tokens per calibration sequence (default {d['seq_len']})")
    p.add_argument("--calib-steps", type=int, default=d["steps"], help=f"scale-distillation steps (default {d['steps']})")
    p.add_argument("--calib-lr", type=float, default=d["lr"], help=f"scale-distillation learning rate (default {d['lr']})")
    p.add_argument("--calib-loss", choices=("mse", "kl"), default=d["loss"], help="distillation loss on the logits")
    p.add_argument("--calib-tune-steps", type=int, default=d["tune_steps"],
                   help=f"end-to-end steps that train the scales of {'/'.join(training_codecs('tune'))} tensors on KL to "
                        f"the fine-tune after the layerwise pass (0: none; default {d['tune_steps']})")
    p.add_argument("--calib-tune-lr", type=float, default=d["tune_lr"],
                   help=f"learning rate of those steps (default {d['tune_lr']})")
    p.add_argument("--calib-tune-scope", choices=TUNE_SCOPES, default=d["tune_scope"],
                   help="where the tune stage trains: the whole model on KL (model), one decoder layer at a time on "
                        "the fine-tune's layer outputs with --calib-tune-steps steps per layer, in the memory of "
                        "one layer (layers), or the whole model where it fits in memory, else layers (auto, the "
                        "default)")
    p.add_argument("--gptq-act-order", action="store_true", help="GPTQ: quantize columns by decreasing Hessian diag")
    p.add_argument("--gptq-no-whiten", action="store_true",
                   help="GPTQ: singular vectors from the delta's own SVD (Delta-CoMe) instead of the SVD of the "
                        "input-whitened delta (lowest layer output error, the default); also keeps stored "
                        "low-rank factors as they are instead of refitting them to the layer outputs")
    p.add_argument("--gptq-allocation", choices=("keep", "optimal"), default=d["allocation"],
                   help="GPTQ: keep the data-free bit groups (default) or re-choose them in the same byte budget")
    p.add_argument("--auto-sensitivity", choices=SENSITIVITIES, default=d["sensitivity"],
                   help="--method auto: predicted KL from each calibration window's weight gradient (sequence, "
                        "the default; a scratch file of windows x 2 bytes per parameter beside the output), or "
                        "from each output channel's Fisher (labels sampled from the fine-tune, or the text's), or "
                        "none (output error only)")


def calibration_from_args(args: argparse.Namespace) -> CalibrationOptions | None:
    if args.calib is None:
        return None
    return CalibrationOptions(args.calib, samples=args.calib_samples, seq_len=args.calib_len, steps=args.calib_steps,
                              lr=args.calib_lr, loss=args.calib_loss, tune_steps=args.calib_tune_steps,
                              tune_scope=args.calib_tune_scope,
                              tune_lr=args.calib_tune_lr, act_order=args.gptq_act_order,
                              whiten=not args.gptq_no_whiten, allocation=args.gptq_allocation,
                              device=getattr(args, "device", "auto"), sensitivity=args.auto_sensitivity)
