"""A delta file read with its codecs: the container (delta_file.DeltaFile) plus decoding and applying.

``load_delta(path)`` returns a ``Delta``: on open (after the container's schema, integrity and consistency
checks), every parameter's codec must be registered, every stored field must be in that codec's
vocabulary, a compressing codec's recorded dtype must be a floating-point one, every stored setting the
codec declares must have its type and range, and where the codec knows its exact encoded shapes from
(shape, settings) the stored tensors must have them, so a forged shape is refused before any tensor is
read (``inspect`` included); ``encoded``, ``decode`` and ``apply`` then turn the stored tensors back into
a float32 delta or the fine-tune's tensor: the codec's ``check_stored`` first (``verify`` runs it on every
parameter), then a decoded delta must be finite and base + delta may hold no NaN or Inf the base did not.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor

from .checkpoint import block_rows
from .codecs import Codec, Encoded, available, get_codec
from .delta_file import NEW_ROWS, DeltaFile, ParamInfo
from .dtypes import DTYPES, SAFETENSORS_DTYPES, dtype_name
from .errors import BaseMismatchError, DeltacompError, DeltaFormatError, SettingsError

_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,)}


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
            self._check_dtype(codec, info)
            self._check_settings(codec, info)
            self._check_shapes(codec, info)

    def _check_dtype(self, codec: Codec, info: ParamInfo) -> None:
        """A compressing codec's delta is rebuilt in float32 and cast to the recorded dtype: an integer or
        bool dtype there (which no encoder records: such tensors have no delta) would silently turn the
        weight into all True or all zeros. Pass-through codecs may hold a fine-tune's own integer buffers."""
        if codec.compresses and not DTYPES[info.dtype].is_floating_point:
            raise DeltaFormatError(f"{self.path}: {info.name}: codec {info.codec} with dtype {info.dtype}; a "
                                   "compressed delta rebuilds a floating-point weight only; the file is damaged "
                                   "or was edited")

    def _check_settings(self, codec: Codec, info: ParamInfo) -> None:
        """Each stored value of a setting the codec declares has its type (2.5 is no group size) and range."""
        for s in codec.settings:
            value = info.settings.get(s.name)
            if value is None:
                continue
            types = _TYPES.get(s.type, (object,))
            if not isinstance(value, types) or (isinstance(value, bool) and s.type is not bool):
                raise DeltaFormatError(f"{self.path}: {info.name}: setting {s.name}={value!r} is not a "
                                       f"{s.type.__name__}; the file is damaged or was edited")
            try:
                s.convert(value, codec.name)
            except SettingsError as exc:
                raise DeltaFormatError(f"{self.path}: {info.name}: {exc}; the file is damaged or was edited") from None

    def _check_shapes(self, codec: Codec, info: ParamInfo) -> None:
        """Stored shapes and dtypes against the codec's exact ones from (shape, settings), when it has them."""
        known = {k: v for k, v in info.settings.items() if k in {s.name for s in codec.settings}}
        try:
            want = codec.meta_tensors(info.encoded_shape, codec.resolve_settings(known))
        except (DeltacompError, ValueError, TypeError, KeyError, IndexError, ZeroDivisionError, OverflowError) as exc:
            raise DeltaFormatError(f"{self.path}: {info.name}: settings {_short(info.settings)} do not fit "
                                   f"shape {list(info.encoded_shape)} ({exc})") from None
        if want is None:
            return
        if info.base_rows is not None:
            want = {**want, NEW_ROWS: None}
        if set(want) != set(info.fields):
            raise DeltaFormatError(f"{self.path}: {info.name}: stores fields {sorted(info.fields)}, codec "
                                   f"{info.codec} writes {sorted(want)} for shape {list(info.encoded_shape)}")
        for f, t in want.items():
            if t is None:
                continue
            code, shape = self._manifest[f"{info.name}.{f}"]
            if tuple(shape) != tuple(t.shape) or SAFETENSORS_DTYPES[code] != t.dtype:
                raise DeltaFormatError(f"{self.path}: {info.name}.{f}: stored {code} {list(shape)}, expected "
                                       f"{t.dtype} {list(t.shape)} for shape {list(info.encoded_shape)}; "
                                       "the file is damaged or was edited")

    def encoded(self, name: str) -> Encoded:
        info = self.param(name)
        if info.tied_to is not None:
            return self.encoded(info.tied_to)
        tensors = self.raw_tensors(name)
        tensors.pop(NEW_ROWS, None)
        return self._checked(name, Encoded(info.codec, info.encoded_shape, tensors, dict(info.settings)))

    def _checked(self, name: str, enc: Encoded) -> Encoded:
        """The codec's check of the stored values (``Codec.check_stored``: no NaN/Inf scale, factor or
        value) before anything decodes or serves them."""
        if self.params[name].has_base:  # a tensor stored whole is the fine-tune's own (NaN allowed on request)
            with self.guard(name, "read"):
                get_codec(enc.codec).check_stored(enc)
        return enc

    def verify(self) -> None:
        """Every stored tensor checksummed, then each parameter's stored values checked by its codec
        (``check_stored``, as every decoding path does), so that ``inspect`` refuses what ``reconstruct``
        refuses. A tensor stored whole is only checksummed (streamed); a parameter too large to hold whose
        codec works on row blocks is checked a block of rows at a time."""
        for name, info in self.params.items():
            if info.tied_to is not None:
                continue
            step = block_rows(info.encoded_shape) if self.row_blocked(name) else None
            if not info.has_base or step is not None:
                self.verify_param(name)  # streamed, whatever the size
            if not info.has_base:
                continue
            if step is None:
                self.encoded(name)  # reads, checksums and checks the stored values
                continue
            rows, rest = info.encoded_shape[0], info.encoded_shape[1:]
            for start in range(0, rows, step):
                stop = min(start + step, rows)
                self._checked(name, Encoded(info.codec, (stop - start, *rest),
                                            {f: self.field_rows(name, f, start, stop) for f in info.fields
                                             if f != NEW_ROWS}, dict(info.settings)))

    def decode(self, name: str) -> Tensor:
        """The float32 delta over the base rows (shape ``encoded_shape``). A delta applied to the base is
        finite: stored values that are each finite can still overflow together (a singular value of 3e38
        times factors of 65504). A tensor stored whole is the fine-tune's own (NaN allowed on request)."""
        info = self.param(name)
        if info.tied_to is not None:
            return self.decode(info.tied_to)
        out = self._decode(name, info)
        if info.has_base and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            raise DeltaFormatError(f"{self.path}: {name}: the decoded delta holds {bad} NaN or Inf value(s): "
                                   "its stored values overflow; the file is damaged or was edited")
        return out

    def _decode(self, name: str, info: ParamInfo) -> Tensor:
        """``decode`` without the finiteness pass (``apply`` checks its result instead)."""
        enc = self.encoded(name)
        with self.guard(name, "decode"):
            out = get_codec(enc.codec).decode(enc)
        if tuple(out.shape) != info.encoded_shape:
            raise DeltaFormatError(f"{self.path}: {name} decodes to shape {tuple(out.shape)}, "
                                   f"metadata says {info.encoded_shape}")
        return out

    def _applied(self, what: str, base: Tensor, delta: Tensor, dtype: torch.dtype) -> Tensor:
        """``(base + delta)`` in float32 cast to ``dtype``, refused when it holds more NaN or Inf values than
        the base did: a delta decoded to Inf, or a sum beyond ``dtype``'s range, would be written silently.
        (A base may hold its own NaN/Inf when the user allowed it; those pass through.) One isfinite pass;
        the base is counted only when the result is not all finite."""
        out = (base.to(torch.float32) + delta).to(dtype)
        if out.is_floating_point() and not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).sum())
            had = int((~torch.isfinite(base)).sum()) if base.is_floating_point() else 0
            if bad > had:
                raise DeltaFormatError(f"{self.path}: {what}: base + delta holds {bad} NaN or Inf value(s) in "
                                       f"{dtype_name(dtype)}, the base holds {had}: the stored values overflow; "
                                       "the file is damaged or was edited (or the base is not this delta's)")
        return out

    @contextmanager
    def guard(self, name: str, what: str) -> Iterator[None]:
        """Errors of a codec working on this file's values (parameters beyond the declared settings, e.g. a
        position count, are the codec's own) become one DeltaFormatError naming the file and tensor."""
        try:
            yield
        except DeltaFormatError as exc:  # from the shared decoders (positions): add the file and tensor
            raise DeltaFormatError(f"{self.path}: {name}: {exc}") from None
        except DeltacompError:  # already one of ours (e.g. NoFactorsError, a ValueError too)
            raise
        except (RuntimeError, ValueError, IndexError, KeyError, TypeError, OverflowError, ZeroDivisionError,
                MemoryError) as exc:
            raise DeltaFormatError(f"{self.path}: cannot {what} {name} ({type(exc).__name__}: "
                                   f"{_short(str(exc), 200)}); the file is inconsistent") from None

    def stats(self, name: str) -> dict[str, Any]:
        """The codec's ``inspect`` statistics of one stored parameter. A codec without statistics of its own
        (the base class's ``stats``) gets no read of the tensor (at 70B, a raw embedding is 2 GB)."""
        info = self.param(name)
        while info.tied_to is not None:
            info = self.params[info.tied_to]
        if info.codec in available() and type(get_codec(info.codec)).stats is Codec.stats:
            return {}
        enc = self.encoded(name)
        with self.guard(name, "inspect"):
            return get_codec(enc.codec).stats(enc)

    def lora_factors(self, name: str) -> tuple[Tensor, Tensor, Tensor]:
        """The codec's low-rank factors of one stored parameter (NoFactorsError where it has none)."""
        enc = self.encoded(name)
        with self.guard(name, "read the factors of"):
            return get_codec(enc.codec).lora_factors(enc)

    def apply(self, name: str, base: Tensor | None) -> Tensor:
        """The fine-tune's tensor: ``(base + delta)`` in float32, cast to the fine-tune's dtype; a tensor
        the base lacks is stored whole (its encoded ``values``, in its own dtype)."""
        info = self.param(name)
        if info.tied_to is not None:
            return self.apply(info.tied_to, base)
        out_dtype = DTYPES[info.dtype]
        if not info.has_base:
            return self.raw_tensors(name)["values"].to(out_dtype)
        if base is None:
            raise DeltaFormatError(f"{self.path}: {name} needs its base tensor")
        self._check_base_shape(name, base, info.encoded_shape)
        shared = self._applied(name, base, self._decode(name, info), out_dtype)
        if info.base_rows is None:
            return shared
        new_rows = self.raw_tensors(name)[NEW_ROWS].to(out_dtype)
        return torch.cat([shared, new_rows], dim=0)

    def _check_base_shape(self, name: str, base: Tensor, want: tuple[int, ...]) -> None:
        got = tuple(base.shape)
        if got != want and not (got == () and want == (1,)):
            raise BaseMismatchError(f"{self.path}: {name}: the base tensor given has shape {list(got)}, the delta "
                                    f"applies to {list(want)} — wrong base?")

    def row_blocked(self, name: str) -> bool:
        """True when this parameter's codec decodes blocks of rows (``Codec.row_blocks``), so that
        ``apply_rows`` can rebuild it a block at a time."""
        info = self.param(name)
        return self.row_blocked(info.tied_to) if info.tied_to is not None else get_codec(info.codec).row_blocks

    def apply_rows(self, name: str, base: Tensor | None, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of ``apply(name, full base)``, from the base's rows ``start:stop``, for a
        ``row_blocked`` parameter; rows past the base's (added tokens) come from the stored new rows.
        The stored bytes are not checksummed here: ``verify_param`` the parameter first."""
        info = self.param(name)
        if info.tied_to is not None:
            return self.apply_rows(info.tied_to, base, start, stop)
        out_dtype = DTYPES[info.dtype]
        if not info.has_base:
            return self.field_rows(name, "values", start, stop).to(out_dtype)
        rows = info.encoded_shape[0]
        if start >= rows and info.base_rows is not None:
            return self.field_rows(name, NEW_ROWS, start - rows, stop - rows).to(out_dtype)
        if base is None or stop > rows:
            raise DeltaFormatError(f"{self.path}: {name}: rows {start}:{stop} need their base rows")
        self._check_base_shape(name, base, (stop - start, *info.encoded_shape[1:]))
        enc = self._checked(name, Encoded(info.codec, (stop - start, *info.encoded_shape[1:]),
                                          {f: self.field_rows(name, f, start, stop) for f in info.fields
                                           if f != NEW_ROWS}, dict(info.settings)))
        with self.guard(name, "decode"):
            delta = get_codec(info.codec).decode(enc)
        if tuple(delta.shape) != enc.shape:
            raise DeltaFormatError(f"{self.path}: {name} rows {start}:{stop} decode to shape {tuple(delta.shape)}")
        return self._applied(f"{name} rows {start}:{stop}", base, delta, out_dtype)

    def __enter__(self) -> "Delta":
        return self


def load_delta(path: str | os.PathLike | Delta) -> Delta:
    """Open a delta file (an already open ``Delta`` is returned as it is)."""
    return path if isinstance(path, Delta) else Delta(path)


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
