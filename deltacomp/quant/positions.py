"""Compact storage of a sparse support: sorted flat positions (indices into numel) + optional signs.

Used by the ``ternary`` and ``dare`` codecs. Four interchangeable position storages; ``auto`` encodes
with each available one and keeps the smallest (ties go to the earlier name in ``STORAGES``). The
choice is returned in the params as ``storage`` and decides which fields are present.

Layouts (all bit streams are little-endian within a byte: bit i of byte j is stream bit 8*j + i,
the same order as the SIGNS layout in ops.py; padding bits are 0):

  golomb  ``rice_q`` uint8 bit stream: for each kept position, in order, q ones then one zero;
          ``rice_r`` uint8 bit stream: r-bit fields, field i at stream bits [i*r, (i+1)*r), LSB first.
          gap_i = pos_i - pos_{i-1} - 1 (pos_{-1} = -1); q = gap >> r, field = gap & (2^r - 1).
          Splitting the unary and binary parts into two streams costs nothing (same bit count as an
          interleaved Rice code) and makes decoding vectorizable. r (params ``rice``) is the exact
          minimiser of the stored bits for these gaps, which for i.i.d. positions at density p is the
          classic Rice parameter ~ log2(ln 2 / p).
  rans    ``rans`` uint8: little-endian uint32 words of a constriction ANS stack (24-bit probabilities).
          Symbols: each gap is written as e = gap // M escape symbols (value M) then gap % M, with a
          categorical model P(g) = p (1-p)^g for g < M, P(escape) = (1-p)^M, p = kept / numel. The
          geometric law is memoryless, so the escape split costs nothing: the code length of a gap is
          -log2(p (1-p)^gap), i.e. the entropy bound H(p)/p per kept entry on i.i.d. positions.
          M = clamp(ceil(ln 16 / p), 1, 16384); params ``rans_symbols`` = number of coded symbols.
          Whatever the arrangement, the gaps sum to at most numel - k, so the ideal code length is at
          most -k log2 p - (numel - k) log2(1 - p) = numel H(p): ``rans_nbytes_bound`` adds the 24-bit
          probability rounding and the coder's final state to that, and lets a byte budget pick k.
  bitmap  ``mask`` uint8: ceil(numel / 8) bytes, bit n set when flat index n is kept (1 bit/param).
  zstd    ``zmask``: the ``mask`` bytes compressed by zstd (level 3).
  signs   ``signs`` uint8, ceil(kept / 8) bytes, bit i = 1 when the i-th kept entry (in position
          order) is positive. Present only when signs are given.

Entropy bound (``bound_bits``): a support of k of n entries chosen uniformly needs log2 C(n, k) ~
n H(k/n) bits; each sign adds one. Per parameter: H(p) + p; per kept entry: H(p)/p + 1.

Reading (``check_support``, then ``decode_support``): every stream's length is bounded from (kept,
numel, the storage's parameters) before it is unpacked or decompressed: golomb ``rice_q`` at most
ceil((kept + ((numel - kept) >> rice)) / 8) bytes and ``rice_r`` exactly ceil(kept * rice / 8); ``rans``
at most 24 bits per symbol plus two words of coder state; ``mask`` exactly ceil(numel / 8); ``zmask``
at most zstd's compress bound of the mask. Once decoded, no stream may hold bytes past its last code.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import DeltaFormatError, SettingsError

STORAGES = ("golomb", "rans", "bitmap", "zstd")
STORAGE_FIELDS = {"golomb": ("rice_q", "rice_r"), "rans": ("rans",), "bitmap": ("mask",), "zstd": ("zmask",)}
FIELDS = ("signs",) + tuple(f for fs in STORAGE_FIELDS.values() for f in fs)
_RANS_MAX_ALPHABET = 16384
_ZSTD_LEVEL = 3


# -- bit helpers -----------------------------------------------------------------------------------
def pack_bits(bits: np.ndarray) -> Tensor:
    """bool/0-1 array -> uint8 tensor, little-endian bit order within each byte."""
    return torch.from_numpy(np.packbits(np.asarray(bits, dtype=bool), bitorder="little"))


def unpack_bits(packed: Tensor, n: int) -> np.ndarray:
    """First n bits of a uint8 tensor (little-endian bit order) as a bool array."""
    data = _bytes(packed, "bits")
    if data.size * 8 < n:
        raise DeltaFormatError(f"bit stream holds {data.size * 8} bits, expected at least {n}")
    return np.unpackbits(data, count=n, bitorder="little").astype(bool)


def _bytes(t: Tensor, what: str) -> np.ndarray:
    if not isinstance(t, Tensor) or t.dtype != torch.uint8 or t.dim() != 1:
        raise DeltaFormatError(f"field {what!r} must be a 1-D uint8 tensor, got "
                               f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    return t.contiguous().numpy()


def _as_positions(positions: Tensor | np.ndarray, numel: int) -> np.ndarray:
    pos = positions.cpu().numpy() if isinstance(positions, Tensor) else np.asarray(positions)
    pos = pos.astype(np.int64, copy=False).reshape(-1)
    if pos.size and (pos[0] < 0 or pos[-1] >= numel or np.any(np.diff(pos) <= 0)):
        raise ValueError(f"positions must be strictly increasing flat indices in [0, {numel})")
    return pos


def _gaps(pos: np.ndarray) -> np.ndarray:
    return np.diff(pos, prepend=-1) - 1


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    return np.cumsum(gaps + 1) - 1


# -- golomb-rice -----------------------------------------------------------------------------------
def _rice_param(gaps: np.ndarray) -> int:
    """The Rice parameter r minimising n (1 + r) + sum(gap >> r). The cost is convex in r (its step
    cost(r+1) - cost(r) = n - sum(ceil((gap >> r) / 2)) never decreases), so walk downhill from the
    geometric-law guess r ~ log2(mean gap * ln 2)."""
    if gaps.size == 0:
        return 0
    costs: dict[int, int] = {}

    def cost(r: int) -> int:
        if r not in costs:
            costs[r] = gaps.size * (1 + r) + int((gaps >> r).sum())
        return costs[r]

    r = max(0, int(math.log2(max(float(gaps.mean()) * math.log(2), 1.0))))
    while cost(r + 1) < cost(r):
        r += 1
    while r > 0 and cost(r - 1) <= cost(r):
        r -= 1
    return r


def _fields_to_bits(values: np.ndarray, r: int) -> np.ndarray:
    """(n,) nonnegative ints < 2^r -> (n * r,) bits, LSB first per value."""
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= r)
    as_bytes = values.astype(f"<u{width}").view(np.uint8).reshape(-1, width)
    return np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :r].reshape(-1)


def _bits_to_fields(bits: np.ndarray, n: int, r: int) -> np.ndarray:
    """Inverse of _fields_to_bits: (n * r,) bits -> (n,) int64."""
    width = next(w for w in (1, 2, 4, 8) if 8 * w >= r)
    padded = np.zeros((n, 8 * width), dtype=np.uint8)
    padded[:, :r] = bits.reshape(n, r)
    return np.packbits(padded, axis=1, bitorder="little").view(f"<u{width}").reshape(-1).astype(np.int64)


def _golomb_encode(pos: np.ndarray) -> tuple[dict[str, Tensor], dict[str, Any]]:
    gaps = _gaps(pos)
    r = _rice_param(gaps)
    q = gaps >> r
    unary = np.ones(int(q.sum()) + gaps.size, dtype=bool)
    unary[np.cumsum(q + 1) - 1] = False  # the terminating zero of each unary code
    fields = _fields_to_bits(gaps & ((1 << r) - 1), r) if r else np.zeros(0, dtype=bool)
    return {"rice_q": pack_bits(unary), "rice_r": pack_bits(fields)}, {"rice": r}


def _golomb_decode(tensors: dict[str, Tensor], params: dict[str, Any], k: int) -> np.ndarray:
    """Streams whose lengths ``_check_sizes`` bounded; the unary one may not run past its last code."""
    r = params["rice"]
    qbytes = _bytes(tensors["rice_q"], "rice_q")
    ends = np.flatnonzero(np.unpackbits(qbytes, bitorder="little") == 0)[:k]
    if ends.size < k:
        raise DeltaFormatError(f"golomb storage: unary stream ends after {ends.size} of {k} gaps")
    used = (int(ends[-1]) + 8) // 8 if k else 0  # bytes up to the one holding the last terminating zero
    if qbytes.size != used:
        raise DeltaFormatError(f"golomb storage: field rice_q holds {qbytes.size} bytes, its {k} codes end in "
                               f"byte {used} (trailing data)")
    gaps = (np.diff(ends, prepend=-1) - 1) << r
    if r:
        gaps |= _bits_to_fields(unpack_bits(tensors["rice_r"], k * r).astype(np.uint8), k, r)
    return _from_gaps(gaps)


# -- rANS (constriction) ---------------------------------------------------------------------------
def _rans_model(k: int, numel: int):
    import constriction

    p = k / numel
    m = _RANS_MAX_ALPHABET if p == 0 else int(min(max(math.ceil(math.log(16) / p), 1), _RANS_MAX_ALPHABET))
    g = np.arange(m, dtype=np.float64)
    probs = np.append(p * np.power(1.0 - p, g), (1.0 - p) ** m)
    return constriction.stream.model.Categorical(probs, perfect=False), m


def _rans_encode(pos: np.ndarray, numel: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    import constriction

    gaps = _gaps(pos)
    if gaps.size == 0:
        return {"rans": torch.zeros(0, dtype=torch.uint8)}, {"rans_symbols": 0}
    model, m = _rans_model(gaps.size, numel)
    esc = gaps // m
    symbols = np.full(int(esc.sum()) + gaps.size, m, dtype=np.int32)
    symbols[np.cumsum(esc + 1) - 1] = gaps % m
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, model)
    words = coder.get_compressed().astype("<u4", copy=False)
    return {"rans": torch.from_numpy(words.view(np.uint8).copy())}, {"rans_symbols": int(symbols.size)}


def _rans_decode(tensors: dict[str, Tensor], params: dict[str, Any], k: int, numel: int) -> np.ndarray:
    import constriction

    if k == 0:
        return np.zeros(0, dtype=np.int64)
    nsym = params["rans_symbols"]
    data = _bytes(tensors["rans"], "rans")
    model, m = _rans_model(k, numel)
    try:
        coder = constriction.stream.stack.AnsCoder(data.view("<u4").astype(np.uint32))
        symbols = coder.decode(model, nsym).astype(np.int64)
    except ValueError as exc:
        raise DeltaFormatError(f"rans storage: field rans cannot be decoded ({exc})") from None
    if not coder.is_empty():  # the encoder's stack holds exactly its symbols
        raise DeltaFormatError(f"rans storage: field rans holds {coder.num_words()} words beyond its {nsym} "
                               "symbols (trailing data)")
    ends = np.flatnonzero(symbols != m)
    if ends.size != k:
        raise DeltaFormatError(f"rans storage: decoded {ends.size} gaps, expected {k}")
    esc = np.diff(ends, prepend=-1) - 1
    return _from_gaps(esc * m + symbols[ends])


# -- bitmap / zstd ---------------------------------------------------------------------------------
def _bitmap(pos: np.ndarray, numel: int) -> np.ndarray:
    bits = np.zeros(numel, dtype=bool)
    bits[pos] = True
    return bits


def _zstd_encode(pos: np.ndarray, numel: int) -> dict[str, Tensor]:
    import zstandard

    packed = np.packbits(_bitmap(pos, numel), bitorder="little")
    blob = zstandard.ZstdCompressor(level=_ZSTD_LEVEL).compress(packed.tobytes())
    return {"zmask": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}


def _zstd_decode(tensors: dict[str, Tensor], numel: int) -> Tensor:
    import zstandard

    nbytes = (numel + 7) // 8
    blob = _bytes(tensors["zmask"], "zmask").tobytes()
    try:
        # a frame may declare its own content size, which one-shot decompress would allocate whatever
        # max_output_size says: refuse a declared size other than the mask's, then stream with a cap
        declared = zstandard.frame_content_size(blob)
        if declared not in (-1, nbytes):
            raise DeltaFormatError(f"zstd storage: frame declares {declared} bytes, the mask has {nbytes}")
        reader = zstandard.ZstdDecompressor().stream_reader(blob, read_across_frames=False)
        chunks, got = [], 0
        while got <= nbytes:
            chunk = reader.read(min(nbytes + 1 - got, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
        raw = b"".join(chunks)
        if len(raw) == nbytes:  # the frame holds exactly the mask, so a second pass is bounded
            rest = zstandard.ZstdDecompressor().decompressobj()
            rest.decompress(blob)
            if rest.unused_data or not rest.eof:
                raise DeltaFormatError(f"zstd storage: field zmask holds {len(rest.unused_data)} bytes after its "
                                       "frame (trailing data)")
    except zstandard.ZstdError as exc:
        raise DeltaFormatError(f"zstd storage: cannot decompress the mask ({exc})") from None
    if len(raw) != nbytes:
        raise DeltaFormatError(f"zstd storage: mask has {len(raw)} bytes, expected {nbytes}")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _mask_positions(mask: Tensor, numel: int) -> np.ndarray:
    return np.flatnonzero(unpack_bits(mask, numel))


def _zstd_bound(nbytes: int) -> int:
    """zstd's ZSTD_COMPRESSBOUND (+ slack for the frame header): no frame of ``nbytes`` is longer."""
    return nbytes + (nbytes >> 8) + (((128 << 10) - nbytes) >> 11 if nbytes < (128 << 10) else 0) + 32


def _check_sizes(name: str, tensors: dict[str, Tensor], params: dict[str, Any], k: int, numel: int) -> None:
    """Each stream's byte count against what ``k`` of ``numel`` positions allow under the storage's own
    parameters, before anything is unpacked or decompressed (a Golomb-Rice unary stream unpacks to a bool
    and an int64 index per bit, ~75x its bytes): memory stays bounded by the tensor, and a stream longer
    than any encoding carries trailing data. Where the exact length is known only once decoded (Golomb's
    unary stream, rANS, zstd), the decoder checks that no bytes are left over."""
    if name == "golomb":
        r = params.get("rice")
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r <= 62:
            raise DeltaFormatError(f"golomb storage: Rice parameter {r!r} is not an integer in [0, 62]")
        # k terminating zeros plus the quotients gap >> r, whose sum is at most (sum of gaps) >> r; the k
        # gaps of positions below numel sum to at most numel - k
        limits = {"rice_q": ((k + ((numel - k) >> r) + 7) // 8, "at most"),
                  "rice_r": ((k * r + 7) // 8, "exactly")}
        why = f"{k} of {numel} positions at Rice parameter {r}"
    elif name == "rans":
        nsym = params.get("rans_symbols") if k else 0  # no support: nothing is decoded
        if not isinstance(nsym, int) or isinstance(nsym, bool) or not k <= nsym <= numel + k:
            raise DeltaFormatError(f"rans storage: {nsym!r} symbols do not describe {k} kept entries")
        # a symbol has a probability of at least 2^-24 (24-bit leaky quantization): at most 24 bits each,
        # and the coder's final state adds two words
        limits = {"rans": (4 * (-(-24 * nsym // 32) + 2) if nsym else 0, "at most")}
        why = f"{nsym} symbols"
    elif name == "bitmap":
        limits, why = {"mask": ((numel + 7) // 8, "exactly")}, f"a mask of {numel} entries"
    else:
        limits, why = {"zmask": (_zstd_bound((numel + 7) // 8), "at most")}, f"a mask of {numel} entries"
    for fld, (most, how) in limits.items():
        size = _bytes(tensors[fld], fld).size
        words = fld != "rans" or size % 4 == 0  # rANS stores whole 32-bit words
        if size > most or (how == "exactly" and size != most) or not words:
            raise DeltaFormatError(f"{name} storage: field {fld} holds {size} bytes, {why} take {how} {most}"
                                   + (" (trailing data)" if size > most else "" if words else " in 4-byte words"))


# -- public API ------------------------------------------------------------------------------------
def available_storages() -> tuple[str, ...]:
    """The storages whose optional package (constriction for rans, zstandard for zstd) is installed."""
    out = []
    for name in STORAGES:
        try:
            if name == "rans":
                import constriction  # noqa: F401
            elif name == "zstd":
                import zstandard  # noqa: F401
        except ImportError:
            continue
        out.append(name)
    return tuple(out)


def _encode_one(name: str, pos: np.ndarray, numel: int) -> tuple[dict[str, Tensor], dict[str, Any]]:
    if name == "golomb":
        return _golomb_encode(pos)
    if name == "rans":
        return _rans_encode(pos, numel)
    if name == "bitmap":
        return {"mask": pack_bits(_bitmap(pos, numel))}, {}
    return _zstd_encode(pos, numel), {}


def encode_support(positions: Tensor | np.ndarray, numel: int, signs: Tensor | np.ndarray | None = None,
                   storage: str = "auto") -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Store sorted flat ``positions`` (< numel) and, if given, one sign per position (True = +).

    Returns (tensors, params); params hold ``storage`` (the one used), ``kept`` and what that storage
    needs to decode. ``storage="auto"`` keeps the smallest of the installed storages."""
    if storage != "auto" and storage not in STORAGES:
        raise SettingsError(f"unknown position storage {storage!r}; choose one of: auto, {', '.join(STORAGES)}")
    pos = _as_positions(positions, numel)
    names = available_storages() if storage == "auto" else (storage,)
    if storage not in ("auto",) + names:
        pkg = "constriction" if storage == "rans" else "zstandard"
        raise SettingsError(f"position storage {storage!r} needs the {pkg} package: pip install {pkg}")
    best = None
    for name in names:
        if name == "bitmap" and best is not None and best[0] <= (numel + 7) // 8:
            continue  # its size is known without encoding and cannot win
        tensors, params = _encode_one(name, pos, numel)
        size = sum(t.numel() for t in tensors.values())
        if best is None or size < best[0]:
            best = (size, name, tensors, params)
    _, name, tensors, params = best
    tensors = dict(tensors)
    if signs is not None:
        sg = signs.cpu().numpy() if isinstance(signs, Tensor) else np.asarray(signs)
        sg = sg.astype(bool, copy=False).reshape(-1)
        if sg.size != pos.size:
            raise ValueError(f"got {sg.size} signs for {pos.size} positions")
        tensors["signs"] = pack_bits(sg)
    return tensors, {"storage": name, "kept": int(pos.size), **params}


def check_support(tensors: dict[str, Tensor], params: dict[str, Any], numel: int,
                  with_signs: bool = True) -> tuple[str, int]:
    """(storage, kept) after what ``decode_support`` checks before decoding: the storage and its fields,
    the kept count, one sign bit per kept entry, and each stream's length against its bound from
    (kept, numel, the storage's parameters). Nothing is unpacked or decompressed, so it is cheap enough
    for a codec's ``check_stored`` (``inspect``'s verification) as well."""
    name = params.get("storage")
    if name not in STORAGES:
        raise DeltaFormatError(f"unknown position storage {name!r} (known: {', '.join(STORAGES)})")
    missing = [f for f in STORAGE_FIELDS[name] + (("signs",) if with_signs else ()) if f not in tensors]
    if missing:
        raise DeltaFormatError(f"{name} storage: missing field(s) {', '.join(missing)}")
    k = params.get("kept")
    if not isinstance(k, int) or not 0 <= k <= numel:
        raise DeltaFormatError(f"kept count {k!r} is not an integer in [0, {numel}]")
    if with_signs and tuple(tensors["signs"].shape) != ((k + 7) // 8,):  # one bit per kept entry, no more
        raise DeltaFormatError(f"signs: {tuple(tensors['signs'].shape)} bytes, {k} kept entries need "
                               f"{(k + 7) // 8}")
    _check_sizes(name, tensors, params, k, numel)
    return name, k


def decode_support(tensors: dict[str, Tensor], params: dict[str, Any], numel: int,
                   with_signs: bool = True) -> tuple[Tensor, Tensor | None]:
    """Inverse of encode_support: (int64 positions, bool signs or None). Vectorized throughout; every
    stream's length is bounded (``check_support``) before it is unpacked, and none may carry trailing data."""
    name, k = check_support(tensors, params, numel, with_signs)
    if name == "golomb":
        pos = _golomb_decode(tensors, params, k)
    elif name == "rans":
        pos = _rans_decode(tensors, params, k, numel)
    elif name == "bitmap":
        pos = _mask_positions(tensors["mask"], numel)
    else:
        pos = _mask_positions(_zstd_decode(tensors, numel), numel)
    if pos.size != k or (k and (pos[0] < 0 or pos[-1] >= numel)):
        raise DeltaFormatError(f"{name} storage: decoded {pos.size} positions in range, expected {k} in [0, {numel})")
    signs = torch.from_numpy(unpack_bits(tensors["signs"], k)) if with_signs else None
    return torch.from_numpy(pos.astype(np.int64, copy=False)), signs


def entropy_bits(p: float) -> float:
    """Binary entropy H(p) in bits."""
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def bound_bits(kept: int, numel: int, value_bits: float = 1.0) -> float:
    """Entropy bound in bits for a support of ``kept`` of ``numel`` plus ``value_bits`` per kept entry:
    numel * H(kept / numel) + kept * value_bits (1 for a sign, 16 for an fp16 value)."""
    return numel * entropy_bits(kept / numel) + kept * value_bits if numel else 0.0


def rans_nbytes_bound(kept: int, numel: int) -> int:
    """An upper bound on the ``rans`` field's bytes for any support of ``kept`` of ``numel``: the
    numel H(p) ideal code length plus 1% for probability rounding and 3 words of coder state."""
    if kept == 0:
        return 0
    return 4 * (math.ceil(numel * entropy_bits(kept / numel) * 1.01 / 32) + 3)


def storage_stats(nbytes: int, kept: int, numel: int, value_bits: float = 1.0) -> dict[str, Any]:
    """What ``inspect`` prints for a sparse encoding of ``nbytes`` in all (scales included): bits per
    parameter and per kept entry, the entropy bound of the same (``bound_bits``) and how far above it
    the stored size is (``over_bound`` = stored / bound - 1; None when the bound is 0)."""
    bound = bound_bits(kept, numel, value_bits)
    bits = 8.0 * nbytes
    return {
        "kept": kept,
        "density": kept / numel if numel else 0.0,
        "bits_per_param": bits / numel if numel else 0.0,
        "bits_per_nonzero": bits / kept if kept else None,
        "bound_bits_per_param": bound / numel if numel else 0.0,
        "bound_bits_per_nonzero": bound / kept if kept else None,
        "over_bound": bits / bound - 1.0 if bound > 0 else None,
    }
