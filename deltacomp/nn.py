"""Serving a delta without reconstructing the fine-tune: modules that add the packed delta's term to
their base layer's output, and functions that patch a model loaded from the base.

    model = AutoModelForCausalLM.from_pretrained(BASE)
    patch_model(model, "ft.delta.safetensors")         # one fine-tune: y = base(x) + x @ delta^T
    patch_model_multi(model, ["a.delta.safetensors", "b.delta.safetensors"])
    set_delta_index(model, torch.tensor([0, 1, -1]))   # batch row i uses delta index[i] (-1: the base)
    unpatch_model(model)                               # back to the base

Linear weights whose delta is compressed (bitdelta, ternary, svd-mixed, lowrank, dare) are served from
the packed form: ``DeltaLinear`` computes ``base(x) + codec term``, or for BitDelta over a plain fp32/bf16
``nn.Linear`` one fused pass over the base weight and the signs (``sign_matmul_fused``) where that
measured faster on this machine (``deltacomp.serve_dispatch``). Everything else
in the file (raw embeddings and norms, biases, added tokens) is applied in place by
``deltacomp.api.apply_delta_`` and restored by ``unpatch_model``.

Quantized base (one quantized base, many deltas): the base module computes its own output, so a
bitsandbytes ``Linear8bitLt`` / ``Linear4bit`` (e.g. from ``from_pretrained(..., quantization_config=
BitsAndBytesConfig(...))``, see ``deltacomp.serve.load_base``) is wrapped like an ``nn.Linear``: every
compressed or raw delta of a quantized weight is served as a term over it (never added into the quantized
storage), single and multi-tenant, and ``unpatch_model`` puts the quantized modules back. Quantized
weights cannot be fingerprinted against the float base (one warning); float tensors (norms, embeddings,
an unquantized head) are still checked. Tested in tests/test_bnb.py on CPU with bitsandbytes 0.50.2
(8-bit and 4-bit nf4; bitdelta, svd-mixed, ternary, lowrank): logits equal the quantized base's output
plus ``x @ decoded_delta^T``.

Multi-tenant: one base, several deltas. ``MultiDeltaLinear`` sends every batch row to its delta: all
BitDelta rows in one ``sign_matmul_multi`` call (rows of one delta grouped inside the kernel), other
codecs per contiguous group of rows (segments). Tensors applied in place for one delta (norms,
embeddings) are served per row by ``MultiDeltaModule``, which runs the module with each delta's
tensors on that delta's rows.
"""
from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from . import ops, serve_dispatch
from .codecs import CodecName, Encoded, get_codec
from .delta_file import DeltaFile, load_delta
from .errors import DeltacompError
from .quant import positions as P

_PACKED = (CodecName.BITDELTA.value, CodecName.TERNARY.value, CodecName.SVD_MIXED.value,
           CodecName.LOWRANK.value, CodecName.DARE.value)


# -- one delta's term for a linear layer -------------------------------------------------------------
class DeltaTerm(nn.Module):
    """``x @ delta^T`` from one encoded delta, in its runtime form (buffers, so ``.to()`` moves them).

    bitdelta: the packed signs and scales (sign_matmul); ternary: the TERNARY_CSR form decoded once
    (ternary_matmul); raw: the dense delta; other codecs: ``codec.matmul`` on the packed tensors."""

    def __init__(self, enc: Encoded):
        super().__init__()
        if len(enc.shape) != 2:
            raise ValueError(f"DeltaTerm: a linear weight delta is 2-D, got shape {enc.shape}")
        self.codec, self.shape, self.params = enc.codec, tuple(enc.shape), dict(enc.params)
        self.fields: list[str] = []
        if enc.codec == CodecName.TERNARY.value:
            pos, signs = P.decode_support(enc.tensors, enc.params, enc.numel)
            row_ptr, neg_start, cols = ops.ternary_runtime(pos, signs, self.shape)
            for name, t in (("row_ptr", row_ptr), ("neg_start", neg_start), ("cols", cols),
                            ("scale", enc.tensors["scale"])):
                self._keep(name, t)
        elif enc.codec == CodecName.RAW.value:
            self._keep("dense", get_codec(enc.codec).decode(enc))
        else:
            for name, t in enc.tensors.items():
                self._keep(name, t)

    def _keep(self, name: str, t: Tensor) -> None:
        self.register_buffer(f"t_{name}", t.contiguous(), persistent=False)
        self.fields.append(name)

    def tensor(self, name: str) -> Tensor:
        return getattr(self, f"t_{name}")

    def encoded(self) -> Encoded:
        return Encoded(self.codec, self.shape, {f: self.tensor(f) for f in self.fields}, self.params)

    def forward(self, x2: Tensor) -> Tensor:
        """x2 (M, K) -> (M, N) in x2's dtype."""
        k = self.shape[1]
        if self.codec == CodecName.TERNARY.value:
            return ops.ternary_matmul(x2, self.tensor("row_ptr"), self.tensor("neg_start"), self.tensor("cols"),
                                      self.tensor("scale"), k)
        if self.codec == CodecName.RAW.value:
            return x2 @ self.tensor("dense").to(x2.dtype).T
        return get_codec(self.codec).matmul(x2, self.encoded()).to(x2.dtype)


def _out(y: Tensor, lead: torch.Size) -> Tensor:
    return y.reshape(*lead, y.shape[-1])


class DeltaLinear(nn.Module):
    """``base(x) + x @ delta^T`` with the delta kept packed. ``base`` is any linear module (an
    ``nn.Linear`` or a quantized one that computes its own output)."""

    def __init__(self, base: nn.Module, encoded: Encoded, fused: bool | None = None):
        super().__init__()
        n, k = encoded.shape if len(encoded.shape) == 2 else (None, None)
        if (n, k) != (getattr(base, "out_features", n), getattr(base, "in_features", k)):
            raise ValueError(f"DeltaLinear: delta of shape {encoded.shape} for a base layer "
                             f"{getattr(base, 'out_features', '?')} x {getattr(base, 'in_features', '?')}")
        self.base = base
        self.delta = DeltaTerm(encoded)
        self.in_features, self.out_features = k, n
        # fused: None = where possible (a plain fp32/bf16 nn.Linear and one-mask BitDelta), each batch
        # taking whichever of fused / base + delta term measured faster on this machine for its shape
        # (serve_dispatch); True = always fused; False = never.
        can_fuse = (type(base) is nn.Linear and base.weight.dtype in (torch.float32, torch.bfloat16)
                    and encoded.codec == CodecName.BITDELTA.value and int(encoded.params.get("masks", 1)) == 1)
        if fused and not can_fuse:
            raise ValueError("DeltaLinear: fused=True needs a plain fp32/bf16 nn.Linear and a one-mask bitdelta delta")
        self.fused = can_fuse if fused is None else bool(fused)
        self.fused_measured = fused is None  # the fused path is taken where measured faster

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        if self.fused and (not self.fused_measured or serve_dispatch.prefer_fused(
                x2, self.base.weight, lambda: self._fused(x2), lambda: self._unfused(x2))):
            return _out(self._fused(x2), lead)
        return _out(self._unfused(x2), lead)

    def _fused(self, x2: Tensor) -> Tensor:
        d = self.delta
        y = ops.sign_matmul_fused(x2, self.base.weight, d.tensor("signs"), d.tensor("scale"), self.in_features)
        return y if self.base.bias is None else y + self.base.bias

    def _unfused(self, x2: Tensor) -> Tensor:
        y = self.base(x2)
        return y + self.delta(x2).to(y.dtype)

    def extra_repr(self) -> str:
        return f"codec={self.delta.codec}, fused={self.fused}{' (where measured faster)' if self.fused and self.fused_measured else ''}"


# -- several deltas over one base ------------------------------------------------------------------
def _batch_index(module: nn.Module, x: Tensor) -> Tensor:
    """The delta index set on ``module`` (one entry per batch row, dim 0 of x), checked against x."""
    index = getattr(module, "delta_index", None)
    if index is None:
        raise DeltacompError(f"{type(module).__name__}: no delta index set; call deltacomp.nn.set_delta_index("
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


class MultiDeltaLinear(nn.Module):
    """One base linear layer, T deltas (None where a delta leaves this layer unchanged). Batch row i
    adds the term of delta ``delta_index[i]`` (set by ``set_delta_index``; -1 adds nothing)."""

    def __init__(self, base: nn.Module, encoded: Sequence[Encoded | None], bias_deltas: Sequence[Tensor | None] = ()):
        super().__init__()
        self.base = base
        self.num_deltas = len(encoded)
        self.delta_index: Tensor | None = None
        n, k = base.out_features, base.in_features
        bit = [e if e is not None and e.codec == CodecName.BITDELTA.value and len(e.shape) == 2 else None
               for e in encoded]
        # BitDelta tenants: one SIGNS stack per mask level; slots[l][t] = position of delta t in that
        # stack, -1 when delta t has no mask l (then it adds nothing at that level).
        levels = max((int(e.params.get("masks", 1)) for e in bit if e is not None), default=0)
        self.levels = levels
        for lv in range(levels):
            sfx = "" if lv == 0 else f"_{lv}"
            members = [t for t, e in enumerate(bit) if e is not None and f"signs{sfx}" in e.tensors]
            slots = torch.full((self.num_deltas,), -1, dtype=torch.int64)
            slots[members] = torch.arange(len(members))
            scales = [bit[t].tensors[f"scale{sfx}"].to(torch.float32) for t in members]
            if any(s.dim() for s in scales):
                scales = [s.expand(n) if s.dim() == 0 or s.numel() == 1 else s for s in scales]
                scales = [s.reshape(n) for s in scales]
            else:
                scales = [s.reshape(()) for s in scales]
            self.register_buffer(f"slots{lv}", slots, persistent=False)
            self.register_buffer(f"signs{lv}", torch.stack([bit[t].tensors[f"signs{sfx}"] for t in members]),
                                 persistent=False)
            self.register_buffer(f"scales{lv}", torch.stack(scales).contiguous(), persistent=False)
        # every other codec: its own term, run on the rows of its delta (segments)
        self.others = nn.ModuleDict({str(t): DeltaTerm(e) for t, e in enumerate(encoded)
                                     if e is not None and bit[t] is None})
        self.bias_deltas = [t for t, b in enumerate(bias_deltas) if b is not None]
        for t in self.bias_deltas:
            self.register_buffer(f"bias_delta{t}", bias_deltas[t].reshape(n).contiguous(), persistent=False)
        self.in_features, self.out_features = k, n

    def forward(self, x: Tensor) -> Tensor:
        idx = _row_index(self, x)
        y = self.base(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.reshape(-1, y.shape[-1])
        extra = None
        for lv in range(self.levels):
            slots = getattr(self, f"slots{lv}")
            sel = torch.where(idx >= 0, slots[idx.clamp(min=0)], -1)
            if bool((sel >= 0).any()):
                term = ops.sign_matmul_multi(x2, getattr(self, f"signs{lv}"), getattr(self, f"scales{lv}"), sel,
                                             self.in_features)
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

    def forward(self, x: Tensor, *args, **kwargs):
        idx = _batch_index(self, x)
        y = self.module(x, *args, **kwargs)
        for t, names in enumerate(self._names):
            rows = (idx == t).nonzero().reshape(-1) if names else None
            if rows is not None and rows.numel():
                params = {name: getattr(self, buf) for name, buf in names.items()}
                yt = torch.func.functional_call(self.module, params, (x.index_select(0, rows), *args), kwargs)
                y = y.index_copy(0, rows, yt.to(y.dtype))
        return y


# -- patching a model --------------------------------------------------------------------------------
_PATCH_ATTR = "_deltacomp_patch"


def _open(delta: str | os.PathLike | DeltaFile) -> DeltaFile:
    return delta if isinstance(delta, DeltaFile) else load_delta(delta)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _state(model: nn.Module) -> dict[str, Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _quantized(tensor: Tensor) -> bool:
    """A weight stored quantized: integer storage (bitsandbytes Int8Params, 4-bit packed uint8), or a
    bitsandbytes Params4bit whose packed storage is a float dtype (``bnb_4bit_quant_storage``). Checked by
    class name so this module does not import bitsandbytes."""
    return not tensor.is_floating_point() or type(tensor).__name__ == "Params4bit"


def _check_base(checker, name: str, tensor: Tensor, where: str, warned: list) -> None:
    """Fingerprint check of one base tensor; a quantized base (int8/4-bit storage) cannot be hashed
    against the float base the delta was made from, so it is skipped with one warning."""
    if not _quantized(tensor):
        checker.check(name, tensor.detach().cpu(), where)
    elif not warned:
        warned.append(name)
        warnings.warn(f"{where}: {name} is stored quantized ({tensor.dtype}); the base fingerprint cannot be "
                      "checked for quantized layers")


def _not_patched(model: nn.Module) -> None:
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise DeltacompError(f"{type(model).__name__} is already patched with a delta; call "
                             "deltacomp.nn.unpatch_model(model) first")


def patch_model(model: nn.Module, delta: str | os.PathLike | DeltaFile, *, force: bool = False,
                fused: bool | None = None) -> nn.Module:
    """Serve ``delta`` on ``model`` (loaded from the base): every linear layer whose weight delta is
    compressed becomes a ``DeltaLinear`` (packed delta, base weight untouched); every other tensor in the
    file is applied in place (``api.apply_delta_``). The base fingerprint is checked first (``force``
    applies a mismatching delta anyway, with a warning). ``fused``: None = automatic. Returns model."""
    from . import api  # api imports nothing from here; the import is local to keep nn light

    _not_patched(model)
    df = _open(delta)
    checker = api._BaseChecker(df, force)
    owners: dict[int, int] = {}
    for p in _state(model).values():
        owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    wrap: dict[str, tuple[nn.Module, str]] = {}
    warned: list = []
    skip: set[str] = set()  # zero deltas of quantized weights: nothing to add, nothing to apply in place
    for mname, mod in model.named_modules():
        wname = f"{mname}.weight" if mname else "weight"
        info = df.params.get(wname)
        if not isinstance(mod, nn.Linear) or info is None:
            continue
        if _quantized(mod.weight):
            # the quantized storage cannot take a float delta in place: every delta is served as a term
            if info.tied_to is None and info.codec == CodecName.ZERO.value:
                skip.add(wname)
                continue
            if (info.tied_to is not None or not info.has_base or info.base_rows is not None
                    or len(info.shape) != 2 or info.codec not in _PACKED + (CodecName.RAW.value,)):
                raise DeltacompError(f"{type(model).__name__}: {wname} is stored quantized and its delta "
                                     f"({info.codec}{', tied' if info.tied_to else ''}"
                                     f"{', added rows' if info.base_rows is not None else ''}) cannot be served "
                                     "over it; load the base unquantized, or keep this layer unquantized")
        elif (info.tied_to is not None or not info.has_base or info.base_rows is not None
                or info.codec not in _PACKED or len(info.shape) != 2
                or owners.get(mod.weight.data_ptr(), 0) > 1):  # a shared (tied) weight is changed in place
            continue
        _check_base(checker, wname, mod.weight, type(model).__name__, warned)
        wrap[mname] = (mod, wname)
    wrapped = {w for _, w in wrap.values()} | skip
    rest = [n for n in df.params if n not in wrapped]  # applied in place
    state = _state(model)
    backup = {n: state[n].detach().clone() for n in rest if df.params[n].tied_to is None and n in state}
    api.apply_delta_(model, df, force=force, names=rest)
    for mname, (mod, wname) in wrap.items():
        _set_module(model, mname, DeltaLinear(mod, df.encoded(wname), fused=fused))
    setattr(model, _PATCH_ATTR, {"backup": backup, "deltas": 1})
    return model


def _has_delta(df: DeltaFile, name: str) -> bool:
    info = df.params.get(name)
    if info is not None and info.tied_to is not None:
        info = df.params[info.tied_to]
    return info is not None and info.codec != CodecName.ZERO.value


def patch_model_multi(model: nn.Module, deltas: Sequence[str | os.PathLike | DeltaFile], *,
                      force: bool = False) -> nn.Module:
    """Serve several deltas of one base at once; nothing is changed in place. Linear layers become
    ``MultiDeltaLinear``, other modules whose tensors some delta changes (norms, embeddings) become
    ``MultiDeltaModule``. Choose each batch row's delta with ``set_delta_index`` before a forward pass.
    Deltas that add tokens (a larger vocabulary) or new tensors cannot share one base and are refused."""
    from . import api

    _not_patched(model)
    dfs = [_open(d) for d in deltas]
    if not dfs:
        raise DeltacompError("patch_model_multi: give at least one delta")
    state = _state(model)
    warned: list = []
    for df in dfs:
        checker = api._BaseChecker(df, force)
        for name, info in df.params.items():
            if info.base_rows is not None or not info.has_base:
                raise DeltacompError(f"{df.path}: {name} adds tokens or a tensor the base lacks; such a delta "
                                     "cannot share the base with others, use patch_model or reconstruct")
            if name not in state:
                raise DeltacompError(f"{df.path}: {name} is not a parameter of {type(model).__name__} (wrong base?)")
            if info.tied_to is None and info.codec != CodecName.ZERO.value:
                _check_base(checker, name, state[name], type(model).__name__, warned)
    # names sharing one tensor (tied embeddings and head): a delta to any of them changes all of them
    by_ptr: dict[int, list[str]] = {}
    for n, t in state.items():
        by_ptr.setdefault(t.data_ptr(), []).append(n)

    def source(df: DeltaFile, name: str) -> str | None:
        return next((a for a in [name] + by_ptr[state[name].data_ptr()] if _has_delta(df, a)), None)

    plan: list[tuple[str, nn.Module]] = []
    for mname, mod in model.named_modules():
        local = [n for n, _ in mod.named_parameters(recurse=False)] + [n for n, _ in mod.named_buffers(recurse=False)]
        full = {n: f"{mname}.{n}" if mname else n for n in local}
        src = [{n: source(df, f) for n, f in full.items()} for df in dfs]
        if not any(a is not None for s in src for a in s.values()):
            continue
        if isinstance(mod, nn.Linear) and set(full) <= {"weight", "bias"}:
            encs = [df.encoded(s["weight"]) if s["weight"] else None for df, s in zip(dfs, src)]
            biases = [df.decode(s["bias"]) if s.get("bias") else None for df, s in zip(dfs, src)]
            plan.append((mname, MultiDeltaLinear(mod, encs, biases)))
        else:
            bad = [f for n, f in full.items() if _quantized(state[f]) and any(s.get(n) for s in src)]
            if bad:
                raise DeltacompError(f"patch_model_multi: {bad[0]} is stored quantized in a "
                                     f"{type(mod).__name__}, which is not a linear layer; its delta cannot "
                                     "be served over it")
            per = []
            for df, s in zip(dfs, src):
                changed = {n: df.apply(a, state[a].detach().cpu()).to(state[a].dtype).reshape(state[a].shape)
                           for n, a in s.items() if a is not None}
                per.append(changed or None)
            plan.append((mname, MultiDeltaModule(mod, per)))
    for mname, new in plan:
        if not mname:
            raise DeltacompError("patch_model_multi: the model itself owns changed tensors; patch its parent")
        _set_module(model, mname, new)
    setattr(model, _PATCH_ATTR, {"backup": {}, "deltas": len(dfs)})
    return model


def set_delta_index(model: nn.Module, index: Tensor | Sequence[int]) -> nn.Module:
    """Which delta each batch row uses in the next forward passes (int, -1 = the base alone)."""
    patch = getattr(model, _PATCH_ATTR, None)
    if patch is None:
        raise DeltacompError(f"{type(model).__name__} is not patched; call patch_model_multi first")
    index = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
    t = patch["deltas"]
    if index.numel() and (int(index.min()) < -1 or int(index.max()) >= t):
        raise DeltacompError(f"set_delta_index: values must be in [-1, {t}) ({t} deltas patched; -1 = base), "
                             f"got {index.tolist()}")
    for mod in model.modules():
        if isinstance(mod, (MultiDeltaLinear, MultiDeltaModule)):
            mod.delta_index = index
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo ``patch_model`` / ``patch_model_multi``: the wrapped base modules are put back and the
    tensors applied in place restored (a vocabulary grown for added tokens is shrunk back)."""
    patch = getattr(model, _PATCH_ATTR, None)
    if patch is None:
        raise DeltacompError(f"{type(model).__name__} is not patched")
    for mname, mod in list(model.named_modules()):
        if isinstance(mod, (DeltaLinear, MultiDeltaLinear)):
            _set_module(model, mname, mod.base)
        elif isinstance(mod, MultiDeltaModule):
            _set_module(model, mname, mod.module)
    backup = patch["backup"]
    state = _state(model)
    for name, old in backup.items():
        if tuple(state[name].shape) != tuple(old.shape) and hasattr(model, "resize_token_embeddings"):
            model.resize_token_embeddings(old.shape[0])
            state = _state(model)
    with torch.no_grad():
        for name, old in backup.items():
            state[name].copy_(old)
    delattr(model, _PATCH_ATTR)
    return model
