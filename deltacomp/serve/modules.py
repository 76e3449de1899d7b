"""Runtime modules that add a packed delta's term to their base layer's output (patching a model with
them: serve/patch.py).

``DeltaLinear`` computes ``base(x) + term(x)`` with the term the delta's codec builds
(``codec.serving_term``), or, when that term fuses with a plain ``nn.Linear``'s weight, one pass over both.
``base`` is any linear module: a float ``nn.Linear``, or a quantized one (serve/quantized.py) that
computes its own output; a delta is never added into quantized storage. Tested over bitsandbytes 8-bit
and 4-bit nf4 bases in tests/test_bnb.py (logits equal the quantized base's output plus
``x @ decoded_delta^T``).

Multi-tenant: one base, several deltas. ``MultiDeltaLinear`` sends every batch row to its delta: the
tenants of a codec with a multi-tenant term (``codec.multi_term``, rows of one delta grouped inside one
kernel call) together, the others per contiguous group of rows (segments). When every row uses one
delta (a decode step of one tenant) whose multi-tenant term can fuse that tenant with the base weight
(``fuses_one(t, weight)`` / ``fused_one(x2, weight, t)``), the layer takes whichever of that fused pass
and base + term measured faster, as ``DeltaLinear`` does; when every row is on the base, the base alone.
Tensors applied in place for one delta (norms, embeddings) are served per row by ``MultiDeltaModule``,
which runs the module with each delta's tensors on that delta's rows.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import Tensor, nn

from ..codecs import Encoded, get_codec
from ..errors import DeltacompError
from . import dispatch
from .kept import ROWS_MAX, base_plan, call_plan, challenge, fused_plan, keep


def _out(y: Tensor, lead: torch.Size) -> Tensor:
    return y.reshape(*lead, y.shape[-1])


class DeltaLinear(nn.Module):
    """``base(x) + x @ delta^T`` with the delta kept packed. ``base`` is any linear module (an
    ``nn.Linear`` or a quantized one that computes its own output)."""

    _plan: tuple | None = None  # (key, fused, x2 size, output size, layer plan, weight, bias): see forward

    def __init__(self, base: nn.Module, encoded: Encoded, fused: bool | None = None):
        super().__init__()
        n, k = encoded.shape if len(encoded.shape) == 2 else (None, None)
        if (n, k) != (getattr(base, "out_features", n), getattr(base, "in_features", k)):
            raise ValueError(f"DeltaLinear: delta of shape {encoded.shape} for a base layer "
                             f"{getattr(base, 'out_features', '?')} x {getattr(base, 'in_features', '?')}")
        self.base = base
        self.delta = get_codec(encoded.codec).serving_term(encoded)
        self.in_features, self.out_features = k, n
        # fused: None = where the codec's term fuses with this base (a plain nn.Linear whose weight dtype
        # the fused kernel takes), each batch taking whichever of fused / base + term measured faster on
        # this machine for its shape (serve/dispatch.py); True = always fused; False = never.
        can_fuse = type(base) is nn.Linear and self.delta.fuses_with(base.weight)
        if fused and not can_fuse:
            raise ValueError(f"DeltaLinear: fused=True needs a plain nn.Linear and a delta whose term fuses with "
                             f"its weight; a {encoded.codec} delta over {type(base).__name__} "
                             f"({getattr(getattr(base, 'weight', None), 'dtype', '?')}) does not")
        self.fused = can_fuse if fused is None else bool(fused)
        self.fused_measured = fused is None  # the fused path is taken where measured faster
        self._plan = None
        self._kept: dict[tuple, tuple] = {}  # key -> plan, the last kept.KEPT keys (see forward)

    def forward(self, x: Tensor) -> Tensor:
        # A decode step calls every patched layer once per token with an input of one shape, and at
        # SmolLM2-135M's shapes the rest of the step is about 0.1 ms per layer, the same order as this
        # method's own work. So a CPU call keeps the path it took and the sizes it reshaped to (``_plan``)
        # with what they were decided on: x's shape and dtype, the flags and the base weight's dtype, and
        # ``dispatch.plan_state()`` (settings, threads, resets, terms moved); the next call with all of them
        # unchanged takes that path again without asking the dispatch, and reshapes with the kept sizes; where the
        # term built a layer plan for that path (``plans``: the base and the term in one native call) and
        # the base's weight and bias are the tensors it holds, the plan serves the call.
        if not x.is_cpu or torch.compiler.is_compiling():
            return self._forward(x)
        fused = self.fused
        key = (x.shape, x.dtype, dispatch.plan_state(), fused, self.fused_measured,
               self._modules["base"]._parameters["weight"].dtype if fused else None)
        plan = self._plan
        if plan is None or plan[0] != key:
            plan = self._kept.get(key)  # a path kept for this key before (a prompt, then decode steps)
            if plan is None:
                y, plan = self._forward(x, key)
                keep(self, plan)
                return y
            self._plan = plan
        _, fused, in2, out, native, weight, bias = plan
        if native is not None:
            y = call_plan(self, native, weight, bias, x)
            if y is not None:
                return y
        x2 = x if in2 is None else x.reshape(*in2)
        y = self._fused(x2) if fused else self._unfused(x2)
        return y if out is None else y.reshape(*out)

    def _forward(self, x: Tensor, key: tuple | None = None):
        """The output, deciding the path (and with ``key``, also the plan that keeps it for the next call)."""
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        fused = self.fused and (not self.fused_measured or dispatch.prefer_fused(
            x2, self._modules["base"]._parameters["weight"], lambda: self._fused(x2), lambda: self._unfused(x2)))
        y = self._fused(x2) if fused else self._unfused(x2)
        out = y if x2 is x else _out(y, x.shape[:-1])
        if key is None:
            return out
        native = weight = bias = None
        base = self._modules["base"]
        if type(base) is nn.Linear:
            weight, bias = base._parameters["weight"], base._parameters["bias"]
            term = self._modules["delta"]
            rows = x2.shape[0]
            native = (fused_plan(term.layer_plan(weight, bias, None, "fused", rows),
                                  lambda: term.layer_plan(weight, bias, None, "rows", rows), x2, weight, "single",
                                  lambda: self._fused(x2)) if fused else
                      base_plan(lambda mode: term.layer_plan(weight, bias, None, mode, rows), x2, weight,
                                 "single", lambda: self._unfused(x2)))
        return out, (key, fused, None if x2 is x else tuple(x2.shape), None if x2 is x else tuple(out.shape),
                     native, weight, bias)

    def _fused(self, x2: Tensor) -> Tensor:
        base = self._modules["base"]  # a plain nn.Linear: its tensors read from the dicts, not nn.Module's getattr
        y = self._modules["delta"].fused(x2, base._parameters["weight"])
        bias = base._parameters["bias"]
        return y if bias is None else y + bias

    def _unfused(self, x2: Tensor) -> Tensor:
        y = self._modules["base"](x2)
        t = self._modules["delta"](x2)
        return y + (t if t.dtype == y.dtype else t.to(y.dtype))

    def _apply(self, fn, *args, **kwargs):
        self._plan = None  # .to() and the like replace the term's tensors, which a layer plan holds
        self._kept.clear()
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        where = " (where measured faster)" if self.fused and self.fused_measured else ""
        return f"codec={self.delta.codec}, fused={self.fused}{where}"


# -- several deltas over one base ------------------------------------------------------------------
def _batch_index(module: nn.Module, x: Tensor) -> Tensor:
    """The delta index set on ``module`` (one entry per batch row, dim 0 of x), checked against x."""
    index = getattr(module, "delta_index", None)
    if index is None:
        raise DeltacompError(f"{type(module).__name__}: no delta index set; call deltacomp.set_delta_index("
                             "model, index) with one entry per batch row (-1 = base) before the forward pass")
    if x.dim() < 1 or x.shape[0] != index.shape[0]:
        raise DeltacompError(f"{type(module).__name__}: the delta index has {index.shape[0]} entries but the "
                             f"batch has {x.shape[0] if x.dim() else 0} rows (input shape {tuple(x.shape)})")
    return index


def _row_index(module: nn.Module, x: Tensor) -> Tensor:
    """The delta index expanded to one entry per row of x.reshape(-1, K) (tokens of a row share it)."""
    index = _batch_index(module, x)
    per = x[0].numel() // x.shape[-1] if x.dim() > 1 else 1
    return index.repeat_interleave(per) if per != 1 else index


class _Uniform:
    """The delta every row of a delta index uses (-1: all on the base), or None when rows differ; kept
    for the index tensor last seen until it is replaced or changed in place (its version counter), so a
    decode step does not compare the index again in every layer."""

    def __init__(self):
        self._seen: tuple[Tensor, int] | None = None
        self._value: int | None = None

    def __call__(self, index: Tensor) -> int | None:
        seen = self._seen
        if seen is None or seen[0] is not index or seen[1] != index._version:
            first = index.reshape(-1)[:1]
            self._value = int(first) if first.numel() and bool((index == first).all()) else None
            self._seen = (index, index._version)
        return self._value


_BASE, _FUSED, _ONE, _GENERAL = range(4)  # MultiDeltaLinear's paths: base alone, fused, one tenant's term, rows


class MultiDeltaLinear(nn.Module):
    """One base linear layer, T deltas (None where a delta leaves this layer unchanged). Batch row i
    adds the term of delta ``delta_index[i]`` (set by ``set_delta_index``; -1 adds nothing)."""

    _plan: tuple | None = None  # the path of the last CPU call: see forward

    def __init__(self, base: nn.Module, encoded: Sequence[Encoded | None], bias_deltas: Sequence[Tensor | None] = ()):
        super().__init__()
        self.base = base
        self.num_deltas = len(encoded)
        self.delta_index: Tensor | None = None
        n, k = base.out_features, base.in_features
        # per codec: one multi-tenant term for all its tenants when it has one (``shared``), else a term
        # per tenant run on the rows of its delta (``others``, segments)
        self.shared = nn.ModuleList()
        others: dict[str, nn.Module] = {}
        shared_codecs: list[str] = []
        for name in dict.fromkeys(e.codec for e in encoded if e is not None):
            mine = [e if e is not None and e.codec == name else None for e in encoded]
            multi = get_codec(name).multi_term(mine)
            if multi is not None:
                self.shared.append(multi)
                shared_codecs.append(name)
            else:
                others.update({str(t): get_codec(name).serving_term(e) for t, e in enumerate(mine) if e is not None})
        self.others = nn.ModuleDict(dict(sorted(others.items(), key=lambda kv: int(kv[0]))))
        self.bias_deltas = [t for t, b in enumerate(bias_deltas) if b is not None]
        for t in self.bias_deltas:
            self.register_buffer(f"bias_delta{t}", bias_deltas[t].reshape(n).contiguous(), persistent=False)
        self.in_features, self.out_features = k, n
        # tenant t -> position in ``shared`` of the term serving it when that term can fuse one tenant with
        # the base weight (``fuses_one`` / ``fused_one``), else -1
        self._term_of = [-1] * len(encoded)
        self._fusers = tuple(self.shared)  # the same modules, indexed without ModuleList's per-call checks
        for t, e in enumerate(encoded):
            i = shared_codecs.index(e.codec) if e is not None and e.codec in shared_codecs else -1
            if i >= 0 and hasattr(self.shared[i], "fused_one"):
                self._term_of[t] = i
        # tenants that leave this layer as it is (no term, no bias delta)
        self._unchanged = {t for t, e in enumerate(encoded) if e is None and t not in self.bias_deltas}
        self._uniform = _Uniform()
        self._kept: dict[tuple, tuple] = {}  # key -> plan, the last kept.KEPT keys (see forward)

    def forward(self, x: Tensor) -> Tensor:
        # As DeltaLinear.forward: a CPU call keeps the path it took (``_plan``) with what it was decided on,
        # here also the delta index (the same tensor, unchanged in place: its version counter)
        index = self.delta_index
        if index is None or not x.is_cpu or torch.compiler.is_compiling():
            return self._forward(x)
        weight = self._modules["base"]._parameters.get("weight")
        key = (x.shape, x.dtype, index._version, dispatch.plan_state(), None if weight is None else weight.dtype)
        plan = self._plan
        if plan is None or plan[1] is not index or plan[0] != key:
            plan = self._kept.get(key)  # as DeltaLinear.forward
            if plan is None or plan[1] is not index:
                y, plan = self._forward(x, key)
                keep(self, plan)
                return y
            self._plan = plan
        _, _, path, t, in2, out, native, weight, bias = plan
        if native is not None:
            y = call_plan(self, native, weight, bias, x)
            if y is not None:
                return y
        if path == _FUSED:
            y = self._fused_one(x if in2 is None else x.reshape(*in2), t)
            return y if out is None else y.reshape(*out)
        return self._run(path, x, t)

    def _forward(self, x: Tensor, key: tuple | None = None):
        """The output, deciding the path (and with ``key``, also the plan that keeps it for the next call:
        key, index, path, tenant, x2 size, output size, and ``_layer_plan``'s plan, weight and bias)."""
        index = _batch_index(self, x)
        only = self._uniform(index)
        path = _GENERAL
        if only == -1 or only in self._unchanged:  # every row on the base alone, or on a delta without a term
            path = _BASE
        elif only is not None:
            weight = self._fusable(only)
            if weight is not None:
                x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
                fused = dispatch.prefer_fused(x2, weight, lambda: self._fused_one(x2, only),
                                              lambda: self._general(x), kind="multi")
                if key is not None:
                    return self._one_tenant(only, x, x2, fused, key, index)
                if fused:
                    y = self._fused_one(x2, only, weight)
                    return y if x2 is x else _out(y, x.shape[:-1])
            elif str(only) in self.others:  # one tenant's own term on every row
                path = _ONE
        y = self._run(path, x, only)
        if key is None:
            return y
        native = self._layer_plan(path, only, x.reshape(-1, x.shape[-1])) if path == _ONE else (None, None, None)
        return y, (key, index, path, only, None, None, *native)

    def _one_tenant(self, t: int, x: Tensor, x2: Tensor, fused: bool, key: tuple, index: Tensor) -> tuple:
        """The output and the kept plan of a batch all of tenant t's, t fusing with the base: the fused path's
        layer plan and the general path's (base + t's term) where both exist, the faster one as measured
        (kind "multi-plans": DELTACOMP_FUSED=always takes the fused one); else the path ``fused`` says (the
        Python paths as measured) with its plan if it has one."""
        f = self._layer_plan(_FUSED, t, x2)
        g = self._general_plan(t, x2, lambda: self._general(x))
        if f[0] is not None and g[0] is not None:
            fused = challenge(f[0], x2, f[1], "multi-plans", lambda: g[0](x2.contiguous())) is not None
        native = f if fused else g
        y = None if native[0] is None else native[0](x)
        if y is None and fused:
            y = self._fused_one(x2, t)
            y = y if x2 is x else _out(y, x.shape[:-1])
        elif y is None:
            y = self._general(x)
        reshaped = fused and x2 is not x
        return y, (key, index, _FUSED if fused else _GENERAL, t, tuple(x2.shape) if reshaped else None,
                   tuple(y.shape) if reshaped else None, *native)

    def _general_plan(self, t: int, x2: Tensor, general) -> tuple:
        """(plan, weight, bias): a layer plan of base + tenant t's term (t fuses, every row is t's): at one x
        row the "torch" plan or the "own" one where measured faster (``base_plan``, kind "multi-general"), at
        2..ROWS_MAX rows the "rows" plan where measured faster than the general path (``general()``; kind
        "multi-general-rows"); Nones where there is none."""
        weight, m = self._fusable(t), x2.shape[0]
        make = None if weight is None else getattr(self._fusers[self._term_of[t]], "layer_plan_one", None)
        if make is None or m > ROWS_MAX:
            return None, None, None
        bias = self._modules["base"]._parameters["bias"]
        extra = self._buffers[f"bias_delta{t}"] if t in self.bias_deltas else None
        if m == 1:
            native = base_plan(lambda mode: make(t, weight, bias, extra, 1, mode), x2, weight, "multi-general",
                               general)
        else:
            native = challenge(make(t, weight, bias, extra, m, "rows"), x2, weight, "multi-general-rows", general)
        return (native, weight, bias) if native is not None else (None, None, None)

    def _apply(self, fn, *args, **kwargs):
        self._plan = None  # as DeltaLinear._apply
        self._kept.clear()
        return super()._apply(fn, *args, **kwargs)

    def _layer_plan(self, path: int, t: int, x2: Tensor) -> tuple:
        """(plan, weight, bias): tenant t's layer plan (``plans``) for the fused or one-term path over a plain
        nn.Linear base (x2: the call's rows), with the weight and bias it holds; Nones where its term builds none."""
        base = self._modules["base"]
        if type(base) is not nn.Linear:
            return None, None, None
        weight, bias = base._parameters["weight"], base._parameters["bias"]
        extra = self._buffers[f"bias_delta{t}"] if t in self.bias_deltas else None
        if path == _FUSED:
            make = getattr(self._fusers[self._term_of[t]], "layer_plan_one", None)
            rows = x2.shape[0]
            native = None if make is None else fused_plan(
                make(t, weight, bias, extra, rows), lambda: make(t, weight, bias, extra, rows, "rows"), x2, weight,
                "multi", lambda: self._fused_one(x2, t))
        else:
            term = self._modules["others"]._modules[str(t)]
            native = base_plan(lambda mode: term.layer_plan(weight, bias, extra, mode, x2.shape[0]), x2, weight,
                                "multi", lambda: self._one_term(x2, t))
        return native, weight, bias

    def _run(self, path: int, x: Tensor, t: int | None) -> Tensor:
        if path == _BASE:
            return self._modules["base"](x)
        if path == _ONE:
            return self._one_term(x, t)
        return self._general(x)

    def _one_term(self, x: Tensor, t: int) -> Tensor:
        """base(x) + tenant t's term (+ its bias delta): every row is t's, no row gather or scatter."""
        y = self._modules["base"](x)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y2 = y if y.dim() == 2 else y.reshape(-1, y.shape[-1])
        d = self._modules["others"]._modules[str(t)](x2)
        y2 = y2 + (d if d.dtype == y2.dtype else d.to(y2.dtype))
        if t in self.bias_deltas:
            y2 = y2 + getattr(self, f"bias_delta{t}").to(y2.dtype)
        return y2 if y.dim() == 2 else y2.reshape(y.shape)

    def _fusable(self, t: int) -> Tensor | None:
        """The base weight when tenant t's term fuses with this plain nn.Linear base in one pass (and t has
        no other term), else None."""
        i = self._term_of[t] if 0 <= t < len(self._term_of) else -1
        if i < 0:
            return None
        base = self._modules["base"]
        if type(base) is not nn.Linear:
            return None
        weight = base._parameters["weight"]
        return weight if self._fusers[i].fuses_one(t, weight) else None

    def _fused_one(self, x2: Tensor, t: int, weight: Tensor | None = None) -> Tensor:
        base = self._modules["base"]  # a plain nn.Linear (see _fusable)
        y = self._fusers[self._term_of[t]].fused_one(x2, base._parameters["weight"] if weight is None else weight, t)
        bias = base._parameters["bias"]
        if bias is not None:
            y = y + bias
        if self.bias_deltas and t in self.bias_deltas:
            y = y + getattr(self, f"bias_delta{t}").to(y.dtype)
        return y

    def _shared_term(self, multi: nn.Module, x2: Tensor, idx: Tensor) -> Tensor | None:
        """``multi(x2, idx)``, or its ``tables_rows`` where that serves the batch (1..ROWS_MAX rows, no autograd)
        and is measured faster on this call's tensors (``dispatch.prefer_fused``, kind "multi-tables-rows")."""
        serve = getattr(multi, "tables_serve", None)
        weight = self._modules["base"]._parameters.get("weight")
        if (serve is None or weight is None or x2.shape[0] > ROWS_MAX
                or (torch.is_grad_enabled() and x2.requires_grad) or not serve(x2, idx)):
            return multi(x2, idx)
        x = x2.contiguous()
        if dispatch.prefer_fused(x, weight, lambda: multi.tables_rows(x, idx), lambda: multi(x, idx),
                                 kind="multi-tables-rows"):
            return multi.tables_rows(x, idx)
        return multi(x, idx)

    def _general(self, x: Tensor) -> Tensor:
        """Base matmul, then each row's delta term (shared multi-tenant terms, per-tenant segments)."""
        idx = _row_index(self, x)
        y = self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        extra = None
        for multi in self.shared:
            term = self._shared_term(multi, x2, idx)
            if term is not None:
                extra = term if extra is None else extra + term
        extra = torch.zeros_like(y2) if extra is None else extra.to(y2.dtype)
        for t, term in self.others.items():
            rows = (idx == int(t)).nonzero().reshape(-1)
            if rows.numel():
                extra.index_add_(0, rows, term(x2.index_select(0, rows)).to(y2.dtype))
        for t in self.bias_deltas:
            rows = (idx == t).nonzero().reshape(-1)
            if rows.numel():
                b = getattr(self, f"bias_delta{t}").to(y2.dtype)
                extra.index_add_(0, rows, b.expand(rows.numel(), -1))
        return (y2 + extra).reshape(*lead, y.shape[-1])


class MultiDeltaModule(nn.Module):
    """Any module whose parameters differ per delta (norms, embeddings): rows of delta t run the module
    with delta t's full tensors (``torch.func.functional_call``), the others the base module. The
    module must treat batch rows (dim 0) independently."""

    _plan: tuple | None = None  # (index, its version, x's rows, module or None) of the last call: see forward

    def __init__(self, module: nn.Module, per_delta: Sequence[dict[str, Tensor] | None]):
        super().__init__()
        self.module = module
        self.num_deltas = len(per_delta)
        self.delta_index: Tensor | None = None
        # buffers (so .to() moves them), named d<t>_<n>; _names[t] maps them back to the module's names
        self._names: list[dict[str, str]] = []
        for t, d in enumerate(per_delta):
            names = {}
            for j, (name, v) in enumerate((d or {}).items()):
                self.register_buffer(f"d{t}_{j}", v.detach(), persistent=False)
                names[name] = f"d{t}_{j}"
            self._names.append(names)
        self._uniform = _Uniform()
        self._clones: dict[int, nn.Module | None] = {}
        self._plan = None

    def forward(self, x: Tensor, *args, **kwargs):
        # a decode step: the module that served every row last time (``_plan``: the index tensor, its
        # version, x's rows, the module) serves them again while the index is that tensor, unchanged
        plan = self._plan
        index = self.delta_index
        if plan is not None and plan[0] is index and plan[1] == index._version and x.shape[:1] == plan[2]:
            mod = plan[3]  # None: the wrapped module itself, looked up each time
            return (self._modules["module"] if mod is None else mod)(x, *args, **kwargs)
        return self._forward(x, args, kwargs)

    def _forward(self, x: Tensor, args: tuple, kwargs: dict):
        idx = _batch_index(self, x)
        only = self._uniform(idx)
        self._plan = None
        if only == -1 or (only is not None and 0 <= only < self.num_deltas and not self._names[only]):
            self._plan = (idx, idx._version, x.shape[:1], None)  # every row on the base, or on a delta
            return self._modules["module"](x, *args, **kwargs)  # that leaves this module as it is
        mod = self._as_delta(only) if only is not None and 0 <= only < self.num_deltas else None
        if mod is not None:  # every row of one delta: its module alone
            self._plan = (idx, idx._version, x.shape[:1], mod)
            return mod(x, *args, **kwargs)
        if only is not None and 0 <= only < self.num_deltas:
            params = {name: getattr(self, buf) for name, buf in self._names[only].items()}
            return torch.func.functional_call(self.module, params, (x, *args), kwargs)
        y = self.module(x, *args, **kwargs)
        for t, names in enumerate(self._names):
            rows = (idx == t).nonzero().reshape(-1) if names else None
            if rows is not None and rows.numel():
                params = {name: getattr(self, buf) for name, buf in names.items()}
                yt = torch.func.functional_call(self.module, params, (x.index_select(0, rows), *args), kwargs)
                y = y.index_copy(0, rows, yt.to(y.dtype))
        return y

    def _as_delta(self, t: int) -> nn.Module | None:
        """A shallow copy of the module holding delta t's tensors in place of its own (built once, dropped
        when the buffers move or the mode changes): a decode step runs it like the module itself, without
        ``functional_call``'s per-call swapping. None when delta t names a tensor of a submodule."""
        if t in self._clones:
            return self._clones[t]
        own = self.module._parameters.keys() | self.module._buffers.keys()
        mod = None
        if all(name in own for name in self._names[t]):
            mod = copy.copy(self.module)
            mod._parameters, mod._buffers = dict(self.module._parameters), dict(self.module._buffers)
            for name, buf in self._names[t].items():
                (mod._parameters if name in mod._parameters else mod._buffers)[name] = getattr(self, buf)
        self._clones[t] = mod
        return mod

    def _apply(self, fn, *args, **kwargs):
        self._clones, self._plan = {}, None  # .to() and the like replace the tensors the copies hold
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._clones, self._plan = {}, None
        return super().train(mode)
