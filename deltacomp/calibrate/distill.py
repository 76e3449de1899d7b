"""BitDelta scale distillation: train the scales of sign-coded deltas so the compressed model's logits
match the fine-tune's on calibration text; the signs stay as they are.

Reference: Liu et al., "BitDelta: Your Fine-Tune May Only Be Worth One Bit" (2024), section 3.2 (MSE on
logits, AdamW lr 1e-4, 200 steps x batch 4 of 128 tokens). Two deliberate differences from their code:
every parameter other than the scales is frozen explicitly, and the loss never counts padded positions
(our windows are full length; ``mask`` is honoured if a caller pads).

Memory: the two models are never held together. The fine-tune is loaded, its logits on every
calibration sample are cached as fp16 (in memory, or in a temporary file above ``cache_limit_bytes``),
it is freed, and only then the base is loaded and turned into the student.

Student layer (a bitdelta-coded nn.Linear)::

    y = x @ (W_base + sum_i scale_i * sign_i)^T + bias     sign_i = ±1 (unpacked once, model dtype)
    scale_i: () per tensor, or (N,) per output row (broadcast along K); the only trainable tensors.
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

from .. import ops
from ..codecs import CodecName, Encoded
from ..delta_file import DEFAULT_MAX_SHARD_BYTES, DTYPES, NEW_ROWS, DeltaFile, DeltaWriter, base_digest, load_delta
from ..errors import BaseMismatchError, CheckpointError, SettingsError
from ..progress import progress_bar
from .data import CalibData

LOSSES = ("mse", "kl")
# BitDelta trains 200 steps; here one step of 4 x 128 tokens on SmolLM2-135M (fp32, 2 busy CPU cores) took
# 34 s, and 20 steps already cut held-out KL(fine-tune || compressed) 7x on the bundled pair: 20 by default.
DEFAULT_STEPS = 20
DEFAULT_LR = 1e-4
DEFAULT_BATCH = 4


# -- the student layer ------------------------------------------------------------------------------
class SignScaledLinear(nn.Module):
    """``x @ (W_base + sum_i scale_i * sign_i)^T + b`` with only the scales trainable."""

    def __init__(self, base: nn.Linear, signs: list[Tensor], scales: list[Tensor]):
        super().__init__()
        self.base = base.requires_grad_(False)
        dtype = base.weight.dtype
        for i, s in enumerate(signs):
            self.register_buffer(f"sign_{i}", s.to(dtype), persistent=False)
        self.scales = nn.ParameterList(nn.Parameter(s.detach().to(torch.float32).clone()) for s in scales)
        self.scale_shapes = [tuple(s.shape) for s in scales]

    def delta(self) -> Tensor:
        out = None
        for i, scale in enumerate(self.scales):
            sign = getattr(self, f"sign_{i}")
            s = scale.to(sign.dtype)
            term = sign * (s[:, None] if s.dim() else s)
            out = term if out is None else out + term
        return out

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base.weight + self.delta(), self.base.bias)


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
def _check_base(df: DeltaFile, name: str, tensor: Tensor) -> None:
    want = df.base_tensors.get(name)
    if want is None:
        return
    dt = df.metadata.get("base", {}).get("dtypes", {}).get(name)
    t = tensor.detach().cpu()
    if dt in DTYPES and t.dtype != DTYPES[dt]:
        t = t.to(DTYPES[dt])
    if base_digest(t) != want:
        raise BaseMismatchError(f"calibration: base tensor {name} differs from the base {df.path} was made against "
                                "(fingerprint mismatch) — wrong base?")


def build_student(model: nn.Module, df: DeltaFile) -> list[str]:
    """Turn ``model`` (loaded from the base) into the student, in place; return the distilled names.

    Bitdelta-coded 2-D weights of nn.Linear modules become SignScaledLinear; every other delta is added
    to its parameter once and stays fixed. Every original parameter is frozen."""
    model.requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    modules = dict(model.named_modules())
    distilled: list[str] = []
    for name, info in df.params.items():
        if info.tied_to is not None:
            continue
        if name not in params:
            raise CheckpointError(f"calibration: {name} is in the delta {df.path} but not a parameter of the model")
        p = params[name]
        if info.base_rows is not None or tuple(p.shape) != tuple(info.shape):
            raise SettingsError(f"calibration: {name} has shape {list(p.shape)} in the base model but "
                                f"{list(info.shape)} in the fine-tune (added tokens are not supported by calibration)")
        mod_name = name.rsplit(".", 1)[0] if name.endswith(".weight") else None
        module = modules.get(mod_name) if mod_name else None
        if info.has_base:
            _check_base(df, name, p)
        if info.codec == CodecName.BITDELTA.value and len(info.shape) == 2 and isinstance(module, nn.Linear):
            enc = df.encoded(name)
            k = info.shape[1]
            masks = int(enc.params.get("masks", 1))
            field = lambda base, i: base if i == 0 else f"{base}_{i}"  # noqa: E731
            signs = [ops.unpack_signs(enc.tensors[field("signs", i)], k, torch.float32) for i in range(masks)]
            scales = [enc.tensors[field("scale", i)] for i in range(masks)]
            parent_name, _, child = mod_name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, SignScaledLinear(module, signs, scales))
            distilled.append(name)
            continue
        with torch.no_grad():
            new = df.apply(name, p.detach().cpu().reshape(info.encoded_shape) if info.has_base else None)
            p.copy_(new.reshape(p.shape).to(p.dtype))
    return distilled


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
def _eval_loss(model: nn.Module, ids: Tensor, cache: _LogitCache, batch_size: int, kind: str) -> float:
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        x = ids[start:start + batch_size]
        total += float(_loss(model(input_ids=x).logits, cache.data[start:start + batch_size], kind)) * x.shape[0]
        count += x.shape[0]
    return total / count


def train_scales(model: nn.Module, ids: Tensor, teacher: Tensor, *, steps: int, lr: float, batch_size: int,
                 loss: str = "mse", seed: int = 0, progress: bool = False) -> list[float]:
    """AdamW on the trainable parameters of ``model`` (the scales) to match ``teacher`` logits (n, L, V).

    Batches are drawn without replacement from a seeded permutation, reshuffled each epoch."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(int(seed))
    device = ids.device
    order: list[int] = []
    history: list[float] = []
    for _ in progress_bar(range(steps), desc="distill", unit="step", enable=progress):
        if len(order) < batch_size:
            order += torch.randperm(ids.shape[0], generator=g).tolist()
        pick, order = sorted(order[:batch_size]), order[batch_size:]
        idx = torch.tensor(pick)
        out = model(input_ids=ids[idx.to(device)]).logits
        step_loss = _loss(out, teacher[idx].to(device), loss)
        opt.zero_grad(set_to_none=True)
        step_loss.backward()
        opt.step()
        history.append(float(step_loss.detach()))
    return history


def _scale_modules(model: nn.Module) -> dict[str, SignScaledLinear]:
    return {n + ".weight": m for n, m in model.named_modules() if isinstance(m, SignScaledLinear)}


# -- the whole run ----------------------------------------------------------------------------------
def distill_scales(base: str | os.PathLike, finetuned: str | os.PathLike, delta_in: str | os.PathLike,
                   delta_out: str | os.PathLike, calib: CalibData | Tensor, *, steps: int = DEFAULT_STEPS,
                   lr: float = DEFAULT_LR, batch_size: int = DEFAULT_BATCH, loss: str = "mse", device: str = "cpu",
                   seed: int = 0, overwrite: bool = False, cache_limit_bytes: int = 2 * 1024**3,
                   progress: bool = True) -> dict[str, Any]:
    """Distill the bitdelta scales of ``delta_in`` on ``calib`` and write ``delta_out``; return a report."""
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
        distilled = build_student(model, df)
        if not distilled:
            raise SettingsError(f"calibration: {delta_in} has no bitdelta-coded linear weights to distill")
        model.to(device)
        scales = [p for p in model.parameters() if p.requires_grad]
        n_train = sum(p.numel() for p in scales)
        loss_before = _eval_loss(model, ids, cache, batch, loss)
        t1 = time.perf_counter()
        history = train_scales(model, ids, cache.data, steps=steps, lr=lr, batch_size=batch, loss=loss, seed=seed,
                               progress=progress)
        t_train = time.perf_counter() - t1
        loss_after = _eval_loss(model, ids, cache, batch, loss)
        new_scales = {name: [s.detach().cpu().to(torch.float32).reshape(shape) for s, shape in zip(m.scales, m.scale_shapes)]
                      for name, m in _scale_modules(model).items()}
    finally:
        cache.close()

    report = {"steps": steps, "lr": lr, "batch_size": batch, "loss": loss, "loss_before": loss_before,
              "loss_after": loss_after, "distilled_tensors": len(distilled), "trained_scalars": n_train,
              "seconds_teacher": t_teacher, "seconds_train": t_train,
              "seconds_per_step": t_train / steps if steps else 0.0, "teacher_cache_on_disk": cache.on_disk,
              "data": calib.describe(), "loss_history": history}
    calibration = {"method": "distill",
                   **{k: report[k] for k in ("steps", "lr", "batch_size", "loss", "loss_before", "loss_after", "data")}}
    write_rescaled(df, delta_out, new_scales, calibration, overwrite=overwrite)
    df.close()
    report["seconds_total"] = time.perf_counter() - t0
    report["path"] = str(delta_out)
    return report


def write_rescaled(df: DeltaFile, out: str | os.PathLike, scales: dict[str, list[Tensor]],
                   calibration: dict[str, Any], overwrite: bool = False,
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> None:
    """Copy ``df`` to ``out`` with new bitdelta scale tensors (signs and everything else byte-identical)."""
    replaced: dict[str, Encoded] = {}
    for name, new in scales.items():
        enc = df.encoded(name)
        tensors = dict(enc.tensors)
        for i, s in enumerate(new):
            key = "scale" if i == 0 else f"scale_{i}"
            old = tensors[key]
            if tuple(old.shape) != tuple(s.shape):
                raise ValueError(f"{name}.{key}: distilled scale has shape {tuple(s.shape)}, file has {tuple(old.shape)}")
            tensors[key] = s.to(old.dtype).contiguous()
        replaced[name] = Encoded(enc.codec, enc.shape, tensors, enc.params)
    rewrite_delta(df, out, replaced, calibration, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


def rewrite_delta(df: DeltaFile, out: str | os.PathLike, replaced: dict[str, Encoded], calibration: dict[str, Any],
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
            writer.add(new_info, enc, new_rows=new_rows)
        meta = {k: v for k, v in df.metadata.items() if k not in ("format", "deltacomp_version", "params")}
        # every calibration step is recorded, in order (distillation, then the layerwise pass)
        before = dict(meta.get("source", {})).get("calibration", [])
        steps = [before] if isinstance(before, dict) else list(before)
        meta["source"] = {**dict(meta.get("source", {})), "calibration": steps + [calibration]}
        writer.finish(meta)
    except BaseException:
        writer.abort()
        raise
