"""svd-mixed's student for end-to-end tuning on the logits (the driver is deltacomp.calibrate.distill).

The codes (which quantization level every entry of U and V takes) stay as stored; what data may change is
every continuous number of the format, each by a dimensionless parameter that starts at 0, so one
learning rate suits them all whatever their magnitude:

    s_i           = s_i0 * (1 + a_i)                      one per kept singular vector
    scale_g       = scale_g0 * (1 + b_g)                  one per quantization group of U^T and V rows
    zero_g        = zero_g0 + scale_g0 * c_g              (an offset in units of the group's first step)
    y = x @ (W_base + U diag(s) V)^T + bias,  U^T = zero + codes * scale,  V likewise (rtn.py layout)

The delta is never formed: the forward pass is two skinny products, ``((x @ V^T) * s) @ U^T``. After
training, ``encoded`` writes the new values into the same fields in their stored dtypes (fp16 scales and
zeros, fp32 s): same bytes, same codes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..base import Encoded
from ...quant.bitpack import unpack_bits
from ...quant.rtn import dequantize
from . import allocation as al

_FP16_MAX = 65504.0


class _Side(nn.Module):
    """One group's rows of U^T or V: codes (c, L) uint8, stored scale/zero (c, G) and their offsets."""

    def __init__(self, codes: Tensor, scale: Tensor, zero: Tensor, group_size: int):
        super().__init__()
        self.group_size = group_size
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scale0", scale.float(), persistent=False)
        self.register_buffer("zero0", zero.float(), persistent=False)
        self.b = nn.Parameter(torch.zeros_like(self.scale0))
        self.c = nn.Parameter(torch.zeros_like(self.scale0))

    def scale(self) -> Tensor:
        return self.scale0 * (1 + self.b)

    def zero(self) -> Tensor:
        return self.zero0 + self.scale0 * self.c

    def rows(self) -> Tensor:
        """The dequantized rows (c, L), float32 as rtn.dequantize gives them, differentiable in b and c."""
        return dequantize(self.codes, self.scale(), self.zero(), self.group_size)


class LowRankTunedLinear(nn.Module):
    """``x @ (W_base + U diag(s) V)^T + b`` with svd-mixed's codes fixed and its scales trainable."""

    def __init__(self, base: nn.Linear, enc: Encoded):
        super().__init__()
        self.base = base.requires_grad_(False)
        n, k = enc.shape
        gs = int(enc.params["group_size"])
        t = enc.tensors
        self.widths = []
        self.u_sides, self.v_sides = nn.ModuleList(), nn.ModuleList()
        for b, c in al.parse_groups(enc.params["alloc"]) if enc.params.get("alloc") else []:
            self.widths.append(b)
            self.u_sides.append(_Side(unpack_bits(t[f"u_q{b}"], b, c * n).reshape(c, n), t[f"u_scale{b}"],
                                      t[f"u_zero{b}"], gs))
            self.v_sides.append(_Side(unpack_bits(t[f"v_q{b}"], b, c * k).reshape(c, k), t[f"v_scale{b}"],
                                      t[f"v_zero{b}"], gs))
        self.register_buffer("s0", t["s"].float(), persistent=False)
        self.a = nn.Parameter(torch.zeros_like(self.s0))

    def s(self) -> Tensor:
        return self.s0 * (1 + self.a)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.base.weight, self.base.bias)
        if not self.widths:
            return y
        v = torch.cat([side.rows() for side in self.v_sides]).to(x.dtype)   # (r, K)
        ut = torch.cat([side.rows() for side in self.u_sides]).to(x.dtype)  # (r, N)
        z = F.linear(x, v) * self.s().to(x.dtype)
        return y + z @ ut

    def encoded(self, enc: Encoded) -> Encoded:
        """``enc`` with the tuned values in its fields (codes byte-identical, dtypes as stored)."""
        tensors = dict(enc.tensors)
        for b, u, v in zip(self.widths, self.u_sides, self.v_sides):
            for name, side in (("u", u), ("v", v)):
                for field, value in (("scale", side.scale()), ("zero", side.zero())):
                    key = f"{name}_{field}{b}"
                    new = value.detach().cpu().clamp(-_FP16_MAX, _FP16_MAX)
                    if field == "scale":
                        new = new.clamp_min(0)
                    tensors[key] = new.to(tensors[key].dtype).contiguous()
        tensors["s"] = self.s().detach().cpu().to(enc.tensors["s"].dtype).contiguous()
        return Encoded(enc.codec, enc.shape, tensors, dict(enc.params))
