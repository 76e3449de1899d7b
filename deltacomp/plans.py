"""Layer plans: a patched linear layer's CPU forward (base matmul and delta term) in one call from Python
(``_C.LayerPlan``, csrc/plans.cpp).

A decode step calls each patched layer once per token. At small widths the Python around the kernels costs
as much as the kernels do (the svd-mixed op converts 33 tensor arguments per call; the module then adds
and reshapes with further op calls). A plan checks a layer's tensors once, keeps them, and serves
``x (..., K) -> y (..., N)`` in one call, its base by one of three modes:

- ``"torch"``: ``linear(x, weight, bias) + term(x)``, the base by torch's ``at::linear`` (what the
  ``nn.Linear`` it wraps computes), the term by the op's raw kernel;
- ``"own"`` (one x row): ``(x @ weight^T + bias) + term(x)``, the base by the extension's SIMD matvec
  (``simd8::dense_m1``), which on some CPUs streams the weight faster than torch's BLAS (MKL takes a generic
  path on AMD CPUs); the serving modules take it where measured faster (serve/dispatch.py);
- ``"fused"`` (bitdelta at one x row): ``sign_matmul_tl(x, weight, ...) + bias``;
- ``"rows"`` (several x rows): as "torch", the term computed row by row, so each row takes the int8 tables
  (which serve one row; inexact); for a few rows on small layers faster than the exact multi-row kernels,
  and taken where measured so;
- then ``+ extra`` (a tenant's bias delta).

"torch" and "fused" do the Python path's arithmetic, so their outputs equal it; "own" sums the base in
another order; "rows" takes the int8 tables where the Python path, at several rows, is exact.

A codec's serving term builds its plan (``DeltaTerm.layer_plan``); the serving modules (serve/modules.py)
keep it with the path they keep for an input shape. A plan answers None for a call it does not serve (not
a contiguous CPU tensor of its dtype, autograd recording, a source tensor changed in place, more than one
row where the kernel takes one), and the module takes its Python path.

Moving a serving module, its model or a term alone (``.to()``, ``.half()``, ...) drops the plans kept on
the tensors it replaces (a term's move is part of ``serve.dispatch.plan_state``).

    DELTACOMP_LAYER_PLANS=0     # no plans: every call takes the Python path (the modules' kept paths follow)
"""
from __future__ import annotations


from torch import Tensor

from . import environment
from .ops import HAS_EXTENSION

if HAS_EXTENSION:
    from . import _C

    _LayerPlan = getattr(_C, "LayerPlan", None)  # None: a build from before the plans (no plans, same results)
else:  # pragma: no cover - depends on the build
    _LayerPlan = None

ENV = "DELTACOMP_LAYER_PLANS"


def enabled() -> bool:
    """Whether serving terms build plans: the extension is built and DELTACOMP_LAYER_PLANS is not 0."""
    return _LayerPlan is not None and environment.choice(ENV) != "0"


def lowrank(weight: Tensor, bias: Tensor | None, extra: Tensor | None, mode: str, args: tuple, tl: tuple | None):
    """A plan of ``base(x) + kbit_lowrank_matmul_groups(x, *args) (+ extra)``, the base by ``mode`` ("torch" or
    "own"); ``args`` the op's arguments after x (six lists, s, bits, n, k, group size), ``tl`` its five TL4
    lists or None."""
    lists, s, bits, n, k, gs = args[:6], args[6], args[7], args[8], args[9], args[10]
    return _LayerPlan.lowrank(weight, bias, extra, mode, [list(t) for t in lists], s, list(bits), n, k, gs,
                              None if tl is None else [list(t) for t in tl])


def sign_tl(weight: Tensor, bias: Tensor | None, extra: Tensor | None, mode: str, s_tl: Tensor, scale: Tensor,
            sources: list[Tensor], n: int, k: int):
    """A plan of ``x @ (weight + scale * sign)^T + bias`` (mode "fused") or ``base(x) + x @ (scale * sign)^T``
    (the base by mode "torch" or "own") at one x row by ``sign_matmul_tl`` (``+ extra``); ``s_tl`` the TL4
    repack of the signs and
    ``scale`` (fp32) made from ``sources`` (the stored signs and scale), whose in-place changes end the plan
    (``plan.current()`` turns False)."""
    return _LayerPlan.sign_tl(weight, bias, extra, mode, s_tl, scale, sources, n, k)
