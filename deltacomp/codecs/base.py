"""The codec contract: a stateless object that turns a float32 delta into packed tensors and back.

A codec never modifies its input, never reads files, and reports its size only through the real
``nbytes`` of the tensors it returns: no size is ever estimated.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from torch import Tensor

from ..errors import SettingsError


class CodecName(str, enum.Enum):
    """On-disk codec names (stable: they are written into delta files)."""

    ZERO = "zero"            # the delta is exactly zero: nothing stored
    RAW = "raw"              # the delta itself, in fp32/bf16/fp16
    BITDELTA = "bitdelta"    # sign(delta) packed 8 per byte, times a scale (BitDelta)
    LOWRANK = "lowrank"      # truncated SVD factors
    SVD_MIXED = "svd-mixed"  # SVD factors quantized with more bits for larger singular values
    TERNARY = "ternary"      # top-k magnitudes stored as sign x scale (ComPEFT)
    DARE = "dare"            # random drop + rescale (DARE), fp16 values at kept positions


@dataclass
class Encoded:
    """One tensor's compressed form: packed on-disk tensors + JSON-able params."""

    codec: str
    shape: tuple[int, ...]
    tensors: dict[str, Tensor]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {text!r}")


@dataclass(frozen=True)
class Setting:
    """A codec parameter: its type, default, allowed values and one line of help."""

    name: str
    type: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], bool] | None = None  # extra validity test on the converted value
    check_msg: str = ""

    def convert(self, value: Any, codec: str) -> Any:
        if value is None:
            return None
        try:
            if self.type is bool and not isinstance(value, bool):
                out = _parse_bool(value)
            else:
                out = self.type(value) if not isinstance(value, self.type) else value
        except (TypeError, ValueError) as exc:
            raise SettingsError(
                f"{codec}: setting {self.name}={value!r} is not a valid {self.type.__name__} ({exc})"
            ) from None
        if self.choices is not None and out not in self.choices:
            raise SettingsError(
                f"{codec}: setting {self.name}={value!r} must be one of {', '.join(map(str, self.choices))}"
            )
        if self.check is not None and not self.check(out):
            raise SettingsError(f"{codec}: setting {self.name}={value!r} {self.check_msg or 'is out of range'}")
        return out


class Codec:
    """Base class. Subclasses set ``name``, ``settings`` and ``fields`` and implement encode/decode.

    ``fields`` is the vocabulary of tensor suffixes this codec may write (regexes matched in full), so
    a reader can reject a file holding anything else.
    """

    name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]] = ()
    fields: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""

    # -- settings -----------------------------------------------------------------------------------
    @classmethod
    def resolve_settings(cls, given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Defaults overlaid with ``given`` (strings or typed values), validated; unknown keys raise."""
        given = dict(given or {})
        known = {s.name: s for s in cls.settings}
        unknown = sorted(set(given) - set(known))
        if unknown:
            valid = ", ".join(known) or "(none)"
            raise SettingsError(f"{cls.name}: unknown setting(s) {', '.join(unknown)}; valid: {valid}")
        return {n: s.convert(given.get(n, s.default), cls.name) for n, s in known.items()}

    def settings_for_budget(self, shape: tuple[int, ...], nbytes: int, given: dict[str, Any]) -> dict[str, Any]:
        """Settings that make a delta of ``shape`` cost at most ``nbytes`` (the plan's ``--ratio``).

        ``given`` are settings the user fixed; a codec that cannot be steered by size raises."""
        raise SettingsError(f"{self.name}: this codec cannot target a size; give its settings instead of --ratio")

    def needs_global(self, settings: dict[str, Any]) -> bool:
        """True when encoding with these settings needs a statistic over all tensors given this codec
        (e.g. ComPEFT's one global threshold); the caller then runs ``global_settings`` first."""
        return False

    def global_settings(self, deltas: Callable[[], Any], settings: dict[str, Any]) -> dict[str, Any]:
        """Settings to add for every tensor of the group; ``deltas()`` yields the group's float32 deltas
        afresh on each call (streamed, one tensor at a time)."""
        return {}

    # -- the contract -------------------------------------------------------------------------------
    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> Tensor:
        raise NotImplementedError

    def matmul(self, x: Tensor, enc: Encoded) -> Tensor:
        """``x @ decode(enc).T``. Codecs with a packed kernel override this to avoid the dense delta."""
        return x @ self.decode(enc).to(x.dtype).T

    # -- helpers for subclasses ---------------------------------------------------------------------
    def _check_input(self, delta: Tensor) -> None:
        if not isinstance(delta, Tensor):
            raise TypeError(f"{self.name}: delta must be a torch.Tensor, got {type(delta).__name__}")
        if delta.dtype != torch.float32:
            raise TypeError(f"{self.name}: delta must be float32, got {delta.dtype}")
        if delta.dim() not in (1, 2):
            raise ValueError(f"{self.name}: delta must be 1-D or 2-D, got shape {tuple(delta.shape)}")

    @classmethod
    def field_allowed(cls, fieldname: str) -> bool:
        return any(re.fullmatch(p, fieldname) for p in cls.fields)


_REGISTRY: dict[str, type[Codec]] = {}


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: add a codec under its on-disk name (must be a CodecName)."""
    key = normalize(cls.name)
    if key not in {c.value for c in CodecName}:
        raise ValueError(f"codec name {cls.name!r} is not a CodecName member; add it there first")
    if key in _REGISTRY:
        raise ValueError(f"codec {key!r} registered twice ({_REGISTRY[key].__name__} and {cls.__name__})")
    _REGISTRY[key] = cls
    return cls


def get_codec(name: str) -> Codec:
    key = normalize(name)
    if key not in _REGISTRY:
        raise SettingsError(f"unknown method {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]()


def available() -> list[str]:
    return sorted(_REGISTRY)
