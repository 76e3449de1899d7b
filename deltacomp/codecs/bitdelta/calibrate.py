"""bitdelta's calibrator: BitDelta scale distillation (the driver is deltacomp.calibrate.distill).

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
    """``x @ (W_base + sum_i scale_i * sign_i)^T + b`` with only the scales trainable."""

    def __init__(self, base: nn.Linear, signs: list[Tensor], scales: list[Tensor]):
        super().__init__()
        self.base = base.requires_grad_(False)
        dtype = base.weight.dtype
        for i, s in enumerate(signs):
            self.register_buffer(f"sign_{i}", s.to(dtype), persistent=False)
        self.scales = nn.ParameterList(nn.Parameter(s.detach().to(torch.float32).clone()) for s in scales)
        self.scale_shapes = [tuple(s.shape) for s in scales]

    def delta(self) -> Tensor:
        out = None
        for i, scale in enumerate(self.scales):
            sign = getattr(self, f"sign_{i}")
            s = scale.to(sign.dtype)
            term = sign * (s[:, None] if s.dim() else s)
            out = term if out is None else out + term
        return out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.delta(), self.base.bias)


class ScaleDistillation(Calibrator):
    stage = "distill"
    description = "scale distillation"

    def student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        k = enc.shape[1]
        masks = int(enc.params.get("masks", 1))
        signs = [ops.unpack_signs(enc.tensors[field("signs", i)], k, torch.float32) for i in range(masks)]
        return SignScaledLinear(linear, signs, [enc.tensors[field("scale", i)] for i in range(masks)])

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        """``enc`` with the trained scales (signs byte-identical)."""
        tensors = dict(enc.tensors)
        for i, (s, shape) in enumerate(zip(student.scales, student.scale_shapes)):
            key = field("scale", i)
            old = tensors[key]
            new = s.detach().cpu().to(torch.float32).reshape(shape)
            if tuple(old.shape) != tuple(new.shape):
                raise ValueError(f"{key}: distilled scale has shape {tuple(new.shape)}, file has {tuple(old.shape)}")
            tensors[key] = new.to(old.dtype).contiguous()
        return Encoded(enc.codec, enc.shape, tensors, enc.params)
