"""ternary's calibrator: the support and signs stay; the scale becomes the least-squares one on the layer
outputs, alpha = <delta H, T> / <T H, T> for the sign pattern T (per row with ``per_row``): the
output-space counterpart of the codec's data-free ``scale=mean``, which is least squares on the weights.
Then, in the tune stage, the scale(s) are trained end to end: alpha = alpha_0 * (1 + a), ``a`` starting at 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Encoded
from ..calibrator import Calibrator, LayerwiseOptions


def sign_pattern(enc: Encoded) -> Tensor:
    """The stored sign pattern T (+-1 on the support, 0 elsewhere) as a dense float32 (N, K)."""
    from .codec import TernaryCodec

    ones = Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": torch.ones_like(enc.tensors["scale"])}, enc.params)
    return TernaryCodec().decode(ones)


class ScaledPattern(nn.Module):
    """``x @ (alpha T)^T``: the stored sign pattern T fixed, alpha = alpha_0 (1 + a) trainable (one, or one
    per row). Also the sparse part of svd-sparse's student."""

    def __init__(self, enc: Encoded, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("pattern", sign_pattern(enc).to(dtype), persistent=False)
        self.register_buffer("scale0", enc.tensors["scale"].float(), persistent=False)
        self.a = nn.Parameter(torch.zeros_like(self.scale0))

    def scale(self) -> Tensor:
        return self.scale0 * (1 + self.a)

    def weight(self) -> Tensor:
        s = self.scale().to(self.pattern.dtype)
        return self.pattern * (s[:, None] if s.dim() else s)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight())


class ScaledPatternLinear(ScaledPattern):
    """``x @ (W_base + alpha T)^T + b``: the base layer with ``ScaledPattern`` added to its weight."""

    def __init__(self, base: nn.Linear, enc: Encoded):
        super().__init__(enc, base.weight.dtype)
        self.base = base.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.weight(), self.base.bias)


def ternary_ls_scale(delta: Tensor, enc: Encoded, h: Tensor) -> Encoded:
    """``enc`` (ternary) with its scale(s) replaced by the least-squares fit of the layer outputs:
    argmin_alpha trace((delta - alpha T) H (delta - alpha T)^T) with T the stored sign pattern. A row (or
    tensor) whose pattern has no output energy keeps its stored scale; a negative fit (the pattern points
    against the delta on this data) is clamped to 0."""
    scale = enc.tensors["scale"].to(h.device)  # enc may live on the CPU while delta and H are on a GPU
    t = sign_pattern(enc).to(h.device, torch.float64)
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
    tunes = True

    def student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        return ScaledPatternLinear(linear, enc)

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        """``enc`` with the tuned scale(s), kept >= 0 (support and signs byte-identical)."""
        stored = enc.tensors["scale"]
        new = student.scale().detach().cpu().clamp_min(0).to(stored.dtype).reshape(stored.shape)
        return Encoded(enc.codec, enc.shape, {**enc.tensors, "scale": new.contiguous()}, dict(enc.params))

    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded:
        return ternary_ls_scale(delta, enc, h)
