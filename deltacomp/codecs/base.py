"""The codec contract: a stateless object that turns a float32 delta into packed tensors and back.

A codec never modifies its input, never reads files, and reports its size only through the real
``nbytes`` of the tensors it returns: no size is ever estimated.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from ..errors import DeltaFormatError, NoFactorsError, SettingsError

if TYPE_CHECKING:  # the runtime classes import torch.nn; codecs load them only when serving
    from torch import nn

    from .calibrator import Calibrator
    from .term import DeltaTerm


class CodecName(str, enum.Enum):
    """On-disk codec names (stable: they are written into delta files)."""

    ZERO = "zero"            # the delta is exactly zero: nothing stored
    RAW = "raw"              # the delta itself, in fp32/bf16/fp16
    BITDELTA = "bitdelta"    # sign(delta) packed 8 per byte, times a scale (BitDelta)
    LOWRANK = "lowrank"      # truncated SVD factors
    SVD_MIXED = "svd-mixed"  # SVD factors quantized with more bits for larger singular values
    TERNARY = "ternary"      # top-k magnitudes stored as sign x scale (ComPEFT)
    DARE = "dare"            # random drop + rescale (DARE), fp16 values at kept positions
    SVD_SPARSE = "svd-sparse"  # svd-mixed's factors plus a sparse ternary residual, in one budget


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


@dataclass
class Rung:
    """One encoding of a ladder (``Codec.ladder``): what ``encode(delta, **settings)`` gives, with as much
    of it built as the ladder needed."""

    settings: dict[str, Any]
    nbytes: int                     # == encode(delta, **settings).nbytes, exactly
    pack: Callable[[], Encoded]     # the packed form (built on demand where the bytes are known without it)
    # decode(pack()) from what the ladder holds (up to float rounding), float32 on the CPU; None: decode
    rebuild: Callable[[], Tensor] | None = None
    # ||delta - decode(pack())||_F^2 where the ladder knows it without the reconstruction (relative error
    # under 1e-5); None where it does not. Lets a caller skip rungs another rung beats in bytes and error.
    weight_error: float | None = None

    def reconstruction(self, codec: "Codec") -> Tensor:
        """decode(encode(delta, **settings)), rebuilt from the ladder's pieces where it kept them."""
        return self.rebuild() if self.rebuild is not None else codec.decode(_on_cpu(self.pack()))


def _on_cpu(enc: Encoded) -> Encoded:
    return Encoded(enc.codec, enc.shape, {k: v.cpu() for k, v in enc.tensors.items()}, enc.params)


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

    Besides encode/decode/matmul a codec answers everything the rest of the package needs to know about
    its method, so that no other module compares codec names: its exact size on ``meta``
    (``meta_tensors``), its serving term (``serving_term``, ``multi_term``), its LoRA factors
    (``lora_factors``), its calibrator (``calibrator``), its ``inspect`` statistics (``stats``), and how
    the serving and planning layers treat it (the two flags below).
    """

    name: ClassVar[str]
    settings: ClassVar[tuple[Setting, ...]] = ()
    fields: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    # True: the delta is cheaper added into a float base weight than served as a term (raw, zero);
    # a quantized base, which cannot take it in place, still gets it as a term.
    applied_in_place: ClassVar[bool] = False
    # True: the codec only ever encodes an all-zero delta (nothing to serve, nothing to apply).
    always_zero: ClassVar[bool] = False
    # False: pass-through storage, not counted among the compressed tensors (raw, zero).
    compresses: ClassVar[bool] = True
    # Device types ``encode`` runs on (its math follows the delta's device, the encoded tensors may come
    # back on it); compress(device=...) hands other codecs their delta on the CPU.
    encode_devices: ClassVar[tuple[str, ...]] = ("cpu",)
    # True: the codec works on blocks of rows. With the settings ``block_settings`` returns for the
    # whole tensor, ``encode`` of rows a:b of the delta gives exactly rows a:b (along dimension 0) of each
    # field ``encode`` gives for the whole tensor, with the same params, and ``decode`` of those rows
    # gives rows a:b of the delta; ``meta_tensors`` is exact. Tensors too large to hold a few float32
    # copies of (a 70B model's embedding) are then compressed and reconstructed block by block (api.py);
    # other codecs get them whole.
    row_blocks: ClassVar[bool] = False
    # False: ``--method auto`` weighs this codec only when named (``auto:codecs=A+B``), not by default.
    auto_default: ClassVar[bool] = True

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

    # Budgets, relative to the hint, at which the default ``candidates`` asks ``settings_for_budget``.
    LADDER: ClassVar[tuple[float, ...]] = (0.125, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)

    def candidates(self, shape: tuple[int, ...], budget_hint: int) -> list[dict[str, Any]]:
        """Settings worth trying for a delta of ``shape`` when one byte budget is spread over all tensors
        (``--method auto``); ``budget_hint`` is this tensor's even share. The caller encodes each one and
        measures its real bytes and error, so a rung may land anywhere. The default asks
        ``settings_for_budget`` at a ladder of budgets around the hint; a codec that cannot target a size
        offers nothing unless it overrides this."""
        out: list[dict[str, Any]] = []
        for f in self.LADDER:
            try:
                s = self.settings_for_budget(tuple(shape), max(1, int(budget_hint * f)), {})
            except SettingsError:
                continue
            if s not in out:
                out.append(s)
        return out

    # Callers run the ladders of codecs with a lower LADDER_PASS first, so that a codec which can bound
    # its rungs' errors before building them (``prune``) is pruned against the others' finished rungs.
    LADDER_PASS: ClassVar[int] = 0

    def ladder(self, delta: Tensor, settings: Sequence[dict[str, Any]],
               prune: Callable[[int, float], bool] | None = None) -> Iterator[Rung]:
        """The encodings of ``delta`` under each of ``settings`` (one rung each, carrying its settings, in an
        order of the codec's choosing; a rung this tensor cannot take, SettingsError or ValueError from
        ``encode``, is left out), each the same as ``encode(delta, **s)`` on its own: the same bytes and,
        up to float rounding, the same reconstruction. Yielded one at a time, so that a caller keeping
        only numbers holds one rung's tensors at once (plus what the rungs share).

        The default encodes rung by rung. A codec whose rungs share work overrides it (one SVD at the
        largest rank for every rank, one sort of |delta| for every density, the first masks of the last
        rung for the fewer-mask rungs); it may rebuild the reconstruction from its own pieces (``rebuild``),
        leave the packing for ``pack`` where the bytes are known without it (``exact_nbytes``), and report
        the weight error where it has it cheaply (``weight_error``).

        ``prune(nbytes, floor)``: True when a rung of ``nbytes`` bytes whose weight error is at least
        ``floor`` is not wanted (another rung beats it); a ladder that can bound a rung's error from below
        before the costly part of building it asks, and leaves such a rung out. The default asks nothing."""
        for s in settings:
            try:
                enc = self.encode(delta, **s)
            except (SettingsError, ValueError):
                continue
            yield Rung(dict(s), enc.nbytes, lambda enc=enc: enc)

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

    def encoded_settings(self, settings: dict[str, Any], given: dict[str, Any], delta: Tensor, base: Tensor,
                         finetuned: Tensor) -> dict[str, Any]:
        """Settings for one tensor once its data is known (``given``: what the user wrote); the default
        keeps ``settings``. Raw uses it to store the fine-tune's own dtype when that is exact."""
        return settings

    def block_settings(self, settings: dict[str, Any], given: dict[str, Any],
                       blocks: Iterable[tuple[Tensor, Tensor, Tensor]]) -> dict[str, Any]:
        """``encoded_settings`` for a tensor seen as consecutive row blocks ``(delta, base, finetuned)``
        (``row_blocks`` codecs; the iterator may be left unfinished); the default keeps ``settings``."""
        return settings

    # -- exact size on meta ---------------------------------------------------------------------------
    def meta_tensors(self, shape: tuple[int, ...], settings: dict[str, Any]) -> dict[str, Tensor] | None:
        """The encoded tensors for a delta of ``shape`` as ``meta`` tensors (shapes and dtypes, no data),
        or None when the size depends on the data (ternary's and DARE's entropy-coded positions)."""
        return None

    def exact_nbytes(self, shape: tuple[int, ...], settings: dict[str, Any] | None = None) -> int | None:
        """Bytes ``encode`` will store for ``shape`` under ``settings``, computed on ``meta`` without data;
        None when the size depends on the data."""
        tensors = self.meta_tensors(tuple(shape), self.resolve_settings(settings))
        if tensors is None:
            return None
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # -- serving --------------------------------------------------------------------------------------
    def serving_term(self, enc: Encoded) -> "DeltaTerm":
        """The module computing ``x @ delta^T`` from the packed form (buffers, so ``.to()`` moves them).
        The default keeps the encoded tensors and calls ``matmul``; codecs with a run-time layout (ternary
        CSR, raw's dense delta) or a fused path over the base weight (bitdelta) return their own."""
        from .term import DeltaTerm

        return DeltaTerm(self, enc)

    def multi_term(self, encs: Sequence[Encoded | None]) -> "nn.Module | None":
        """A module serving the deltas ``encs`` (one per tenant, None where a tenant has no delta of this
        codec) in one call, ``forward(x2, row_index) -> (M, N) or None``; None when the codec has no
        multi-tenant kernel (each tenant's ``serving_term`` then runs on its own rows). The module may also
        offer ``fuses_one(t, weight) -> bool`` and ``fused_one(x2, weight, t) -> x2 @ (weight + delta_t)^T``:
        a batch whose rows are all tenant t's then takes that one pass where measured faster. And
        ``tables_serve(x2, row_index) -> bool`` with ``tables_rows(x2, row_index)``: ``forward``'s result by
        another kernel (bitdelta: each row through int8 tables), taken where it serves and measured faster."""
        return None

    # -- export ---------------------------------------------------------------------------------------
    def lora_factors(self, enc: Encoded) -> tuple[Tensor, Tensor, Tensor]:
        """(U (N, r), S (r,), Vh (r, K)) float32 with delta ~= U diag(S) Vh, for a LoRA export."""
        raise NoFactorsError(f"{self.name}: stores no low-rank factors; a LoRA adapter cannot carry it "
                             "(export from BASE FINETUNED instead, or compress with lowrank or svd-mixed)")

    # -- calibration and inspect ------------------------------------------------------------------------
    def calibrator(self) -> "Calibrator | None":
        """How data improves this codec's encodings (calibrator.py), or None when it does not use data."""
        return None

    def stats(self, enc: Encoded) -> dict[str, Any]:
        """Codec-specific figures for ``inspect`` (e.g. bits per kept entry vs the entropy bound)."""
        return {}

    # -- reading ----------------------------------------------------------------------------------------
    def check_stored(self, enc: Encoded) -> None:
        """Refuse stored values no encoder writes, before they are decoded or served (a reader calls
        this on every parameter it reads). The default: every floating-point field is finite, since a
        NaN or Inf scale, factor or value would turn the whole tensor into NaN silently. A codec whose
        fields may hold something else, or that can check more, overrides it."""
        for fld, t in enc.tensors.items():
            if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise DeltaFormatError(f"field {fld} holds {bad} NaN or Inf value(s), which {self.name} never "
                                       "writes; the file is damaged or was edited")

    # -- helpers for subclasses ---------------------------------------------------------------------
    def check_factor_bound(self, s: Tensor, u_max: Tensor, v_max: Tensor) -> None:
        """Refuse low-rank factors whose product can overflow float32: every entry of ``sum_i s_i u_i v_i^T``
        is at most ``sum_i |s_i| max|u_i| max|v_i|`` (``u_max``, ``v_max``: each vector's largest magnitude).
        Stored values that are each finite (a singular value of 3e38, factors of 65504) would otherwise
        decode, or serve, as Inf. Genuine factors sit many orders of magnitude below the bound."""
        bound = float((s.double().abs() * u_max.double() * v_max.double()).sum()) if s.numel() else 0.0
        if not bound <= torch.finfo(torch.float32).max:
            raise DeltaFormatError(f"{self.name}: the stored factors can reach {bound:.3g}, beyond float32's range "
                                   "(their product overflows to Inf); the file is damaged or was edited")

    def check_input(self, delta: Tensor) -> None:
        """Raises unless ``delta`` is a float32 1-D or 2-D tensor (what encode accepts)."""
        if not isinstance(delta, Tensor):
            raise TypeError(f"{self.name}: delta must be a torch.Tensor, got {type(delta).__name__}")
        if delta.dtype != torch.float32:
            raise TypeError(f"{self.name}: delta must be float32, got {delta.dtype}")
        if delta.dim() not in (1, 2):
            raise ValueError(f"{self.name}: delta must be 1-D or 2-D, got shape {tuple(delta.shape)}")

    _check_input = check_input  # the name the codecs' encode paths use

    @classmethod
    def field_allowed(cls, fieldname: str) -> bool:
        return any(re.fullmatch(p, fieldname) for p in cls.fields)


_REGISTRY: dict[str, type[Codec]] = {}


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def register(cls: type[Codec], *, builtin: bool = True) -> type[Codec]:
    """Class decorator: add a codec under its on-disk name. Built-in codecs must be CodecName members
    (stable names written into files); ``register(cls, builtin=False)`` adds another codec (a plugin,
    or a test's toy codec) under its own name."""
    key = normalize(cls.name)
    if builtin and key not in {c.value for c in CodecName}:
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


def unregister(name: str) -> None:
    """Remove a codec registered with ``builtin=False`` (tests clean up after themselves)."""
    key = normalize(name)
    if key in {c.value for c in CodecName}:
        raise ValueError(f"codec {key!r} is built in and cannot be removed")
    _REGISTRY.pop(key, None)


def available() -> list[str]:
    return sorted(_REGISTRY)


def auto_defaults() -> list[str]:
    """The codecs ``--method auto`` weighs when none are named (``Codec.auto_default``)."""
    return sorted(n for n, cls in _REGISTRY.items() if cls.auto_default)
