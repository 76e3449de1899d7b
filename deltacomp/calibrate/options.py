"""The calibration options of ``compress`` (one dataclass: the CLI builds it once, the defaults live here)
and the pass that runs each codec's calibrator stage in order on a data-free delta file."""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..codecs import available, get_codec
from ..codecs.calibrator import STAGES, LayerwiseOptions
from ..devices import resolve_device
from ..errors import SettingsError
from .data import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, CalibData, load_calibration
from .distill import DEFAULT_LR, DEFAULT_STEPS, DEFAULT_TUNE_LR, DEFAULT_TUNE_STEPS, LOSSES
from .selfgen import SELF, sample_windows
from .sensitivity import LABELS

SENSITIVITIES = ("sequence", *LABELS, "none")  # --auto-sensitivity choices, the default first
# where the tune stage trains: the whole model on KL (distill.py) or one decoder layer at a time on its
# outputs (blocktune.py); "auto": the whole model where it fits in memory, else layer by layer
TUNE_SCOPES = ("auto", "model", "layers")


@dataclass(frozen=True)
class CalibrationOptions:
    """Calibration on data for ``compress``. ``data``: a text file, or a bundled corpus name (its
    training split). The distill stage uses steps/lr/loss; the layerwise stage (GPTQ, least-squares
    scales) damp/act_order/whiten/allocation; the final tune stage tune_steps/tune_lr (KL as the loss;
    ``tune_steps=0`` skips it) and tune_scope (the whole model, or one decoder layer at a time with
    ``tune_steps`` per layer)."""

    data: str | os.PathLike
    samples: int = DEFAULT_SAMPLES       # calibration sequences
    seq_len: int = DEFAULT_SEQ_LEN       # tokens per sequence
    steps: int = DEFAULT_STEPS           # scale-distillation steps
    lr: float = DEFAULT_LR               # scale-distillation learning rate
    loss: str = "mse"                    # distillation loss on the logits: mse or kl
    tune_steps: int = DEFAULT_TUNE_STEPS # end-to-end tuning steps after the layerwise pass (0: none)
    tune_lr: float = DEFAULT_TUNE_LR     # its learning rate (on dimensionless offsets)
    tune_scope: str = "auto"             # TUNE_SCOPES: end to end ("model"), per decoder layer ("layers")
    damp: float = 0.01                   # GPTQ damping
    act_order: bool = False              # GPTQ: columns by decreasing Hessian diagonal
    whiten: bool = True                  # GPTQ: singular vectors of the input-whitened delta
    allocation: str = "keep"             # GPTQ: keep the stored bit groups, or "optimal" in the same bytes
    device: str = "auto"                 # where the model runs and the calibrators' math (devices.py)
    sensitivity: str = "sequence"        # --method auto: per-window Fisher (seqfisher.py), per-channel
                                         # Fisher labels "sampled"/"empirical" (sensitivity.py), or "none"

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise SettingsError(f"calibration: loss {self.loss!r} must be one of {', '.join(LOSSES)}")
        if self.sensitivity not in SENSITIVITIES:
            raise SettingsError(f"calibration: sensitivity {self.sensitivity!r} must be one of "
                                f"{', '.join(SENSITIVITIES)}")
        if not (isinstance(self.tune_steps, int) and self.tune_steps >= 0):
            raise SettingsError(f"calibration: tune_steps must be a non-negative integer, got {self.tune_steps!r}")
        if self.tune_scope not in TUNE_SCOPES:
            raise SettingsError(f"calibration: tune_scope {self.tune_scope!r} must be one of {', '.join(TUNE_SCOPES)}")
        if not self.tune_lr > 0:
            raise SettingsError(f"calibration: tune_lr must be positive, got {self.tune_lr!r}")
        self.layerwise  # validates allocation and damp

    @property
    def layerwise(self) -> LayerwiseOptions:
        return LayerwiseOptions(damp=self.damp, act_order=self.act_order, whiten=self.whiten,
                                allocation=self.allocation)


def calibrating_codecs() -> list[str]:
    return [n for n in available() if get_codec(n).calibrator() is not None]


def stages_for(codecs: Iterable[str], tune: bool = True) -> list[str]:
    """The calibrator stages the codecs in a file need, in the order they run (``tune`` only when asked
    for and some codec's calibrator tunes)."""
    names = [c for c in codecs if c != "tied"]
    cals = [cal for cal in (get_codec(c).calibrator() for c in names) if cal is not None]
    wanted = {cal.stage for cal in cals} | ({"tune"} if tune and any(cal.tunes for cal in cals) else set())
    if not wanted:
        raise SettingsError(f"--calib: no tensor uses a codec that calibrates ({', '.join(calibrating_codecs())}); "
                            f"this file has {', '.join(sorted(names))}")
    return [s for s in STAGES if s in wanted]


# the tune stage holds the base in float32, the students' unpacked codes (up to about as many numbers again)
# and one batch's activations and logits: ~2 x 4 bytes per parameter plus this
_TUNE_OVERHEAD_BYTES = 3 * 1024**3


def _no_room_to_tune(finetuned, device: str) -> str | None:
    """Why the end-to-end tune stage would not fit in memory on ``device`` (a one-line reason), or None."""
    from ..checkpoint import open_checkpoint
    from ..memory import available_bytes

    have = available_bytes(device)
    if have is None:
        return None
    with open_checkpoint(finetuned) as ckpt:
        numel = sum(math.prod(ckpt.shape(n)) for n in ckpt.names())
    need = 8 * numel + _TUNE_OVERHEAD_BYTES
    if need <= have:
        return None
    return (f"training the whole model in float32 needs ~{need / 1e9:.1f} GB for {numel / 1e9:.2f} B parameters "
            f"and {device} has {have / 1e9:.1f} GB available")


def load_data(options: CalibrationOptions, finetuned, progress: bool = False) -> CalibData:
    """The calibration windows: tokenized with the fine-tune's tokenizer, or with ``data="self"`` (and no
    file of that name) sampled from the fine-tune (selfgen.py)."""
    if str(options.data) == SELF and not Path(options.data).is_file():
        return sample_windows(finetuned, options.samples, options.seq_len, device=resolve_device(options.device),
                              progress=progress)
    return load_calibration(options.data, finetuned, options.samples, options.seq_len)


def run_stages(base, finetuned, src: Path, out: Path, codecs: Iterable[str], options: CalibrationOptions,
               data: CalibData, scratch: Callable[[], Path], progress: bool = True) -> dict[str, Any]:
    """Run each needed stage on ``src``, the last one writing ``out`` (the others ``scratch()`` files);
    returns the stage reports by stage name."""
    from .blocktune import tune_blockwise
    from .distill import check_end_to_end, distill_scales
    from .layerwise import calibrate_layerwise

    device = resolve_device(options.device)
    runs = {
        "distill": lambda s, d: distill_scales(base, finetuned, s, d, data, steps=options.steps, lr=options.lr,
                                               loss=options.loss, overwrite=True, progress=progress, device=device),
        "layerwise": lambda s, d: calibrate_layerwise(base, finetuned, s, d, data, options=options.layerwise,
                                                      overwrite=True, progress=progress, device=device),
        "tune": lambda s, d: distill_scales(base, finetuned, s, d, data, steps=options.tune_steps,
                                            lr=options.tune_lr, loss="kl", overwrite=True, progress=progress,
                                            device=device, stage="tune"),
    }
    stages = stages_for(codecs, tune=options.tune_steps > 0)
    reports: dict[str, Any] = {}
    scope = _tune_scope(options.tune_scope, finetuned, device, reports) if "tune" in stages else None
    if "tune" in stages and scope is None:
        stages.remove("tune")
    elif scope == "layers":
        runs["tune"] = lambda s, d: tune_blockwise(base, finetuned, s, d, data, steps=options.tune_steps,
                                                   lr=options.tune_lr, overwrite=True, progress=progress,
                                                   device=device)
    end_to_end = {"distill"} | ({"tune"} if scope == "model" else set())
    for stage in end_to_end & set(stages):
        check_end_to_end(finetuned, src, stage)
    for i, stage in enumerate(stages):
        dst = out if i == len(stages) - 1 else scratch()
        reports[stage] = runs[stage](src, dst)
        src = dst
    return reports


def _tune_scope(asked: str, finetuned, device, reports: dict[str, Any]) -> str | None:
    """Where the tune stage runs: "model" (end to end) or "layers"; None to skip it (``asked`` is "model"
    and the model does not fit: the note says so, in ``reports`` and on stderr)."""
    if asked == "layers":
        return "layers"
    why = _no_room_to_tune(finetuned, device)
    if why is None:
        return "model"
    if asked == "auto":
        print(f"deltacomp: tune stage runs one decoder layer at a time: {why}", file=sys.stderr)
        return "layers"
    reports["tune"] = {"skipped": f"tune stage skipped: {why}; the file keeps the layerwise calibration "
                                  "(--calib-tune-scope layers tunes one decoder layer at a time)"}
    print(f"deltacomp: {reports['tune']['skipped']}", file=sys.stderr)
    return None
