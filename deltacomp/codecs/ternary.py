"""Ternary (ComPEFT): keep the largest-magnitude entries of the delta as sign x scale, drop the rest.

Reference: Yadav et al., "ComPEFT: Compression for Communicating Parameter Efficient Updates via Sparsification
and Quantization" (2023). Their value is alpha * std(delta) * sign; ``scale=std:ALPHA`` reproduces it
(std is the population std over the dense delta), ``scale=mean`` (default) uses mean |kept|, the
L2-optimal scale for a fixed support and signs.

Support: k = clamp(round(density * numel), 1, numel) entries, capped at the number of nonzero entries
(a zero carries no sign, so an all-zero delta keeps nothing). The kept set is exactly the top-k by
|delta|; among entries tied at the k-th magnitude the lowest flat indices are kept. The k-th magnitude is
found by an exact radix select on the float32 bit patterns (two 16-bit histogram passes), which is
linear time and several times faster than torch.kthvalue on large tensors.

Global scope (ComPEFT's choice: one threshold over all compressed tensors). The plan must run a
pre-pass: ``t = TernaryCodec.global_threshold(source, density)`` where ``source`` is a list of the float32
deltas or a zero-argument callable returning a fresh iterator over them (two streaming passes, memory
O(1) in the model size); then encode each tensor with ``scope=global, threshold=t``. With ``threshold``
given, density is ignored and the kept set is {|delta| >= threshold, delta != 0}. Encoding with
``scope=global`` and no threshold raises.

Fields: ``scale`` (fp32, () or (rows,) with ``per_row``), ``signs`` and the position fields of the
chosen storage (see quant/positions.py). Params: the settings, with ``storage`` set to the storage
actually used, plus ``kept`` and the storage's own decode parameters.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor

from ..errors import DeltaFormatError, SettingsError
from ..quant import positions as P
from .base import Codec, CodecName, Encoded, Setting, register

_SCALE_RE = re.compile(r"mean|std(?::(?P<alpha>[0-9.eE+-]+))?")


def parse_scale(text: str) -> tuple[str, float]:
    """``mean`` -> ("mean", 1.0); ``std`` / ``std:ALPHA`` -> ("std", ALPHA). Raises ValueError."""
    m = _SCALE_RE.fullmatch(str(text).strip())
    if not m:
        raise ValueError(f"scale must be mean, std or std:ALPHA, got {text!r}")
    if text.startswith("mean"):
        return "mean", 1.0
    alpha = float(m.group("alpha")) if m.group("alpha") else 1.0
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"scale std:ALPHA needs a finite ALPHA > 0, got {text!r}")
    return "std", alpha


def _scale_ok(text: str) -> bool:
    try:
        parse_scale(text)
    except ValueError:
        return False
    return True


def _count_k(density: float, numel: int) -> int:
    return min(numel, max(1, int(math.floor(density * numel + 0.5))))


# -- exact k-th largest magnitude by radix select on float32 bit patterns ----------------------------
# For finite x >= 0, the int32 view of float32 x is monotone in x, so the k-th largest magnitude is the
# k-th largest bit pattern: a histogram of the high 16 bits finds its bucket, one of the low 16 bits
# inside that bucket finds it exactly.
_NONFINITE_HIGH = 0x7F80  # high 16 bits of +inf; NaN and inf patterns are >= 0x7F800000


def _magnitude_bits(delta: Tensor) -> Tensor:
    """|delta| as a flat int32 tensor of float32 bit patterns."""
    return delta.detach().to(torch.float32).reshape(-1).abs().view(torch.int32)


def _pick(hist: Tensor, k: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= k, and how many of the k fall inside bin b."""
    at_least = hist.flip(0).cumsum(0).flip(0)  # at_least[b] = count of entries in bins >= b
    b = int(torch.nonzero(at_least >= k)[-1])
    above = int(at_least[b + 1]) if b + 1 < hist.numel() else 0
    return b, k - above


def _kth_largest_bits(source: Callable[[], Iterable[Tensor]], k_of: Callable[[int], int]) -> int:
    """Bit pattern of the k-th largest value streamed by ``source()`` (called twice); k = k_of(count)."""
    high = torch.zeros(1 << 15, dtype=torch.int64)
    seen = 0
    for bits in source():
        high += torch.bincount(bits >> 16, minlength=1 << 15)
        seen += bits.numel()
    if seen == 0:
        raise ValueError("no tensors (or only empty ones) were given")
    if int(high[_NONFINITE_HIGH:].sum()):
        raise ValueError("delta holds NaN or Inf; cannot choose a magnitude threshold")
    b, need = _pick(high, k_of(seen))
    low = torch.zeros(1 << 16, dtype=torch.int64)
    again = 0
    for bits in source():
        low += torch.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
        again += bits.numel()
    if again != seen:
        raise ValueError(f"the second pass saw {again} entries, the first {seen}; the deltas must not change")
    lo, _ = _pick(low, need)
    return (b << 16) | lo


def _bits_to_float(bits: int) -> float:
    return float(np.array([bits], dtype=np.int32).view(np.float32)[0])


def _float32_ceil_bits(value: float) -> int:
    """Bit pattern of the smallest float32 >= value (so |d| >= value is decided exactly in float32)."""
    f = np.float32(value)
    if float(f) < value:
        f = np.nextafter(f, np.float32(np.inf))
    return int(np.array([f], dtype=np.float32).view(np.int32)[0])


def topk_positions(delta: Tensor, k: int) -> np.ndarray:
    """Sorted flat indices of exactly min(k, nonzeros) largest |delta| (ties: lowest index first)."""
    bits = _magnitude_bits(delta)
    if bits.numel() == 0:
        return np.zeros(0, dtype=np.int64)
    high_bits = bits >> 16  # the radix select of _kth_largest_bits, sharing this shift between passes
    high = torch.bincount(high_bits, minlength=1 << 15)
    if int(high[_NONFINITE_HIGH:].sum()):
        raise ValueError("delta holds NaN or Inf; cannot choose a magnitude threshold")
    b, need = _pick(high, k)
    lo, _ = _pick(torch.bincount(bits[high_bits == b] & 0xFFFF, minlength=1 << 16), need)
    t = (b << 16) | lo
    keep = (bits > t).numpy()
    if t == 0:  # fewer than k nonzero entries: keep them all (a zero has no sign)
        return np.flatnonzero(keep)
    short = k - int(np.count_nonzero(keep))
    if short:
        keep[np.flatnonzero((bits == t).numpy())[:short]] = True
    return np.flatnonzero(keep)


@register
class TernaryCodec(Codec):
    name = CodecName.TERNARY.value
    description = "top-k magnitudes of the delta stored as sign x scale, entropy-coded positions (ComPEFT)"
    reference = "https://arxiv.org/abs/2311.13171"
    fields = ("scale",) + P.FIELDS
    settings = (
        Setting("density", float, 0.1, "fraction of entries kept", check=lambda v: 0 < v <= 1,
                check_msg="must be in (0, 1] (the fraction of entries kept)"),
        Setting("scope", str, "tensor", "threshold per tensor, or one over all tensors (needs threshold=)",
                choices=("tensor", "global")),
        Setting("scale", str, "mean", "mean (mean |kept|) or std:ALPHA (ALPHA * std(delta), ComPEFT)",
                check=_scale_ok, check_msg="must be mean, std or std:ALPHA with ALPHA > 0"),
        Setting("per_row", bool, False, "one scale per output row instead of one per tensor"),
        Setting("storage", str, "auto", "position storage; auto keeps the smallest",
                choices=("auto",) + P.STORAGES),
        Setting("threshold", float, None, "keep |delta| >= threshold (set by the plan for scope=global)",
                check=lambda v: math.isfinite(v) and v >= 0, check_msg="must be a finite number >= 0"),
    )

    # -- byte budget (--ratio) -----------------------------------------------------------------------
    def settings_for_budget(self, shape, nbytes, given):
        """The largest density whose encoding is guaranteed to fit ``nbytes``: rANS positions cost at
        most ``rans_nbytes_bound`` for any support, plus one sign bit per kept entry and the scales
        (auto storage never exceeds the rANS size)."""
        s = self.resolve_settings(given)
        if s["scope"] == "global" or s["threshold"] is not None:
            raise SettingsError("ternary: --ratio sets a density per tensor; it cannot be combined with "
                                "scope=global or threshold=")
        if s["storage"] not in ("auto", "rans") or "rans" not in P.available_storages():
            raise SettingsError(f"ternary: --ratio needs storage=auto or rans (with constriction installed), "
                                f"got storage={s['storage']}")
        numel = math.prod(shape)
        rows = shape[0] if len(shape) == 2 else 1
        fixed = 4 * (rows if s["per_row"] else 1)

        def cost(k: int) -> int:
            return P.rans_nbytes_bound(k, numel) + (k + 7) // 8 + fixed

        if cost(1) > nbytes:
            raise SettingsError(f"ternary: a budget of {nbytes} bytes is below one kept entry ({cost(1)} bytes) "
                                f"for shape {tuple(shape)}; use a lower --ratio or another method")
        if cost(numel) <= nbytes:  # cost rises up to p = 2/3, then falls to the 1 bit/param of p = 1
            return {**s, "density": 1.0}
        lo, hi = 1, max(1, (2 * numel) // 3)  # cost is increasing on [1, 2 numel / 3]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if cost(mid) <= nbytes else (lo, mid - 1)
        return {**s, "density": lo / numel}

    # -- global pre-pass -----------------------------------------------------------------------------
    @classmethod
    def global_threshold(cls, deltas: Iterable[Tensor] | Callable[[], Iterable[Tensor]], density: float) -> float:
        """The exact k-th largest |delta| over all tensors, k = clamp(round(density * total), 1, total).

        Streams: ``deltas`` is read twice, one tensor at a time, so it must be a re-iterable collection
        (list, tuple) or a zero-argument callable returning a fresh iterator (e.g. one that loads each
        delta from the checkpoints). Keeping every tensor with |delta| >= the result (and != 0) keeps
        exactly k entries in total when no other entry ties the threshold."""
        density = cls.resolve_settings({"density": density})["density"]
        if callable(deltas):
            make = deltas
        elif iter(deltas) is deltas:
            raise TypeError("global_threshold reads the deltas twice: pass a list or a zero-argument "
                            "callable returning a fresh iterator, not a one-shot iterator/generator")
        else:
            make = lambda: deltas  # noqa: E731
        source = lambda: (_magnitude_bits(d) for d in make())  # noqa: E731
        return _bits_to_float(_kth_largest_bits(source, lambda n: _count_k(density, n)))

    # -- the contract --------------------------------------------------------------------------------
    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        numel = delta.numel()
        if s["threshold"] is not None:
            bits = _magnitude_bits(delta)
            if int(torch.count_nonzero(bits >= (_NONFINITE_HIGH << 16))):
                raise ValueError("ternary: delta holds NaN or Inf")
            t = max(_float32_ceil_bits(s["threshold"]), 1)  # bit pattern 1 = smallest |d| != 0
            pos = np.flatnonzero((bits >= t).numpy())
        elif s["scope"] == "global":
            raise SettingsError("ternary: scope=global needs threshold= (computed over all tensors by "
                                "TernaryCodec.global_threshold in the plan's pre-pass)")
        else:
            pos = topk_positions(delta, _count_k(s["density"], numel))
        flat = delta.detach().reshape(-1)
        pos_t = torch.from_numpy(pos)
        kept = flat[pos_t]
        scale = self._scale(delta, pos_t, kept, s)
        tensors, pparams = P.encode_support(pos, numel, kept > 0, storage=s["storage"])
        tensors["scale"] = scale
        return Encoded(self.name, tuple(delta.shape), tensors, {**s, **pparams})

    @staticmethod
    def _scale(delta: Tensor, pos: Tensor, kept: Tensor, s: dict[str, Any]) -> Tensor:
        kind, alpha = parse_scale(s["scale"])
        mat = delta.reshape(1, -1) if delta.dim() == 1 else delta
        if kind == "std":
            std = mat.std(dim=1, correction=0) if s["per_row"] else mat.std(correction=0)
            return (alpha * std.to(torch.float64)).to(torch.float32).contiguous()
        mag = kept.abs().to(torch.float64)
        if not s["per_row"]:
            return (mag.mean() if mag.numel() else torch.zeros((), dtype=torch.float64)).to(torch.float32)
        rows, cols = mat.shape
        row = pos // cols
        total = torch.zeros(rows, dtype=torch.float64).index_add_(0, row, mag)
        count = torch.bincount(row, minlength=rows).to(torch.float64)
        return torch.where(count > 0, total / count.clamp(min=1), 0.0).to(torch.float32)

    def decode(self, enc: Encoded) -> Tensor:
        numel = enc.numel
        pos, signs = P.decode_support(enc.tensors, enc.params, numel)
        scale = enc.tensors.get("scale")
        rows = (enc.shape[0] if len(enc.shape) == 2 else 1) if enc.params.get("per_row") else None
        if scale is None or scale.dtype != torch.float32 or scale.shape != (() if rows is None else (rows,)):
            raise DeltaFormatError(f"ternary: field 'scale' must be fp32 of shape {() if rows is None else (rows,)}, "
                                   f"got {None if scale is None else (scale.dtype, tuple(scale.shape))}")
        vals = torch.where(signs, 1.0, -1.0)
        if scale.dim():
            cols = enc.shape[-1] if len(enc.shape) == 2 else numel
            vals = vals * scale[pos // cols]
        else:
            vals = vals * scale
        out = torch.zeros(numel, dtype=torch.float32)
        out[pos] = vals
        return out.reshape(enc.shape)

    def stats(self, enc: Encoded) -> dict[str, Any]:
        """For ``inspect``: stored bits per parameter / per kept entry vs the entropy bound
        (H(p) per parameter for the positions + one sign bit per kept entry; the stored size includes
        everything, scales too). Also the position storage used."""
        return {"storage": enc.params.get("storage"),
                **P.storage_stats(enc.nbytes, int(enc.params.get("kept", 0)), enc.numel, value_bits=1.0)}
