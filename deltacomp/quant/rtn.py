"""Asymmetric round-to-nearest (RTN) quantization with one scale and zero point per group.

For a 2-D ``w`` of shape (rows, K), groups are ``group_size`` consecutive elements along the last
axis (the input dim of a weight); the last group of a row may be shorter. For group g:
    zero  = min(w_g) rounded DOWN to fp16,  scale = (max(w_g) - zero) / (2**bits - 1) rounded UP to fp16
    code  = clamp(round((w - zero) / scale), 0, 2**bits - 1)           (uint8, unpacked)
    w_hat = zero + code * scale
Rounding zero down and scale up keeps [min, max] inside the code range, so |w - w_hat| <= scale / 2
(exactly, up to float32 arithmetic). A constant group gets scale 0, code 0 and zero = its value
rounded to the nearest fp16, so it decodes to that fp16 value.

Shapes: codes (rows, K) uint8; scale, zero (rows, ceil(K / group_size)) float16.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .bitpack import packed_nbytes

_FP16_MAX = 65504.0


def n_groups(k: int, group_size: int) -> int:
    return (k + group_size - 1) // group_size


def quantized_nbytes(rows: int, k: int, bits: int, group_size: int) -> int:
    """Bytes of packed codes + fp16 scales + fp16 zeros for a (rows, k) block."""
    return packed_nbytes(rows * k, bits) + 2 * 2 * rows * n_groups(k, group_size)


def _grouped(w: Tensor, group_size: int) -> Tensor:
    """(rows, K) -> (rows, G, group_size), padding the last group by repeating its last element
    (which leaves that group's min and max unchanged)."""
    rows, k = w.shape
    pad = n_groups(k, group_size) * group_size - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    return w.reshape(rows, -1, group_size)


def quantize(w: Tensor, bits: int, group_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize a 2-D float tensor; returns (codes uint8 (rows, K), scale fp16, zero fp16 (rows, G))."""
    if not 1 <= bits <= 8:
        raise ValueError(f"rtn: bits must be in 1..8, got {bits}")
    if group_size < 1:
        raise ValueError(f"rtn: group_size must be >= 1, got {group_size}")
    if w.dim() != 2:
        raise ValueError(f"rtn: expected a 2-D tensor, got shape {tuple(w.shape)}")
    rows, k = w.shape
    g = n_groups(k, group_size)
    if rows == 0 or k == 0:
        empty = torch.zeros(rows, g, dtype=torch.float16, device=w.device)
        return torch.zeros(rows, k, dtype=torch.uint8, device=w.device), empty, empty.clone()
    w32 = w.to(torch.float32)
    if not torch.isfinite(w32).all() or w32.abs().max() > _FP16_MAX / 2:
        raise ValueError("rtn: values must be finite and within fp16 range for fp16 scales/zeros")
    grouped = _grouped(w32, min(group_size, k))  # one group: the row itself (a huge group size pads nothing)
    lo, hi = grouped.amin(-1), grouped.amax(-1)
    zero = lo.to(torch.float16)
    zero = torch.where(zero.float() > lo, torch.nextafter(zero, torch.full_like(zero, -float("inf"))), zero)
    levels = (1 << bits) - 1
    scale_f = (hi - zero.float()) / levels
    scale = scale_f.to(torch.float16)
    scale = torch.where(scale.float() < scale_f, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    const = hi == lo  # constant group: nearest fp16 value, no scale
    zero = torch.where(const, lo.to(torch.float16), zero)
    scale = torch.where(const, torch.zeros_like(scale), scale)
    safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale_f))
    q = torch.round((grouped - zero.float()[..., None]) / safe[..., None]).clamp_(0, levels)
    codes = q.reshape(rows, -1)[:, :k].to(torch.uint8).contiguous()
    return codes, scale.contiguous(), zero.contiguous()


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int = 128) -> Tensor:
    """float32 (rows, K) from codes (rows, K) and per-group fp16 scale/zero (rows, G)."""
    rows, k = codes.shape
    g = n_groups(k, group_size)
    if scale.shape != (rows, g) or zero.shape != (rows, g):
        raise ValueError(f"rtn: scale/zero must have shape {(rows, g)}, got {tuple(scale.shape)}, "
                         f"{tuple(zero.shape)}")
    rep = min(group_size, max(k, 1))  # one group spans at most the row: a huge group size costs no memory
    s = scale.float().repeat_interleave(rep, dim=1)[:, :k]
    z = zero.float().repeat_interleave(rep, dim=1)[:, :k]
    return z + codes.float() * s
