"""The public Python API: compress, reconstruct, load, apply. The CLI is a thin layer over this."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import torch
from torch import Tensor

from .basecheck import BaseChecker, check_base_names
from .checkpoint import Checkpoint, ShardedWriter, open_checkpoint
from .codecs import get_codec
from .delta import Delta, load_delta
from .delta_file import (DEFAULT_MAX_SHARD_BYTES, DeltaWriter, ParamInfo, base_digest, file_to_json,
                         fingerprint_all, index_path)
from .devices import resolve_device
from .dtypes import DTYPES, dtype_name
from .errors import CheckpointError, OutputExistsError, SettingsError
from .modelnames import checkpoint_aliases, not_in_model
from .pairing import PairKind, Pairing, check_pair, pair_checkpoints
from .plan import DEFAULT_METHOD, WHOLE, Plan
from .progress import progress_bar
from .rowblocks import add_streamed, finite_or_refuse, write_streamed
from .rowblocks import count_nonfinite as _nonfinite
from .storage import as_path, check_shard_size, output_dir, refuse_inputs
from .summary import summarize

if TYPE_CHECKING:
    from .calibrate.options import CalibrationOptions

_CPU = torch.device("cpu")
_WIDENED_IN_SUB = (torch.bfloat16, torch.float16, torch.float32)

__all__ = ["compress", "reconstruct", "load_delta", "apply_delta_", "iter_reconstructed", "summarize"]


# -- compress ---------------------------------------------------------------------------------------
def _delta(ft: Tensor, b: Tensor, p: Pairing, b32: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """(the fine-tune's rows shared with the base, their float32 delta; scalars as shape (1,)); ``b32``:
    ``b`` in float32 already, when the caller has it."""
    shared = ft[: p.base_rows] if p.base_rows is not None else ft
    # bf16/fp16 minus float32 is computed in float32, element by element: the same values as widening
    # first, without a float32 copy of the fine-tune tensor
    left = shared if shared.dtype in _WIDENED_IN_SUB else shared.to(torch.float32)
    delta = left - (b32 if b32 is not None else b.to(torch.float32))
    return shared, (delta.reshape(1) if delta.dim() == 0 else delta)


def _group_key(a) -> str:
    return a.codec + json.dumps(a.settings, sort_keys=True, default=str)


def _global_prepass(bck: Checkpoint, fck: Checkpoint, pairs: list[Pairing], plan: Plan,
                    progress: bool) -> dict[str, dict]:
    """Statistics some codecs need over all their tensors (ComPEFT's global threshold), streamed."""
    groups: dict[str, tuple[Any, dict, list[Pairing]]] = {}
    for p in pairs:
        if p.kind != PairKind.DELTA:
            continue
        shape = tuple(bck.shape(p.name)) or (1,)
        if plan.auto and p.name not in plan.choices and plan.auto_target(p.name, shape, is_zero=False):
            continue  # --method auto left it out of the allocation: unchanged, stored as zero
        a = plan.assign(p.name, shape, fck.dtype(p.name).itemsize, is_zero=False)
        codec = get_codec(a.codec)
        if codec.needs_global(a.settings):
            groups.setdefault(_group_key(a), (codec, a.settings, []))[2].append(p)
    out = {}
    for key, (codec, settings, members) in groups.items():
        def deltas(members=members):
            for p in progress_bar(members, desc=f"{codec.name} pre-pass", unit="tensor", enable=progress):
                d = _delta(fck.get(p.name), bck.get(p.name), p)[1]
                # unchanged tensors cost nothing, outside the group; non-finite ones are refused or
                # stored whole later, and must not turn the group's statistic into NaN
                if torch.count_nonzero(d) and bool(torch.isfinite(d).all()):
                    yield d
        out[key] = codec.global_settings(deltas, settings)
    return out


def _auto_weights(base, finetuned, plan: Plan, data, calibration: "CalibrationOptions", scratch: Path,
                  progress: bool) -> dict[str, Any]:
    """--method auto --calib: what auto weighs each candidate's error with, for every linear it decides:
    with ``calibration.sensitivity`` "sequence", each calibration window's weight gradient (a scratch file
    under ``scratch``, closed by the caller: calibrate/seqfisher.py); else the input Gram H and, unless
    "none", the output Fisher diagonal f (calibrate/sensitivity.py); with a description for the file's
    ``source.auto.sensitivity``."""
    from .calibrate.layerwise import input_grams
    from .calibrate.sensitivity import describe, output_sensitivities

    with open_checkpoint(base) as bck, open_checkpoint(finetuned) as fck:
        names = {p.name for p in pair_checkpoints(bck, fck)
                 if p.kind == PairKind.DELTA and plan.auto_target(p.name, tuple(bck.shape(p.name)), False)}
    dev = resolve_device(calibration.device)
    if calibration.sensitivity == "sequence":
        from .calibrate.seqfisher import ESTIMATE, sequence_fisher

        store = sequence_fisher(finetuned, data, names, scratch, device=dev, progress=progress)
        return {"grams": None, "fishers": store, "store": store,
                "sensitivity": {"estimate": ESTIMATE, "fisher": "true Fisher (labels sampled from the fine-tune)",
                                "labels": "sampled", "windows": store.windows, "data": data.describe()}}
    if calibration.sensitivity == "none":
        return {"grams": input_grams(finetuned, data, names, device=dev), "fishers": None,
                "sensitivity": {"estimate": "none (each layer's output error counts the same)"}}
    grams, fishers = output_sensitivities(finetuned, data, names, labels=calibration.sensitivity, device=dev)
    return {"grams": grams, "fishers": fishers, "sensitivity": describe(calibration.sensitivity, data)}


def _auto_allocate(bck: Checkpoint, fck: Checkpoint, pairs: list[Pairing], plan: Plan, device: torch.device,
                   progress: bool, weights: dict[str, Any] | None = None) -> None:
    """--method auto: the first pass (auto.py) over the tensors the plan leaves to it, streamed; fills
    ``plan.choices`` and ``plan.auto_report``. Non-finite pairs are left to ``_add_tensor`` (refused or
    stored whole), unchanged ones to the zero codec."""
    from .auto import choose
    from .plan import Assignment

    targets = [p for p in pairs
               if p.kind == PairKind.DELTA and plan.auto_target(p.name, tuple(bck.shape(p.name)), False)]

    def items():
        for p in targets:
            ft, b = fck.get(p.name), bck.get(p.name)
            if _nonfinite(ft) or _nonfinite(b):
                continue
            delta = _delta(ft, b, p)[1]
            if torch.count_nonzero(delta):
                yield p.name, delta, plan.budget_hint(tuple(delta.shape), ft.element_size())

    w = weights or {}
    chosen, plan.auto_report = choose(items(), device, progress, w.get("grams"), w.get("fishers"),
                                      codecs=plan.codecs_for_auto(data_free=not w), total=len(targets))
    if "sensitivity" in w:
        plan.auto_report["sensitivity"] = w["sensitivity"]
    plan.choices = {n: Assignment(c.codec, dict(c.settings), "auto", dict(c.settings)) for n, c in chosen.items()}


def compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
             method: str = DEFAULT_METHOD, ratio: float | None = None, rules: list[str] | tuple = (),
             overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
             calibration: "CalibrationOptions | None" = None, progress: bool = True,
             device: str | torch.device | None = "auto", allow_nonfinite: bool = False,
             allow_mismatch: bool = False, bits: float | None = None) -> dict[str, Any]:
    """Compress ``finetuned`` as a delta over ``base`` into ``out``; returns the summary of the file.

    ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``; see devices.py) is where the codecs' math runs,
    one tensor at a time; calibration runs where ``calibration.device`` says.

    ``calibration`` (``deltacomp.calibrate.CalibrationOptions``) turns on the codecs' use of data: each
    codec's calibrator runs in its stage (end-to-end distillation, then the layerwise pass; see
    codecs/calibrator.py). The data-free file is made under a temporary
    name first, so a failure never leaves a file at ``out``.

    A NaN or Inf in a base or fine-tune tensor is refused (NonFiniteError) unless ``allow_nonfinite``,
    which stores such a tensor whole (exact, uncompressed). A pair that does not look like a base and
    its fine-tune is refused (pairing.check_pair) unless ``allow_mismatch``.

    ``method="auto"`` chooses a codec and settings per linear tensor under one budget: ``ratio`` or
    ``bits`` (per parameter of those tensors); see auto.py."""
    checks = {"allow_nonfinite": allow_nonfinite, "allow_mismatch": allow_mismatch, "bits": bits}
    out = as_path(out, "the output delta file")
    rules = check_rules(rules)
    _refuse_inputs(out, base, finetuned)
    out = Path(out)
    for p in (out, index_path(out)):  # before any work (lexists: a dangling link is there too)
        if os.path.lexists(p) and not overwrite:
            raise OutputExistsError(f"{p}: {'exists' if p.exists() else 'is a link to nothing'}; pass --overwrite "
                                    "to replace it")
    if calibration is None:
        return _compress(base, finetuned, out, method=method, ratio=ratio, rules=rules, overwrite=overwrite,
                         max_shard_bytes=max_shard_bytes, progress=progress, device=device, **checks)
    from .calibrate.options import load_data, run_stages

    data = load_data(calibration, finetuned, progress)  # fail fast on bad data
    plan = Plan(method, list(rules), ratio, bits)
    stages: list[Path] = []
    weights: dict[str, Any] | None = None

    def stage() -> Path:
        stages.append(out.with_name(f".{out.name}.stage{len(stages)}-{os.getpid()}.delta.safetensors"))
        return stages[-1]

    try:
        if plan.auto:
            weights = _auto_weights(base, finetuned, plan, data, calibration, out.parent, progress)
        first = _compress(base, finetuned, stage(), method=method, ratio=ratio, rules=rules, overwrite=True,
                          max_shard_bytes=max_shard_bytes, progress=progress, device=device, weights=weights, **checks)
        if plan.auto and not index_path(stages[0]).exists() and not any(
                get_codec(c).calibrator() for c in first["by_codec"] if c != "tied"):
            os.replace(stages[0], out)  # auto chose no codec that calibrates: the allocation used the data
            with load_delta(out) as df:
                return {**summarize(df), "calibration": {}}
        reports = run_stages(base, finetuned, stages[0], out, first["by_codec"], calibration, data, stage,
                             progress)
    finally:
        if weights is not None and weights.get("store") is not None:
            weights["store"].close()
        for p in stages:
            _remove_delta(p)
    with load_delta(out) as df:
        return {**summarize(df), "calibration": reports}


def check_rules(rules: Any) -> list[str]:
    """``rules`` as a list (each rule is checked by Plan), or a SettingsError when it is not a list."""
    if isinstance(rules, (str, bytes)):
        raise SettingsError(f"rules must be a list of REGEX=METHOD strings, got the string {rules!r}")
    if not isinstance(rules, Iterable):
        raise SettingsError(f"rules must be a list of REGEX=METHOD strings, got {rules!r}"[:300])
    return list(rules)


def check_module(model: Any, where: str) -> None:
    """The model a delta is applied to or served on must be a torch module (one loaded from the base)."""
    if not isinstance(model, torch.nn.Module):
        raise SettingsError(f"{where}: model must be a torch.nn.Module loaded from the base, got {type(model).__name__}")


def model_files(*models: str | os.PathLike) -> list[Path]:
    """The files the checkpoints ``models`` are read from (an output must never be one of them)."""
    out: list[Path] = []
    for m in models:
        with open_checkpoint(m) as ck:
            out += ck.files()
    return out


def _refuse_inputs(out: str | os.PathLike, base: str | os.PathLike, finetuned: str | os.PathLike) -> None:
    """An existing output (or its sharded index) that is a file of the base or the fine-tune is refused."""
    names = [Path(out), index_path(Path(out))]
    if any(p.exists() for p in names):
        files = model_files(base, finetuned)
        for p in names:
            refuse_inputs(p, files)


def _remove_delta(path: Path) -> None:
    """Remove a delta file (all shards and the index too, if it was sharded)."""
    idx = index_path(path)
    if idx.is_file():
        try:
            for shard in set(json.loads(idx.read_text())["weight_map"].values()):
                (path.parent / shard).unlink(missing_ok=True)
        except (ValueError, KeyError):
            pass
        idx.unlink(missing_ok=True)
    path.unlink(missing_ok=True)


class BaseTensor:
    """One base tensor, read once, with what encoding a fine-tune's tensor asks of it computed once:
    its digest (the file's fingerprint), its count of NaN/Inf and its float32 copy. compress-many
    (many.py) shares one across every fine-tune."""

    def __init__(self, tensor: Tensor, path: str | os.PathLike):
        self.tensor, self.path = tensor, str(path)
        self._digest: str | None = None
        self._nonfinite: int | None = None
        self._f32: Tensor | None = None

    @property
    def digest(self) -> str:
        if self._digest is None:
            self._digest = base_digest(self.tensor)
        return self._digest

    @property
    def nonfinite(self) -> int:
        if self._nonfinite is None:
            self._nonfinite = _nonfinite(self.tensor)
        return self._nonfinite

    @property
    def float32(self) -> Tensor:
        if self._f32 is None:
            self._f32 = self.tensor.to(torch.float32)
        return self._f32

    def __getstate__(self) -> dict:  # shipped to other processes (Ray) without the float32 copy
        return {**self.__dict__, "_f32": None}


@dataclass
class EncodedParam:
    """One fine-tune tensor as the delta file stores it: what ``DeltaWriter.add`` takes, and the digest
    of the base tensor it applies to (None when it has no base)."""
    info: ParamInfo
    tensors: dict[str, Tensor] | None
    new_rows: Tensor | None = None
    base_hash: str | None = None


def _check_finite(p: Pairing, ft: Tensor, ft_path: str, base: BaseTensor, allow: bool) -> bool:
    """False (store whole) or NonFiniteError when the pair holds NaN/Inf (rowblocks.finite_or_refuse)."""
    return finite_or_refuse(p.name, [(ft_path, _nonfinite(ft), ft.numel()),
                                     (base.path, base.nonfinite, base.tensor.numel())], allow)


def encode_param(plan: Plan, p: Pairing, ft: Tensor, ft_path: str | os.PathLike, base: BaseTensor | None,
                 shared_settings: dict[str, dict], device: torch.device, allow_nonfinite: bool = False) -> EncodedParam:
    """Encode one fine-tune tensor as its plan says (on ``device`` when its codec runs there); ``base``
    is the base tensor of a ``DELTA`` pair (None otherwise). The per-tensor step of compress and
    compress-many, in this process or in a Ray task: it reads no file."""
    if dtype_name(ft.dtype) not in DTYPES:  # refused here, before a file the reader would refuse is made
        raise CheckpointError(f"{ft_path}: {p.name}: dtype {dtype_name(ft.dtype)} cannot be stored in a delta "
                              f"file (supported: {', '.join(DTYPES)}); convert the checkpoint first")
    info = ParamInfo(p.name, None, tuple(ft.shape), dtype_name(ft.dtype))
    if p.kind == PairKind.TIED:
        info.tied_to = p.tied_to
        return EncodedParam(info, None)
    if p.kind == PairKind.DELTA and not _check_finite(p, ft, str(ft_path), base, allow_nonfinite):
        p = Pairing(p.name, PairKind.NEW)
    if p.kind == PairKind.NEW:
        enc = get_codec(WHOLE).whole(ft)
        info.codec, info.has_base, info.settings = enc.codec, False, enc.params
        return EncodedParam(info, enc.tensors)
    b = base.tensor
    shared, delta = _delta(ft, b, p, base.float32)
    is_zero = not bool(torch.count_nonzero(delta))
    a = plan.assign(p.name, tuple(delta.shape), ft.element_size(), is_zero)
    codec = get_codec(a.codec)
    settings = {**a.settings, **shared_settings.get(_group_key(a), {})}
    settings = codec.encoded_settings(settings, a.given, delta, b.reshape(delta.shape), shared.reshape(delta.shape))
    dev = device if device.type in codec.encode_devices else _CPU
    enc = codec.encode(delta.to(dev), **settings)
    tensors = {k: v.cpu() for k, v in enc.tensors.items()}
    if ft.dim() == 0:  # scalars are stored as shape (1,) and restored
        enc.shape, info.shape = (1,), ()
    info.codec, info.settings, info.base_rows = a.codec, enc.params, p.base_rows
    return EncodedParam(info, tensors, ft[p.base_rows:] if p.base_rows is not None else None, base.digest)


def add_encoded(writer: DeltaWriter, e: EncodedParam, base_hashes: dict[str, str]) -> None:
    writer.add(e.info, e.tensors, new_rows=e.new_rows)
    if e.base_hash is not None:
        base_hashes[e.info.name] = e.base_hash


def read_base(bck: Checkpoint, p: Pairing) -> BaseTensor | None:
    """The base tensor a pair's encoding needs (``DELTA`` pairs only)."""
    return BaseTensor(bck.get(p.name), bck.path) if p.kind == PairKind.DELTA else None


def prepare_pairs(bck: Checkpoint, fck: Checkpoint, plan: Plan, device: torch.device, progress: bool,
                  allow_mismatch: bool, weights: dict[str, Any] | None = None) -> tuple[list[Pairing], dict]:
    """Pair, check, and run the whole-model passes the plan needs (auto's allocation, the codecs'
    global statistics): (pairs in the fine-tune's order, shared settings by group)."""
    pairs = pair_checkpoints(bck, fck)
    check_pair(bck, fck, pairs, allow_mismatch)
    if plan.auto:
        _auto_allocate(bck, fck, pairs, plan, device, progress, weights)
    return pairs, _global_prepass(bck, fck, pairs, plan, progress)


def file_metadata(base, finetuned, bck: Checkpoint, fck: Checkpoint, plan: Plan,
                  base_hashes: dict[str, str]) -> dict[str, Any]:
    """The delta file's metadata besides its params (DeltaWriter adds those)."""
    return {
        "base": {"fingerprint": fingerprint_all(base_hashes), "tensors": base_hashes,
                 "dtypes": {n: dtype_name(bck.dtype(n)) for n in base_hashes}},
        "files": {k: file_to_json(v) for k, v in fck.extra_files().items()},
        "source": {**plan.describe(), "base": str(base), "finetuned": str(finetuned),
                   "finetuned_bytes": fck.nbytes()},
    }


def _compress(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *,
              method: str, ratio: float | None, rules, overwrite: bool, max_shard_bytes: int,
              progress: bool, device: str | torch.device | None = "auto", allow_nonfinite: bool = False,
              allow_mismatch: bool = False, bits: float | None = None,
              weights: dict[str, Any] | None = None) -> dict[str, Any]:
    plan = Plan(method, list(rules), ratio, bits)
    device = resolve_device(device)
    writer = DeltaWriter(out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    try:
        with open_checkpoint(base) as bck, open_checkpoint(finetuned) as fck:
            pairs, shared_settings = prepare_pairs(bck, fck, plan, device, progress, allow_mismatch, weights)
            base_hashes: dict[str, str] = {}
            for p in progress_bar(pairs, desc="compress", unit="tensor", enable=progress):
                if add_streamed(writer, plan, bck, fck, p, base_hashes, shared_settings, _group_key, allow_nonfinite):
                    continue  # large, and its codec works on row blocks: done block by block (rowblocks.py)
                e = encode_param(plan, p, fck.get(p.name), fck.path, read_base(bck, p), shared_settings, device,
                                 allow_nonfinite)
                add_encoded(writer, e, base_hashes)
            metadata = file_metadata(base, finetuned, bck, fck, plan, base_hashes)
        writer.finish(metadata)
    except BaseException:
        writer.abort()
        raise
    with load_delta(out) as df:
        return summarize(df)


def iter_reconstructed(base: str | os.PathLike | Checkpoint, delta: str | os.PathLike | Delta, *,
                       force: bool = False, progress: bool = False) -> Iterator[tuple[str, Tensor]]:
    """Yield (name, fine-tune tensor) one at a time: base + decoded delta, in the fine-tune's dtype."""
    bck = base if isinstance(base, Checkpoint) else open_checkpoint(base)
    df = load_delta(delta)
    checker = BaseChecker(df, force)
    check_base_names(df, bck)
    for name in progress_bar(list(df.params), desc="reconstruct", unit="tensor", enable=progress):
        yield name, _reconstructed(bck, df, checker, name)


def _reconstructed(bck: Checkpoint, df: Delta, checker: BaseChecker, name: str) -> Tensor:
    info = df.params[name]
    src = info.tied_to or name
    src_info = df.params[src]
    b = None
    if src_info.has_base:
        b = bck.get(src)
        checker.check(src, b, str(bck.path))
        b = b.reshape(src_info.encoded_shape) if b.dim() == 0 else b
    return df.apply(src, b).reshape(info.shape)


def reconstruct(base: str | os.PathLike, delta: str | os.PathLike, out: str | os.PathLike, *,
                overwrite: bool = False, force: bool = False, max_shard_bytes: int = 5 * 1024**3,
                progress: bool = True) -> Path:
    """Write the fine-tune as a Hugging Face model folder at ``out`` (atomic: built aside, then renamed)."""
    out = as_path(out, "the output folder")
    check_shard_size(max_shard_bytes)
    with load_delta(delta) as df, open_checkpoint(base) as bck:
        refuse_inputs(out, bck.files() + df.files_on_disk, folder=True)
        _reconstruct(bck, df, out, overwrite, force, max_shard_bytes, progress)
    return Path(out)


def _reconstruct(bck: Checkpoint, df: Delta, out: str | os.PathLike, overwrite: bool, force: bool,
                 max_shard_bytes: int, progress: bool) -> None:
    with output_dir(out, overwrite=overwrite) as tmp:
        checker = BaseChecker(df, force)
        check_base_names(df, bck)
        with ShardedWriter(tmp, max_shard_bytes) as writer:
            for name in progress_bar(list(df.params), desc="reconstruct", unit="tensor", enable=progress):
                if not write_streamed(writer, bck, df, checker, name):  # large: block by block
                    writer.add(name, _reconstructed(bck, df, checker, name))
        open_checkpoint(tmp).close()  # readable before it gets the output's name
        for fname, data in df.files.items():
            if "/" in fname or "\\" in fname or fname.startswith("."):
                continue  # never write outside the folder, whatever the file says
            (tmp / fname).write_bytes(data)


def apply_delta_(model: torch.nn.Module, delta: str | os.PathLike | Delta, *, force: bool = False,
                 names: Iterable[str] | None = None, progress: bool = False) -> torch.nn.Module:
    """Turn ``model`` (loaded from the base) into the fine-tune, in place, parameter by parameter
    (only the parameters in ``names`` when given)."""
    check_module(model, "apply_delta_")
    df = load_delta(delta)
    checker = BaseChecker(df, force)
    state = _model_state(model, df)
    todo = list(df.params) if names is None else [n for n in df.params if n in set(names)]
    for name in progress_bar(todo, desc="apply", unit="tensor", enable=progress):
        info = df.params[name]
        if info.tied_to is not None:
            if name in state and state[name] is not state.get(info.tied_to):
                if state[name].data_ptr() != state[info.tied_to].data_ptr():
                    raise CheckpointError(f"{name}: the fine-tune ties it to {info.tied_to}, the model does not")
            continue
        if name not in state:
            raise not_in_model(model, df.path, name)
        p = state[name]
        if (info.base_rows is not None and tuple(p.shape) == info.encoded_shape
                and hasattr(model, "resize_token_embeddings")):
            # the fine-tune added tokens: grow the model's vocabulary first (tied heads follow)
            model.resize_token_embeddings(info.shape[0])
            state = _model_state(model, df)
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


def _model_state(model: torch.nn.Module, df: Delta) -> dict[str, Tensor]:
    """The model's parameters and buffers by name, plus each delta tensor transformers renamed on load
    under the delta's (the checkpoint's) name."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(dict(model.named_buffers(remove_duplicate=False)))
    state.update({c: state[m] for c, m in checkpoint_aliases(model, df.params).items()})
    return state
