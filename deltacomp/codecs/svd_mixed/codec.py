"""svd-mixed: SVD of the delta, singular vectors quantized with more bits for larger singular values.

Reference: Ping et al., "Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision" (2024). Their
quantizer is GPTQ with calibration data; this codec is data-free: asymmetric RTN (quant/rtn.py), V
quantized first, then U re-fitted by least squares against the quantized V (``refit``), which plays the
part of their second, V-aware GPTQ pass. Bit allocation: quant counts scaled from Delta-CoMe, or the
exact optimum of an error model (allocation.py).

Fields, for each bit width b used (groups have distinct widths, descending):
    v_q{b}      uint8 KBITS stream of the group's V rows, (c_b, K) codes row-major   (quant/bitpack.py)
    v_scale{b}  fp16 (c_b, ceil(K / group_size)),  v_zero{b} likewise               (quant/rtn.py)
    u_q{b}      KBITS stream of the group's U columns stored as rows of U^T, (c_b, N) codes row-major
    u_scale{b}, u_zero{b}  fp16 (c_b, ceil(N / group_size))
    s           fp32 (r,): singular values of all kept vectors, groups in order
delta ~= sum_b U_b diag(s_b) V_b with U_b = dequant(u_*{b})^T (N, c_b), V_b = dequant(v_*{b}) (c_b, K).
params["alloc"] ("8:2+3:32+2:968") records the groups. Size = allocation.alloc_nbytes, exactly.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import allocation as al
from ... import ops
from ...errors import DeltaFormatError, SettingsError
from ...linalg import single_threaded
from ...quant.bitpack import pack_bits, packed_nbytes, unpack_bits
from ...quant.rtn import dequantize, n_groups, quantize
from ...quant.svd import energy, gram_of_columns
from ..base import Codec, CodecName, Encoded, Setting, register
from .serving import SvdMixedTerm, alloc_groups, group_args
from ..lowrank import SVD_METHODS, refuse_1d, truncated_svd


def _check_groups(text: str) -> bool:
    al.parse_groups(text)  # raises SettingsError with the reason
    return True


@register
class SvdMixedCodec(Codec):
    name = CodecName.SVD_MIXED.value
    encode_devices = ("cpu", "cuda")  # SVD, RTN and packing follow the delta's device (quant/svd.py)
    description = "SVD factors quantized at 8/3/2 bits by singular value (Delta-CoMe, data-free RTN)"
    reference = "https://arxiv.org/abs/2406.08903"
    fields = (r"[uv]_q[1-8]", r"[uv]_scale[1-8]", r"[uv]_zero[1-8]", "s")
    settings = (
        Setting("groups", str, None, "bits:count groups by descending singular value, e.g. 8:2+3:32+2:rest "
                "('rest' fills the budget); default: Delta-CoMe's 8/3/2 scaled with the shape",
                check=_check_groups),
        Setting("ratio", float, 16.0, "target compression vs fp16 (bytes = N*K*2/ratio)",
                check=lambda v: v >= 1, check_msg="must be >= 1"),
        Setting("bits", float, None, "average bits per parameter (instead of ratio)",
                check=lambda v: 0 < v <= 16, check_msg="must be in (0, 16]"),
        Setting("nbytes", int, None, "byte budget (set by --ratio planning; overrides ratio and bits)",
                check=lambda v: v >= 0, check_msg="must be >= 0"),
        Setting("group_size", int, 128, "quantization group size along each singular vector",
                check=lambda v: v >= 1, check_msg="must be >= 1"),
        Setting("allocation", str, "default", "how many vectors get which width",
                choices=("default", "optimal")),
        Setting("refit", bool, True, "re-fit U by least squares for the quantized V (kept only if it helps)"),
        Setting("svd", str, "auto", "SVD algorithm (quant/svd.py): auto = randomized block Krylov where the "
                "kept rank is small, else the Gram eigendecomposition", choices=SVD_METHODS),
    )

    # -- sizing ---------------------------------------------------------------------------------------
    @staticmethod
    def budget(shape: tuple[int, int], s: dict[str, Any]) -> int:
        n, k = shape
        if s["nbytes"] is not None:
            return s["nbytes"]
        if s["bits"] is not None:
            return math.floor(n * k * s["bits"] / 8)
        return math.floor(n * k * 2 / s["ratio"])

    def allocation_for(self, shape: tuple[int, int], s: dict[str, Any]) -> al.Allocation:
        """The data-independent allocation (groups or default) for ``shape`` under settings ``s``."""
        budget = self.budget(shape, s)
        if s["groups"] is not None:
            return al.resolve_groups(shape, al.parse_groups(s["groups"]), budget, s["group_size"])
        return al.default_allocation(shape, budget, s["group_size"])

    def settings_for_budget(self, shape, nbytes, given):
        refuse_1d(self.name, shape)
        s = self.resolve_settings({**given, "nbytes": nbytes})
        shape = tuple(shape)
        if s["allocation"] == "default":
            alloc = self.allocation_for(shape, s)
            size = al.alloc_nbytes(shape, alloc, s["group_size"])
            if size > nbytes:
                raise SettingsError(f"{self.name}: groups={s['groups']} need {size} bytes for shape {shape}, "
                                    f"over the budget of {nbytes}; end groups with ':rest' or lower --ratio")
            if not alloc and nbytes:
                raise SettingsError(f"{self.name}: a budget of {nbytes} bytes holds no singular vector for "
                                    f"shape {shape}; use a lower --ratio or another method")
        return s

    # -- encode ---------------------------------------------------------------------------------------
    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self._check_input(delta)
        s = self.resolve_settings(settings)
        shape = tuple(delta.shape)
        refuse_1d(self.name, shape)
        gs = s["group_size"]
        if not torch.count_nonzero(delta):
            alloc: al.Allocation = []
            u, sv, vh = truncated_svd(delta, 0)
        elif s["allocation"] == "optimal":
            budget = self.budget(shape, s)
            low = al.OPTIMAL_LEVELS[-1]
            r_cap = al.fill_rest(shape, [], low, budget, gs)  # no more vectors fit even at the lowest width
            u, sv, vh = truncated_svd(delta, r_cap, s["svd"])
            errors = al.vector_errors(u, vh, al.OPTIMAL_LEVELS, gs)
            alloc = al.optimal_allocation(sv, errors, shape, budget, gs)
        else:
            alloc = self.allocation_for(shape, s)
            u, sv, vh = truncated_svd(delta, sum(c for _, c in alloc), s["svd"])
        r = sum(c for _, c in alloc)
        u, sv, vh = u[:, :r], sv[:r], vh[:r]
        vq = self._quantize_rows(vh, alloc, gs)
        v_hat = torch.cat([dequantize(*q, gs) for q in vq]) if alloc else vh
        candidates = [(u, sv)]
        dd = energy(delta)
        # delta v_hat^T (N, r) and v_hat v_hat^T (r, r): shared by the refit and each candidate's error
        proj, vv = ((v_hat @ delta.T).T, v_hat @ v_hat.T) if r else (None, None)  # (skinny @ big^T)^T: faster
        if s["refit"] and r:
            candidates.append(_refit(delta, v_hat, proj, vv))

        def quantize_u(cand):
            uq = self._quantize_rows(cand[0].T, alloc, gs)
            u_hat = torch.cat([dequantize(*q, gs) for q in uq]).T if alloc else cand[0]
            err = _fit_error(delta, u_hat * cand[1], v_hat, proj, vv, dd) if r else 0.0
            return err, (uq, cand[1])

        uq, sv = best_candidate(candidates, quantize_u)
        return pack_encoded(self.name, shape, alloc, uq, vq, sv, s)

    LADDER_PASS = 1  # its rungs' errors are bounded by the SVD's tail: pruned against the other codecs'

    def ladder(self, delta, settings, prune=None):
        """One SVD at the largest rank and each width's quantization of its rows, shared by every rung
        (ladder.py)."""
        from .ladder import svd_mixed_ladder

        return svd_mixed_ladder(self, delta, settings, prune)

    @staticmethod
    def _quantize_rows(rows: Tensor, alloc: al.Allocation, gs: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        out, i = [], 0
        for b, c in alloc:
            out.append(quantize(rows[i:i + c].contiguous(), b, gs))
            i += c
        return out

    # -- sizing on meta, factors, calibrator -------------------------------------------------------------
    def meta_tensors(self, shape, settings):
        """Exact for the data-independent allocation; None for ``allocation=optimal`` (the counts depend
        on the singular values)."""
        if len(shape) != 2 or settings["allocation"] != "default":
            return None
        return _alloc_meta(tuple(shape), self.allocation_for(tuple(shape), settings), settings["group_size"])

    def check_stored(self, enc: Encoded) -> None:
        """Finite values (the default), and fields exactly as the stored allocation ("alloc", which decode
        and serving follow) says: no group without its codes, no codes no group reads."""
        super().check_stored(enc)
        text = enc.params.get("alloc")
        try:
            if len(enc.shape) != 2 or not isinstance(text, (str, type(None))):
                raise ValueError("not a 2-D delta with an allocation text")
            alloc = alloc_groups(text)
            if any(c is None for _, c in alloc):
                raise ValueError("a group without a count")
            want = _alloc_meta(tuple(enc.shape), alloc, int(enc.params["group_size"]))
        except (SettingsError, ValueError, TypeError, KeyError) as exc:
            raise DeltaFormatError(f"{self.name}: stored allocation {text!r} is malformed ({exc})") from None
        got = {f: (t.dtype, tuple(t.shape)) for f, t in enc.tensors.items()}
        for f in sorted(set(want) | set(got)):
            w = (want[f].dtype, tuple(want[f].shape)) if f in want else None
            if got.get(f) != w:
                raise DeltaFormatError(f"{self.name}: field {f} is {got.get(f) or 'missing'}, the stored allocation "
                                       f"{text!r} needs {w or 'no such field'}; the file is damaged or was edited")
        t = enc.tensors
        if alloc:  # |u| <= |zero| + (2^b - 1) |scale| per group, the same for v: the product within float32
            top = {side: torch.cat([(t[f"{side}_zero{b}"].float().abs() + (2 ** b - 1) * t[f"{side}_scale{b}"].float()
                                     .abs()).amax(1) for b, _ in alloc]) for side in "uv"}
            self.check_factor_bound(t["s"], top["u"], top["v"])

    def lora_factors(self, enc: Encoded) -> tuple[Tensor, Tensor, Tensor]:
        """The dequantized factors, groups in order."""
        groups = list(self._groups(enc))
        if not groups:
            n, k = enc.shape
            return torch.zeros(n, 0), torch.zeros(0), torch.zeros(0, k)
        return (torch.cat([g[0] for g in groups]).T.contiguous(), torch.cat([g[1] for g in groups]).float(),
                torch.cat([g[2] for g in groups]))

    def calibrator(self):
        from .gptq import Gptq

        return Gptq()

    # -- decode / matmul ------------------------------------------------------------------------------
    def _groups(self, enc: Encoded):
        """Yield (U_b^T (c, N), s_b (c,), V_b (c, K)) float32, one group at a time."""
        n, k = enc.shape
        gs = int(enc.params["group_size"])
        t = enc.tensors
        i = 0
        alloc = alloc_groups(enc.params.get("alloc"))
        for b, c in alloc:
            ut = dequantize(unpack_bits(t[f"u_q{b}"], b, c * n).reshape(c, n), t[f"u_scale{b}"], t[f"u_zero{b}"], gs)
            v = dequantize(unpack_bits(t[f"v_q{b}"], b, c * k).reshape(c, k), t[f"v_scale{b}"], t[f"v_zero{b}"], gs)
            yield ut, t["s"][i:i + c], v
            i += c

    def decode(self, enc: Encoded) -> Tensor:
        out = torch.zeros(enc.shape, dtype=torch.float32, device=enc.tensors["s"].device)
        for ut, sv, v in self._groups(enc):
            out += (ut.T * sv) @ v
        return out

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        """x (..., K) @ delta^T, every bit-width group in one ``ops.kbit_lowrank_matmul_groups`` call (the
        codes are decoded inside the op; U, V and the delta are never built). Low-precision x is widened
        once so the group terms are summed in fp32; float64 x is computed in float64 (the reference path)."""
        n, k = enc.shape
        out_dt = x.dtype if x.is_floating_point() else torch.float32
        x2 = x.reshape(-1, k).to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        y = ops.kbit_lowrank_matmul_groups(x2, *group_args(enc))
        return y.to(out_dt).reshape(*x.shape[:-1], n)

    def serving_term(self, enc: Encoded):
        """One op call per layer, its arguments gathered once (serving.py)."""
        return SvdMixedTerm(self, enc)


def _alloc_meta(shape: tuple[int, int], alloc, gs: int) -> dict[str, Tensor]:
    """The fields (on ``meta``) of a delta of ``shape`` quantized with allocation ``alloc`` [(bits, count)]."""
    n, k = shape
    out = {}
    for b, c in alloc:
        for side, length in (("u", n), ("v", k)):
            out[f"{side}_q{b}"] = torch.empty(packed_nbytes(c * length, b), dtype=torch.uint8, device="meta")
            for f in ("scale", "zero"):
                out[f"{side}_{f}{b}"] = torch.empty(c, n_groups(length, gs), dtype=torch.float16, device="meta")
    out["s"] = torch.empty(sum(c for _, c in alloc), dtype=torch.float32, device="meta")
    return out


def best_candidate(candidates, quantize):
    """The result of ``quantize(candidate) -> (error, result)`` with the lowest error (the first on ties)."""
    best = None
    for cand in candidates:
        err, result = quantize(cand)
        if best is None or err < best[0]:
            best = (err, result)
    return best[1]


def pack_encoded(name: str, shape: tuple[int, int], alloc: al.Allocation, uq, vq, sv: Tensor,
                 settings: dict[str, Any]) -> Encoded:
    """svd-mixed's on-disk form from the quantized U^T and V rows of each group (rtn.py layout)."""
    tensors: dict[str, Tensor] = {}
    for (b, _), (uc, us, uz), (vc, vs, vz) in zip(alloc, uq, vq):
        tensors[f"u_q{b}"], tensors[f"u_scale{b}"], tensors[f"u_zero{b}"] = pack_bits(uc, b), us, uz
        tensors[f"v_q{b}"], tensors[f"v_scale{b}"], tensors[f"v_zero{b}"] = pack_bits(vc, b), vs, vz
    tensors["s"] = sv.to(torch.float32).contiguous()
    return Encoded(name, shape, tensors, {**settings, "alloc": al.format_alloc(alloc)})


def _fit_error(delta: Tensor, a: Tensor, v_hat: Tensor, proj: Tensor, vv: Tensor, dd: float | None = None) -> float:
    """||delta - a v_hat||_F^2 from ||delta||^2 - 2 <a, delta v_hat^T> + <a^T a, v_hat v_hat^T>, with
    proj = delta v_hat^T and vv = v_hat v_hat^T: 2 N r^2 flops instead of the 2 N K r of forming
    a v_hat (1/3 of it for 11008 x 4096 at r = 1305, 1/8 for 4096 x 11008). The expansion cancels when
    the error is small against ||delta||, so under a 10% relative error it is measured directly.
    ``dd``: ||delta||_F^2 when the caller has it (quant/svd.py ``energy``). The products are summed in
    float64 from float32 terms (no float64 copies of the N x r factors)."""
    if dd is None:
        dd = energy(delta)
    cross = float((a * proj).sum(dtype=torch.float64))
    quad = float((gram_of_columns(a) * vv).sum(dtype=torch.float64))
    err2 = dd - 2 * cross + quad
    if err2 < 1e-2 * dd:
        err2 = float(torch.linalg.vector_norm(delta - a @ v_hat, dtype=torch.float64)) ** 2
    return err2


def _refit(delta: Tensor, v_hat: Tensor, proj: Tensor | None = None, vv: Tensor | None = None
           ) -> tuple[Tensor, Tensor]:
    """Least-squares M = argmin ||delta - M v_hat||_F (M = delta v_hat^T (v_hat v_hat^T)^-1), split into
    unit columns U and their norms s, so U is quantized on the same footing as the SVD's.
    ``proj``, ``vv``: delta v_hat^T and v_hat v_hat^T when the caller has them."""
    gram = (v_hat @ v_hat.T if vv is None else vv).double()
    rhs = (delta @ v_hat.T if proj is None else proj).T  # (r, N)
    # The quantized rows stay close to orthonormal, so the Gram is well conditioned and a Cholesky solve
    # suffices (7x faster than gelsd at r = 1305, N = 11008: 1.6 s vs 11.4 s); gelsd (rank-revealing,
    # CPU) only when Cholesky fails, e.g. on duplicate or zero rows. The r x r inverse comes from the
    # float64 factor; applying it to the N rows is one product in rhs's dtype (float32: 0.45 s where the
    # float64 cholesky_solve took 1.2 s; with cond(gram) ~ 1 its rounding is ~1e-7 relative, far under
    # the RTN step that follows).
    chol, bad = torch.linalg.cholesky_ex(gram)
    if not int(bad):
        m = (rhs.T @ torch.cholesky_inverse(chol).to(rhs.dtype)).float()  # (N, r)
    else:
        driver = "gelsd" if gram.device.type == "cpu" else None  # CUDA only has gels
        with single_threaded():
            m = torch.linalg.lstsq(gram, rhs.double(), driver=driver).solution.T.float()
    norms = torch.linalg.vector_norm(m, dim=0)
    u = m / torch.where(norms > 0, norms, torch.ones_like(norms))
    return u.contiguous(), norms.contiguous()
