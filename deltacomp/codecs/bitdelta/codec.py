"""BitDelta: sign(delta) packed 8 per byte, times an L2-optimal scale (mean |delta|).

Reference: Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (2024).
Options beyond the paper: per-row scales (``scale=row``) and ``masks=k`` residual sign masks, each
coding what the previous masks left, with its own scale (k bits per parameter).

Fields: ``signs`` (SIGNS layout, see ops.py), ``scale`` (fp32, () or (N,)); mask i >= 1 adds
``signs_i`` and ``scale_i``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ... import ops
from ...errors import SettingsError
from ..base import Codec, CodecName, Encoded, Rung, Setting, register
from .serving import field as _field

_BUDGET_SLACK = 0.005


@register
class BitDeltaCodec(Codec):
    name = CodecName.BITDELTA.value
    description = "1-bit sign of the delta times a scale (BitDelta)"
    reference = "https://arxiv.org/abs/2402.10193"
    fields = (r"signs(_\d+)?", r"scale(_\d+)?")
    encode_devices = ("cpu", "cuda")  # a mean and a sign pack: nothing device-specific
    settings = (
        Setting("scale", str, "tensor", "one scale per tensor, or one per output row", choices=("tensor", "row")),
        Setting("masks", int, 1, "residual sign masks (bits per parameter)", check=lambda v: 1 <= v <= 16,
                check_msg="must be between 1 and 16"),
    )

    def settings_for_budget(self, shape, nbytes, given):
        if "masks" in given:
            raise SettingsError("bitdelta: masks= and --ratio both fix the size; give one of them")
        s = self.resolve_settings(given)
        per_mask = self.exact_nbytes(shape, {**s, "masks": 1})
        # Sizes come in whole masks; allow a per-tensor scale's bytes (or 0.5%) over the budget per mask,
        # so that --ratio 16 on 16-bit weights gives one mask (15.99x) rather than nothing.
        masks = max((m for m in range(1, 17) if m * per_mask <= nbytes + max(_BUDGET_SLACK * nbytes, 4 * m)),
                    default=0)
        if masks < 1:
            raise SettingsError(
                f"bitdelta: a budget of {nbytes} bytes is below one sign mask ({per_mask} bytes) for shape "
                f"{tuple(shape)}; use a lower --ratio or another method")
        return {**s, "masks": int(min(masks, 16))}

    def candidates(self, shape, budget_hint):
        """1 to 3 sign masks, each with one scale per tensor or per row: the size is fixed by the shape,
        so the hint does not matter (more masks are dominated by other codecs at those bytes)."""
        return [{"scale": sc, "masks": m} for m in (1, 2, 3) for sc in ("tensor", "row")]

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        tensors: dict[str, Tensor] = {}
        for i, (packed, scale, _) in enumerate(self._masks_of(delta, s["scale"], s["masks"], terms=False)):
            tensors[_field("signs", i)], tensors[_field("scale", i)] = packed, scale
        return Encoded(self.name, tuple(delta.shape), tensors, dict(s))

    @staticmethod
    def _masks_of(delta: Tensor, scale_kind: str, masks: int, terms: bool = True):
        """Yield (packed signs, fp32 scale, the mask's term signs x scale) for masks 0..masks-1, each coding
        what the earlier ones left: mask i is the same whatever number of masks follows it. Without
        ``terms`` the last mask's term is not built (None)."""
        mat = delta.reshape(1, -1) if delta.dim() == 1 else delta
        residual = mat
        for i in range(masks):
            scale = residual.abs().mean(dim=1) if scale_kind == "row" else residual.abs().mean()
            packed = ops.pack_signs(residual.contiguous())
            term = None
            if terms or i + 1 < masks:
                signs = ops.unpack_signs(packed, mat.shape[1])
                term = signs * (scale[:, None] if scale.dim() else scale)
            yield packed, scale.to(torch.float32).contiguous(), term
            if i + 1 < masks:
                residual = residual - term

    def ladder(self, delta, settings, prune=None):
        """One chain of residual masks per scale kind, as long as the longest rung: a rung of m masks is
        its first m (the same tensors encode writes), its weight error that of the residual the chain
        leaves after m masks. Rungs come by scale kind, then by masks."""
        self._check_input(delta)
        wanted: dict[str, list[tuple[dict[str, Any], dict[str, Any]]]] = {}
        for given in settings:
            try:
                s = self.resolve_settings(given)
            except SettingsError:
                continue
            wanted.setdefault(s["scale"], []).append((given, s))
        for kind, group in wanted.items():
            tensors: dict[str, Tensor] = {}
            total = None
            for i, (packed, scale, term) in enumerate(self._masks_of(delta, kind, max(s["masks"] for _, s in group))):
                tensors[_field("signs", i)], tensors[_field("scale", i)] = packed, scale
                total = term if total is None else total + term
                for given, s in group:
                    if s["masks"] == i + 1:
                        enc = Encoded(self.name, tuple(delta.shape), dict(tensors), dict(s))
                        left = delta.reshape(total.shape) - total
                        err = float(torch.linalg.vector_norm(left, dim=-1).double().square().sum())
                        yield Rung(dict(given), enc.nbytes, lambda enc=enc: enc, weight_error=err)

    def meta_tensors(self, shape, settings):
        rows, k = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        out = {}
        for i in range(settings["masks"]):
            out[_field("signs", i)] = torch.empty(rows, (k + 7) // 8, dtype=torch.uint8, device="meta")
            out[_field("scale", i)] = torch.empty((rows,) if settings["scale"] == "row" else (),
                                                  dtype=torch.float32, device="meta")
        return out

    def serving_term(self, enc: Encoded):
        from .serving import BitDeltaTerm

        return BitDeltaTerm(self, enc)

    def multi_term(self, encs: Sequence[Encoded | None]):
        from .serving import SignStacks

        return SignStacks(encs) if any(e is not None for e in encs) else None

    def calibrator(self):
        from .calibrate import ScaleDistillation

        return ScaleDistillation()

    def _masks(self, enc: Encoded) -> int:
        return int(enc.params.get("masks", 1))

    def decode(self, enc: Encoded) -> Tensor:
        k = enc.shape[-1]
        out = None
        for i in range(self._masks(enc)):
            signs = ops.unpack_signs(enc.tensors[_field("signs", i)], k)
            scale = enc.tensors[_field("scale", i)]
            term = signs * (scale[:, None] if scale.dim() else scale)
            out = term if out is None else out + term
        return out.reshape(enc.shape)

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        if len(enc.shape) != 2:
            return super().matmul(x, enc)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = None
        for i in range(self._masks(enc)):
            term = ops.sign_matmul(x2, enc.tensors[_field("signs", i)], enc.tensors[_field("scale", i)], enc.shape[1])
            y = term if y is None else y + term
        return y.reshape(*lead, enc.shape[0])
