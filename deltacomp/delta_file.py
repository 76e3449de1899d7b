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
Writes go to temporary names renamed at the end; readers check the format version, each tensor's
checksum and bounds. This layer knows no codec: decoding, applying and each codec's field vocabulary are
checked above it (deltacomp.delta).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from ._version import __version__
from .dtypes import DTYPES, dtype_name
from .errors import ChecksumError, DeltaFormatError, OutputExistsError, SettingsError
from .storage import ShardBuffer

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


def fingerprint_all(per_tensor: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(per_tensor):
        h.update(f"{name}={per_tensor[name]}\n".encode())
    return h.hexdigest()


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
        if self.base_rows is not None:
            return (self.base_rows, *self.shape[1:])
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
    def from_json(cls, name: str, d: dict[str, Any], where: str) -> "ParamInfo":
        try:
            info = cls(name=name, codec=d.get("codec"), shape=tuple(int(s) for s in d["shape"]), dtype=d["dtype"],
                       settings=dict(d.get("settings", {})), fields=list(d.get("fields", [])),
                       nbytes=int(d.get("nbytes", 0)), checksum=str(d.get("checksum", "")),
                       has_base=bool(d.get("has_base", True)), base_rows=d.get("base_rows"),
                       tied_to=d.get("tied_to"))
        except (KeyError, TypeError, ValueError) as exc:
            raise DeltaFormatError(f"{where}: metadata of {name!r} is malformed ({exc!r})") from None
        if info.dtype not in DTYPES:
            raise DeltaFormatError(f"{where}: {name!r} has unknown dtype {info.dtype!r}")
        if any(s < 0 for s in info.shape) or (info.base_rows is not None and not
                                               (info.shape and 0 < int(info.base_rows) <= info.shape[0])):
            raise DeltaFormatError(f"{where}: {name!r} has out-of-bounds shape {info.shape} / base_rows {info.base_rows}")
        return info


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
    """Collects encoded tensors and writes the delta file atomically (sharded above a size)."""

    def __init__(self, path: str | os.PathLike, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.path = Path(path)
        if max_shard_bytes <= 0:
            raise SettingsError(f"max shard size must be positive, got {max_shard_bytes}")
        for p in (self.path, index_path(self.path)):
            if p.exists() and not overwrite:
                raise OutputExistsError(f"{p}: exists; pass --overwrite to replace it")
        if self.path.is_dir():
            raise OutputExistsError(f"{self.path}: is a folder; give a file name like ft.delta.safetensors")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.params: dict[str, ParamInfo] = {}
        self._tmpdir = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.tmp-", dir=self.path.parent))
        self._buffer = ShardBuffer(self._tmpdir, max_shard_bytes, {"format": "pt"})

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
        self._buffer.add({f"{info.name}.{f}": t for f, t in tensors.items()})

    def finish(self, metadata: dict[str, Any]) -> list[Path]:
        meta = {"format": FORMAT, "deltacomp_version": __version__, **metadata,
                "params": {n: p.to_json() for n, p in self.params.items()}}
        meta_json = json.dumps(meta, sort_keys=False)
        try:
            shards = self._buffer.shards
            if not shards:  # one file: metadata in its header
                tmp = self._tmpdir / "single"
                save_file(self._buffer.current, str(tmp), metadata={META_KEY: meta_json})
                os.replace(tmp, self.path)
                if index_path(self.path).exists():  # a stale sharded version with the same name
                    index_path(self.path).unlink()
                return [self.path]
            self._buffer.flush()
            finals = shard_paths(self.path, len(shards))
            weight_map = {}
            for (tmp, names), final in zip(shards, finals):
                weight_map.update({k: final.name for k in names})
            index = {"metadata": {META_KEY: meta_json}, "weight_map": weight_map}
            tmp_index = self._tmpdir / "index"
            tmp_index.write_text(json.dumps(index))
            for (tmp, _), final in zip(shards, finals):
                os.replace(tmp, final)
            os.replace(tmp_index, index_path(self.path))  # last: the file set is valid only now
            if self.path.exists():
                self.path.unlink()
            return finals
        finally:
            self.abort()

    def abort(self) -> None:
        if self._tmpdir.exists():
            for p in self._tmpdir.iterdir():
                p.unlink()
            self._tmpdir.rmdir()


# -- reading ----------------------------------------------------------------------------------------
class DeltaFile:
    """A delta file opened lazily. Tensors are read (and checksummed) one parameter at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self.files_on_disk: list[Path] = []
        meta_json = self._open()
        try:
            meta = json.loads(meta_json)
        except ValueError as exc:
            raise DeltaFormatError(f"{self.path}: metadata is not valid JSON ({exc}); the file is corrupted") from None
        fmt = str(meta.get("format", ""))
        m = re.fullmatch(r"deltacomp/(\d+)", fmt)
        if not m:
            raise DeltaFormatError(f"{self.path}: unknown format {fmt!r}; expected {FORMAT}")
        if int(m.group(1)) > FORMAT_VERSION:
            raise DeltaFormatError(
                f"{self.path}: format {fmt} is newer than this deltacomp ({__version__}) reads ({FORMAT}); "
                "upgrade deltacomp")
        self.metadata = meta
        self.params: dict[str, ParamInfo] = {
            n: ParamInfo.from_json(n, d, str(self.path)) for n, d in dict(meta.get("params", {})).items()}
        for info in self.params.values():
            if info.tied_to is not None:
                if info.tied_to not in self.params:
                    raise DeltaFormatError(f"{self.path}: {info.name} is tied to missing {info.tied_to!r}")
                continue
            for f in info.fields:
                if f"{info.name}.{f}" not in self._where:
                    raise DeltaFormatError(f"{self.path}: tensor {info.name}.{f} is missing (truncated file?)")
        base = meta.get("base", {})
        self.base_tensors: dict[str, str] = dict(base.get("tensors", {}))
        self.base_fingerprint: str = str(base.get("fingerprint", ""))
        self.files: dict[str, bytes] = {k: _file_bytes(v) for k, v in dict(meta.get("files", {})).items()}
        self.source: dict[str, Any] = dict(meta.get("source", {}))

    def _open_safetensors(self, file: Path):
        try:
            handle = self._stack.enter_context(safe_open(str(file), framework="pt"))
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
        try:
            index = json.loads(idx.read_text())
            meta, weight_map = index["metadata"][META_KEY], index["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeltaFormatError(f"{idx}: not a deltacomp index ({exc!r})") from None
        if self.path == idx:
            self.path = idx.with_name(idx.name[: -len(".index.json")])
        for shard in sorted(set(weight_map.values())):
            file = idx.parent / shard
            if "/" in shard or "\\" in shard or not file.is_file():
                raise DeltaFormatError(f"{idx}: shard {shard!r} is missing or outside the folder")
            h = self._open_safetensors(file)
            keys = set(h.keys())
            for k, s in weight_map.items():
                if s == shard:
                    if k not in keys:
                        raise DeltaFormatError(f"{file}: lacks tensor {k} that the index names")
                    self._where[k] = str(file)
        self.files_on_disk.append(idx)
        return meta

    # -- access -------------------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Size of the delta on disk, headers and metadata included."""
        return sum(p.stat().st_size for p in self.files_on_disk)

    def raw_tensors(self, name: str) -> dict[str, Tensor]:
        info = self.params[name]
        tensors = {f: self._handles[self._where[f"{name}.{f}"]].get_tensor(f"{name}.{f}") for f in info.fields}
        if encoded_checksum(tensors) != info.checksum:
            raise ChecksumError(f"{self.path}: checksum mismatch in {name}: the file is corrupted")
        return tensors

    def verify(self) -> None:
        """Checksum every stored tensor (raises ChecksumError on the first bad one)."""
        for name, info in self.params.items():
            if info.tied_to is None:
                self.raw_tensors(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "DeltaFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _file_bytes(v: Any) -> bytes:
    """Inverse of file_to_json."""
    import base64
    import zlib

    if isinstance(v, dict) and "zlib_base64" in v:
        return zlib.decompress(base64.b64decode(v["zlib_base64"]))
    if isinstance(v, dict) and "base64" in v:
        return base64.b64decode(v["base64"])
    return str(v).encode("utf-8")


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
