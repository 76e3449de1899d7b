"""Lazy reading of model checkpoints and streaming, sharded writing of Hugging Face model folders.

A checkpoint is a Hugging Face model folder (config.json + model.safetensors, or sharded
model-0000i-of-0000N.safetensors + model.safetensors.index.json) or one .safetensors file. Tensors are
read one at a time with explicit reads into fresh memory (tensorio.TensorReader), never through a memory
map that would keep every page read mapped: the process's RSS stays near the tensors it holds, whatever
the size of the checkpoint. Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .dtypes import SAFETENSORS_DTYPES
from .errors import CheckpointError, DeltacompError
from .integrity import MAX_EMBEDDED_FILE_BYTES
from .storage import ShardBuffer, as_path
from .tensorio import TensorReader, unique_keys

INDEX_NAME = "model.safetensors.index.json"
# Elements per block where a tensor is read in blocks of rows (64 MB per float32 copy of a block).
BLOCK_ELEMS = 1 << 24
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Files other than weights that make a folder a usable model: carried into the delta file and back out.
EXTRA_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)
_CONVERT_HINT = (
    "convert it to safetensors first, e.g. `python -c \"from transformers import AutoModelForCausalLM as M; "
    "M.from_pretrained('IN').save_pretrained('OUT', safe_serialization=True)\"` (that loads the pickle: "
    "only do it for a checkpoint you trust)"
)


MAX_INDEX_BYTES = 256 * 2**20  # a weight map of millions of tensors; read whole, so bounded first


def bounded_file(f: Path, limit: int) -> None:
    size = f.stat().st_size
    if size > limit:
        raise CheckpointError(f"{f}: {size} bytes, above the {limit} bytes deltacomp reads for such a file; "
                              "is it the right file?")


class Checkpoint:
    """Read-only, lazy view of one checkpoint. Use as a context manager or call ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = as_path(path, "a model (BASE or FINETUNED)")
        self._stack = ExitStack()
        self._handles: dict[Path, TensorReader] = {}
        self._where: dict[str, Path] = {}
        self.folder: Path | None = None
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such file or folder")
        if self.path.is_dir():
            self.folder = self.path
            self._index_folder()
        else:
            self._check_file(self.path)
            self._add_file(self.path)

    # -- discovery ----------------------------------------------------------------------------------
    def _check_file(self, file: Path) -> None:
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{file}: pickled checkpoints are refused (they can run code); {_CONVERT_HINT}")
        if file.suffix != ".safetensors":
            raise CheckpointError(f"{file}: not a .safetensors file; give a model folder or a .safetensors file")

    def _add_file(self, file: Path, names: list[str] | None = None) -> None:
        if not file.is_file():  # a pipe or device: opening one to read it blocks until a writer comes
            raise CheckpointError(f"{file}: not a regular file (a pipe, device or folder); give a model folder or "
                                  "a .safetensors file")
        try:
            handle = self._stack.enter_context(TensorReader(file))
        except Exception as exc:  # safetensors raises its own types for corrupt headers
            raise CheckpointError(f"{file}: cannot read as safetensors ({exc})") from None
        self._handles[file] = handle
        for name in names if names is not None else handle.keys():
            self._where[name] = file

    def _index_folder(self) -> None:
        folder = self.path
        index = folder / INDEX_NAME
        if index.is_file() and (folder / SINGLE_NAME).exists():  # transformers would load the single file
            raise CheckpointError(f"{folder}: holds both {SINGLE_NAME} and {INDEX_NAME} (with its shards), so which "
                                  "weights are the model is ambiguous; remove the one that is not")
        if index.is_file():
            bounded_file(index, MAX_INDEX_BYTES)
            try:
                weight_map = json.loads(index.read_text(), object_pairs_hook=unique_keys)["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise TypeError("weight_map must map tensor names to shard file names")
            except (ValueError, KeyError, TypeError, RecursionError) as exc:
                raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
            by_file: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if "/" in fname or "\\" in fname or fname.startswith("."):
                    raise CheckpointError(f"{index}: shard name {fname!r} points outside {folder}; refused")
                by_file.setdefault(fname, []).append(name)
            for fname, names in by_file.items():
                shard = folder / fname
                if not shard.exists():
                    raise CheckpointError(f"{index}: names shard {fname}, which is missing from {folder}")
                self._check_file(shard)
                self._add_file(shard, names)
            self._check_shards(index)
            return
        if (folder / SINGLE_NAME).is_file():
            self._add_file(folder / SINGLE_NAME)
            return
        tensors = sorted(folder.glob("*.safetensors"))
        if len(tensors) == 1:
            self._add_file(tensors[0])
            return
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder}: holds only pickled weights ({', '.join(sorted(pickles)[:3])}), which are refused; "
                + _CONVERT_HINT)
        raise CheckpointError(f"{folder}: no {SINGLE_NAME}, {INDEX_NAME} or single .safetensors file found")

    def _check_shards(self, index: Path) -> None:
        """Every tensor of a shard is the one the index maps there: transformers loads every tensor of every
        shard (the last shard wins a name given twice), so a tensor the index leaves out, or maps to another
        shard, would be read from one place here and from another there."""
        for shard, handle in self._handles.items():
            for name in handle.keys():
                if self._where.get(name) != shard:
                    other = self._where.get(name)
                    said = f"maps it to {other.name}" if other is not None else "does not name it"
                    raise CheckpointError(f"{shard}: holds tensor {name}, but {index.name} {said}; the index and its "
                                          "shards disagree")

    # -- access -------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _reader(self, name: str) -> TensorReader:
        if name not in self._where:
            raise CheckpointError(f"{self.path}: has no tensor {name!r}")
        reader = self._handles[self._where[name]]
        if name not in reader:
            raise CheckpointError(f"{reader.path}: lacks tensor {name}, which {INDEX_NAME} maps to it")
        return reader

    def shape(self, name: str) -> tuple[int, ...]:
        return self._reader(name).shape(name)

    def dtype(self, name: str) -> torch.dtype:
        code = self._reader(name).dtype_code(name)
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self._where[name]}: {name}: dtype {code} is not supported")
        return SAFETENSORS_DTYPES[code]

    def get(self, name: str) -> Tensor:
        reader = self._reader(name)
        try:
            return reader.get(name)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{reader.path}: {name}: cannot read ({exc})") from None

    def get_rows(self, name: str, start: int, stop: int) -> Tensor:
        """Rows ``start:stop`` of a tensor (tensorio.TensorReader.get_rows)."""
        reader = self._reader(name)
        try:
            return reader.get_rows(name, start, stop)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{reader.path}: {name}: cannot read ({exc})") from None

    def iter_rows(self, name: str, block_elems: int = BLOCK_ELEMS) -> Iterator[Tensor]:
        """A tensor in consecutive blocks of whole rows, about ``block_elems`` elements each (a scalar
        or a tensor below that comes whole)."""
        shape = self.shape(name)
        if not shape or math.prod(shape) <= block_elems:
            yield self.get(name)
            return
        step = max(1, block_elems // max(1, math.prod(shape[1:])))
        for start in range(0, shape[0], step):
            yield self.get_rows(name, start, min(start + step, shape[0]))

    def files(self) -> list[Path]:
        """Every file this checkpoint is read from: weights, the index, config and tokenizer files."""
        out = list(self._handles)
        if self.folder is not None:
            out += [self.folder / n for n in (INDEX_NAME, *EXTRA_FILES) if (self.folder / n).is_file()]
        return out

    def nbytes(self) -> int:
        """Bytes of all weight files on disk (what a user sees as the checkpoint's size)."""
        return sum(f.stat().st_size for f in self._handles)

    @property
    def config(self) -> dict | None:
        if self.folder is None or not (self.folder / "config.json").is_file():
            return None
        bounded_file(self.folder / "config.json", MAX_EMBEDDED_FILE_BYTES)
        try:
            config = json.loads((self.folder / "config.json").read_text())
        except (ValueError, RecursionError) as exc:
            raise CheckpointError(f"{self.folder / 'config.json'}: invalid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{self.folder / 'config.json'}: must hold a JSON object, not {type(config).__name__}")
        return config

    def extra_files(self) -> dict[str, bytes]:
        """The non-weight files a model folder needs (config, generation config, tokenizer)."""
        if self.folder is None:
            return {}
        out = {}
        for n in EXTRA_FILES:
            f = self.folder / n
            if not f.is_file():
                continue
            bounded_file(f, MAX_EMBEDDED_FILE_BYTES)  # before reading: the delta file carries it in its header
            out[n] = f.read_bytes()
        return out

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    return Checkpoint(path)


@contextmanager
def hf_folder(path: str | os.PathLike, what: str) -> Iterator[None]:
    """transformers' errors for a folder that is not a usable model (no config.json, no tokenizer files,
    a file instead of a folder) become one CheckpointError line naming it."""
    try:
        yield
    except DeltacompError:
        raise
    except Exception as exc:  # noqa: BLE001 - sorted by load_failure below
        why = load_failure(exc)
        if why is None:
            raise
        raise CheckpointError(f"{path}: cannot load its {what} with transformers ({why}); "
                              "give a Hugging Face model folder with config.json and tokenizer files") from None


def load_failure(exc: Exception) -> str | None:
    """``Type: message`` (one line, bounded) when ``exc`` is what transformers raises for a file it cannot use
    (``folder_error``), else None: a bug or a deltacomp error, to be raised as it is."""
    if isinstance(exc, DeltacompError) or not folder_error(exc):
        return None
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def folder_error(exc: Exception) -> bool:
    """What transformers raises for a file of the folder it cannot use: Python's errors from parsing and
    using its values (a JSON nested too deep, a list where an object belongs, a zero number of heads), and
    huggingface_hub's validation of config fields (a null or a string where an integer belongs)."""
    if isinstance(exc, (OSError, ValueError, KeyError, TypeError, AttributeError, ArithmeticError, RecursionError)):
        return True
    return any(c.__module__.startswith("huggingface_hub") and c.__name__ == "StrictDataclassError"
               for c in type(exc).__mro__)


# -- writing ----------------------------------------------------------------------------------------
class ShardedWriter:
    """Write tensors into ``folder`` as HF safetensors shards, streamed: each tensor goes to disk when added.

    Shards are named model-0000i-of-0000N.safetensors with an index json when there is more than one,
    model.safetensors otherwise (mergekit's scheme)."""

    def __init__(self, folder: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3,
                 metadata: dict[str, str] | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self._buffer = ShardBuffer(self.folder, max_shard_bytes, dict(metadata or {"format": "pt"}), ".tmp")

    @property
    def total_bytes(self) -> int:
        return self._buffer.total_bytes

    def add(self, name: str, tensor: Tensor) -> None:
        self._buffer.add({name: tensor})

    def add_blocks(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], blocks: Iterable[Tensor]) -> None:
        """One tensor written from consecutive blocks of its rows as they come (memory holds one block)."""
        self._buffer.add_blocks({name: (dtype, tuple(shape))}, lambda _: blocks)

    def close(self) -> list[Path]:
        self._buffer.flush(empty=not self._buffer.shards)  # an empty model is still one (empty) file
        shards = self._buffer.shards
        n = len(shards)
        if n == 1:
            final = self.folder / SINGLE_NAME
            shards[0][0].rename(final)
            return [final]
        weight_map, finals = {}, []
        for i, (path, names) in enumerate(shards):
            final = self.folder / f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            path.rename(final)
            finals.append(final)
            weight_map.update({nm: final.name for nm in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2))
        return finals

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self._buffer.abort()


def same_tensor(a: Checkpoint, name_a: str, b: Checkpoint, name_b: str) -> bool:
    """``torch.equal`` of two checkpoint tensors, compared a block of rows at a time (memory holds two
    blocks, not two embeddings; it stops at the first block that differs)."""
    if a.shape(name_a) != b.shape(name_b):
        return False
    return all(torch.equal(x, y) for x, y in zip(a.iter_rows(name_a), b.iter_rows(name_b)))


def iter_tensors(ckpt: Checkpoint) -> Iterator[tuple[str, Tensor]]:
    for name in ckpt.names():
        yield name, ckpt.get(name)


def block_rows(shape: tuple[int, ...], block_elems: int | None = None) -> int | None:
    """Rows per block for a tensor of ``shape``, or None when it is small enough to be processed whole."""
    limit = BLOCK_ELEMS if block_elems is None else block_elems
    if len(shape) != 2 or math.prod(shape) <= limit or shape[0] < 2:
        return None
    return max(1, limit // math.prod(shape[1:]))
