"""Checkpoint tensor names against a loaded model's parameter names.

A delta file names tensors as the checkpoint does. transformers (5.x) renames some of them on load
(GPT-NeoX's ``embed_out`` becomes ``lm_head``; old ``LayerNorm.gamma`` becomes ``.weight``) and converts
others into another layout (a mixture of experts' per-expert matrices merged into one 3-D tensor per
layer). ``checkpoint_aliases`` finds the model parameter of each renamed tensor, from transformers' own
renaming rules; ``converted_on_load`` tells a tensor that has no parameter of its own in the loaded model
(so a delta over it can only be applied to the checkpoint: ``reconstruct``) from a name the base lacks.
"""
from __future__ import annotations

import os
from typing import Any, Iterable

from torch import nn

from .errors import CheckpointError, ModelLayoutError


def _transforms(model: nn.Module) -> tuple[list[Any], list[Any]]:
    """(renamings, converters) transformers applies when it loads a checkpoint into ``model``; empty
    lists for a model transformers does not know or a transformers without these rules (4.x)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming
    except ImportError:
        return [], []
    try:
        rules = get_model_conversion_mapping(model)
    except Exception:  # noqa: BLE001 - not a transformers model, or rules this version cannot build
        return [], []
    return ([r for r in rules if isinstance(r, WeightRenaming)],
            [r for r in rules if isinstance(r, WeightConverter)])


def _model_names(model: nn.Module) -> dict[str, tuple[int, ...]]:
    named = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    return {n: tuple(t.shape) for n, t in named}


def checkpoint_aliases(model: nn.Module, names: Iterable[str]) -> dict[str, str]:
    """{checkpoint name: model parameter name} for each of ``names`` that the model holds under another
    name (renamed by transformers on load); names the model holds as they are, and names it lacks, are
    left out."""
    have = _model_names(model)
    missing = [n for n in names if n not in have]
    if not missing:
        return {}
    renamings, _ = _transforms(model)
    out = {}
    for name in missing:
        new = name
        for r in renamings:
            new, _ = r.rename_source_key(new)
        if new != name and new in have:
            out[name] = new
    return out


def converted_on_load(model: nn.Module, name: str) -> bool:
    """True when transformers turns checkpoint tensor ``name`` into part of another tensor on load (e.g.
    one expert's matrix into a layer's merged experts), so the loaded model has no parameter for it."""
    renamings, converters = _transforms(model)
    for r in renamings:
        name, _ = r.rename_source_key(name)
    return any(c.rename_source_key(name)[1] is not None for c in converters)


def not_in_model(model: nn.Module, delta_path: str | os.PathLike, name: str) -> CheckpointError:
    """The error for a delta tensor the loaded model has no parameter for: a layout transformers converts
    on load (merged experts: only the checkpoint can take this delta) or the wrong model."""
    kind = type(model).__name__
    if converted_on_load(model, name):
        return ModelLayoutError(f"{name}: {kind} holds it merged into another tensor once loaded (transformers "
                                f"converts this checkpoint's layout), so the delta {delta_path} cannot be applied "
                                "to the loaded model; reconstruct the fine-tune and load that")
    return CheckpointError(f"{name}: in the delta {delta_path} but not a parameter of {kind} (wrong base?)")
