"""The delta file, format ``deltacomp/1``: a safetensors container of encoded tensors + JSON metadata.

Layout
  tensors     ``<param name>.<field>`` (fields are each codec's fixed vocabulary, e.g. ``.signs``,
              ``.scale``) plus ``<param name>.new_rows`` for rows a fine-tune added to an embedding.
  metadata    ``__metadata__["deltacomp"]`` = one JSON string::

      {"format": "deltacomp/1", "deltacomp_version": "...",
       "params": {name: {"codec", "settings", "shape", "dtype", "fields", "nbytes", "checksum",
                         optional "base_rows" (added rows), "tied_to" (stored once), "has_base"}},
       "base": {"fingerprint": sha256 over all, "tensors": {name: sha256 of the base tensor's bytes}},
       "files": {"config.json": text | {"zlib_base64": ...}},  # fine-tune's config/tokenizer files
       "source": {"method", "ratio", "rules"}}   # how it was made

  Above ``max_shard_bytes`` the file is split HF-style: ``NAME-0000i-of-0000N.delta.safetensors`` and
  ``NAME.delta.safetensors.index.json`` holding the metadata and the weight map.
Writes go to temporary names (``.NAME.tmp-*``) under an exclusive lock on the output, are read back and
verified, and only then renamed. Readers check, before using any field (deltacomp.integrity): the size of
the metadata, the format version, the metadata against the JSON schema, the integrity digest over the
metadata and tensor manifest, that parameters and stored tensors match one to one, and embedded files
with a hard cap on their inflated size; each parameter's checksum is checked when its tensors are read.
The full specification is docs/format.md. This layer knows no codec: decoding, applying and each codec's
field vocabulary are checked above it (deltacomp.delta).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor

from ._version import __version__
from .dtypes import SAFETENSORS_DTYPES, dtype_name
from .errors import ChecksumError, DeltaFormatError, OutputExistsError, UnknownTensorError
from .integrity import (MAX_METADATA_BYTES, SAFETENSORS_CODES, Manifest, check_consistency, check_integrity,
                        decode_embedded, finite_json_hooks, fingerprint_all, integrity_digest, validate_schema)
from .storage import OutputLock, ShardBuffer, as_path, check_shard_size, publish_file, refuse_special
from .tensorio import TensorReader, unique_keys

FORMAT = "deltacomp/1"
FORMAT_VERSION = 1
META_KEY = "deltacomp"
NEW_ROWS = "new_rows"
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

def tensor_digest(t: Tensor, h=None) -> "hashlib._Hash":
    """sha256 over a tensor's raw bytes (any dtype; bf16 included)."""
    h = h or hashlib.sha256()
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        h.update(flat.view(torch.uint8).numpy().data)
    return h


def encoded_checksum(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key]
        h.update(f"{key}:{dtype_name(t.dtype)}:{list(t.shape)};".encode())
        tensor_digest(t, h)
    return h.hexdigest()


def base_digest(t: Tensor) -> str:
    return tensor_digest(t).hexdigest()[:32]


@dataclass
class ParamInfo:
    name: str
    codec: str | None          # None for a tied alias
    shape: tuple[int, ...]     # the fine-tune's shape
    dtype: str                 # the fine-tune's dtype
    settings: dict[str, Any] = field(default_factory=dict)
    fields: list[str] = field(default_factory=list)
    nbytes: int = 0
    checksum: str = ""
    has_base: bool = True      # False: values stored whole (tensor only in the fine-tune)
    base_rows: int | None = None
    tied_to: str | None = None

    @property
    def encoded_shape(self) -> tuple[int, ...]:
        """The shape the codec encoded: the base rows only when tokens were added; a scalar's delta as
        shape (1,) (codecs take 1-D or 2-D; a tensor stored whole keeps its own shape)."""
        if self.base_rows is not None:
            return (self.base_rows, *self.shape[1:])
        if self.shape == () and self.has_base:
            return (1,)
        return self.shape

    def to_json(self) -> dict[str, Any]:
        out = {"codec": self.codec, "shape": list(self.shape), "dtype": self.dtype, "settings": self.settings,
               "fields": self.fields, "nbytes": self.nbytes, "checksum": self.checksum, "has_base": self.has_base}
        if self.base_rows is not None:
            out["base_rows"] = self.base_rows
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        return out

    @classmethod
    def from_json(cls, name: str, d: dict[str, Any]) -> "ParamInfo":
        """From metadata already checked by the schema and the consistency checks (deltacomp.integrity)."""
        return cls(name=name, codec=d["codec"], shape=tuple(d["shape"]), dtype=d["dtype"],
                   settings=dict(d["settings"]), fields=list(d["fields"]), nbytes=d["nbytes"],
                   checksum=d["checksum"], has_base=d["has_base"], base_rows=d.get("base_rows"),
                   tied_to=d.get("tied_to"))


# -- paths ------------------------------------------------------------------------------------------
def _split_name(path: Path) -> tuple[str, str]:
    for ext in (".delta.safetensors", ".safetensors"):
        if path.name.endswith(ext):
            return path.name[: -len(ext)], ext
    return path.name, ""


def index_path(path: Path) -> Path:
    return path.with_name(path.name + ".index.json")


def shard_paths(path: Path, n: int) -> list[Path]:
    stem, ext = _split_name(path)
    return [path.with_name(f"{stem}-{i + 1:05d}-of-{n:05d}{ext}") for i in range(n)]


# -- writing ----------------------------------------------------------------------------------------
class DeltaWriter:
    """Collects encoded tensors and writes the delta file atomically (sharded above a size).

    Holds an exclusive lock on the output from creation to ``finish``/``abort``, so a second run on the
    same output fails at once; the file is read back and verified under its temporary name before it is
    renamed, so nothing the reader would refuse ever appears at the output path."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.path = as_path(path, "the output delta file")
        check_shard_size(max_shard_bytes)
        if self.path.is_dir():
            raise OutputExistsError(f"{self.path}: is a folder; give a file name like ft.delta.safetensors")
        refuse_special(self.path)
        self.overwrite = overwrite
        self._check_free()
        self._lock = OutputLock(self.path)  # creates the missing folders above the file (removed on abort)  # also removes what a killed run on this output left
        try:
            self._check_free()
            self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        except BaseException:
            self._lock.release()
            raise
        self.max_shard_bytes = max_shard_bytes
        self.params: dict[str, ParamInfo] = {}
        self._manifest: Manifest = {}
        self._buffer = ShardBuffer(self._tmpdir, max_shard_bytes, {"format": "pt"})

    def _check_free(self) -> None:
        for p in (self.path, index_path(self.path)):
            if os.path.lexists(p) and not self.overwrite:  # (lexists: a dangling link is there too)
                what = "is a link to nothing" if not p.exists() else "exists"
                raise OutputExistsError(f"{p}: {what}; pass --overwrite to replace it")

    def add(self, info: ParamInfo, tensors: dict[str, Tensor] | None, new_rows: Tensor | None = None) -> None:
        """One parameter: its encoded tensors by field (None for a tied alias) and added rows, if any."""
        if info.name in self.params:
            raise ValueError(f"{info.name}: added twice to the delta file")
        tensors = dict(tensors or {})
        if new_rows is not None:
            tensors[NEW_ROWS] = new_rows
        info.fields = sorted(tensors)
        info.nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        info.checksum = encoded_checksum(tensors)
        self.params[info.name] = info
        for f, t in tensors.items():
            self._manifest[f"{info.name}.{f}"] = (SAFETENSORS_CODES[t.dtype], tuple(t.shape))
        self._buffer.add({f"{info.name}.{f}": t for f, t in tensors.items()})

    def add_blocks(self, info: ParamInfo, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   blocks: Callable[[str], Iterable[Tensor]]) -> None:
        """``add`` for a parameter too large to hold: each field of ``specs`` (field -> dtype, shape;
        ``new_rows`` included) is written from the consecutive row blocks ``blocks(field)`` yields, as
        they come. The file and its metadata are byte for byte what ``add`` writes for the whole tensors
        (the checksum is taken over the same bytes, field by field in sorted order)."""
        if info.name in self.params:
            raise ValueError(f"{info.name}: added twice to the delta file")
        order = sorted(specs)
        h = hashlib.sha256()

        def hashed(key: str) -> Iterator[Tensor]:
            f = key[len(info.name) + 1:]
            dtype, shape = specs[f]
            h.update(f"{f}:{dtype_name(dtype)}:{list(shape)};".encode())
            for block in blocks(f):
                tensor_digest(block, h)
                yield block

        self._buffer.add_blocks({f"{info.name}.{f}": specs[f] for f in order}, hashed)
        info.fields = order
        info.nbytes = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
        info.checksum = h.hexdigest()
        self.params[info.name] = info
        for f in order:
            self._manifest[f"{info.name}.{f}"] = (SAFETENSORS_CODES[specs[f][0]], tuple(specs[f][1]))

    def _metadata_json(self, metadata: dict[str, Any]) -> str:
        meta = {"format": FORMAT, "deltacomp_version": __version__, **metadata,
                "params": {n: p.to_json() for n, p in self.params.items()}}
        meta.pop("integrity", None)  # a copied file's record describes the old content
        meta = json.loads(json.dumps(meta))  # the digest is over what a reader will parse
        where = f"{self.path} (being written)"
        validate_schema(meta, where)
        check_consistency(meta, self._manifest, where)
        meta["integrity"] = {"sha256": integrity_digest(meta, self._manifest)}
        return json.dumps(meta)

    def finish(self, metadata: dict[str, Any]) -> list[Path]:
        try:
            meta_json = self._metadata_json(metadata)
            shards = self._buffer.shards
            if not shards:  # one file: metadata in its header
                tmp = self._tmpdir / "single.delta.safetensors"
                self._buffer.flush({META_KEY: meta_json}, empty=True)
                self._buffer.shards.pop()[0].rename(tmp)
                _verify_written(tmp)
                publish_file(tmp, self.path, self.overwrite)
                if index_path(self.path).exists():  # a stale sharded version with the same name
                    index_path(self.path).unlink()
                return [self.path]
            self._buffer.flush()
            finals = shard_paths(self.path, len(shards))
            weight_map, tmp_map = {}, {}
            for (tmp, names), final in zip(shards, finals):
                weight_map.update({k: final.name for k in names})
                tmp_map.update({k: tmp.name for k in names})
            check = self._tmpdir / "check.delta.safetensors.index.json"
            check.write_text(json.dumps({"metadata": {META_KEY: meta_json}, "weight_map": tmp_map}))
            _verify_written(check)
            tmp_index = self._tmpdir / "index"
            tmp_index.write_text(json.dumps({"metadata": {META_KEY: meta_json}, "weight_map": weight_map}))
            if index_path(self.path).exists() and not self.overwrite:
                raise OutputExistsError(f"{index_path(self.path)}: appeared while this run was writing; "
                                        "pass --overwrite to replace it")
            for (tmp, _), final in zip(shards, finals):
                os.replace(tmp, final)
            os.replace(tmp_index, index_path(self.path))  # last: the file set is valid only now
            if self.path.exists():
                self.path.unlink()
            return finals
        finally:
            self.abort()

    def abort(self) -> None:
        self._buffer.abort()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
        self._lock.release()


def _verify_written(path: Path) -> None:
    """Open and checksum a file just written, as any reader will (catches a writer bug before publishing)."""
    with DeltaFile(path) as df:
        df.verify()


# -- reading ----------------------------------------------------------------------------------------
class DeltaFile:
    """A delta file opened lazily. Tensors are read (and checksummed) one parameter at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path, "a delta file")
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._manifest: Manifest = {}
        self.files_on_disk: list[Path] = []
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    def _load(self) -> None:
        where = str(self.path)
        meta_json = self._open()
        if len(meta_json) > MAX_METADATA_BYTES:
            raise DeltaFormatError(f"{where}: metadata is {len(meta_json)} bytes, above the bound {MAX_METADATA_BYTES}")
        try:
            meta = json.loads(meta_json, object_pairs_hook=unique_keys, **finite_json_hooks(where))
        except (ValueError, RecursionError) as exc:
            raise DeltaFormatError(f"{where}: metadata is not valid JSON ({exc}); the file is corrupted") from None
        fmt = meta.get("format") if isinstance(meta, dict) else None
        m = re.fullmatch(r"deltacomp/(\d+)", fmt) if isinstance(fmt, str) else None
        if not m:
            raise DeltaFormatError(f"{where}: unknown format {fmt!r}; expected {FORMAT}")
        if int(m.group(1)) > FORMAT_VERSION:
            raise DeltaFormatError(
                f"{where}: format {fmt} is newer than this deltacomp ({__version__}) reads ({FORMAT}); "
                "upgrade deltacomp")
        validate_schema(meta, where)           # types and ranges, before any field is used
        self.integrity_checked = check_integrity(meta, self._manifest, where)
        check_consistency(meta, self._manifest, where)
        self.metadata = meta
        self.params: dict[str, ParamInfo] = {n: ParamInfo.from_json(n, d) for n, d in meta["params"].items()}
        self.base_tensors: dict[str, str] = dict(meta["base"]["tensors"])
        self.base_fingerprint: str = meta["base"]["fingerprint"]
        self.files: dict[str, bytes] = {k: decode_embedded(k, v, where) for k, v in meta["files"].items()}
        self.source: dict[str, Any] = dict(meta.get("source", {}))

    def _open_safetensors(self, file: Path):
        try:
            handle = self._stack.enter_context(TensorReader(file))
            for k in handle.keys():  # the manifest the integrity digest covers, from the header alone
                self._manifest[k] = (handle.dtype_code(k), handle.shape(k))
        except DeltaFormatError:
            raise
        except Exception as exc:
            raise DeltaFormatError(f"{file}: not a readable safetensors file, truncated or corrupted ({exc})") from None
        self._handles[str(file)] = handle
        self.files_on_disk.append(file)
        return handle

    def _open(self) -> str:
        path = self.path
        if path.name.endswith(".index.json"):
            idx = path
        elif path.is_file():
            h = self._open_safetensors(path)
            meta = (h.metadata() or {}).get(META_KEY)
            if meta is None:
                raise DeltaFormatError(f"{path}: a safetensors file but not a deltacomp delta (no '{META_KEY}' metadata)")
            for k in h.keys():
                self._where[k] = str(path)
            return meta
        else:
            idx = index_path(path)
        if not idx.is_file():
            raise DeltaFormatError(f"{path}: no such delta file (nor {idx.name})")
        if idx.stat().st_size > MAX_METADATA_BYTES + 2**20 * 64:  # the metadata plus a weight map
            raise DeltaFormatError(f"{idx}: index is {idx.stat().st_size} bytes, above the bound; refused")
        try:
            index = json.loads(idx.read_bytes(), object_pairs_hook=unique_keys, **finite_json_hooks(str(idx), "index"))
            meta, weight_map = index["metadata"][META_KEY], index["weight_map"]
            if not isinstance(meta, str) or not isinstance(weight_map, dict):
                raise TypeError("metadata.deltacomp must be a string and weight_map an object")
        except (ValueError, KeyError, TypeError, RecursionError) as exc:
            raise DeltaFormatError(f"{idx}: not a deltacomp index ({exc!r})") from None
        if self.path == idx:
            self.path = idx.with_name(idx.name[: -len(".index.json")])
        shards = set(weight_map.values())
        if not all(isinstance(s, str) for s in shards):
            raise DeltaFormatError(f"{idx}: weight_map values must be shard file names")
        for shard in sorted(shards):
            file = idx.parent / shard
            if "/" in shard or "\\" in shard or shard.startswith(".") or not file.is_file():
                raise DeltaFormatError(f"{idx}: shard {shard!r} is missing or outside the folder")
            h = self._open_safetensors(file)
            keys = set(h.keys())
            for k, s in weight_map.items():
                if s == shard:
                    if k not in keys:
                        raise DeltaFormatError(f"{file}: lacks tensor {k} that the index names")
                    self._where[k] = str(file)
            unmapped = keys - set(weight_map)
            if unmapped:
                raise DeltaFormatError(f"{file}: holds tensor {sorted(unmapped)[0]}, which the index does not map")
        self.files_on_disk.append(idx)
        return meta

    # -- access -------------------------------------------------------------------------------------
    def param(self, name: str) -> ParamInfo:
        """The stored parameter ``name``; UnknownTensorError (a KeyError too) naming the file otherwise."""
        info = self.params.get(name) if isinstance(name, str) else None
        if info is None:
            shown = ", ".join(list(self.params)[:3]) + (", ..." if len(self.params) > 3 else "")
            raise UnknownTensorError(f"{self.path}: holds no parameter {name!r} ({len(self.params)} stored: {shown})")
        return info

    @property
    def nbytes(self) -> int:
        """Size of the delta on disk, headers and metadata included."""
        return sum(p.stat().st_size for p in self.files_on_disk)

    def raw_tensors(self, name: str) -> dict[str, Tensor]:
        info = self.param(name)
        try:
            tensors = {f: self._handles[self._where[f"{name}.{f}"]].get(f"{name}.{f}") for f in info.fields}
        except (OSError, ValueError) as exc:
            raise DeltaFormatError(f"{self.path}: {name}: cannot read its tensors ({exc})") from None
        if encoded_checksum(tensors) != info.checksum:
            raise ChecksumError(f"{self.path}: checksum mismatch in {name}: the file is corrupted")
        return tensors

    def field_rows(self, name: str, fld: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of one stored field of a parameter, not checksummed (``verify_param`` the
        parameter first): for reading a parameter too large to hold in blocks of rows."""
        key = f"{name}.{fld}"
        try:
            return self._handles[self._where[key]].get_rows(key, start, stop)
        except (OSError, ValueError, KeyError) as exc:
            raise DeltaFormatError(f"{self.path}: {name}: cannot read rows {start}:{stop} of {fld} ({exc})") from None

    def verify_param(self, name: str) -> None:
        """The checksum of one parameter, its bytes streamed in chunks (memory bounded whatever its size);
        ChecksumError when it does not match."""
        info = self.param(name)
        h = hashlib.sha256()
        try:
            for f in sorted(info.fields):
                key = f"{name}.{f}"
                code, shape = self._manifest[key]
                if code not in SAFETENSORS_DTYPES:
                    raise ValueError(f"dtype {code} of {key} is not supported")
                h.update(f"{f}:{dtype_name(SAFETENSORS_DTYPES[code])}:{list(shape)};".encode())
                for chunk in self._handles[self._where[key]].iter_bytes(key):
                    h.update(chunk.numpy().data)
        except (OSError, ValueError) as exc:
            raise DeltaFormatError(f"{self.path}: {name}: cannot read its tensors ({exc})") from None
        if h.hexdigest() != info.checksum:
            raise ChecksumError(f"{self.path}: checksum mismatch in {name}: the file is corrupted")

    def verify(self) -> None:
        """Checksum every stored tensor (raises ChecksumError on the first bad one), streamed."""
        for name, info in self.params.items():
            if info.tied_to is None:
                self.verify_param(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "DeltaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def file_to_json(data: bytes, inline_limit: int = 4096) -> Any:
    """Small text files stay readable in the metadata; larger or binary ones (a tokenizer.json is MBs, and
    JSON escaping would inflate it) are stored zlib-compressed, base64-encoded."""
    import base64
    import zlib

    if len(data) <= inline_limit:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(data).decode("ascii")}
    return {"zlib_base64": base64.b64encode(zlib.compress(data, 9)).decode("ascii")}
