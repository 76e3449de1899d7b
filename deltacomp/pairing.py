"""Pairing a fine-tune's tensors with its base's: by name, with added embedding rows and tied heads."""
from __future__ import annotations

import enum
import re
import warnings
from dataclasses import dataclass

from .checkpoint import Checkpoint, same_tensor
from .errors import CheckpointError
from .integrity import MAX_NUMEL, tensor_name_problem

ALLOW_HINT = "; pass --allow-mismatch (allow_mismatch=True) if this pair is really meant"

_TIE_TARGETS = {"lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight")}
_ROW_GROWABLE = r"(embed_tokens|wte|word_embeddings|lm_head|embed_out)"


class PairKind(str, enum.Enum):
    """How a fine-tune tensor relates to the base."""

    DELTA = "delta"  # in both, same shape (or more rows: added tokens): stored as a delta
    NEW = "new"      # only in the fine-tune, or not a float tensor: stored whole
    TIED = "tied"    # the same tensor as another one of the fine-tune (a tied head): stored once


@dataclass
class Pairing:
    name: str
    kind: PairKind
    base_rows: int | None = None  # set when the fine-tune added rows (tokens)
    tied_to: str | None = None


def _tied_target(name: str, base: Checkpoint, ft: Checkpoint) -> str | None:
    target = next((t for t in _TIE_TARGETS.get(name, ()) if t in ft), None)
    if (target is not None and same_tensor(ft, name, ft, target)
            and (name not in base or target not in base or same_tensor(base, name, base, target))):
        return target
    return None


def pair_checkpoints(base: Checkpoint, ft: Checkpoint) -> list[Pairing]:
    """Match tensors by name; refuse shape mismatches except added rows of embeddings/heads."""
    out: list[Pairing] = []
    for name in ft.names():
        problem = tensor_name_problem(name)
        if problem is not None:
            raise CheckpointError(f"{ft.path}: tensor name {name[:60]!r}{'...' if len(name) > 60 else ''} {problem}")
        if any(d > MAX_NUMEL for d in ft.shape(name)):  # only an empty tensor can claim one: no file is that large
            raise CheckpointError(f"{ft.path}: {name}: shape {list(ft.shape(name))} has a dimension above the "
                                  f"{MAX_NUMEL} a delta file holds")
        target = _tied_target(name, base, ft)
        if target is not None:
            out.append(Pairing(name, PairKind.TIED, tied_to=target))
            continue
        if name not in base:
            out.append(Pairing(name, PairKind.NEW))
            continue
        fs, bs = ft.shape(name), base.shape(name)
        if fs == bs:
            floats = ft.dtype(name).is_floating_point and base.dtype(name).is_floating_point
            # codecs take 1-D or 2-D deltas: a tensor of more dimensions (stacked experts, a convolution's
            # kernel) is stored whole, as a non-float one is
            out.append(Pairing(name, PairKind.DELTA if floats and len(fs) <= 2 else PairKind.NEW))
        elif (len(fs) == 2 and len(bs) == 2 and fs[1] == bs[1] and fs[0] > bs[0]
              and re.search(_ROW_GROWABLE, name)):
            out.append(Pairing(name, PairKind.DELTA, base_rows=bs[0]))
        else:
            raise CheckpointError(
                f"{name}: shape {list(fs)} in the fine-tune ({ft.path}) but {list(bs)} in the base ({base.path}); "
                "only embeddings/heads may grow (added tokens) — is this the right base?")
    return out


def check_pair(base: Checkpoint, ft: Checkpoint, pairs: list[Pairing], allow_mismatch: bool = False) -> None:
    """Refuse a pair that is not a base and its fine-tune: another architecture (config.json's
    model_type/architectures differ, or no tensor in common), or a fine-tune missing base tensors (they
    would silently vanish from the reconstruction). ``allow_mismatch`` turns the refusals into warnings.
    Warns when the fine-tune has no config.json to carry (the reconstructed folder would lack one)."""
    problems = []
    bc, fc = base.config, ft.config
    if bc is not None and fc is not None:
        for key in ("model_type", "architectures"):
            if key in bc and key in fc and bc[key] != fc[key]:
                problems.append(f"config.json {key} is {fc[key]!r} in the fine-tune, {bc[key]!r} in the base")
    names = ft.names()
    if names and not any(p.kind == PairKind.DELTA for p in pairs):
        problems.append("no tensor of the fine-tune pairs with one of the base (every one would be stored whole)")
    tied_or_present = set(names)
    missing = [n for n in base.names() if n not in tied_or_present]
    if missing:
        problems.append(f"the fine-tune lacks {len(missing)} base tensor(s), e.g. {missing[0]} (they would be "
                        "missing from the reconstruction)")
    for problem in problems:
        msg = f"{ft.path}: {problem} — is {base.path} its base?"
        if not allow_mismatch:
            raise CheckpointError(msg + ALLOW_HINT)
        warnings.warn(msg + "; continuing (--allow-mismatch)")
    if fc is None:
        warnings.warn(f"{ft.path}: no config.json to carry into the delta; a reconstructed folder will lack "
                      "one (copy the fine-tune's config.json next to it)")
