"""End-to-end training of a delta file's scales on the logits: BitDelta's scale distillation (the
``distill`` stage) and the final ``tune`` stage (codecs/calibrator.py) share this driver. The codes
(signs, quantization levels, supports) stay as they are; only what each codec's student exposes trains.

Reference: Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (2024), section 3.2 (MSE on
logits, AdamW lr 1e-4, 200 steps x batch 4 of 128 tokens). Two deliberate differences from their code:
every parameter other than the scales is frozen explicitly, and the loss never counts padded positions
(our windows are full length; ``mask`` is honoured if a caller pads).

Memory: the two models are never held together. The fine-tune is loaded, its logits on every
calibration sample are cached as fp16 (in memory, or in a temporary file above ``cache_limit_bytes``),
it is freed, and only then the base is loaded and turned into the student: every linear layer whose
codec's calibrator runs in the ``distill`` stage is replaced by that calibrator's student module
(codecs/calibrator.py), whose trainable parameters are the only ones trained.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..basecheck import BaseChecker
from ..codecs import Encoded, get_codec
from ..delta import Delta, load_delta
from ..delta_file import DEFAULT_MAX_SHARD_BYTES, NEW_ROWS, DeltaWriter
from ..errors import CheckpointError, ModelLayoutError, SettingsError
from ..modelnames import checkpoint_aliases, converted_on_load, not_in_model
from ..memory import training_heap
from ..modelcheck import check_folder
from ..progress import progress_bar
from .data import CalibData

LOSSES = ("mse", "kl")
# BitDelta trains 200 steps; here one step of 4 x 128 tokens on SmolLM2-135M (fp32, 2 busy CPU cores) took
# 34 s, and 20 steps already cut held-out KL(fine-tune || compressed) 7x on the bundled pair: 20 by default.
DEFAULT_STEPS = 20
DEFAULT_LR = 1e-4
DEFAULT_BATCH = 4
# The tune stage trains dimensionless offsets (the tuning codecs' students), with KL as loss. On the bundled
# pair (docs/quality.md: the default method @16x after its layerwise pass, 32 windows of 128 tokens) 40 steps took
# held-out KL from 0.00169 to 0.00102 at lr 1e-3, 0.00062 at 5e-3 and 0.00065 at 1e-2.
DEFAULT_TUNE_STEPS = 40
DEFAULT_TUNE_LR = 5e-3


# -- teacher cache ----------------------------------------------------------------------------------
class _LogitCache:
    """fp16 teacher logits (n, L, V): a tensor in memory, or a memory-mapped temporary file."""

    def __init__(self, shape: tuple[int, int, int], limit_bytes: int):
        nbytes = math.prod(shape) * 2
        self._tmp = None
        if nbytes > limit_bytes:
            self._tmp = tempfile.NamedTemporaryFile(prefix="deltacomp-teacher-", suffix=".f16")
            mm = np.memmap(self._tmp.name, dtype=np.float16, mode="w+", shape=shape)
            self.data = torch.from_numpy(mm)
        else:
            self.data = torch.empty(shape, dtype=torch.float16)
        self.on_disk = self._tmp is not None

    def close(self) -> None:
        self.data = None
        if self._tmp is not None:
            self._tmp.close()


# -- model loading ----------------------------------------------------------------------------------
def _load_model(path: str | os.PathLike, config_json: bytes | None, dtype: torch.dtype) -> nn.Module:
    """A causal LM from a model folder, or from a single .safetensors file plus a config."""
    import transformers

    p = Path(path)
    if p.is_dir() and (p / "config.json").is_file():
        check_folder(p)  # config.json against the weights, before transformers allocates what it describes
        model = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=dtype)
    else:
        if config_json is None:
            raise CheckpointError(f"{p}: calibration runs the model and needs its config.json; give a model folder")
        from safetensors.torch import load_file

        cfg_dict = json.loads(config_json)
        cfg = transformers.AutoConfig.for_model(**cfg_dict)
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        state = load_file(str(p))
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        missing = [m for m in missing if not m.endswith("lm_head.weight")]  # tied heads are not stored
        if missing or unexpected:
            raise CheckpointError(f"{p}: does not match its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        model.tie_weights()
    return model.eval()


@torch.no_grad()
def teacher_logits(model: nn.Module, ids: Tensor, batch_size: int, limit_bytes: int, progress: bool) -> _LogitCache:
    n, length = ids.shape
    cache = None
    for start in progress_bar(range(0, n, batch_size), desc="teacher", unit="batch", enable=progress):
        logits = model(input_ids=ids[start:start + batch_size]).logits
        if cache is None:
            cache = _LogitCache((n, length, logits.shape[-1]), limit_bytes)
        cache.data[start:start + batch_size] = logits.to(torch.float16)
    return cache


# -- the student ------------------------------------------------------------------------------------
STAGES = ("distill", "tune")


def _trains_in(cal, stage: str) -> bool:
    """Whether a calibrator's student trains in ``stage``: its own distill stage, or the final tune."""
    return cal is not None and (cal.stage == "distill" if stage == "distill" else cal.tunes)


def _distilled(df: Delta, name: str, stage: str = "distill"):
    """The calibrator of ``name``'s codec when its student trains in ``stage``, else None."""
    cal = get_codec(df.params[name].codec).calibrator()
    return cal if _trains_in(cal, stage) else None


def _trained(cal, stage: str, student: nn.Module, enc: Encoded) -> Encoded:
    """The new encoding a trained student stands for (the calibrator's ``tune_encoded`` in the tune stage)."""
    return cal.tune_encoded(student, enc) if stage == "tune" else cal.encoded(student, enc)


def build_student(model: nn.Module, df: Delta, stage: str = "distill") -> list[str]:
    """Turn ``model`` (loaded from the base) into the student, in place; return the trained names.

    2-D weights of nn.Linear modules whose codec's student trains in ``stage`` become that student
    module; every other delta is added to its parameter once and stays fixed. Every original parameter is
    frozen."""
    model.requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    alias = checkpoint_aliases(model, df.params)  # checkpoint name -> the loaded model's, where renamed
    params.update({c: params[m] for c, m in alias.items() if m in params})
    checker = BaseChecker(df)
    distilled: list[str] = []
    for name, info in df.params.items():
        if info.tied_to is not None:
            continue
        if name not in params:
            err = not_in_model(model, df.path, name)
            if isinstance(err, ModelLayoutError):
                raise SettingsError(_merged_message(stage, name, model))
            raise CheckpointError(f"calibration: {err}")
        p = params[name]
        if info.base_rows is not None or tuple(p.shape) != tuple(info.shape):
            raise SettingsError(f"calibration: {name} has shape {list(p.shape)} in the base model but "
                                f"{list(info.shape)} in the fine-tune (added tokens are not supported by calibration)")
        mname = alias.get(name, name)
        mod_name = mname.rsplit(".", 1)[0] if mname.endswith(".weight") else None
        module = modules.get(mod_name) if mod_name else None
        if info.has_base:
            checker.check(name, p, "calibration", hint=" — wrong base?")
        cal = _distilled(df, name, stage)
        if cal is not None and len(info.shape) == 2 and isinstance(module, nn.Linear):
            make = cal.tune_student if stage == "tune" else cal.student
            swap_in(model, modules, mod_name, make(module, df.encoded(name)))
            distilled.append(name)
            continue
        apply_stored(df, name, p, p.detach() if info.has_base else None)
    return distilled


def swap_in(root: nn.Module, modules: dict[str, nn.Module], mod_name: str, student: nn.Module) -> tuple:
    """Put ``student`` where the linear ``mod_name`` of ``root`` stood; returns (parent, attribute, the linear)
    to put it back."""
    parent_name, _, child = mod_name.rpartition(".")
    parent = modules[parent_name] if parent_name else root
    setattr(parent, child, student)
    return parent, child, modules[mod_name]


@torch.no_grad()
def apply_stored(df: Delta, name: str, p: Tensor, base: Tensor | None) -> None:
    """Set the fixed (not trained) parameter ``p`` to ``base`` + the file's stored delta of ``name``."""
    info = df.params[name]
    new = df.apply(name, base.cpu().reshape(info.encoded_shape) if base is not None else None)
    p.copy_(new.reshape(p.shape).to(p.device, p.dtype))


def _merged_message(stage: str, name: str, model: nn.Module) -> str:
    return (f"calibration ({stage}): {name}: {type(model).__name__} merges it with other tensors once loaded "
            "(transformers converts this checkpoint's layout), so end-to-end calibration cannot run on this "
            "model; compress without --calib, or with --calib-tune-steps 0 where the codec calibrates layer by layer")


def check_end_to_end(finetuned: str | os.PathLike, delta: str | os.PathLike, stage: str) -> None:
    """Refuse, before any stage runs, a delta the ``stage`` (distill/tune) student cannot be built for: a
    tensor transformers merges into another on load (a mixture of experts' per-expert matrices). The model
    is built on ``meta`` from the config, so this costs no memory; anything else wrong is left to the stage."""
    import transformers
    from accelerate import init_empty_weights

    from .streamed import model_config

    with load_delta(delta) as df:
        try:
            cfg = model_config(Path(finetuned), df.files.get("config.json"))
            with init_empty_weights(include_buffers=False):
                model = transformers.AutoModelForCausalLM.from_config(cfg)
        except Exception:  # noqa: BLE001 - the stage itself reports an unreadable config or model
            return
        have = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        have |= set(checkpoint_aliases(model, df.params))
        for name, info in df.params.items():
            if info.tied_to is None and name not in have and converted_on_load(model, name):
                raise SettingsError(_merged_message(stage, name, model))


def _loss(student: Tensor, teacher: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """Mean over (unmasked) positions; MSE averages over the vocabulary too (as BitDelta does)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        per_pos = (s - t).pow(2).mean(-1)
    else:  # KL(teacher || student) per position
        lt, ls = F.log_softmax(t, -1), F.log_softmax(s, -1)
        per_pos = (lt.exp() * (lt - ls)).sum(-1)
    if mask is None:
        return per_pos.mean()
    m = mask.to(per_pos.dtype)
    return (per_pos * m).sum() / m.sum().clamp_min(1)


@torch.no_grad()
def _eval_loss(model: nn.Module, ids: Tensor, teacher: Tensor, batch_size: int, kind: str,
               rows: list[int] | None = None) -> float:
    """Mean loss over the windows ``rows`` (default: all) of ``ids`` against ``teacher`` logits."""
    rows = list(range(ids.shape[0])) if rows is None else rows
    total = 0.0
    for start in range(0, len(rows), batch_size):
        idx = torch.tensor(rows[start:start + batch_size])
        out = model(input_ids=ids[idx.to(ids.device)]).logits
        total += float(_loss(out, teacher[idx].to(out.device), kind)) * len(idx)
    return total / len(rows)


def held_out_split(n: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(training rows, check rows) of ``n`` windows for the tune stage: one in eight (at least one) held
    out from a seeded permutation when there are 8 or more, else every window in both."""
    if n < 8:
        return list(range(n)), list(range(n))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed) + 1)).tolist()
    k = max(1, n // 8)
    return sorted(perm[k:]), sorted(perm[:k])


def train_scales(model: nn.Module, ids: Tensor, teacher: Tensor, *, steps: int, lr: float, batch_size: int,
                 loss: str = "mse", seed: int = 0, progress: bool = False, rows: list[int] | None = None,
                 desc: str = "distill") -> list[float]:
    """AdamW on the trainable parameters of ``model`` (the scales) to match ``teacher`` logits (n, L, V).

    Batches are drawn without replacement from a seeded permutation of ``rows`` (default: every window),
    reshuffled each epoch."""
    pool = torch.tensor(list(range(ids.shape[0])) if rows is None else rows, dtype=torch.int64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    device = ids.device
    order: list[int] = []
    history: list[float] = []
    for _ in progress_bar(range(steps), desc=desc, unit="step", enable=progress):
        if len(order) < batch_size:
            order += pool[torch.randperm(len(pool), generator=g)].tolist()
        pick, order = sorted(order[:batch_size]), order[batch_size:]
        idx = torch.tensor(pick)
        out = model(input_ids=ids[idx.to(device)]).logits
        step_loss = _loss(out, teacher[idx].to(device), loss)
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
        history.append(float(step_loss.detach()))
    return history


# -- the whole run ----------------------------------------------------------------------------------
def distill_scales(base: str | os.PathLike, finetuned: str | os.PathLike, delta_in: str | os.PathLike,
                   delta_out: str | os.PathLike, calib: CalibData | Tensor, *, steps: int = DEFAULT_STEPS,
                   lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, loss: str = "mse", device: str = "cpu",
                   seed: int = 0, overwrite: bool = False, cache_limit_bytes: int = 2 * 1024**3,
                   progress: bool = True, stage: str = "distill") -> dict[str, Any]:
    """Train the trainable parameters (e.g. scales) of the tensors of ``delta_in`` whose codec's student
    trains in ``stage`` (``distill`` or ``tune``) on ``calib`` and write ``delta_out``; return a report."""
    if stage not in STAGES:
        raise SettingsError(f"calibration: stage {stage!r} must be one of {', '.join(STAGES)}")
    if loss not in LOSSES:
        raise SettingsError(f"calibration: loss {loss!r} must be one of {', '.join(LOSSES)}")
    if not isinstance(steps, int) or steps < 0:
        raise SettingsError(f"calibration: steps must be a non-negative integer, got {steps!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"calibration: batch_size must be a positive integer, got {batch_size!r}")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise SettingsError(f"calibration: lr must be positive, got {lr!r}")
    if isinstance(calib, Tensor):
        calib = CalibData(calib.to(torch.int64), {"data": "<token ids>"})
    if calib.ids.dim() != 2:
        raise SettingsError(f"calibration: ids must be (n_samples, seq_len), got shape {tuple(calib.ids.shape)}")
    t0 = time.perf_counter()
    df = load_delta(delta_in)
    config_json = df.files.get("config.json")
    ids = calib.ids.to(device)
    batch = min(batch_size, ids.shape[0])

    teacher = _load_model(finetuned, config_json, torch.float32).to(device)
    cache = teacher_logits(teacher, ids, batch, cache_limit_bytes, progress)
    del teacher  # never two models at once
    t_teacher = time.perf_counter() - t0

    try:
        model = _load_model(base, config_json, torch.float32)
        distilled = build_student(model, df, stage)
        if not distilled:
            codecs = '/'.join(training_codecs(stage))
            if not any(i.tied_to is None and _distilled(df, n, stage) is not None for n, i in df.params.items()):
                raise SettingsError(f"calibration ({stage}): the delta has no {codecs} tensors to {stage}")
            raise SettingsError(f"calibration ({stage}): none of the delta's {codecs} tensors is the weight of a "
                                f"torch.nn.Linear layer of {type(model).__name__} (GPT-2-style Conv1D layers are "
                                "not supported); compress without --calib")
        model.to(device)
        scales = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in scales)
        # the tune stage trains many more numbers than BitDelta's scales: it is judged on windows it never
        # trained on; distillation keeps its reference behaviour (every window, judged on the same)
        train_rows, check_rows = held_out_split(ids.shape[0], seed) if stage == "tune" else (None, None)
        loss_before = _eval_loss(model, ids, cache.data, batch, loss, check_rows)
        t1 = time.perf_counter()
        with training_heap():
            history = train_scales(model, ids, cache.data, steps=steps, lr=lr, batch_size=batch, loss=loss,
                                   seed=seed, progress=progress, rows=train_rows, desc=stage)
        t_train = time.perf_counter() - t1
        loss_after = _eval_loss(model, ids, cache.data, batch, loss, check_rows)
        modules = dict(model.named_modules())
        # never worse than no distillation: when training raised the loss on the calibration windows (too
        # large a learning rate for this data), the data-free scales stay
        kept = not loss_after <= loss_before  # higher, or not a number (training diverged)
        loss_after = loss_after if math.isfinite(loss_after) else None  # (the file records no NaN)
        replaced = {} if kept else {name: _trained(_distilled(df, name, stage), stage, modules[name.rsplit(".", 1)[0]],
                                                   df.encoded(name)) for name in distilled}
    finally:
        cache.close()

    report = {"steps": steps, "lr": lr, "batch_size": batch, "loss": loss, "loss_before": loss_before,
              "loss_after": loss_after, "kept_data_free_scales": kept, "distilled_tensors": len(distilled), "trained_scalars": n_train,
              "checked_on": "held-out windows" if check_rows is not None and len(check_rows) < ids.shape[0]
              else "training windows", "check_windows": ids.shape[0] if check_rows is None else len(check_rows),
              "seconds_teacher": t_teacher, "seconds_train": t_train,
              "seconds_per_step": t_train / steps if steps else 0.0, "teacher_cache_on_disk": cache.on_disk,
              "data": calib.describe(), "loss_history": history}
    calibration = {"method": stage,
                   **{k: report[k] for k in ("steps", "lr", "batch_size", "loss", "loss_before", "loss_after",
                                             "kept_data_free_scales", "checked_on", "check_windows", "data")}}
    rewrite_delta(df, delta_out, replaced, calibration, overwrite=overwrite)
    df.close()
    report["seconds_total"] = time.perf_counter() - t0
    report["path"] = str(delta_out)
    return report


def training_codecs(stage: str = "distill") -> list[str]:
    """The codecs whose calibrator's student trains in ``stage``."""
    from ..codecs import available

    return [n for n in available() if _trains_in(get_codec(n).calibrator(), stage)]


def rewrite_delta(df: Delta, out: str | os.PathLike, replaced: dict[str, Encoded], calibration: dict[str, Any],
                  overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Copy ``df`` to ``out``, with the encodings in ``replaced`` (same codec) instead of the stored ones,
    checksums recomputed and ``calibration`` appended to ``source.calibration`` (a list of steps); every other tensor is copied byte for byte."""
    writer = DeltaWriter(out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
    try:
        for name, info in df.params.items():
            new_info = replace(info, settings=dict(info.settings), fields=[], nbytes=0, checksum="")
            if info.tied_to is not None:
                writer.add(new_info, None)
                continue
            tensors = df.raw_tensors(name)
            new_rows = tensors.pop(NEW_ROWS, None)
            enc = Encoded(info.codec, info.encoded_shape, tensors, dict(info.settings))
            if name in replaced:
                enc = replaced[name]
                if enc.codec != info.codec or tuple(enc.shape) != tuple(info.encoded_shape):
                    raise ValueError(f"{name}: replacement is {enc.codec} {tuple(enc.shape)}, the file holds "
                                     f"{info.codec} {tuple(info.encoded_shape)}")
                new_info.settings = dict(enc.params)
            writer.add(new_info, enc.tensors, new_rows=new_rows)
        meta = {k: v for k, v in df.metadata.items() if k not in ("format", "deltacomp_version", "params")}
        # every calibration step is recorded, in order (distillation, then the layerwise pass)
        before = dict(meta.get("source", {})).get("calibration", [])
        steps = [before] if isinstance(before, dict) else list(before)
        meta["source"] = {**dict(meta.get("source", {})), "calibration": steps + [calibration]}
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
