"""Writing files safely, shared by every writer: atomic outputs (built aside, then renamed, so a crash
never leaves a half-written file or folder at the target) and the shard buffer both the delta file and
Hugging Face model folders are written through."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from safetensors.torch import save_file
from torch import Tensor

from .errors import OutputExistsError


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a sibling temporary file and rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Check ``out`` may be written and make a sibling temporary folder to build it in.

    Returns (final path, temp path). Call ``commit_output_dir`` when done; on failure remove the temp."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    return out, tmp


def commit_output_dir(tmp: Path, out: Path) -> None:
    """Replace ``out`` by ``tmp`` with renames only, so a crash never leaves a half-written ``out``."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


@contextmanager
def output_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """``with output_dir(out) as tmp:`` build the folder in ``tmp``; it replaces ``out`` only when the block
    completes, and is removed if it raises."""
    final, tmp = prepare_output_dir(out, overwrite=overwrite)
    try:
        yield tmp
        commit_output_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardBuffer:
    """Tensors gathered into safetensors shards of at most ``max_bytes`` (a group added together is never
    split), each written to ``folder`` under a temporary name as soon as the next group would overflow it.
    ``shards`` lists (temporary path, tensor names); ``current`` holds what is not written yet."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str], suffix: str = ""):
        self.folder, self.max_bytes, self.metadata, self.suffix = Path(folder), max_bytes, metadata, suffix
        self.current: dict[str, Tensor] = {}
        self.current_bytes = 0
        self.total_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, Tensor], clone: bool = False) -> None:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self.current and self.current_bytes + size > self.max_bytes:
            self.flush()
        for name, t in tensors.items():
            t = t.detach().contiguous()
            self.current[name] = t.clone() if clone else t
        self.current_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.current:
            return
        path = self.folder / f"shard-{len(self.shards):05d}{self.suffix}"
        save_file(self.current, str(path), metadata=self.metadata)
        self.shards.append((path, list(self.current)))
        self.current, self.current_bytes = {}, 0
