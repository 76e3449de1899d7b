"""DARE: drop each delta entry at random with rate p, rescale the kept ones by 1 / (1 - p).

Reference: Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch" (2024). The rescale makes the decoded delta unbiased: E[decode] = delta over the drop mask.

The mask is reproducible and touches no global RNG state: a private torch.Generator seeded with
``seed`` mixed with a stable hash of the shape (sha256 of "dare:<seed>:<shape>"), so two tensors of the
same shape share a mask for the same seed (the mask never depends on the values or the name).
Kept entries that are exactly zero are not stored (they decode to zero either way).

Fields: ``values`` (fp16, one per kept entry in position order, already rescaled) and the position fields
of the chosen storage (see quant/positions.py; no signs, the values carry them). Params: the settings
with ``storage`` set to the storage used, plus ``kept`` and the storage's decode parameters.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DeltaFormatError
from ..quant import positions as P
from .base import Codec, CodecName, Encoded, Setting, register

_FP16_MAX = float(torch.finfo(torch.float16).max)
_CHUNK = 1 << 18


def mask_seed(seed: int, shape: tuple[int, ...]) -> int:
    """The generator seed for ``seed`` and a tensor shape: stable across runs, platforms and versions."""
    digest = hashlib.sha256(f"dare:{int(seed)}:{tuple(int(d) for d in shape)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _keep_chunks(shape: tuple[int, ...], p: float, seed: int):
    """(start, bool keep-mask) per chunk of _CHUNK entries: each entry kept with probability 1 - p. The
    uniforms are drawn chunk by chunk from one generator, so no numel-sized float buffer is made."""
    numel = int(np.prod(shape, dtype=np.int64))
    gen = torch.Generator(device="cpu").manual_seed(mask_seed(seed, shape))
    for start in range(0, numel, _CHUNK):
        yield start, torch.rand(min(_CHUNK, numel - start), generator=gen, dtype=torch.float32) >= p


def drop_mask(shape: tuple[int, ...], p: float, seed: int) -> Tensor:
    """Bool keep-mask (flat, numel entries) that encode draws for this shape, p and seed."""
    parts = [keep for _, keep in _keep_chunks(shape, p, seed)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


@register
class DareCodec(Codec):
    name = CodecName.DARE.value
    description = "random drop with rate p, kept entries rescaled by 1/(1-p) in fp16 (DARE)"
    reference = "https://arxiv.org/abs/2311.03099"
    fields = ("values",) + tuple(f for f in P.FIELDS if f != "signs")
    settings = (
        Setting("p", float, 0.9, "drop rate", check=lambda v: 0 <= v < 1, check_msg="must be in [0, 1) (the drop rate)"),
        Setting("seed", int, 0, "seed of the drop mask (mixed with the tensor shape)"),
        Setting("storage", str, "auto", "position storage; auto keeps the smallest", choices=("auto",) + P.STORAGES),
    )

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        flat = delta.detach().reshape(-1)
        parts = []
        for start, keep in _keep_chunks(tuple(delta.shape), s["p"], s["seed"]):
            chunk = flat[start:start + keep.numel()]
            lo, hi = torch.aminmax(chunk)  # NaN propagates into both
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError("dare: delta holds NaN or Inf")
            parts.append(np.flatnonzero((keep & (chunk != 0)).numpy()) + start)
        pos = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64))
        values = flat[pos].to(torch.float64) / (1.0 - s["p"])
        if values.numel() and float(values.abs().max()) > _FP16_MAX:
            raise ValueError(f"dare: a rescaled value {float(values.abs().max()):.4g} overflows fp16 "
                             f"(max {_FP16_MAX:.0f}) at p={s['p']}; use a lower p")
        tensors, pparams = P.encode_support(pos, flat.numel(), None, storage=s["storage"])
        tensors["values"] = values.to(torch.float16).contiguous()
        return Encoded(self.name, tuple(delta.shape), tensors, {**s, **pparams})

    def check_stored(self, enc: Encoded) -> None:
        """Finite values (the default), and the position streams within their bounds (as ternary's)."""
        super().check_stored(enc)
        P.check_support(enc.tensors, enc.params, enc.numel, with_signs=False)

    def decode(self, enc: Encoded) -> Tensor:
        pos, _ = P.decode_support(enc.tensors, enc.params, enc.numel, with_signs=False)
        values = enc.tensors.get("values")
        if values is None or values.dtype != torch.float16 or values.shape != (pos.numel(),):
            raise DeltaFormatError(f"dare: field 'values' must be fp16 of shape ({pos.numel()},), got "
                                   f"{None if values is None else (values.dtype, tuple(values.shape))}")
        out = torch.zeros(enc.numel, dtype=torch.float32)
        out[pos] = values.to(torch.float32)
        return out.reshape(enc.shape)

    def stats(self, enc: Encoded) -> dict[str, Any]:
        """For ``inspect``: stored bits per parameter / per kept entry vs the entropy bound
        (H(p) per parameter for the positions + 16 bits of fp16 value per kept entry; the stored size includes
        everything, scales too). Also the position storage used."""
        return {"storage": enc.params.get("storage"),
                **P.storage_stats(enc.nbytes, int(enc.params.get("kept", 0)), enc.numel, value_bits=16.0)}
