"""The public Python API: compress, reconstruct, load, apply. The CLI is a thin layer over this."""
from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from torch import Tensor

from .checkpoint import (Checkpoint, ShardedWriter, commit_output_dir, open_checkpoint,
                         prepare_output_dir)
from .codecs import CodecName, Encoded, get_codec
from .delta_file import (DEFAULT_MAX_SHARD_BYTES, DTYPES, DeltaFile, DeltaWriter, ParamInfo, base_digest,
                         dtype_name, file_to_json, fingerprint_all, load_delta)
from .errors import BaseMismatchError, CheckpointError, OutputExistsError, SettingsError
from .plan import Plan
from .progress import progress_bar

__all__ = ["compress", "reconstruct", "load_delta", "apply_delta_", "iter_reconstructed", "summarize"]

_TIE_TARGETS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_ROW_GROWABLE = r"(embed_tokens|wte|word_embeddings|lm_head|embed_out)"


# -- pairing base and fine-tune ---------------------------------------------------------------------
@dataclass
class Pairing:
    name: str
    kind: str                     # "delta" | "new" (only in the fine-tune) | "tied"
    base_rows: int | None = None  # set when the fine-tune added rows (tokens)
    tied_to: str | None = None


def pair_checkpoints(base: Checkpoint, ft: Checkpoint) -> list[Pairing]:
    """Match tensors by name; refuse shape mismatches except added rows of embeddings/heads."""
    out: list[Pairing] = []
    for name in ft.names():
        if name in _TIE_TARGETS:
            target = next((t for t in _TIE_TARGETS[name] if t in ft), None)
            if (target is not None and ft.shape(target) == ft.shape(name)
                    and torch.equal(ft.get(name), ft.get(target))
                    and (name not in base or target not in base or torch.equal(base.get(name), base.get(target)))):
                out.append(Pairing(name, "tied", tied_to=target))
                continue
        if name not in base:
            out.append(Pairing(name, "new"))
            continue
        fs, bs = ft.shape(name), base.shape(name)
        if fs == bs:
            if not (ft.dtype(name).is_floating_point and base.dtype(name).is_floating_point):
                out.append(Pairing(name, "new"))
            else:
                out.append(Pairing(name, "delta"))
        elif (len(fs) == 2 and len(bs) == 2 and fs[1] == bs[1] and fs[0] > bs[0]
              and re.search(_ROW_GROWABLE, name)):
            out.append(Pairing(name, "delta", base_rows=bs[0]))
        else:
            raise CheckpointError(
                f"{name}: shape {list(fs)} in the fine-tune ({ft.path}) but {list(bs)} in the base ({base.path}); "
                "only embeddings/heads may grow (added tokens) — is this the right base?")
    return out


# -- compress ---------------------------------------------------------------------------------------
def _raw_exact(codec_name: str, settings: dict, given: dict, delta: Tensor, base: Tensor, ft: Tensor) -> dict:
    """Raw storage must reproduce the fine-tune exactly: keep the fine-tune's dtype if it does, else fp32."""
    if codec_name != CodecName.RAW.value or "dtype" in given:
        return settings
    ft_dtype = dtype_name(ft.dtype)
    if ft_dtype in ("bfloat16", "float16"):
        cand = delta.to(ft.dtype).to(torch.float32)
        if torch.equal((base.to(torch.float32) + cand).to(ft.dtype), ft):
            return {**settings, "dtype": ft_dtype}
    return {**settings, "dtype": "float32"}


def _delta(ft: Tensor, b: Tensor, p: Pairing) -> tuple[Tensor, Tensor]:
    """(the fine-tune's rows shared with the base, their float32 delta; scalars as shape (1,))."""
    shared = ft[: p.base_rows] if p.base_rows is not None else ft
    delta = shared.to(torch.float32) - b.to(torch.float32)
    return shared, (delta.reshape(1) if delta.dim() == 0 else delta)


def _group_key(a) -> str:
    return a.codec + json.dumps(a.settings, sort_keys=True, default=str)


def _global_prepass(bck: Checkpoint, fck: Checkpoint, pairs: list[Pairing], plan: Plan,
                    progress: bool) -> dict[str, dict]:
    """Statistics some codecs need over all their tensors (ComPEFT's global threshold), streamed."""
    groups: dict[str, tuple[Any, dict, list[Pairing]]] = {}
    for p in pairs:
        if p.kind != "delta":
            continue
        shape = tuple(bck.shape(p.name)) or (1,)
        a = plan.assign(p.name, shape, fck.dtype(p.name).itemsize, is_zero=False)
        codec = get_codec(a.codec)
        if codec.needs_global(a.settings):
            groups.setdefault(_group_key(a), (codec, a.settings, []))[2].append(p)
    out = {}
    for key, (codec, settings, members) in groups.items():
        def deltas(members=members):
            for p in progress_bar(members, desc=f"{codec.name} pre-pass", unit="tensor", enable=progress):
                d = _delta(fck.get(p.name), bck.get(p.name), p)[1]
                if torch.count_nonzero(d):  # unchanged tensors are stored as zero, outside the group
                    yield d
        out[key] = codec.global_settings(deltas, settings)
    return out


def compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
             method: str = "bitdelta", ratio: float | None = None, rules: list[str] | tuple = (),
             overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             calib: str | os.PathLike | None = None, calib_samples: int = 32, calib_len: int = 128,
             calib_steps: int = 20, calib_lr: float = 1e-4, calib_loss: str = "mse", gptq_act_order: bool = False,
             gptq_whiten: bool = True, gptq_allocation: str = "keep", progress: bool = True) -> dict[str, Any]:
    """Compress ``finetuned`` as a delta over ``base`` into ``out``; returns the summary of the file.

    ``calib`` (a text file, or a bundled corpus name: its training split) turns on the codecs' use of
    data: BitDelta scale distillation for bitdelta tensors, GPTQ for svd-mixed ones, a least-squares scale
    on the layer outputs for ternary ones (calibrate/layerwise.py). The data-free file is
    made under a temporary name first, so a failure never leaves a file at ``out``."""
    if calib is None:
        return _compress(base, finetuned, out, method=method, ratio=ratio, rules=rules, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, progress=progress)
    from .calibrate import calibrate_layerwise, distill_scales, load_calibration

    out = Path(out)
    for p in (out, out.with_name(out.name + ".index.json")):
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p}: exists; pass --overwrite to replace it")
    data = load_calibration(calib, finetuned, calib_samples, calib_len)  # fail fast on bad data
    stages: list[Path] = []

    def stage() -> Path:
        stages.append(out.with_name(f".{out.name}.stage{len(stages)}-{os.getpid()}.delta.safetensors"))
        return stages[-1]

    try:
        first = _compress(base, finetuned, stage(), method=method, ratio=ratio, rules=rules, overwrite=True,
                          max_shard_bytes=max_shard_bytes, progress=progress)
        steps = []
        if "bitdelta" in first["by_codec"]:
            steps.append(("distill", lambda src, dst: distill_scales(
                base, finetuned, src, dst, data, steps=calib_steps, lr=calib_lr, loss=calib_loss, overwrite=True,
                progress=progress)))
        if {"svd-mixed", "ternary"} & set(first["by_codec"]):
            steps.append(("layerwise", lambda src, dst: calibrate_layerwise(
                base, finetuned, src, dst, data, act_order=gptq_act_order, whiten=gptq_whiten,
                allocation=gptq_allocation, overwrite=True, progress=progress)))
        if not steps:
            raise SettingsError(f"--calib: no tensor uses a codec that calibrates (bitdelta, svd-mixed, ternary); "
                                f"this file has {', '.join(sorted(first['by_codec']))}")
        reports, src = {}, stages[0]
        for i, (name, run) in enumerate(steps):
            dst = out if i == len(steps) - 1 else stage()
            reports[name] = run(src, dst)
            src = dst
    finally:
        for p in stages:
            _remove_delta(p)
    with load_delta(out) as df:
        return {**summarize(df), "calibration": reports}


def _remove_delta(path: Path) -> None:
    """Remove a delta file (all shards and the index too, if it was sharded)."""
    from .delta_file import index_path

    idx = index_path(path)
    if idx.is_file():
        try:
            for shard in set(json.loads(idx.read_text())["weight_map"].values()):
                (path.parent / shard).unlink(missing_ok=True)
        except (ValueError, KeyError):
            pass
        idx.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


def _compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
              method: str, ratio: float | None, rules, overwrite: bool, max_shard_bytes: int,
              progress: bool) -> dict[str, Any]:
    plan = Plan(method, list(rules), ratio)
    writer = DeltaWriter(out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    try:
        with open_checkpoint(base) as bck, open_checkpoint(finetuned) as fck:
            pairs = pair_checkpoints(bck, fck)
            base_hashes: dict[str, str] = {}
            shared_settings = _global_prepass(bck, fck, pairs, plan, progress)
            for p in progress_bar(pairs, desc="compress", unit="tensor", enable=progress):
                ft = fck.get(p.name)
                info = ParamInfo(p.name, None, tuple(ft.shape), dtype_name(ft.dtype))
                if p.kind == "tied":
                    info.tied_to = p.tied_to
                    writer.add(info, None)
                    continue
                if p.kind == "new":
                    info.codec, info.has_base = CodecName.RAW.value, False
                    enc = Encoded(info.codec, info.shape, {"values": ft}, {"dtype": info.dtype})
                    info.settings = enc.params
                    writer.add(info, enc)
                    continue
                b = bck.get(p.name)
                base_hashes[p.name] = base_digest(b)
                shared, delta = _delta(ft, b, p)
                is_zero = not bool(torch.count_nonzero(delta))
                a = plan.assign(p.name, tuple(delta.shape), ft.element_size(), is_zero)
                a.settings = {**a.settings, **shared_settings.get(_group_key(a), {})}
                a.settings = _raw_exact(a.codec, a.settings, a.given, delta, b.reshape(delta.shape),
                                        shared.reshape(delta.shape))
                enc = get_codec(a.codec).encode(delta, **a.settings)
                if ft.dim() == 0:  # scalars are stored as shape (1,) and restored
                    enc.shape = (1,)
                info.codec, info.settings, info.base_rows = a.codec, enc.params, p.base_rows
                if ft.dim() == 0:
                    info.shape = ()
                writer.add(info, enc, new_rows=ft[p.base_rows:] if p.base_rows is not None else None)
            metadata = {
                "base": {"fingerprint": fingerprint_all(base_hashes), "tensors": base_hashes,
                         "dtypes": {n: dtype_name(bck.dtype(n)) for n in base_hashes}},
                "files": {k: file_to_json(v) for k, v in fck.extra_files().items()},
                "source": {**plan.describe(), "base": str(base), "finetuned": str(finetuned),
                           "finetuned_bytes": fck.nbytes()},
            }
        writer.finish(metadata)
    except BaseException:
        writer.abort()
        raise
    with load_delta(out) as df:
        return summarize(df)


# -- reading back -----------------------------------------------------------------------------------
def summarize(df: DeltaFile, stats: bool = True) -> dict[str, Any]:
    """Sizes per tensor and per codec, as counted from the file (``stats``: codec-specific figures such
    as ternary's bits per nonzero vs the entropy bound, which reads the tensors)."""
    tensors, by_codec = [], {}
    ft_bytes_total = 0
    for name, info in df.params.items():
        numel = 1
        for s in info.shape:
            numel *= s
        itemsize = DTYPES[info.dtype].itemsize
        ft_bytes = 0 if info.tied_to else numel * itemsize
        ft_bytes_total += ft_bytes
        codec = info.codec or f"tied:{info.tied_to}"
        row = {"name": name, "codec": codec, "shape": list(info.shape), "dtype": info.dtype,
               "nbytes": info.nbytes, "finetuned_bytes": ft_bytes, "settings": info.settings,
               "bits_per_param": (8 * info.nbytes / numel) if numel and not info.tied_to else 0.0}
        tensors.append(row)
        c = by_codec.setdefault(info.codec or "tied", {"tensors": 0, "params": 0, "nbytes": 0, "finetuned_bytes": 0})
        c["tensors"] += 1
        c["params"] += 0 if info.tied_to else numel
        c["nbytes"] += info.nbytes
        c["finetuned_bytes"] += ft_bytes
        if stats and info.codec and hasattr(get_codec(info.codec), "stats"):
            st = get_codec(info.codec).stats(df.encoded(name))
            row["stats"] = st
            c["kept"] = c.get("kept", 0) + int(st.get("kept", 0))
            c["bound_bits"] = c.get("bound_bits", 0.0) + st["bound_bits_per_param"] * numel
    for c in by_codec.values():
        c["bits_per_param"] = 8 * c["nbytes"] / c["params"] if c["params"] else 0.0
        if "bound_bits" in c:  # entropy bound of positions + one sign bit per kept entry
            c["bound_bits_per_param"] = c.pop("bound_bits") / c["params"] if c["params"] else 0.0
            c["bits_per_nonzero"] = 8 * c["nbytes"] / c["kept"] if c["kept"] else None
    compressed = [c for k, c in by_codec.items() if k not in ("raw", "zero", "tied")]
    comp_nbytes = sum(c["nbytes"] for c in compressed)
    comp_ft = sum(c["finetuned_bytes"] for c in compressed)
    file_bytes = df.nbytes
    ft_file_bytes = df.source.get("finetuned_bytes") or ft_bytes_total
    return {
        "path": str(df.path), "format": df.metadata.get("format"),
        "deltacomp_version": df.metadata.get("deltacomp_version"),
        "file_bytes": file_bytes, "finetuned_bytes": ft_file_bytes,
        "ratio": ft_file_bytes / file_bytes if file_bytes else float("inf"),
        "compressed_tensors": {"finetuned_bytes": comp_ft, "nbytes": comp_nbytes,
                               "ratio": comp_ft / comp_nbytes if comp_nbytes else None,
                               "bits_per_param": 8 * comp_nbytes / sum(c["params"] for c in compressed)
                               if compressed and any(c["params"] for c in compressed) else None},
        "by_codec": by_codec, "tensors": tensors, "base_fingerprint": df.base_fingerprint,
        "source": df.source, "files": sorted(df.files),
    }


class _BaseChecker:
    """Compares base tensors with the fingerprint recorded in the delta file."""

    def __init__(self, df: DeltaFile, force: bool):
        self.df, self.force, self.warned = df, force, False

    def check(self, name: str, tensor: Tensor, where: str) -> None:
        want = self.df.base_tensors.get(name)
        if want is None:
            return
        dt = self.df.metadata.get("base", {}).get("dtypes", {}).get(name)
        if dt in DTYPES and tensor.dtype != DTYPES[dt]:
            tensor = tensor.to(DTYPES[dt])
        if base_digest(tensor) == want:
            return
        msg = (f"{where}: tensor {name} differs from the base {self.df.path} was made against "
               "(fingerprint mismatch); pass --force to apply it anyway")
        if not self.force:
            raise BaseMismatchError(msg)
        if not self.warned:
            warnings.warn(msg.replace("; pass --force to apply it anyway", "; applying anyway (--force)"))
            self.warned = True


def _check_base_names(df: DeltaFile, bck: Checkpoint) -> None:
    for name, info in df.params.items():
        if info.tied_to is not None or not info.has_base:
            continue
        if name not in bck:
            raise BaseMismatchError(f"{bck.path}: has no tensor {name}, which {df.path} needs — wrong base?")
        want = info.encoded_shape
        if tuple(bck.shape(name)) != tuple(want) and not (want == (1,) and bck.shape(name) == ()):
            raise BaseMismatchError(f"{bck.path}: {name} has shape {list(bck.shape(name))}, "
                                    f"{df.path} expects {list(want)} — wrong base?")


def iter_reconstructed(base: str | os.PathLike | Checkpoint, delta: str | os.PathLike | DeltaFile, *,
                       force: bool = False, progress: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, fine-tune tensor) one at a time: base + decoded delta, in the fine-tune's dtype."""
    bck = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    df = delta if isinstance(delta, DeltaFile) else load_delta(delta)
    checker = _BaseChecker(df, force)
    _check_base_names(df, bck)
    for name in progress_bar(list(df.params), desc="reconstruct", unit="tensor", enable=progress):
        info = df.params[name]
        src = info.tied_to or name
        src_info = df.params[src]
        b = None
        if src_info.has_base:
            b = bck.get(src)
            checker.check(src, b, str(bck.path))
            b = b.reshape(src_info.encoded_shape) if b.dim() == 0 else b
        out = df.apply(src, b)
        yield name, out.reshape(info.shape)


def reconstruct(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
                overwrite: bool = False, force: bool = False, max_shard_bytes: int = 5 * 1024**3,
                progress: bool = True) -> Path:
    """Write the fine-tune as a Hugging Face model folder at ``out`` (atomic: built aside, then renamed)."""
    df = load_delta(delta)
    bck = open_checkpoint(base)
    out_dir, tmp = prepare_output_dir(out, overwrite=overwrite)
    try:
        with ShardedWriter(tmp, max_shard_bytes) as writer:
            for name, tensor in iter_reconstructed(bck, df, force=force, progress=progress):
                writer.add(name, tensor)
        for fname, data in df.files.items():
            if "/" in fname or "\\" in fname or fname.startswith("."):
                continue  # never write outside the folder, whatever the file says
            (tmp / fname).write_bytes(data)
        commit_output_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bck.close()
        df.close()
    return out_dir


def apply_delta_(model: torch.nn.Module, delta: str | os.PathLike | DeltaFile, *, force: bool = False,
                 names: Iterable[str] | None = None, progress: bool = False) -> torch.nn.Module:
    """Turn ``model`` (loaded from the base) into the fine-tune, in place, parameter by parameter
    (only the parameters in ``names`` when given)."""
    df = delta if isinstance(delta, DeltaFile) else load_delta(delta)
    checker = _BaseChecker(df, force)
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    todo = list(df.params) if names is None else [n for n in df.params if n in set(names)]
    for name in progress_bar(todo, desc="apply", unit="tensor", enable=progress):
        info = df.params[name]
        if info.tied_to is not None:
            if name in state and state[name] is not state.get(info.tied_to):
                if state[name].data_ptr() != state[info.tied_to].data_ptr():
                    raise CheckpointError(f"{name}: the fine-tune ties it to {info.tied_to}, the model does not")
            continue
        if name not in state:
            raise CheckpointError(f"{name}: in the delta {df.path} but not a parameter of the model")
        p = state[name]
        if (info.base_rows is not None and tuple(p.shape) == info.encoded_shape
                and hasattr(model, "resize_token_embeddings")):
            # the fine-tune added tokens: grow the model's vocabulary first (tied heads follow)
            model.resize_token_embeddings(info.shape[0])
            state = dict(model.named_parameters(remove_duplicate=False))
            state.update(dict(model.named_buffers(remove_duplicate=False)))
            p = state[name]
        if tuple(p.shape) != tuple(info.shape):
            raise CheckpointError(f"{name}: model has shape {list(p.shape)}, the fine-tune {list(info.shape)}"
                                  + (" (added tokens: call model.resize_token_embeddings first)" if info.base_rows else ""))
        with torch.no_grad():
            b = p.detach().cpu()
            if info.base_rows is not None:
                b = b[: info.base_rows]
            if info.has_base:
                checker.check(name, b, type(model).__name__)
            new = df.apply(name, b.reshape(info.encoded_shape) if info.has_base else None).reshape(p.shape)
            p.copy_(new.to(p.dtype))
    return model
