"""lowrank's calibrator.

Layerwise stage: the factors are refit to the layer's output error, the rank-r truncated SVD of the
input-whitened delta (quant/whiten.py): same rank, dtype and bytes, kept only when its output error
trace(E H E^T) is lower than the stored factors' (``LayerwiseOptions.whiten`` off: the stored ones stay).

Tune stage: every number of the file's factors trains end to end, each by an offset from its stored value
in units of its typical size, so that one learning rate suits all of them::

    u = u0 + du / sqrt(N)      v = v0 + dv / sqrt(K)      s = s0 (1 + a)      (du, dv, a start at 0)
    y = x @ (W_base + u diag(s) v)^T + bias, never forming the delta: ((x @ v^T) * s) @ u^T

(u's columns and v's rows are unit vectors: their entries' rms is 1/sqrt(N) and 1/sqrt(K).) ``encoded``
writes u and v back in their stored dtype (clamped to its range) and s in float32: the same bytes.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...quant.whiten import whitened_svd
from ..base import Encoded
from ..calibrator import Calibrator, LayerwiseOptions, output_error


class FactorTunedLinear(nn.Module):
    """``x @ (W_base + u diag(s) v)^T + b`` with lowrank's factors trainable (offsets from the stored)."""

    def __init__(self, base: nn.Linear, enc: Encoded):
        super().__init__()
        self.base = base.requires_grad_(False)
        n, k = enc.shape
        t = enc.tensors
        self.register_buffer("u0", t["u"].float().reshape(n, -1), persistent=False)
        self.register_buffer("v0", t["v"].float().reshape(-1, k), persistent=False)
        self.register_buffer("s0", t["s"].float().reshape(-1), persistent=False)
        self.du = nn.Parameter(torch.zeros_like(self.u0))
        self.dv = nn.Parameter(torch.zeros_like(self.v0))
        self.a = nn.Parameter(torch.zeros_like(self.s0))
        self.unit_u, self.unit_v = 1 / math.sqrt(n), 1 / math.sqrt(k)

    def factors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.u0 + self.du * self.unit_u, self.s0 * (1 + self.a), self.v0 + self.dv * self.unit_v

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        if not self.s0.numel():
            return y
        u, s, v = (f.to(x.dtype) for f in self.factors())
        return y + (F.linear(x, v) * s) @ u.T

    def encoded(self, enc: Encoded) -> Encoded:
        """``enc`` with the tuned factors (same fields, shapes and dtypes)."""
        tensors = dict(enc.tensors)
        for key, value in zip(("u", "s", "v"), self.factors()):
            old = tensors[key]
            new = value.detach().cpu()
            if old.dtype.is_floating_point and old.dtype != torch.float32:
                lim = torch.finfo(old.dtype).max
                new = new.clamp(-lim, lim)
            tensors[key] = new.to(old.dtype).reshape(old.shape).contiguous()
        return Encoded(enc.codec, enc.shape, tensors, dict(enc.params))


class FactorRefit(Calibrator):
    stage = "layerwise"
    description = "output-error refit"
    tunes = True

    def student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        return FactorTunedLinear(linear, enc)

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        return student.encoded(enc)

    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded | None:
        """The whitened rank-r factors of ``delta`` when they lower the output error, else None (keep)."""
        from .codec import LowRankCodec

        rank = int(enc.tensors["s"].numel())
        if rank == 0 or not options.whiten:
            return None
        u, s, v, _ = whitened_svd(delta, h, rank, options.damp)
        codec = LowRankCodec()
        new = codec._pack(tuple(delta.shape), u, s, v, dict(enc.params))
        old_err = output_error(delta, codec.decode(_on(enc, delta.device)), h)
        new_err = output_error(delta, codec.decode(_on(new, delta.device)), h)
        return new if new_err < old_err else None


def _on(enc: Encoded, device: torch.device) -> Encoded:
    return Encoded(enc.codec, enc.shape, {k: v.to(device) for k, v in enc.tensors.items()}, enc.params)
