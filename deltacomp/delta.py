"""A delta file read with its codecs: the container (delta_file.DeltaFile) plus decoding and applying.

``load_delta(path)`` returns a ``Delta``: on open, every parameter's codec must be registered and every
stored field must be in that codec's vocabulary; ``encoded``, ``decode`` and ``apply`` then turn the
stored tensors back into a float32 delta or the fine-tune's tensor.
"""
from __future__ import annotations

import os

import torch
from torch import Tensor

from .codecs import Encoded, get_codec
from .delta_file import NEW_ROWS, DeltaFile
from .dtypes import DTYPES
from .errors import DeltaFormatError, SettingsError


class Delta(DeltaFile):
    """A delta file opened lazily, with each parameter's codec checked against its stored fields."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        for info in self.params.values():
            if info.tied_to is not None:
                continue
            try:
                codec = get_codec(info.codec)
            except SettingsError:
                raise DeltaFormatError(f"{self.path}: {info.name} uses unknown codec {info.codec!r}; "
                                       "it was written by a newer deltacomp, upgrade") from None
            for f in info.fields:
                if f != NEW_ROWS and not codec.field_allowed(f):
                    raise DeltaFormatError(f"{self.path}: {info.name} holds field {f!r}, not one of codec {info.codec}'s")

    def encoded(self, name: str) -> Encoded:
        info = self.params[name]
        if info.tied_to is not None:
            return self.encoded(info.tied_to)
        tensors = self.raw_tensors(name)
        tensors.pop(NEW_ROWS, None)
        return Encoded(info.codec, info.encoded_shape, tensors, dict(info.settings))

    def decode(self, name: str) -> Tensor:
        """The float32 delta over the base rows (shape ``encoded_shape``)."""
        info = self.params[name]
        if info.tied_to is not None:
            return self.decode(info.tied_to)
        enc = self.encoded(name)
        try:
            out = get_codec(enc.codec).decode(enc)
        except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
            raise DeltaFormatError(f"{self.path}: cannot decode {name} ({exc}); the file is inconsistent") from None
        if tuple(out.shape) != info.encoded_shape:
            raise DeltaFormatError(f"{self.path}: {name} decodes to shape {tuple(out.shape)}, "
                                   f"metadata says {info.encoded_shape}")
        return out

    def apply(self, name: str, base: Tensor | None) -> Tensor:
        """The fine-tune's tensor: ``(base + delta)`` in float32, cast to the fine-tune's dtype; a tensor
        the base lacks is stored whole (its encoded ``values``, in its own dtype)."""
        info = self.params[name]
        if info.tied_to is not None:
            return self.apply(info.tied_to, base)
        out_dtype = DTYPES[info.dtype]
        if not info.has_base:
            return self.raw_tensors(name)["values"].to(out_dtype)
        if base is None:
            raise DeltaFormatError(f"{self.path}: {name} needs its base tensor")
        delta = self.decode(name)
        if info.base_rows is None:
            return (base.to(torch.float32) + delta).to(out_dtype)
        shared = (base.to(torch.float32) + delta).to(out_dtype)
        new_rows = self.raw_tensors(name)[NEW_ROWS].to(out_dtype)
        return torch.cat([shared, new_rows], dim=0)

    def __enter__(self) -> "Delta":
        return self


def load_delta(path: str | os.PathLike | Delta) -> Delta:
    """Open a delta file (an already open ``Delta`` is returned as it is)."""
    return path if isinstance(path, Delta) else Delta(path)
