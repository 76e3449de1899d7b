"""Pairing a fine-tune's tensors with its base's: by name, with added embedding rows and tied heads."""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from .checkpoint import Checkpoint
from .errors import CheckpointError

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
    if (target is not None and ft.shape(target) == ft.shape(name) and torch.equal(ft.get(name), ft.get(target))
            and (name not in base or target not in base or torch.equal(base.get(name), base.get(target)))):
        return target
    return None


def pair_checkpoints(base: Checkpoint, ft: Checkpoint) -> list[Pairing]:
    """Match tensors by name; refuse shape mismatches except added rows of embeddings/heads."""
    out: list[Pairing] = []
    for name in ft.names():
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
            out.append(Pairing(name, PairKind.DELTA if floats else PairKind.NEW))
        elif (len(fs) == 2 and len(bs) == 2 and fs[1] == bs[1] and fs[0] > bs[0]
              and re.search(_ROW_GROWABLE, name)):
            out.append(Pairing(name, PairKind.DELTA, base_rows=bs[0]))
        else:
            raise CheckpointError(
                f"{name}: shape {list(fs)} in the fine-tune ({ft.path}) but {list(bs)} in the base ({base.path}); "
                "only embeddings/heads may grow (added tokens) — is this the right base?")
    return out
