"""Pass-through codecs: ``zero`` (an unchanged tensor costs nothing) and ``raw`` (the delta itself)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Codec, CodecName, Encoded, Setting, register

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@register
class ZeroCodec(Codec):
    name = CodecName.ZERO.value
    description = "the fine-tune left this tensor unchanged: nothing is stored"
    fields = ()

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


@register
class RawCodec(Codec):
    name = CodecName.RAW.value
    description = "the delta uncompressed (for embeddings, norms, biases, or as a reference)"
    fields = ("values",)
    settings = (
        Setting("dtype", str, "float32", "storage dtype of the delta", choices=tuple(_DTYPES)),
    )

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        values = delta.to(_DTYPES[s["dtype"]]).contiguous()
        return Encoded(self.name, tuple(delta.shape), {"values": values}, {"dtype": s["dtype"]})

    def decode(self, enc: Encoded) -> Tensor:
        return enc.tensors["values"].to(torch.float32)
