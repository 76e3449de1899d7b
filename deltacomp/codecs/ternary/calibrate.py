"""ternary's calibrator: the support and signs stay; the scale becomes the least-squares one on the layer
outputs, alpha = <delta H, T> / <T H, T> for the sign pattern T (per row with ``per_row``): the
output-space counterpart of the codec's data-free ``scale=mean``, which is least squares on the weights."""
from __future__ import annotations

import torch
from torch import Tensor

from ..base import Encoded
from ..calibrator import Calibrator, LayerwiseOptions


def ternary_ls_scale(delta: Tensor, enc: Encoded, h: Tensor) -> Encoded:
    """``enc`` (ternary) with its scale(s) replaced by the least-squares fit of the layer outputs:
    argmin_alpha trace((delta - alpha T) H (delta - alpha T)^T) with T the stored sign pattern. A row (or
    tensor) whose pattern has no output energy keeps its stored scale; a negative fit (the pattern points
    against the delta on this data) is clamped to 0."""
    from .codec import TernaryCodec

    scale = enc.tensors["scale"].to(h.device)  # enc may live on the CPU while delta and H are on a GPU
    ones = Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": torch.ones_like(enc.tensors["scale"])}, enc.params)
    t = TernaryCodec().decode(ones).to(h.device, torch.float64)
    if t.dim() != 2:
        raise ValueError(f"ternary_ls_scale: a linear weight is 2-D, got shape {tuple(t.shape)}")
    th = t @ h.to(torch.float64)
    num = (delta.to(torch.float64) * th).sum(1)
    den = (t * th).sum(1)
    if scale.dim() == 0:
        num, den = num.sum(), den.sum()
    fit = torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scale.to(torch.float64))
    return Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": fit.clamp_min(0).to(torch.float32).contiguous()},
                   dict(enc.params))


class LeastSquaresScale(Calibrator):
    stage = "layerwise"
    description = "least-squares scale"

    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded:
        return ternary_ls_scale(delta, enc, h)
