"""Pass-through codecs: ``zero`` (an unchanged tensor costs nothing) and ``raw`` (the delta itself)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..dtypes import DTYPES, dtype_name
from ..errors import SettingsError
from .base import Codec, CodecName, Encoded, Setting, register
from .term import DeltaTerm

_STORAGE = ("float32", "bfloat16", "float16")


@register
class ZeroCodec(Codec):
    name = CodecName.ZERO.value
    description = "the fine-tune left this tensor unchanged: nothing is stored"
    fields = ()
    applied_in_place = True
    always_zero = True
    compresses = False
    row_blocks = True

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        self.resolve_settings(settings)
        if torch.count_nonzero(delta):
            raise ValueError("zero: the delta is not all zero; use another codec")
        return Encoded(self.name, tuple(delta.shape), {}, {})

    def decode(self, enc: Encoded) -> Tensor:
        return torch.zeros(enc.shape, dtype=torch.float32)

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        return x.new_zeros(*x.shape[:-1], enc.shape[0])

    def meta_tensors(self, shape, settings):
        return {}


@register
class RawCodec(Codec):
    name = CodecName.RAW.value
    description = "the delta uncompressed (for embeddings, norms, biases, or as a reference)"
    fields = ("values",)
    settings = (
        # any storable dtype: a tensor stored whole (``whole``: only in the fine-tune, or an integer/bool
        # tensor, which has no delta) keeps its own; a delta is stored in one of _STORAGE (``encode``)
        Setting("dtype", str, "float32", "storage dtype of the delta (float32, bfloat16, float16)",
                choices=tuple(DTYPES)),
    )
    applied_in_place = True
    compresses = False
    row_blocks = True

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        if s["dtype"] not in _STORAGE:
            raise SettingsError(f"raw: setting dtype={s['dtype']!r} cannot hold a delta; choose one of "
                                f"{', '.join(_STORAGE)}")
        values = delta.to(DTYPES[s["dtype"]]).contiguous()
        if not bool(torch.isfinite(values).all()):  # the delta is finite (compress checks): it overflowed
            raise SettingsError(f"raw: the delta reaches {float(delta.abs().max()):.4g}, beyond {s['dtype']}'s "
                                "range; store it as float32 (raw:dtype=float32)")
        return Encoded(self.name, tuple(delta.shape), {"values": values}, {"dtype": s["dtype"]})

    def encoded_settings(self, settings, given, delta, base, finetuned):
        """Raw storage must reproduce the fine-tune exactly: keep the fine-tune's dtype if it does, else fp32."""
        return self.block_settings(settings, given, [(delta, base, finetuned)])

    def block_settings(self, settings, given, blocks):
        """``encoded_settings`` block by block: the fine-tune's dtype if every block is exact in it."""
        if "dtype" in given:
            return settings
        ft_dtype = None
        for delta, base, finetuned in blocks:
            ft_dtype = dtype_name(finetuned.dtype)
            if ft_dtype not in ("bfloat16", "float16"):
                break
            cand = delta.to(finetuned.dtype).to(torch.float32)
            if not torch.equal(cand.add_(base.to(torch.float32)).to(finetuned.dtype), finetuned):
                ft_dtype = None
                break
        if ft_dtype in ("bfloat16", "float16"):
            return {**settings, "dtype": ft_dtype}
        return {**settings, "dtype": "float32"}

    def candidates(self, shape, budget_hint):
        """The delta in float16: the near-exact top of every tensor's ladder (float32 is never worth it
        when a 16-bit fine-tune is the reference)."""
        return [{"dtype": "float16"}]

    @classmethod
    def whole(cls, tensor: Tensor) -> Encoded:
        """A tensor stored whole, in its own dtype (one the base lacks: it has no delta)."""
        return Encoded(cls.name, tuple(tensor.shape), {"values": tensor}, {"dtype": dtype_name(tensor.dtype)})

    def decode(self, enc: Encoded) -> Tensor:
        return enc.tensors["values"].to(torch.float32)

    def meta_tensors(self, shape, settings):
        return {"values": torch.empty(shape, dtype=DTYPES[settings["dtype"]], device="meta")}

    def serving_term(self, enc: Encoded) -> DeltaTerm:
        return DenseTerm(self, enc)


class DenseTerm(DeltaTerm):
    """The delta decoded once and kept dense (raw deltas served as a term over a quantized base)."""

    def __init__(self, codec: Codec, enc: Encoded):
        super().__init__(codec, enc, {"dense": codec.decode(enc)})

    def forward(self, x2: Tensor) -> Tensor:
        return x2 @ self.tensor("dense").to(x2.dtype).T
