"""svd-sparse's serving term: svd-mixed's term plus ternary's, each its codec's own (packed op, CSR)."""
from __future__ import annotations

from torch import Tensor

from ..base import Codec, Encoded
from ..term import DeltaTerm


class SvdSparseTerm(DeltaTerm):
    """``x2 @ (L + S)^T`` = the low-rank part's term + the sparse part's, summed in x2's dtype."""

    def __init__(self, codec: Codec, enc: Encoded):
        from ..svd_mixed import SvdMixedCodec
        from ..ternary import TernaryCodec
        from .codec import parts

        super().__init__(codec, enc, {})
        lr, sp = parts(enc)
        self.lowrank = SvdMixedCodec().serving_term(lr)
        self.sparse = TernaryCodec().serving_term(sp)

    def forward(self, x2: Tensor) -> Tensor:
        y = self.lowrank(x2)
        return y.add_(self.sparse(x2).to(y.dtype))
