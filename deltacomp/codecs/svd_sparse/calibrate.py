"""svd-sparse's calibrator, in the same bytes.

- Layerwise: the sparse part's scale refitted by least squares on the layer outputs (its support and signs
  stay), once over the stored low-rank part and once over GPTQ's low-rank part for what the sparse part
  leaves (D - S, in the stored groups); whichever of the two has the lower output error
  trace((D - D^) H (D - D^)^T) is kept. The stored pair was chosen together (the sparse part holds the
  largest entries of what the low-rank part leaves), so GPTQ's part, fitted with the sparse part fixed,
  does not always win.
- Tune (end to end, on the logits): svd-mixed's student for the low-rank part (its scales, zeros and
  singular values) plus the sparse part's scale, alpha = alpha_0 (1 + a), trained together.
"""
from __future__ import annotations

from torch import Tensor, nn

from ..base import Encoded
from ..calibrator import Calibrator, LayerwiseOptions, output_error


class LowRankSparseTuned(nn.Module):
    """``x @ (W_base + U diag(s) V + alpha T)^T + b``: svd-mixed's ``LowRankTunedLinear`` over the base, plus
    ternary's ``ScaledPattern`` (the sparse part's sign pattern fixed, its scale trainable)."""

    def __init__(self, base: nn.Linear, enc: Encoded):
        from ..svd_mixed.tune import LowRankTunedLinear
        from ..ternary.calibrate import ScaledPattern
        from .codec import parts

        super().__init__()
        lr, sp = parts(enc)
        self.lowrank = LowRankTunedLinear(base, lr)
        self.sparse = ScaledPattern(sp, base.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.lowrank(x) + self.sparse(x)

    def encoded(self, enc: Encoded) -> Encoded:
        """``enc`` with the tuned values (codes, support and signs byte-identical, dtypes as stored)."""
        from ..ternary.calibrate import LeastSquaresScale
        from .codec import join, parts

        lr, sp = parts(enc)
        return join(self.lowrank.encoded(lr), LeastSquaresScale().encoded(self.sparse, sp), float(enc.params["sparse"]))


class LowRankThenScale(Calibrator):
    stage = "layerwise"
    description = "least-squares scale of the sparse part, over the stored or GPTQ's low-rank part; then tuned"
    tunes = True

    def student(self, linear: nn.Linear, enc: Encoded) -> nn.Module:
        return LowRankSparseTuned(linear, enc)

    def encoded(self, student: nn.Module, enc: Encoded) -> Encoded:
        return student.encoded(enc)

    def calibrate(self, delta: Tensor, enc: Encoded, h: Tensor, options: LayerwiseOptions) -> Encoded:
        from ..svd_mixed import SvdMixedCodec
        from ..svd_mixed.gptq import Gptq
        from ..ternary import TernaryCodec, ternary_ls_scale
        from .codec import join, parts

        lr, sp = parts(enc)
        keep = LayerwiseOptions(options.damp, options.act_order, options.whiten, "keep")  # same groups, bytes
        gptq = Gptq().calibrate(delta - TernaryCodec().decode(sp).to(delta.device), lr, h, keep)
        best = None
        for low in (lr,) if gptq is None else (lr, _on(gptq, lr)):
            low_hat = SvdMixedCodec().decode(low).to(delta.device)
            sparse = _on(ternary_ls_scale(delta - low_hat, sp, h), sp)
            err = output_error(delta, low_hat + TernaryCodec().decode(sparse).to(delta.device), h)
            if best is None or err < best[0]:
                best = (err, join(low, sparse, float(enc.params["sparse"])))
        return best[1]


def _on(new: Encoded, like: Encoded) -> Encoded:
    """``new`` with its tensors on the device ``like``'s are on (the stored encodings live on the CPU)."""
    device = next(iter(like.tensors.values())).device
    return Encoded(new.codec, new.shape, {f: t.to(device) for f, t in new.tensors.items()}, dict(new.params))
