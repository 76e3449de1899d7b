"""ternary's serving term: the TERNARY_CSR run-time form (ops.py), built once from the decoded support."""
from __future__ import annotations

from torch import Tensor

from ... import ops
from ...quant import positions as P
from ..base import Codec, Encoded
from ..term import DeltaTerm


class TernaryTerm(DeltaTerm):
    """``ops.ternary_matmul`` over row_ptr / neg_start / cols (positives first in each row) and the scale."""

    def __init__(self, codec: Codec, enc: Encoded):
        if len(enc.shape) != 2:
            raise ValueError(f"DeltaTerm: a linear weight delta is 2-D, got shape {enc.shape}")
        pos, signs = P.decode_support(enc.tensors, enc.params, enc.numel)
        row_ptr, neg_start, cols = ops.ternary_runtime(pos, signs, tuple(enc.shape))
        super().__init__(codec, enc, {"row_ptr": row_ptr, "neg_start": neg_start, "cols": cols,
                                      "scale": enc.tensors["scale"]})

    def forward(self, x2: Tensor) -> Tensor:
        return ops.ternary_matmul(x2, self.tensor("row_ptr"), self.tensor("neg_start"), self.tensor("cols"),
                                  self.tensor("scale"), self.shape[1])
