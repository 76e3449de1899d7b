"""What a codec does with calibration data: its ``Calibrator``.

The drivers in deltacomp.calibrate run the model on data and call the calibrators of the codecs in a
delta file; they never look at codec names. Three stages, run in this order by ``compress(calibration=...)``:

- ``distill`` (end to end, on the logits): ``student(linear, enc)`` returns a module standing in for the
  linear layer whose trainable parameters are what the codec lets data change (bitdelta: the scales);
  after training, ``encoded(student, enc)`` is the new encoding, same fields and bytes.
- ``layerwise`` (one decoder layer at a time, GPTQ's order): ``calibrate(delta, enc, h, options)`` returns
  a new encoding of ``delta`` given H = sum x^T x of the layer's inputs (svd-mixed: GPTQ; ternary: a
  least-squares scale), or None to keep the stored one.
- ``tune`` (end to end, on the logits, last): every tensor whose calibrator ``tunes`` (``tune_student`` and
  ``tune_encoded``, by default its ``student`` and ``encoded``) is trained together, with KL to the
  fine-tune's next-token distribution as the loss, after the earlier stages have fixed its codes
  (svd-mixed: the scales and singular values of its GPTQ codes; lowrank: its factors; bitdelta: its
  scales, as offsets relative to the distilled ones). Runs when the file holds a tensor whose calibrator
  ``tunes`` and the options ask for steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from ..errors import SettingsError
from .base import Encoded

STAGES = ("distill", "layerwise", "tune")
ALLOCATIONS = ("keep", "optimal")


@dataclass(frozen=True)
class LayerwiseOptions:
    """Options of the layerwise stage (GPTQ's, used by the codecs that run it)."""

    damp: float = 0.01          # GPTQ: damping, a fraction of mean(diag H) added to the diagonal
    act_order: bool = False     # GPTQ: quantize columns by decreasing Hessian diagonal
    whiten: bool = True         # GPTQ: singular vectors of the input-whitened delta (lowest output error)
    allocation: str = "keep"    # keep the stored bit groups, or re-choose them ("optimal") in the same bytes

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise SettingsError(f"calibration: allocation must be one of {', '.join(ALLOCATIONS)}, "
                                f"got {self.allocation!r}")
        if not self.damp >= 0:
            raise SettingsError(f"calibration: damp must be >= 0, got {self.damp!r}")


def output_error(delta: Tensor, approx: Tensor, h: Tensor) -> float:
    """sum over samples of ||x (delta - approx)^T||^2 = trace(E H E^T), E = delta - approx."""
    e = (delta - approx).to(torch.float64)
    return float(torch.sum((e @ h.to(torch.float64)) * e))


class Calibrator:
    """Base class; a codec's ``calibrator()`` returns one (or None). ``description`` is recorded in the
    delta file's metadata for every calibrated codec."""

    stage: ClassVar[str]
    description: ClassVar[str] = ""
    tunes: ClassVar[bool] = False  # its student also runs in the final ``tune`` stage (after ``stage``)

    # -- stage "distill" ------------------------------------------------------------------------------
    def student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        raise NotImplementedError

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        raise NotImplementedError

    # -- stage "tune" (when ``tunes``): the distill-stage pair unless a codec trains other numbers there -----
    def tune_student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        return self.student(linear, enc)

    def tune_encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        return self.encoded(student, enc)

    # -- stage "layerwise" ----------------------------------------------------------------------------
    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded | None:
        raise NotImplementedError
