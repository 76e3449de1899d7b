"""Calibration samples: token windows cut from a text (a file or a string) or from given token ids.

The text is tokenized once with the fine-tune's tokenizer (no special tokens: windows are cut from one
continuous stream). The stream is split into non-overlapping windows of ``seq_len`` tokens starting at a
seeded offset, and ``n_samples`` of them are drawn with a seeded permutation, so the same text, sizes
and seed always give the same samples. Windows are always full length: nothing is padded.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from ..errors import SettingsError

# CLI defaults (--calib-samples, --calib-len): BitDelta's 128-token sequences; 32 windows give 8 distinct
# batches of 4 and keep the fp16 teacher cache at 32 * 128 * vocab * 2 bytes (0.4 GB for a 49k vocab).
DEFAULT_SAMPLES = 32
DEFAULT_SEQ_LEN = 128


@dataclass
class CalibData:
    """``ids`` (n_samples, seq_len) int64, and a JSON-able description for the delta file's metadata."""

    ids: Tensor
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def n_samples(self) -> int:
        return int(self.ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.ids.shape[1])

    def describe(self) -> dict[str, Any]:
        return {**self.source, "n_samples": self.n_samples, "seq_len": self.seq_len}


def _check_sizes(n_samples: int, seq_len: int) -> None:
    for key, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise SettingsError(f"calibration: {key} must be a positive integer, got {v!r}")


def windows(stream: Tensor, n_samples: int, seq_len: int, seed: int = 0, what: str = "token ids") -> Tensor:
    """``n_samples`` non-overlapping windows of ``seq_len`` tokens from a 1-D ``stream`` (seeded)."""
    _check_sizes(n_samples, seq_len)
    stream = torch.as_tensor(stream).reshape(-1).to(torch.int64)
    total = int(stream.numel())
    # seq_len + 1 so a window can also serve as (input, next-token target); n windows may not overlap.
    needed = max(seq_len + 1, n_samples * seq_len)
    if total < needed:
        raise SettingsError(
            f"calibration: {what} has {total} tokens, but {n_samples} samples of {seq_len} tokens need at "
            f"least {needed}; give a longer text or lower --calib-samples / --calib-len")
    g = torch.Generator().manual_seed(int(seed))
    n_windows = total // seq_len
    slack = total - n_windows * seq_len
    offset = int(torch.randint(0, slack + 1, (1,), generator=g)) if slack else 0
    pick = torch.randperm(n_windows, generator=g)[:n_samples].sort().values
    starts = offset + pick * seq_len
    return torch.stack([stream[s:s + seq_len] for s in starts.tolist()])


def load_tokenizer(model_dir: str | os.PathLike):
    """The fine-tune's tokenizer (transformers AutoTokenizer from the model folder)."""
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        raise SettingsError("calibration needs the transformers package to tokenize text") from None
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as exc:
        raise SettingsError(f"{model_dir}: cannot load its tokenizer for calibration ({exc}); "
                            "give pre-tokenized ids or a folder with tokenizer files") from None


def _tokenize(text: str, tokenizer) -> Tensor:
    if hasattr(tokenizer, "model_max_length"):  # we cut windows ourselves: silence the length warning
        tokenizer.model_max_length = 1 << 62
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def from_text(text: str, tokenizer, n_samples: int, seq_len: int, seed: int = 0, name: str = "<text>") -> CalibData:
    """Samples from a string. ``tokenizer`` is a tokenizer object or a model folder holding one."""
    _check_sizes(n_samples, seq_len)
    if not isinstance(text, str):
        raise SettingsError(f"calibration: {name} must be text (str), got {type(text).__name__}")
    if not text.strip():
        raise SettingsError(f"calibration: {name} is empty; give a text of at least "
                            f"{max(seq_len + 1, n_samples * seq_len)} tokens")
    tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    stream = _tokenize(text, tok)
    ids = windows(stream, n_samples, seq_len, seed, what=name)
    sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return CalibData(ids, {"data": name, "sha256": sha, "tokens": int(stream.numel()), "seed": int(seed)})


def from_file(path: str | os.PathLike, tokenizer, n_samples: int, seq_len: int, seed: int = 0) -> CalibData:
    """Samples from a UTF-8 text file."""
    p = Path(path)
    if not p.is_file():
        raise SettingsError(f"calibration: {p}: no such text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SettingsError(f"calibration: {p}: not UTF-8 text ({exc})") from None
    return from_text(text, tokenizer, n_samples, seq_len, seed, name=p.name)


def from_ids(ids: Tensor | Sequence[int], n_samples: int, seq_len: int, seed: int = 0,
             name: str = "<token ids>") -> CalibData:
    """Samples from pre-tokenized ids (a 1-D stream, or 2-D rows that are concatenated)."""
    stream = torch.as_tensor(ids).reshape(-1).to(torch.int64)
    if stream.numel() == 0:
        raise SettingsError(f"calibration: {name} is empty; give at least {max(seq_len + 1, n_samples * seq_len)} tokens")
    out = windows(stream, n_samples, seq_len, seed, what=name)
    sha = hashlib.sha256(stream.numpy().tobytes()).hexdigest()
    return CalibData(out, {"data": name, "sha256_ids": sha, "tokens": int(stream.numel()), "seed": int(seed)})


def load_calibration(spec: str | os.PathLike, model_dir: str | os.PathLike, n_samples: int, seq_len: int,
                     seed: int = 0) -> CalibData:
    """Resolve a CLI ``--calib`` value: a text file, else the name of a bundled corpus (its training split)."""
    p = Path(spec)
    if p.is_file():
        return from_file(p, model_dir, n_samples, seq_len, seed)
    text = _zoo_training_text(str(spec))
    if text is None:
        raise SettingsError(f"calibration: {spec}: neither a text file nor a bundled corpus name "
                            f"({', '.join(_zoo_corpora()) or 'none bundled'})")
    return from_text(text, model_dir, n_samples, seq_len, seed, name=f"corpus:{spec}")


def _zoo_corpora() -> list[str]:
    try:
        from .. import zoo
    except ImportError:
        return []
    return sorted(getattr(zoo, "CORPORA", {}))


def _zoo_training_text(name: str) -> str | None:
    """The training split of a bundled corpus (deltacomp.zoo), never its held-out text; None if unknown."""
    try:
        from .. import zoo
    except ImportError:  # zoo not present in this build
        return None
    if name not in getattr(zoo, "CORPORA", {}):
        return None
    return zoo.corpus_text(name, "train")
