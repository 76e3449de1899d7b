"""The paths a serving module keeps (serve/modules.py) and the layer plans it picks for them
(deltacomp/plans.py): which plan serves a base + term or a fused path, measured where there is a choice
(serve/dispatch.py), the plan's call with its checks, and the last few keys' paths a module keeps."""
from __future__ import annotations

from torch import Tensor, nn

from . import dispatch

ROWS_MAX = 16  # up to this many x rows, a plan computing the term row by row is a measured candidate


def challenge(plan, x2: Tensor, weight: Tensor, kind: str, other):
    """``plan`` where it serves x2 and measured faster than ``other()`` on this call's tensors
    (``dispatch.prefer_fused`` under ``kind``, as for a fused kernel: DELTACOMP_FUSED=always takes the plan,
    never ``other``), else None."""
    x = x2.contiguous()
    if plan is None or plan(x) is None:  # (a call the plans do not serve: autograd recording, ...)
        return None
    return plan if dispatch.prefer_fused(x, weight, lambda: plan(x), other, kind=kind) else None


def base_plan(make, x2: Tensor, weight: Tensor, kind: str, python):
    """The layer plan (``plans``) of a base + term path: ``make(mode)`` builds one or None. The "torch" plan,
    unless a challenger measured faster (``challenge``): at one x row the "own" plan (kind ``kind + "-base"``),
    at 2..ROWS_MAX rows the "rows" plan (``kind + "-rows"``), against the Python path (``python()``) where the
    term builds no "torch" plan."""
    m = x2.shape[0]
    torch_plan = make("torch")
    if m == 1:
        challenger, tag = (None, "") if torch_plan is None else (make("own"), "-base")
    else:
        challenger, tag = (make("rows"), "-rows") if m <= ROWS_MAX else (None, "")
    x = x2.contiguous()
    other = (lambda: torch_plan(x)) if torch_plan is not None else python
    return challenge(challenger, x2, weight, kind + tag, other) or torch_plan


def fused_plan(fused, rows, x2: Tensor, weight: Tensor, kind: str, python):
    """The layer plan of a fused path: ``fused`` (the fused plan, one x row), or at 2..ROWS_MAX rows the plan
    ``rows()`` builds (mode "rows") where measured faster than the fused kernel (``python()``; kind
    ``kind + "-fused-rows"``)."""
    if fused is not None or not 1 < x2.shape[0] <= ROWS_MAX:
        return fused
    return challenge(rows(), x2, weight, kind + "-fused-rows", python)


def call_plan(module: nn.Module, plan, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor | None:
    """``plan(x)``, the module's kept layer plan (``plans``), while its base holds the weight and bias the
    plan was built on; None where the plan does not serve x. A plan that no longer can (a replaced weight
    or bias, a source tensor changed in place) is dropped with the path it was kept with: the next call
    decides again."""
    params = module._modules["base"]._parameters
    if params["weight"] is weight and params["bias"] is bias:
        y = plan(x)
        if y is not None or plan.current():
            return y
    module._plan = None
    module._kept.clear()
    return None


KEPT = 4  # paths (with their layer plans) a serving module keeps, by key: a prompt's shape and the decode
# step's alternate in generation, and deciding again cost 0.12-0.39 ms on one gate_proj (measured, plans built)


def keep(module: nn.Module, plan: tuple) -> tuple:
    """Keep ``plan`` (key first) among the module's last ``KEPT`` paths and as its current one."""
    kept = module._kept
    if len(kept) >= KEPT:
        kept.pop(next(iter(kept)))
    kept[plan[0]] = module._plan = plan
    return plan
