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
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ...errors import DeltaFormatError, SettingsError
from ...quant import positions as P
from ..base import Codec, CodecName, Encoded, Rung, Setting, register

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
# For finite x, the int32 pattern of |x| (sign bit cleared) is monotone in |x|, so the k-th largest
# magnitude is the k-th largest pattern: a histogram of the high 16 bits finds its bucket, the low 16
# bits inside that bucket find it exactly. Tensors are walked in chunks of _CHUNK entries so that the
# temporaries stay in cache and no tensor-sized buffer is allocated (4x faster than whole-tensor ops).
_NONFINITE_HIGH = 0x7F80  # high 16 bits of +inf; NaN and inf patterns are >= 0x7F800000
_CHUNK = 1 << 18


def _raw_bits(delta: Tensor) -> np.ndarray:
    """The flat float32 bit patterns of delta (a view when delta is contiguous float32 on the CPU)."""
    return delta.detach().to(torch.float32).contiguous().reshape(-1).cpu().numpy().view(np.int32)


def _abs_chunks(raw: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, raw.size, _CHUNK):
        yield start, raw[start:start + _CHUNK] & 0x7FFFFFFF


def _high_hist(raw: np.ndarray) -> np.ndarray:
    high = np.zeros(1 << 15, dtype=np.int64)
    for _, bits in _abs_chunks(raw):
        high += np.bincount(bits >> 16, minlength=1 << 15)
    if high[_NONFINITE_HIGH:].any():
        raise ValueError("delta holds NaN or Inf; cannot choose a magnitude threshold")
    return high


def _pick(hist: np.ndarray, k: int) -> tuple[int, int]:
    """Largest bin b with count(bins >= b) >= k, and how many of the k fall inside bin b."""
    at_least = np.cumsum(hist[::-1])[::-1]  # at_least[b] = count of entries in bins >= b
    b = int(np.flatnonzero(at_least >= k)[-1])
    above = int(at_least[b + 1]) if b + 1 < hist.size else 0
    return b, k - above


def _kth_largest_bits(source: Callable[[], Iterable[np.ndarray]], k_of: Callable[[int], int]) -> int:
    """Bit pattern of the k-th largest magnitude of the raw bit arrays streamed by ``source()`` (called
    twice), k = k_of(number of entries)."""
    high = np.zeros(1 << 15, dtype=np.int64)
    seen = 0
    for raw in source():
        high += _high_hist(raw)
        seen += raw.size
    if seen == 0:
        raise ValueError("no tensors (or only empty ones) were given")
    b, need = _pick(high, k_of(seen))
    low = np.zeros(1 << 16, dtype=np.int64)
    again = 0
    for raw in source():
        for _, bits in _abs_chunks(raw):
            low += np.bincount(bits[(bits >> 16) == b] & 0xFFFF, minlength=1 << 16)
        again += raw.size
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


def threshold_positions(delta: Tensor, threshold: float) -> np.ndarray:
    """Sorted flat indices with |delta| >= threshold, never a zero."""
    raw = _raw_bits(delta)
    t = max(_float32_ceil_bits(threshold), 1)  # pattern 1 = the smallest nonzero magnitude
    out = []
    for start, bits in _abs_chunks(raw):
        if bits.max(initial=0) >= _NONFINITE_HIGH << 16:
            raise ValueError("delta holds NaN or Inf")
        out.append(np.flatnonzero(bits >= t) + start)
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def topk_positions(delta: Tensor, k: int) -> np.ndarray:
    """Sorted flat indices of exactly min(k, nonzeros) largest |delta| (ties: lowest index first).

    Two chunked passes: the high-16-bit histogram gives the bucket b of the k-th largest; the second
    pass keeps everything above b and collects bucket b's entries, of which the ``need`` largest (by low
    bits, then lowest index) complete the set."""
    raw = _raw_bits(delta)
    if raw.size == 0:
        return np.zeros(0, dtype=np.int64)
    b, need = _pick(_high_hist(raw), k)
    above, cand_pos, cand_low = [], [], []
    for start, bits in _abs_chunks(raw):
        high = bits >> 16
        above.append(np.flatnonzero(high > b) + start)
        inside = np.flatnonzero(high == b)
        cand_pos.append(inside + start)
        cand_low.append(bits[inside] & 0xFFFF)
    above, cand_pos, cand_low = (np.concatenate(x) for x in (above, cand_pos, cand_low))
    if b == 0:  # zeros never count: fewer than k nonzeros means keeping all of them
        nonzero = cand_low > 0
        cand_pos, cand_low = cand_pos[nonzero], cand_low[nonzero]
    chosen = np.sort(cand_pos[np.lexsort((cand_pos, -cand_low))[:need]])
    return np.insert(above, np.searchsorted(above, chosen), chosen)


def _kept_error(flat: Tensor, pos: Tensor, scale: Tensor, energy: float) -> float:
    """||delta - D^||_F^2 of keeping ``pos`` at +-scale (one scale, or one per row of ``scale.numel()``
    rows), from ``energy`` = ||delta||^2 and sums over the kept entries only, in float64:
    sum over dropped d^2 + sum over kept (|d| - m)^2 = ||delta||^2 - 2 sum_rows m S + sum_rows m^2 k."""
    mag = flat[pos].abs().double()
    m = scale.double().reshape(-1)
    if m.numel() == 1:
        return energy - 2 * float(m[0]) * float(mag.sum()) + float(m[0]) ** 2 * mag.numel()
    row = pos // (flat.numel() // m.numel())
    s_row = torch.zeros_like(m).index_add_(0, row, mag)
    k_row = torch.bincount(row, minlength=m.numel()).double()
    return energy - 2 * float((m * s_row).sum()) + float((m * m * k_row).sum())


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

    # Densities offered to --method auto (the real size of each is measured by encoding it).
    AUTO_DENSITIES = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.66)

    def candidates(self, shape, budget_hint):
        """A fixed ladder of densities, plus the densities the budget ladder around the hint buys (when
        rANS is installed). Positions are entropy-coded, so sizes are nearly continuous in the density:
        these rungs are what lets one budget be met closely. The caller's encode measures each."""
        out = [self.resolve_settings({"density": d}) for d in self.AUTO_DENSITIES]
        return out + [s for s in super().candidates(shape, budget_hint) if s not in out]

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
        source = lambda: (_raw_bits(d) for d in make())  # noqa: E731
        return _bits_to_float(_kth_largest_bits(source, lambda n: _count_k(density, n)))

    def needs_global(self, settings: dict[str, Any]) -> bool:
        return settings.get("scope") == "global" and settings.get("threshold") is None

    def global_settings(self, deltas, settings: dict[str, Any]) -> dict[str, Any]:
        return {"threshold": self.global_threshold(deltas, settings["density"])}

    # -- the contract --------------------------------------------------------------------------------
    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        numel = delta.numel()
        if s["threshold"] is not None:
            pos = threshold_positions(delta, s["threshold"])
        elif s["scope"] == "global":
            raise SettingsError("ternary: scope=global needs threshold= (computed over all tensors by "
                                "TernaryCodec.global_threshold in the plan's pre-pass)")
        else:
            pos = topk_positions(delta, _count_k(s["density"], numel))
        return self._encode_at(delta, pos, s)[0]

    def _encode_at(self, delta: Tensor, pos: np.ndarray, s: dict[str, Any]) -> tuple[Encoded, Tensor]:
        """The encoding keeping the sorted flat positions ``pos``, and its signs (True = +)."""
        flat = delta.detach().reshape(-1)
        pos_t = torch.from_numpy(pos)
        kept = flat[pos_t]
        scale = self._scale(delta, pos_t, kept, s)
        tensors, pparams = P.encode_support(pos, delta.numel(), kept > 0, storage=s["storage"])
        tensors["scale"] = scale
        return Encoded(self.name, tuple(delta.shape), tensors, {**s, **pparams}), kept > 0

    def ladder(self, delta, settings, prune=None):
        """Rungs at a density (scope=tensor, no threshold) share one stable descending sort of |delta| (of
        its first k entries for the largest k asked, ``_leading``): the top-k set is its first k (ties at the k-th magnitude by lowest index, as ``topk_positions``
        keeps them), so each rung costs its scale and its position coding. The reconstruction is built
        from the positions, signs and scale instead of decoding the positions again. Others (and a delta
        holding NaN or Inf, which encode refuses) are encoded alone."""
        self._check_input(delta)
        flat = delta.detach().reshape(-1).cpu()
        order, nonzero = None, 0
        finite = bool(torch.isfinite(flat).all())
        energy = float(torch.linalg.vector_norm(flat.double())) ** 2 if finite else 0.0
        settings = list(settings)
        kmax = max((_count_k(d, flat.numel()) for d in _densities(self, settings)), default=0)
        for given in settings:
            try:
                s = self.resolve_settings(given)
            except SettingsError:
                continue
            if not finite or s["threshold"] is not None or s["scope"] == "global":
                yield from super().ladder(delta, [given])
                continue
            if order is None:  # the first kmax places of a stable descending sort of |delta|
                order = _leading(flat.abs(), kmax)
                nonzero = int(torch.count_nonzero(flat))
            k = min(_count_k(s["density"], flat.numel()), nonzero)
            pos = np.sort(order[:k])
            enc, signs = self._encode_at(delta, pos, s)
            pos_t = torch.from_numpy(pos)
            yield Rung(dict(given), enc.nbytes, lambda enc=enc: enc,
                       lambda enc=enc, pos=pos_t, signs=signs: self._dense(enc, pos, signs),
                       _kept_error(flat, pos_t, enc.tensors["scale"], energy))

    @staticmethod
    def _dense(enc: Encoded, pos: Tensor, signs: Tensor) -> Tensor:
        """The float32 delta of an encoding from its positions and signs (``decode`` without the position
        decoding)."""
        scale = enc.tensors["scale"]
        vals = torch.where(signs, 1.0, -1.0)
        if scale.dim():
            cols = enc.shape[-1] if len(enc.shape) == 2 else enc.numel
            vals = vals * scale[pos // cols]
        else:
            vals = vals * scale
        out = torch.zeros(enc.numel, dtype=torch.float32)
        out[pos] = vals
        return out.reshape(enc.shape)

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

    def check_stored(self, enc: Encoded) -> None:
        """Finite values (the default), and the position streams' lengths within their bounds from the kept
        count (``positions.check_support``: nothing unpacked), so ``inspect`` refuses a padded stream."""
        super().check_stored(enc)
        P.check_support(enc.tensors, enc.params, enc.numel)

    def decode(self, enc: Encoded) -> Tensor:
        numel = enc.numel
        pos, signs = P.decode_support(enc.tensors, enc.params, numel)
        scale = enc.tensors.get("scale")
        rows = (enc.shape[0] if len(enc.shape) == 2 else 1) if enc.params.get("per_row") else None
        if scale is None or scale.dtype != torch.float32 or scale.shape != (() if rows is None else (rows,)):
            raise DeltaFormatError(f"ternary: field 'scale' must be fp32 of shape {() if rows is None else (rows,)}, "
                                   f"got {None if scale is None else (scale.dtype, tuple(scale.shape))}")
        return self._dense(enc, pos, signs)

    def serving_term(self, enc: Encoded):
        from .serving import TernaryTerm

        return TernaryTerm(self, enc)

    def calibrator(self):
        from .calibrate import LeastSquaresScale

        return LeastSquaresScale()

    def stats(self, enc: Encoded) -> dict[str, Any]:
        """For ``inspect``: stored bits per parameter / per kept entry vs the entropy bound
        (H(p) per parameter for the positions + one sign bit per kept entry; the stored size includes
        everything, scales too). Also the position storage used."""
        return {"storage": enc.params.get("storage"),
                **P.storage_stats(enc.nbytes, int(enc.params.get("kept", 0)), enc.numel, value_bits=1.0)}


def _densities(codec: TernaryCodec, settings) -> list[float]:
    """The densities of the settings a ladder sorts for (resolvable, scope=tensor, no threshold)."""
    out = []
    for given in settings:
        try:
            s = codec.resolve_settings(given)
        except SettingsError:
            continue
        if s["threshold"] is None and s["scope"] != "global":
            out.append(s["density"])
    return out


def _leading(mags: Tensor, kmax: int) -> np.ndarray:
    """The first ``kmax`` indices of a stable descending sort of ``mags`` (ties by lowest index). Where kmax
    is a small part of the tensor, only the entries at or above the kmax-th largest value are sorted (a
    full stable sort of 45M values takes ~20 s on one core; their top-k selection well under one)."""
    n = mags.numel()
    if kmax * 4 >= n:
        return torch.sort(mags, descending=True, stable=True).indices.numpy()
    if kmax == 0:
        return np.empty(0, dtype=np.int64)
    t = torch.topk(mags, kmax, sorted=False).values.min()
    cand = torch.nonzero(mags >= t).squeeze(1)  # ascending indices, every tie at t included
    return cand[torch.sort(mags[cand], descending=True, stable=True).indices][:kmax].numpy()
