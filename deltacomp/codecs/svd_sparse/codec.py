"""svd-sparse: a residual composition. The budget is split: ``1 - sparse`` of it buys svd-mixed's
quantized singular vectors of the delta D (Delta-CoMe), the rest a ternary code (ComPEFT: the largest
entries of the residual R = D - L^ as sign x one scale) of what they leave. Low rank captures the broad
directions of a fine-tune's update; the sparse part the few large entries no rank-r fit reaches, which at
the tail of svd-mixed's budget (2-bit vectors of small singular values) buy more per byte.

On disk: svd-mixed's fields and params as svd-mixed writes them, and ternary's with the prefix ``sp_``
(``sp_signs``, ``sp_scale``, the position fields; ``sp_kept``, ``sp_storage``, ...). Each part is read,
checked and decoded by its own codec (``parts``)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...errors import SettingsError
from ..base import Codec, CodecName, Encoded, Setting, register
from ..svd_mixed import SvdMixedCodec
from ..ternary import TernaryCodec

PREFIX = "sp_"  # the residual's fields and params
GRID = 11  # densities the residual's search encodes (one shared sort of |R|: ternary's ladder)


def _own_settings() -> tuple[Setting, ...]:
    keep = [s for s in SvdMixedCodec.settings if s.name != "groups"]  # the budget decides the groups
    return (*keep, Setting("sparse", float, 0.4, "fraction of the byte budget for the sparse ternary residual",
                           check=lambda v: 0 <= v < 1, check_msg="must be in [0, 1)"))


def parts(enc: Encoded) -> tuple[Encoded, Encoded]:
    """The svd-mixed encoding and the ternary one an svd-sparse encoding holds."""
    lr_t = {f: t for f, t in enc.tensors.items() if not f.startswith(PREFIX)}
    sp_t = {f[len(PREFIX):]: t for f, t in enc.tensors.items() if f.startswith(PREFIX)}
    lr_p = {k: v for k, v in enc.params.items() if not k.startswith(PREFIX) and k != "sparse"}
    sp_p = {k[len(PREFIX):]: v for k, v in enc.params.items() if k.startswith(PREFIX)}
    return (Encoded(CodecName.SVD_MIXED.value, enc.shape, lr_t, lr_p),
            Encoded(CodecName.TERNARY.value, enc.shape, sp_t, sp_p))


def join(lr: Encoded, sp: Encoded, sparse: float) -> Encoded:
    """The svd-sparse encoding of the two parts (``parts`` inverted)."""
    tensors = {**lr.tensors, **{PREFIX + f: t for f, t in sp.tensors.items()}}
    params = {**lr.params, "sparse": sparse, **{PREFIX + k: v for k, v in sp.params.items()}}
    return Encoded(CodecName.SVD_SPARSE.value, lr.shape, tensors, params)


def fit_residual(residual: Tensor, nbytes: int) -> Encoded:
    """The ternary encoding of ``residual`` keeping the most entries within ``nbytes``, by its real bytes
    (positions are entropy-coded). Ternary's own sizing gives the largest density guaranteed to fit (a
    bound on the rANS bytes); the real size there is a little lower, so densities up to 1.5x it are
    encoded too (one shared sort of |R|: ternary's ladder) and the largest that fits is kept. Without rANS,
    a geometric grid from one entry to 2/3. None kept when not one entry fits."""
    codec = TernaryCodec()
    numel = residual.numel()
    try:
        d0 = codec.settings_for_budget(tuple(residual.shape), nbytes, {})["density"]
        grid = [d0] if d0 >= 2 / 3 else sorted({min(2 / 3, d0 * (1 + 0.5 * i / (GRID - 1))) for i in range(GRID)})
    except SettingsError:  # no rANS, or not one entry within the bound: measure a wide grid
        low, high = 1 / numel, 2 / 3
        grid = sorted({low * (high / low) ** (i / (GRID - 1)) for i in range(GRID)})
    fitting = [r for r in codec.ladder(residual, [{"density": d} for d in grid]) if r.nbytes <= nbytes]
    if fitting:
        return max(fitting, key=lambda r: r.settings["density"]).pack()
    return codec.encode(torch.zeros_like(residual), density=1 / numel)  # nothing kept: 4 bytes of scale


@register
class SvdSparseCodec(Codec):
    name = CodecName.SVD_SPARSE.value
    description = ("svd-mixed's quantized singular vectors plus a sparse ternary residual in one budget "
                   "(low-rank + sparse)")
    reference = "https://arxiv.org/abs/2406.08903 + https://arxiv.org/abs/2310.13191"
    fields = (*SvdMixedCodec.fields, *(PREFIX + f for f in TernaryCodec.fields))
    settings = _own_settings()
    # auto weighs it only when named (auto:codecs=svd-mixed+svd-sparse): it loses to svd-mixed at 32x on
    # both bundled pairs (docs/svd-sparse.md), and its rungs share no work (an SVD and a residual
    # search each)
    auto_default = False

    def settings_for_budget(self, shape, nbytes, given):
        s = self.resolve_settings({**given, "nbytes": nbytes})
        lr = {k: v for k, v in s.items() if k != "sparse"}
        SvdMixedCodec().settings_for_budget(shape, math.floor(nbytes * (1 - s["sparse"])), lr)  # raises if none fit
        return s

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        if delta.dim() != 2:
            raise SettingsError(f"{self.name}: needs a 2-D delta, got shape {tuple(delta.shape)}")
        budget = SvdMixedCodec.budget(tuple(delta.shape), s)
        lr_settings = {k: v for k, v in s.items() if k != "sparse"}
        lr_settings["nbytes"] = math.floor(budget * (1 - s["sparse"]))
        svd = SvdMixedCodec()
        lr = svd.encode(delta, **lr_settings)
        lr.params["nbytes"] = s["nbytes"]  # the stored settings are the user's (the split is "sparse")
        sp = fit_residual(delta - svd.decode(lr), budget - lr.nbytes)
        return join(lr, sp, s["sparse"])

    def decode(self, enc: Encoded) -> Tensor:
        lr, sp = parts(enc)
        return SvdMixedCodec().decode(lr) + TernaryCodec().decode(sp).to(enc.tensors["s"].device)

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        lr, sp = parts(enc)
        return SvdMixedCodec().matmul(x, lr) + TernaryCodec().matmul(x, sp)

    def check_stored(self, enc: Encoded) -> None:
        """Each part as its own codec checks it (svd-mixed: fields exactly as its allocation says)."""
        lr, sp = parts(enc)
        SvdMixedCodec().check_stored(lr)
        TernaryCodec().check_stored(sp)

    def serving_term(self, enc: Encoded):
        from .serving import SvdSparseTerm

        return SvdSparseTerm(self, enc)

    def calibrator(self):
        from .calibrate import LowRankThenScale

        return LowRankThenScale()

    def stats(self, enc: Encoded) -> dict[str, Any]:
        lr, sp = parts(enc)
        return {"lowrank_bytes": lr.nbytes, "sparse_bytes": sp.nbytes, "alloc": lr.params.get("alloc"),
                "kept": int(sp.params.get("kept", 0)), "sparse_density": int(sp.params.get("kept", 0)) / enc.numel}
