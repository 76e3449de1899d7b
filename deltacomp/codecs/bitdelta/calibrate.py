"""bitdelta's calibrator: BitDelta scale distillation (the driver is deltacomp.calibrate.distill), and the
same scales trained again, relative to the distilled ones, in the final tune stage.

Student layer (a bitdelta-coded nn.Linear)::

    y = x @ (W_base + sum_i scale_i * sign_i)^T + bias     sign_i = +-1 (unpacked once, model dtype)
    scale_i: () per tensor, or (N,) per output row (broadcast along K); the only trainable tensors.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import ops
from ..base import Encoded
from ..calibrator import Calibrator
from .serving import field


class SignScaledLinear(nn.Module):
    """``x @ (W_base + sum_i scale_i * sign_i)^T + b`` with only the scales trainable: the scales themselves
    (BitDelta's distillation), or with ``relative`` an offset ``a_i`` per scale, scale_i = scale_i0 (1 + a_i)
    from 0 (the tune stage: one learning rate for every tensor, whatever its scales' magnitude)."""

    def __init__(self, base: nn.Linear, signs: list[Tensor], scales: list[Tensor], relative: bool = False):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.relative = relative
        dtype = base.weight.dtype
        for i, s in enumerate(signs):
            self.register_buffer(f"sign_{i}", s.to(dtype), persistent=False)
        start = [s.detach().to(torch.float32).clone() for s in scales]
        if relative:
            for i, s in enumerate(start):
                self.register_buffer(f"scale0_{i}", s, persistent=False)
            start = [torch.zeros_like(s) for s in start]
        self.scales = nn.ParameterList(nn.Parameter(s) for s in start)
        self.scale_shapes = [tuple(s.shape) for s in scales]

    def scale(self, i: int) -> Tensor:
        """The i-th scale as the layer uses it."""
        p = self.scales[i]
        return getattr(self, f"scale0_{i}") * (1 + p) if self.relative else p

    def delta(self) -> Tensor:
        out = None
        for i in range(len(self.scales)):
            sign = getattr(self, f"sign_{i}")
            s = self.scale(i).to(sign.dtype)
            term = sign * (s[:, None] if s.dim() else s)
            out = term if out is None else out + term
        return out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.delta(), self.base.bias)


class ScaleDistillation(Calibrator):
    stage = "distill"
    description = "scale distillation"
    tunes = True

    def student(self, linear: nn.Linear, enc: Encoded, relative: bool = False) -> nn.Module:
        k = enc.shape[1]
        masks = int(enc.params.get("masks", 1))
        signs = [ops.unpack_signs(enc.tensors[field("signs", i)], k, torch.float32) for i in range(masks)]
        return SignScaledLinear(linear, signs, [enc.tensors[field("scale", i)] for i in range(masks)], relative)

    def tune_student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        return self.student(linear, enc, relative=True)

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        """``enc`` with the trained scales (signs byte-identical)."""
        tensors = dict(enc.tensors)
        for i, shape in enumerate(student.scale_shapes):
            key = field("scale", i)
            old = tensors[key]
            new = student.scale(i).detach().cpu().to(torch.float32).reshape(shape)
            if tuple(old.shape) != tuple(new.shape):
                raise ValueError(f"{key}: distilled scale has shape {tuple(new.shape)}, file has {tuple(old.shape)}")
            tensors[key] = new.to(old.dtype).contiguous()
        return Encoded(enc.codec, enc.shape, tensors, enc.params)
