"""Export a delta as a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).

For each 2-D linear weight W (N x K) with delta ~= U S V^T (rank r): ``lora_B = U sqrt(S)`` (N x r) and
``lora_A = sqrt(S) V^T`` (r x K), so ``B @ A`` is the rank-r delta; ``lora_alpha = r`` per module (via
alpha_pattern where ranks differ) makes PEFT's scaling alpha / r exactly 1. Tensors a LoRA adapter cannot
carry (embeddings, norms, biases, 1-D tensors, codecs whose ``lora_factors`` raises NoFactorsError) are
returned by name, for the caller to show: they are never dropped silently.
"""
from __future__ import annotations

import json
import numbers
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import open_checkpoint
from .codecs import get_codec
from .quant.svd import truncated_svd
from .delta import load_delta
from .dtypes import dtype_name
from .errors import NoFactorsError, NonFiniteError, SettingsError
from .pairing import PairKind, check_pair, pair_checkpoints
from .plan import DEFAULT_RULES
from .progress import progress_bar
from .rowblocks import count_nonfinite
from .storage import output_dir, refuse_inputs, save_tensors

_NOT_LINEAR = re.compile("|".join(p for p, _ in DEFAULT_RULES))


def lora_pair(u: Tensor, s: Tensor, vh: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(lora_A, lora_B) with B @ A = U diag(S) Vh."""
    root = s.clamp_min(0).sqrt()
    return (root[:, None] * vh).to(dtype).contiguous(), (u * root).to(dtype).contiguous()


def _module(param: str) -> str:
    return param[: -len(".weight")]


def _write_adapter(out: str | os.PathLike, tensors: dict[str, Tensor], ranks: dict[str, int], base_name: str,
                   overwrite: bool, inputs: list[Path]) -> Path:
    if not ranks:
        raise SettingsError("nothing to export: no 2-D linear weight changed (or all were skipped)")
    counts: dict[int, int] = {}
    for r in ranks.values():
        counts[r] = counts.get(r, 0) + 1
    r_main = max(counts, key=lambda r: (counts[r], r))
    pattern = {m: r for m, r in ranks.items() if r != r_main}
    targets = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
        "r": r_main, "lora_alpha": r_main, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": targets, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "modules_to_save": None, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
    }
    refuse_inputs(out, inputs, folder=True)
    with output_dir(out, overwrite=overwrite) as tmp:
        save_tensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return Path(out)


def _add(tensors: dict[str, Tensor], ranks: dict[str, int], param: str, u, s, vh, dtype, source: str) -> None:
    a, b = lora_pair(u, s, vh, dtype)
    bad = count_nonfinite(a) + count_nonfinite(b)
    if bad:  # a delta beyond the dtype's range: the adapter would hold Inf (and PEFT would compute NaN)
        raise SettingsError(f"{source}: {param}: its LoRA factors hold {bad} values beyond {dtype_name(dtype)}'s "
                            "range; export with --dtype float32")
    key = f"base_model.model.{_module(param)}"
    tensors[f"{key}.lora_A.weight"] = a
    tensors[f"{key}.lora_B.weight"] = b
    ranks[_module(param)] = int(s.numel())


def _check_finite(name: str, *tensors: tuple[str, Tensor]) -> None:
    for path, t in tensors:
        n = count_nonfinite(t)
        if n:
            raise NonFiniteError(f"{path}: {name}: {n} of {t.numel()} values are NaN or Inf; its LoRA factors would "
                                 "be NaN; fix the checkpoint")


def export_lora(base: str | os.PathLike, finetuned: str | os.PathLike, out: str | os.PathLike, *, rank: int = 64,
                dtype: torch.dtype = torch.bfloat16, overwrite: bool = False, progress: bool = True,
                allow_mismatch: bool = False) -> dict[str, Any]:
    """Truncated SVD of each linear weight's delta -> a PEFT LoRA adapter of rank ``rank`` at ``out``. A pair
    that does not look like a base and its fine-tune is refused (pairing.check_pair) unless
    ``allow_mismatch``; a NaN or Inf in a weight it exports is refused."""
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or rank < 1:
        raise SettingsError(f"--rank must be >= 1 (an integer), got {rank!r}")
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    skipped: list[str] = []
    with open_checkpoint(base) as bck, open_checkpoint(finetuned) as fck:
        inputs = bck.files() + fck.files()
        refuse_inputs(out, inputs, folder=True)  # before the work
        pairs = list(pair_checkpoints(bck, fck))
        check_pair(bck, fck, pairs, allow_mismatch)
        for p in progress_bar(pairs, desc="export-lora", unit="tensor", enable=progress):
            if p.kind == PairKind.TIED:
                continue
            ft = fck.get(p.name)
            if p.kind != PairKind.DELTA or p.base_rows is not None:
                skipped.append(p.name)
                continue
            b = bck.get(p.name)
            delta = ft.float() - b.float()
            if not torch.count_nonzero(delta):
                continue
            if ft.dim() != 2 or not p.name.endswith(".weight") or _NOT_LINEAR.search(p.name):
                skipped.append(p.name)
                continue
            _check_finite(p.name, (str(fck.path), ft), (str(bck.path), b))
            u, s, vh = truncated_svd(delta, rank)
            _add(tensors, ranks, p.name, u, s, vh, dtype, str(fck.path))
    path = _write_adapter(out, tensors, ranks, str(base), overwrite, inputs)
    return {"path": str(path), "modules": len(ranks), "ranks": ranks, "not_carried": skipped}


def export_lora_from_delta(delta: str | os.PathLike, out: str | os.PathLike, *, base_name: str = "",
                           dtype: torch.dtype = torch.bfloat16, overwrite: bool = False) -> dict[str, Any]:
    """The factors already in a delta file (dequantized; ``codec.lora_factors``) -> a PEFT LoRA adapter."""
    tensors: dict[str, Tensor] = {}
    ranks: dict[str, int] = {}
    skipped: list[str] = []
    with load_delta(delta) as df:
        inputs = list(df.files_on_disk)
        refuse_inputs(out, inputs, folder=True)
        for name, info in df.params.items():
            if info.tied_to is not None or get_codec(info.codec).always_zero:
                continue
            try:
                if not info.has_base or info.base_rows is not None or len(info.shape) != 2:
                    raise NoFactorsError(name)
                f = df.lora_factors(name)
            except NoFactorsError:
                skipped.append(name)
                continue
            _add(tensors, ranks, name, *f, dtype, str(delta))
        base_name = base_name or str(df.source.get("base", ""))
    path = _write_adapter(out, tensors, ranks, base_name, overwrite, inputs)
    return {"path": str(path), "modules": len(ranks), "ranks": ranks, "not_carried": skipped}
