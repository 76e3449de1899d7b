"""What a delta file says is untrusted until checked here, before anything reads a field or allocates.

Three checks, in this order, each raising one ``DeltaFormatError`` line naming the file and what is wrong:

1. schema: the metadata JSON against ``schema/deltacomp-1.schema.json`` (types, required keys, ranges,
   the allow-list of embedded file names), validated by ``jsonschema``;
2. integrity record: ``metadata["integrity"]["sha256"]`` is a sha256 over the canonical metadata (every
   key but ``integrity``: parameters, settings, shapes, ``tied_to``, embedded files, base fingerprint,
   source) and the tensor manifest (each stored tensor's name, dtype and shape as the safetensors header
   gives them). Together with each parameter's checksum of its encoded bytes, every byte that decides
   the output is covered. It detects corruption, truncation and edits; it does not authenticate: whoever
   edits a file can recompute the digest;
3. consistency: every stored tensor belongs to exactly one parameter and every parameter's fields are
   stored, byte counts match the shapes, ``tied_to`` points at a stored parameter (so no cycle), every
   parameter applied to the base has its base fingerprint, and the overall fingerprint matches.

Files written before the integrity record existed (deltacomp 0.1.0 without ``integrity``) still load after
checks 1 and 3, with one warning per file: their metadata edits cannot be detected.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import warnings
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any

from .dtypes import DTYPES, SAFETENSORS_DTYPES
from .errors import DeltaFormatError

SCHEMA_PATH = Path(__file__).with_name("schema") / "deltacomp-1.schema.json"
MAX_METADATA_BYTES = 100_000_000   # safetensors' own header bound; the index json is held to the same
MAX_EMBEDDED_FILE_BYTES = 64 * 2**20  # a tokenizer.json is a few MB; anything larger is refused
MAX_NUMEL = 2**40                  # per tensor: far above any real weight, far below int64 overflow
SAFETENSORS_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}

Manifest = dict[str, tuple[str, tuple[int, ...]]]  # stored tensor name -> (safetensors dtype code, shape)
_warned_legacy: set[str] = set()


class LegacyDeltaWarning(UserWarning):
    """A delta file without an integrity record: loaded, but edits to its metadata go undetected."""


# -- 1. schema --------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _validator():
    import jsonschema

    schema = json.loads(SCHEMA_PATH.read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    # JSON Schema counts 2.0 as an integer; Python keeps it a float, which is no shape or byte count
    strict = cls.TYPE_CHECKER.redefine("integer", lambda _, v: isinstance(v, int) and not isinstance(v, bool))
    return jsonschema.validators.extend(cls, type_checker=strict)(schema)


def tensor_name_problem(name: str) -> str | None:
    """Why the schema's ``tensor_name`` (1 to 1024 characters, no control character) refuses ``name``, or None:
    a writer asks this of a checkpoint's names before it writes anything."""
    if not 1 <= len(name) <= 1024:
        return f"is {len(name)} characters long; a delta file holds tensor names of 1 to 1024 characters"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "holds a control character, which a delta file's tensor names may not"
    return None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def validate_schema(meta: Any, where: str) -> None:
    """Raise one DeltaFormatError line for the most relevant schema violation of ``meta``."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(meta))
    if error is None:
        return
    key = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator in ("type", "enum", "pattern", "minimum", "maximum", "const", "maxLength", "oneOf"):
        problem = f"{_short(error.instance)} is not allowed here ({error.validator} {_short(error.validator_value, 60)})"
    else:
        problem = _short(error.message, 160)
    raise DeltaFormatError(f"{where}: metadata {key}: {problem}; the file is damaged or was edited "
                           "(see docs/format.md)")


def finite_json_hooks(where: str, what: str = "metadata") -> dict[str, Any]:
    """``json.loads`` hooks that refuse NaN, Infinity and -Infinity (Python's JSON extensions) and numbers
    beyond a float's range (1e400 parses to inf): no writer produces them, a check comparing them is
    meaningless, and a summary that prints them is not JSON."""
    def constant(text: str) -> Any:
        shown = text if len(text) <= 40 else text[:37] + "..."
        raise DeltaFormatError(f"{where}: {what} holds the non-finite number {shown}, which no "
                               "writer produces; the file is damaged or was edited")

    def number(text: str) -> float:
        value = float(text)
        return value if math.isfinite(value) else constant(text)

    return {"parse_constant": constant, "parse_float": number}


# -- 2. integrity record ------------------------------------------------------------------------------------
def canonical_bytes(meta: dict[str, Any], manifest: Manifest) -> bytes:
    """One byte string for the metadata (``integrity`` left out) and manifest: sorted keys, no spaces, ASCII."""
    body = {"metadata": {k: v for k, v in meta.items() if k != "integrity"},
            "tensors": {n: [code, list(shape)] for n, (code, shape) in manifest.items()}}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def integrity_digest(meta: dict[str, Any], manifest: Manifest) -> str:
    return hashlib.sha256(canonical_bytes(meta, manifest)).hexdigest()


def check_integrity(meta: dict[str, Any], manifest: Manifest, where: str) -> bool:
    """True when the record matches; False (one warning per file) when the file predates records."""
    record = meta.get("integrity")
    if record is None:
        if where not in _warned_legacy:
            _warned_legacy.add(where)
            warnings.warn(f"{where}: has no integrity record (written by deltacomp {meta.get('deltacomp_version')}); "
                          "tensor checksums are checked but edits to its metadata cannot be detected; "
                          "compress again to get a fully checked file", LegacyDeltaWarning, stacklevel=3)
        return False
    got = integrity_digest(meta, manifest)
    if got != record["sha256"]:
        raise DeltaFormatError(f"{where}: integrity digest mismatch (recorded {record['sha256'][:16]}..., "
                               f"computed {got[:16]}...): the metadata or tensor layout was damaged or edited "
                               "after writing; get a fresh copy of the file")
    return True


# -- 3. consistency -----------------------------------------------------------------------------------------
def stored_nbytes(code: str, shape: tuple[int, ...], where: str, name: str) -> int:
    if code not in SAFETENSORS_DTYPES:
        raise DeltaFormatError(f"{where}: tensor {name} has dtype {code!r}, which deltacomp never writes")
    return math.prod(shape) * SAFETENSORS_DTYPES[code].itemsize


def check_consistency(meta: dict[str, Any], manifest: Manifest, where: str) -> None:
    """Parameters vs stored tensors, tied aliases, bounds and base fingerprints (after the schema)."""
    params: dict[str, dict] = meta["params"]
    expected: dict[str, str] = {}
    for name, p in params.items():
        numel = math.prod(p["shape"])
        if numel > MAX_NUMEL:
            raise DeltaFormatError(f"{where}: {name}: shape {p['shape']} has {numel} elements, above the "
                                   f"bound {MAX_NUMEL}")
        if "base_rows" in p and not (p["shape"] and p["base_rows"] <= p["shape"][0]):
            raise DeltaFormatError(f"{where}: {name}: base_rows {p['base_rows']} outside shape {p['shape']}")
        if "tied_to" in p:
            target = params.get(p["tied_to"])
            if target is None or "tied_to" in target or p["tied_to"] == name:
                raise DeltaFormatError(f"{where}: {name}: tied_to {p['tied_to']!r} is not a stored parameter "
                                       "(missing, itself tied, or a cycle)")
            if target["shape"] != p["shape"]:
                raise DeltaFormatError(f"{where}: {name}: shape {p['shape']}, but tied to {p['tied_to']} of "
                                       f"shape {target['shape']}")
            continue
        _check_new_rows(name, p, manifest, where)
        total = 0
        for f in p["fields"]:
            key = f"{name}.{f}"
            if key not in manifest:
                raise DeltaFormatError(f"{where}: tensor {key} is missing (truncated or edited file?)")
            expected[key] = name
            code, shape = manifest[key]
            total += stored_nbytes(code, shape, where, key)
        if total != p["nbytes"]:
            raise DeltaFormatError(f"{where}: {name}: stored tensors hold {total} bytes, metadata says {p['nbytes']}")
    extra = sorted(set(manifest) - set(expected))
    if extra:
        raise DeltaFormatError(f"{where}: tensor {extra[0]} belongs to no parameter ({len(extra)} such); "
                               "the parameter list was damaged or edited")
    _check_base(meta, params, where)


def _check_new_rows(name: str, p: dict[str, Any], manifest: Manifest, where: str) -> None:
    """Added rows (``base_rows``) are stored exactly when declared, with the fine-tune's dtype and the
    rows the base lacks."""
    key = f"{name}.new_rows"
    if ("base_rows" in p) != ("new_rows" in p["fields"]):
        raise DeltaFormatError(f"{where}: {name}: base_rows and a stored new_rows field go together; "
                               "the file was damaged or edited")
    if "base_rows" not in p or key not in manifest:
        return
    code, shape = manifest[key]
    want = (p["shape"][0] - p["base_rows"], *p["shape"][1:])
    if tuple(shape) != want or SAFETENSORS_DTYPES.get(code) != DTYPES[p["dtype"]]:
        raise DeltaFormatError(f"{where}: {key}: stored {code} {list(shape)}, expected {p['dtype']} {list(want)}")


def fingerprint_all(per_tensor: dict[str, str]) -> str:
    """The base fingerprint: sha256 over the sorted per-tensor fingerprints."""
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}={per_tensor[name]}\n".encode())
    return h.hexdigest()


def _check_base(meta: dict[str, Any], params: dict[str, dict], where: str) -> None:
    tensors = meta["base"]["tensors"]
    for name, p in params.items():
        if "tied_to" not in p and p["has_base"] and name not in tensors:
            raise DeltaFormatError(f"{where}: {name} applies to the base but the base section has no "
                                   "fingerprint for it; the file was damaged or edited")
    unknown = sorted(set(tensors) - set(params))
    if unknown:
        raise DeltaFormatError(f"{where}: base fingerprint of {unknown[0]}, which is no parameter")
    if fingerprint_all(tensors) != meta["base"]["fingerprint"]:
        raise DeltaFormatError(f"{where}: base fingerprint does not match its per-tensor fingerprints; "
                               "the file was damaged or edited")


# -- embedded files ---------------------------------------------------------------------------------------
def decode_embedded(name: str, value: Any, where: str, cap: int = MAX_EMBEDDED_FILE_BYTES) -> bytes:
    """An embedded file's bytes, inflated with a hard cap so a zlib bomb costs at most ``cap`` bytes."""
    try:
        if isinstance(value, str):
            data = value.encode("utf-8")
        elif "base64" in value:
            data = base64.b64decode(value["base64"], validate=True)
        else:
            packed = base64.b64decode(value["zlib_base64"], validate=True)
            inflater = zlib.decompressobj()
            data = inflater.decompress(packed, cap + 1)
            if len(data) > cap or inflater.unconsumed_tail:
                raise DeltaFormatError(f"{where}: embedded file {name} inflates beyond {cap} bytes; refused "
                                       "(a damaged or hostile file)")
            if not inflater.eof:
                raise DeltaFormatError(f"{where}: embedded file {name}: compressed data is truncated")
    except (binascii.Error, zlib.error, ValueError) as exc:
        raise DeltaFormatError(f"{where}: embedded file {name} cannot be decoded ({exc})") from None
    if len(data) > cap:
        raise DeltaFormatError(f"{where}: embedded file {name} is {len(data)} bytes, above the cap of {cap}")
    return data
