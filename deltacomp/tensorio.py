"""safetensors files read and written one tensor at a time, with memory bounded by that tensor.

Reading: safetensors' ``safe_open`` memory-maps the whole file, and every page a tensor was read from
stays mapped in the process (file-backed RSS), so a run over a big checkpoint *looks* as large as the
checkpoint to ``top`` and to schedulers. ``TensorReader`` lets ``safe_open`` validate the header (its
checks of offsets, sizes and bounds are the reference), then reads each tensor with explicit reads into
a fresh buffer: nothing stays mapped once a tensor is returned.

Writing: a safetensors header (names, dtypes, shapes, offsets) precedes the data, and a writer learns
the tensors one by one. ``TensorFileWriter`` appends each tensor's bytes to a spill file as it comes and,
on ``close``, writes the header and copies the bytes behind it (in the kernel where it can), in
safetensors' own order (by dtype, larger first, then by name), so each tensor stays aligned to its
element size and the file equals, byte for byte, what ``save_file`` would have written.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors import safe_open
from torch import Tensor

from .dtypes import SAFETENSORS_DTYPES

_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# safetensors' Dtype enum order: save_file lays tensors out by it, largest first, then by name. Element
# sizes never grow along it, so every tensor starts aligned to its element size.
_DTYPE_RANK = {c: i for i, c in enumerate(("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "F16", "BF16",
                                           "I32", "F32", "F64", "I64"))}
_COPY_CHUNK = 64 * 1024**2


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are unique: with a key given twice, which one counts depends on the
    parser, and the integrity digest (over the parsed metadata) would not see the other."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out



class TensorReader:
    """One safetensors file; ``get`` reads a tensor into new memory with no memory map kept.

    Raises whatever safetensors raises for a malformed header (callers wrap it with their file's name)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        with safe_open(str(self.path), framework="pt") as handle:  # validation only; closed (unmapped) at once
            self._metadata = handle.metadata()
        self._file = open(self.path, "rb", buffering=0)
        try:
            (n,) = struct.unpack("<Q", self._file.read(8))
            header = json.loads(self._file.read(n), object_pairs_hook=unique_keys)
        except BaseException:
            self._file.close()
            raise
        header.pop("__metadata__", None)
        self._start = 8 + n
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {
            k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in header.items()}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def metadata(self) -> dict[str, str] | None:
        return self._metadata

    def dtype_code(self, name: str) -> str:
        return self._entries[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def get(self, name: str) -> Tensor:
        code, shape, begin, end = self._entries[name]
        return self._read(name, begin, end - begin).view(self._dtype(name)).reshape(shape)

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` (along the first dimension) of a tensor with at least one dimension: one
        contiguous byte range of the file, read into new memory."""
        code, shape, begin, end = self._entries[name]
        dtype = self._dtype(name)
        if not shape or not 0 <= start <= stop <= shape[0]:
            raise ValueError(f"{self.path}: {name}: rows {start}:{stop} outside shape {list(shape)}")
        row = (end - begin) // shape[0] if shape[0] else 0
        return self._read(name, begin + start * row, (stop - start) * row).view(dtype).reshape(stop - start,
                                                                                               *shape[1:])

    def iter_bytes(self, name: str, chunk: int = _COPY_CHUNK) -> Iterator[Tensor]:
        """A tensor's raw bytes, ``chunk`` bytes at a time (uint8 tensors), in file order."""
        _, _, begin, end = self._entries[name]
        for at in range(begin, end, chunk):
            yield self._read(name, at, min(chunk, end - at))

    def _dtype(self, name: str) -> torch.dtype:
        code = self._entries[name][0]
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise ValueError(f"{self.path}: {name}: dtype {code} is not supported")
        return dtype

    def _read(self, name: str, offset: int, nbytes: int) -> Tensor:
        """``nbytes`` at ``offset`` of the data section, into a fresh uint8 buffer."""
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view, done = memoryview(buf.numpy()), 0
        while done < len(view):
            got = _read_at(self._file, view[done:], self._start + offset + done)
            if not got:
                raise OSError(f"{self.path}: {name}: file ends {len(view) - done} bytes early; it was truncated")
            done += got
        return buf

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_at(file, view: memoryview, offset: int) -> int:
    if hasattr(os, "preadv"):  # no shared file position: safe whoever else reads this file object
        return os.preadv(file.fileno(), [view], offset)
    file.seek(offset)
    return file.readinto(view)


class TensorFileWriter:
    """Write one safetensors file at ``path`` tensor by tensor (spill file ``path.data`` meanwhile).

    ``add`` copies a tensor's bytes out at once, so the caller may drop or reuse it; ``close(metadata)``
    writes the file (the metadata may be decided only then); ``abort`` removes both files. OSErrors
    name the file being written."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._spill_path = self.path.with_name(self.path.name + ".data")
        self._spill = _opened(self._spill_path, "w+b")
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> code, shape, offset, nbytes
        self.nbytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        self.add_blocks(name, tensor.dtype, tuple(tensor.shape), [tensor])

    def add_blocks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], blocks: Iterable[Tensor]) -> None:
        """One tensor of ``dtype`` and ``shape`` written from consecutive pieces of its row-major data
        (blocks of rows, each of ``dtype``), each one going out as it comes: memory holds one block.
        The pieces must add up to the tensor's size exactly."""
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name} added twice")
        code = _CODES.get(dtype)
        if code is None:
            raise ValueError(f"{self.path}: {name}: dtype {dtype} cannot be stored in safetensors")
        want = math.prod(shape) * dtype.itemsize
        start = self.nbytes
        for block in blocks:
            if block.dtype != dtype:
                raise ValueError(f"{self.path}: {name}: a block of dtype {block.dtype}, expected {dtype}")
            t = block.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            flat = t.contiguous().reshape(-1)
            n = flat.numel() * flat.element_size()
            if self.nbytes - start + n > want:
                raise ValueError(f"{self.path}: {name}: blocks overrun the {want} bytes of shape {list(shape)}")
            if n:
                _io(self._spill_path, self._spill.write, memoryview(flat.view(torch.uint8).numpy()))
            self.nbytes += n  # where the next tensor starts, even if this one fails below
        if self.nbytes - start != want:
            raise ValueError(f"{self.path}: {name}: blocks gave {self.nbytes - start} of the {want} bytes of "
                             f"shape {list(shape)}")
        self._entries[name] = (code, list(shape), start, want)

    def names(self) -> list[str]:
        return list(self._entries)

    def close(self, metadata: dict[str, str] | None = None) -> Path:
        """Write the file: header, then every tensor's bytes in safetensors' order; remove the spill."""
        order = sorted(self._entries, key=lambda k: (-_DTYPE_RANK[self._entries[k][0]], k))
        header: dict = {"__metadata__": dict(sorted(metadata.items()))} if metadata else {}
        offset = 0
        for name in order:
            code, shape, _, nbytes = self._entries[name]
            header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-aligned, as safetensors writes it
        try:
            _io(self._spill_path, self._spill.flush)
            with _opened(self.path, "wb") as out:
                _io(self.path, out.write, struct.pack("<Q", len(raw)) + raw)
                _io(self.path, out.flush)
                for name in order:
                    _, _, src, nbytes = self._entries[name]
                    _copy(self._spill, out, src, nbytes, self.path)
        finally:
            self._spill.close()
            self._spill_path.unlink(missing_ok=True)
        return self.path

    def abort(self) -> None:
        try:  # closing flushes what is buffered; the error that made us abort is the one to report
            self._spill.close()
        except OSError:
            pass
        self._spill_path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)


def _opened(path: Path, mode: str):
    try:
        return open(path, mode)
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _io(path: Path, fn, *args):
    """Call a file method; an OSError (disk full, size limit) names ``path``, so it reads as the user's."""
    try:
        return fn(*args)
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror, str(path)) from None


def _copy(src, dst, offset: int, nbytes: int, path: Path) -> None:
    """Copy ``nbytes`` of ``src`` from ``offset`` to the end of ``dst``: in the kernel when it can
    (copy_file_range: no user-space buffer), else in chunks of bounded size."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < nbytes:
                n = _io(path, os.copy_file_range, src.fileno(), dst.fileno(), nbytes - done, offset + done)
                if n == 0:
                    break
                done += n
        except OSError as exc:
            if exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: not supported here
                raise
        dst.seek(0, os.SEEK_END)
    while done < nbytes:
        src.seek(offset + done)
        chunk = src.read(min(_COPY_CHUNK, nbytes - done))
        if not chunk:
            raise OSError(f"{path}: spill file ended early while writing it")
        _io(path, dst.write, chunk)
        done += len(chunk)
