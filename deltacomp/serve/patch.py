"""Patching a model loaded from the base: ``patch_model`` (one delta, served packed), ``patch_model_multi``
(several deltas, each batch row choosing one with ``set_delta_index``), ``unpatch_model``.

    model = AutoModelForCausalLM.from_pretrained(BASE)
    patch_model(model, "ft.delta.safetensors")         # one fine-tune: y = base(x) + x @ delta^T
    patch_model_multi(model, ["a.delta.safetensors", "b.delta.safetensors"])
    set_delta_index(model, torch.tensor([0, 1, -1]))   # batch row i uses delta index[i] (-1: the base)
    unpatch_model(model)                               # back to the base
"""
from __future__ import annotations

import os
from typing import Sequence

import torch
from torch import Tensor, nn

from .. import environment
from ..basecheck import BaseChecker
from ..codecs import Encoded, get_codec
from ..delta import Delta, load_delta
from ..errors import DeltacompError, SettingsError
from ..modelnames import checkpoint_aliases, not_in_model
from .modules import DeltaLinear, MultiDeltaLinear, MultiDeltaModule
from .quantized import backend_of, check_base, is_quantized

_PATCH_ATTR = "_deltacomp_patch"


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _state(model: nn.Module) -> dict[str, Tensor]:
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    return state


def _not_patched(model: nn.Module) -> None:
    if getattr(model, _PATCH_ATTR, None) is not None:
        raise DeltacompError(f"{type(model).__name__} is already patched with a delta; call "
                             "deltacomp.unpatch_model(model) first")


def _wrapped_linears(model: nn.Module, df: Delta, checker: BaseChecker) -> tuple[dict[str, tuple[nn.Module, str]], set[str]]:
    """The linear layers to wrap in a DeltaLinear (module name -> (module, weight name)), and the weights
    whose all-zero delta needs nothing at all (over a quantized base)."""
    owners: dict[int, int] = {}
    for p in _state(model).values():
        owners[p.data_ptr()] = owners.get(p.data_ptr(), 0) + 1
    wrap: dict[str, tuple[nn.Module, str]] = {}
    warned: list = []
    skip: set[str] = set()
    checkpoint_name = {m: c for c, m in checkpoint_aliases(model, df.params).items()}  # renamed on load
    for mname, mod in model.named_modules():
        wname = f"{mname}.weight" if mname else "weight"
        wname = checkpoint_name.get(wname, wname)
        info = df.params.get(wname)
        backend = backend_of(mod)
        if backend is None or info is None:
            continue
        codec = get_codec(info.codec) if info.tied_to is None else None
        plain = info.tied_to is None and info.has_base and info.base_rows is None and len(info.shape) == 2
        if backend.quantized:
            # the quantized storage cannot take a float delta in place: every delta is served as a term
            if codec is not None and codec.always_zero:
                skip.add(wname)
                continue
            if not plain:
                raise DeltacompError(f"{type(model).__name__}: {wname} is stored quantized and its delta "
                                     f"({info.codec}{', tied' if info.tied_to else ''}"
                                     f"{', added rows' if info.base_rows is not None else ''}) cannot be served "
                                     "over it; load the base unquantized, or keep this layer unquantized")
        elif not plain or codec.applied_in_place or owners.get(mod.weight.data_ptr(), 0) > 1:
            continue  # applied in place (a shared, tied weight too: changing it changes all its names)
        check_base(checker, wname, mod.weight, type(model).__name__, warned)
        wrap[mname] = (mod, wname)
    return wrap, skip


def patch_model(model: nn.Module, delta: str | os.PathLike | Delta, *, force: bool = False,
                fused: bool | None = None) -> nn.Module:
    """Serve ``delta`` on ``model`` (loaded from the base): every linear layer whose weight delta its
    codec serves as a term becomes a ``DeltaLinear`` (packed delta, base weight untouched); every other
    tensor in the file is applied in place (``api.apply_delta_``). The base fingerprint is checked first
    (``force`` applies a mismatching delta anyway, with a warning). ``fused``: None = automatic."""
    from .. import api  # api imports nothing from serve; local to keep ``import deltacomp.serve`` light

    api.check_module(model, "patch_model")
    environment.check()  # a bad DELTACOMP_* value fails here, not in the first forward pass
    if fused is not None and not isinstance(fused, bool):
        raise SettingsError(f"patch_model: fused must be True, False or None (automatic), got {fused!r}")
    _not_patched(model)
    df = load_delta(delta)
    wrap, skip = _wrapped_linears(model, df, BaseChecker(df, force))
    wrapped = {w for _, w in wrap.values()} | skip
    rest = [n for n in df.params if n not in wrapped]  # applied in place
    state = _state(model)
    alias = checkpoint_aliases(model, rest)
    backup = {alias.get(n, n): state[alias.get(n, n)].detach().clone() for n in rest
              if df.params[n].tied_to is None and alias.get(n, n) in state}
    api.apply_delta_(model, df, force=force, names=rest)
    for mname, (mod, wname) in wrap.items():
        enc = df.encoded(wname)
        _set_module(model, mname, _served(lambda: DeltaLinear(mod, enc, fused=fused), [(df, wname, enc)]))
    setattr(model, _PATCH_ATTR, {"backup": backup, "deltas": 1})
    return model


def _has_delta(df: Delta, name: str) -> bool:
    info = df.params.get(name)
    if info is not None and info.tied_to is not None:
        info = df.params[info.tied_to]
    return info is not None and not get_codec(info.codec).always_zero


def patch_model_multi(model: nn.Module, deltas: Sequence[str | os.PathLike | Delta], *,
                      force: bool = False, verify_base: bool = True) -> nn.Module:
    """Serve several deltas of one base at once; nothing is changed in place. Linear layers become
    ``MultiDeltaLinear``, other modules whose tensors some delta changes (norms, embeddings) become
    ``MultiDeltaModule``. Choose each batch row's delta with ``set_delta_index`` before a forward pass.
    Deltas that add tokens (a larger vocabulary) or new tensors cannot share one base and are refused.
    ``verify_base=False`` skips hashing the base tensors against each delta's fingerprint, for a caller
    that has already checked these deltas against this model (the server re-patches as deltas come and go)."""
    from ..api import check_module

    check_module(model, "patch_model_multi")
    environment.check()
    _not_patched(model)
    if isinstance(deltas, (str, os.PathLike)):
        raise DeltacompError(f"patch_model_multi: give a list of delta files, got one path {deltas!r}")
    dfs = [load_delta(d) for d in deltas]
    if not dfs:
        raise DeltacompError("patch_model_multi: give at least one delta")
    state = _state(model)
    warned: list = []
    # per delta, model parameter name -> the delta's (checkpoint's) name, for tensors renamed on load
    names: list[dict[str, str]] = []
    for df in dfs:
        checker = BaseChecker(df, force)
        alias = checkpoint_aliases(model, df.params)
        names.append({m: c for c, m in alias.items()})
        for name, info in df.params.items():
            if info.base_rows is not None or not info.has_base:
                raise DeltacompError(f"{df.path}: {name} adds tokens or a tensor the base lacks; such a delta "
                                     "cannot share the base with others, use patch_model or reconstruct")
            if alias.get(name, name) not in state:
                raise not_in_model(model, df.path, name)
            if verify_base and info.tied_to is None and not get_codec(info.codec).always_zero:
                check_base(checker, name, state[alias.get(name, name)], type(model).__name__, warned)
    # names sharing one tensor (tied embeddings and head): a delta to any of them changes all of them
    by_ptr: dict[int, list[str]] = {}
    for n, t in state.items():
        by_ptr.setdefault(t.data_ptr(), []).append(n)

    def source(i: int, name: str) -> str | None:
        """The name in delta i of the tensor holding model parameter ``name`` (or one tied to it) whose
        delta is not zero; None if there is none."""
        ckpt = (names[i].get(a, a) for a in [name] + by_ptr[state[name].data_ptr()])
        return next((c for c in ckpt if _has_delta(dfs[i], c)), None)

    plan: list[tuple[str, nn.Module]] = []
    for mname, mod in model.named_modules():
        local = [n for n, _ in mod.named_parameters(recurse=False)] + [n for n, _ in mod.named_buffers(recurse=False)]
        full = {n: f"{mname}.{n}" if mname else n for n in local}
        src = [{n: source(i, f) for n, f in full.items()} for i in range(len(dfs))]
        if not any(a is not None for s in src for a in s.values()):
            continue
        if isinstance(mod, nn.Linear) and set(full) <= {"weight", "bias"}:
            encs = [df.encoded(s["weight"]) if s["weight"] else None for df, s in zip(dfs, src)]
            biases = [df.decode(s["bias"]) if s.get("bias") else None for df, s in zip(dfs, src)]
            plan.append((mname, _served(lambda: MultiDeltaLinear(mod, encs, biases),
                                        [(df, s["weight"], e) for df, s, e in zip(dfs, src, encs)])))
        else:
            bad = [f for n, f in full.items() if is_quantized(state[f]) and any(s.get(n) for s in src)]
            if bad:
                raise DeltacompError(f"patch_model_multi: {bad[0]} is stored quantized in a "
                                     f"{type(mod).__name__}, which is not a linear layer; its delta cannot "
                                     "be served over it")
            per = []
            for df, s in zip(dfs, src):
                changed = {n: df.apply(a, state[full[n]].detach().cpu()).to(state[full[n]].dtype)
                           .reshape(state[full[n]].shape) for n, a in s.items() if a is not None}
                per.append(changed or None)
            plan.append((mname, MultiDeltaModule(mod, per)))
    for mname, new in plan:
        if not mname:
            raise DeltacompError("patch_model_multi: the model itself owns changed tensors; patch its parent")
        _set_module(model, mname, new)
    setattr(model, _PATCH_ATTR, {"backup": {}, "deltas": len(dfs)})
    return model


_CODEC_ERRORS = (DeltacompError, RuntimeError, ValueError, IndexError, KeyError, TypeError, OverflowError,
                 ZeroDivisionError, MemoryError)


def _served(make, parts: list[tuple[Delta, str | None, Encoded | None]]) -> nn.Module:
    """``make()``, the module serving several deltas' packed forms; when it fails, the part at fault is
    found by building each term alone under its file's guard, so the error names the file and tensor."""
    try:
        return make()
    except _CODEC_ERRORS:
        for df, name, enc in parts:
            if enc is not None:
                with df.guard(name, "serve"):
                    get_codec(enc.codec).serving_term(enc)
        raise


def set_delta_index(model: nn.Module, index: Tensor | Sequence[int]) -> nn.Module:
    """Which delta each batch row uses in the next forward passes (int, -1 = the base alone)."""
    patch = getattr(model, _PATCH_ATTR, None)
    if patch is None:
        raise DeltacompError(f"{type(model).__name__} is not patched; call patch_model_multi first")
    try:
        raw = torch.as_tensor(index)
    except (TypeError, ValueError, RuntimeError):
        raise DeltacompError(f"set_delta_index: give integer delta indices, got {index!r}") from None
    if raw.is_floating_point() or raw.is_complex() or raw.dtype == torch.bool:
        raise DeltacompError(f"set_delta_index: give integer delta indices, got {raw.tolist()}")
    index = raw.to(torch.int64).reshape(-1)
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
