"""Low-rank: delta ~= U_r diag(S_r) V_r^T from a truncated SVD (the LoRA-extraction baseline).

Fields: ``u`` (N, r) and ``v`` (r, K) in fp16 or bf16 (unit-norm singular vectors, so they sit well
inside either range), ``s`` (r,) float32. Size = r * (N + K) * 2 + 4 * r bytes.
Rank from ``rank=``, else ``energy=`` (smallest r keeping that fraction of ||delta||_F^2), else
``ratio=`` (compression vs fp16: r = floor(N*K*2/ratio / ((N+K)*2 + 4))).
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ...errors import SettingsError
from ...quant.svd import METHODS as SVD_METHODS
from ...quant.svd import truncated_svd
from ..base import Codec, CodecName, Encoded, Rung, Setting, register

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def refuse_1d(codec: str, shape: tuple[int, ...]) -> None:
    if len(shape) != 2:
        raise SettingsError(f"{codec}: a {len(shape)}-D delta of shape {tuple(shape)} has no low-rank "
                            "structure; use raw for 1-D tensors (e.g. --rule 'norm=raw')")


def _prefix_errors(delta: Tensor, a: Tensor, v: Tensor) -> list[float | None]:
    """||delta - a[:, :r] v[:r]||_F^2 for every r = 0..R, from one product delta v^T and the two R x R
    Grams: ||delta||^2 - 2 sum(a * delta v^T)[:r] + sum((a^T a) * (v v^T))[:r, :r], summed in float64.
    None where the error is under 1% of ||delta||^2, where the expansion may have cancelled."""
    dd = float(torch.linalg.vector_norm(delta, dtype=torch.float64)) ** 2
    if a.shape[1] == 0:
        return [dd]
    cross = torch.cumsum((a.double() * (v @ delta.T).T.double()).sum(0), 0)
    quad = ((a.T @ a).double() * (v @ v.T).double())
    # sum of the leading r x r block of quad, for every r: row prefix sums of the lower triangle, doubled
    lower = torch.tril(quad, -1).sum(1)
    block = torch.cumsum(2 * lower + quad.diagonal(), 0)
    errs = [dd] + (dd - 2 * cross + block).tolist()
    return [e if e >= 1e-2 * dd else None for e in errs]


@register
class LowRankCodec(Codec):
    name = CodecName.LOWRANK.value
    encode_devices = ("cpu", "cuda")  # SVD, RTN and packing follow the delta's device (quant/svd.py)
    description = "truncated SVD factors U_r, S_r, V_r (LoRA-style)"
    reference = "https://arxiv.org/abs/2106.09685"
    fields = ("u", "s", "v")
    settings = (
        Setting("rank", int, None, "number of singular vectors kept", check=lambda v: v >= 0,
                check_msg="must be >= 0"),
        Setting("energy", float, None, "keep the fewest vectors holding this fraction of ||delta||_F^2",
                check=lambda v: 0 < v <= 1, check_msg="must be in (0, 1]"),
        Setting("ratio", float, 16.0, "compression vs fp16 when neither rank nor energy is given",
                check=lambda v: v >= 1, check_msg="must be >= 1"),
        Setting("dtype", str, "float16", "storage dtype of the factors", choices=tuple(_DTYPES)),
        Setting("svd", str, "auto", "SVD algorithm (quant/svd.py): auto = randomized block Krylov where the "
                "rank is small, else the Gram eigendecomposition", choices=SVD_METHODS),
    )

    @staticmethod
    def bytes_per_rank(shape: tuple[int, ...]) -> int:
        n, k = shape
        return (n + k) * 2 + 4

    def settings_for_budget(self, shape, nbytes, given):
        refuse_1d(self.name, shape)
        s = self.resolve_settings(given)
        if s["rank"] is not None or s["energy"] is not None:
            raise SettingsError(f"{self.name}: give either rank=/energy= or a --ratio budget, not both")
        per = self.bytes_per_rank(tuple(shape))
        rank = min(nbytes // per, min(shape))
        if rank < 1:
            raise SettingsError(f"{self.name}: a budget of {nbytes} bytes is below one rank ({per} bytes) for "
                                f"shape {tuple(shape)}; use a lower --ratio or another method")
        return {**s, "rank": int(rank)}

    def candidates(self, shape, budget_hint):
        """Rank 0 (the tensor left at the base: 0 bytes) and the ranks the ladder's budgets buy."""
        if len(shape) != 2:
            return []
        return [{**self.resolve_settings({}), "rank": 0}] + super().candidates(shape, budget_hint)

    def ladder(self, delta, settings, prune=None):
        """Rungs with a fixed rank share one SVD (per ``svd`` method) at the largest of them: each is its
        top r, the same as a rank-r SVD where the SVD path is exact (quant/svd.py; else within its
        stated tolerance, the rank-R subspace being the more accurate). Others are encoded alone."""
        fixed: dict[str, list[tuple[dict[str, Any], dict[str, Any], int]]] = {}
        plain = delta.dim() == 2 and delta.dtype == torch.float32
        for given in settings:
            try:
                s = self.resolve_settings(given)
            except SettingsError:
                continue
            if plain and s["rank"] is not None:
                fixed.setdefault(s["svd"], []).append((given, s, min(s["rank"], min(delta.shape))))
            else:
                yield from super().ladder(delta, [given])
        zero = not torch.count_nonzero(delta)
        shape = tuple(delta.shape)
        for svd, group in fixed.items():
            u, sv, vh = truncated_svd(delta, 0 if zero else max(r for *_, r in group), svd)
            errors = {}
            for dtype in {s["dtype"] for _, s, _ in group}:
                errors[dtype] = _prefix_errors(delta, u.to(_DTYPES[dtype]).float() * sv, vh.to(_DTYPES[dtype]).float())
            for given, s, r in group:
                def pack(u=u[:, :r], sv=sv[:r], vh=vh[:r], s=s):
                    return self._pack(shape, u, sv, vh, s)

                rank = int(sv[:r].numel())
                yield Rung(dict(given), rank * self.bytes_per_rank(shape), pack, weight_error=errors[s["dtype"]][rank])

    def _pack(self, shape: tuple[int, int], u: Tensor, sv: Tensor, vh: Tensor, s: dict[str, Any]) -> Encoded:
        dt = _DTYPES[s["dtype"]]
        tensors = {"u": u.to(dt).contiguous(), "s": sv.to(torch.float32).contiguous(), "v": vh.to(dt).contiguous()}
        return Encoded(self.name, shape, tensors, {**s, "rank": int(sv.numel())})

    def _rank(self, shape: tuple[int, int], s: dict[str, Any]) -> int | None:
        if s["rank"] is not None:
            return min(s["rank"], min(shape))
        if s["energy"] is not None:
            return None  # decided after a full SVD
        n, k = shape
        return min(math.floor(n * k * 2 / s["ratio"]) // self.bytes_per_rank(shape), min(shape))

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        refuse_1d(self.name, tuple(delta.shape))
        rank = self._rank(tuple(delta.shape), s)
        if not torch.count_nonzero(delta):
            rank = 0
        u, sv, vh = truncated_svd(delta, rank, s["svd"])
        if rank is None:  # energy: smallest r with cumulative energy >= target
            energy = torch.cumsum(sv.double() ** 2, 0)
            total = float(energy[-1]) if energy.numel() else 0.0
            want = torch.tensor([s["energy"] * total], dtype=energy.dtype, device=energy.device)
            r = int(torch.searchsorted(energy, want)) + 1
            r = min(r, sv.numel())
            u, sv, vh = u[:, :r], sv[:r], vh[:r]
        return self._pack(tuple(delta.shape), u, sv, vh, s)

    def meta_tensors(self, shape, settings):
        """Exact unless ``energy=`` picks the rank from the singular values."""
        if len(shape) != 2 or (settings["rank"] is None and settings["energy"] is not None):
            return None
        r = self._rank(tuple(shape), settings)
        dt = _DTYPES[settings["dtype"]]
        return {"u": torch.empty(shape[0], r, dtype=dt, device="meta"), "s": torch.empty(r, device="meta"),
                "v": torch.empty(r, shape[1], dtype=dt, device="meta")}

    def calibrator(self):
        from .calibrate import FactorRefit

        return FactorRefit()

    def lora_factors(self, enc: Encoded) -> tuple[Tensor, Tensor, Tensor]:
        t = enc.tensors
        return t["u"].float(), t["s"].float(), t["v"].float()

    def check_stored(self, enc: Encoded) -> None:
        """Finite values (the default), and factors whose product stays within float32 (``check_factor_bound``)."""
        super().check_stored(enc)
        t = enc.tensors
        u, s, v = t.get("u"), t.get("s"), t.get("v")
        if u is None or s is None or v is None or u.dim() != 2 or v.dim() != 2 or s.dim() != 1:
            return  # (the reader's shape checks name what is wrong)
        if u.shape[1] == s.numel() == v.shape[0] and s.numel():
            self.check_factor_bound(s, u.float().abs().amax(0), v.float().abs().amax(1))

    def decode(self, enc: Encoded) -> Tensor:
        t = enc.tensors
        return (t["u"].float() * t["s"]) @ t["v"].float()

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        t = enc.tensors
        dt = x.dtype if x.is_floating_point() else torch.float32
        return ((x.to(dt) @ t["v"].to(dt).T) * t["s"].to(dt)) @ t["u"].to(dt).T
