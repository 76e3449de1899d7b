"""Writing files safely, shared by every writer: atomic outputs (built aside, then renamed, so a crash
never leaves a half-written file or folder at the target), one writer per output at a time (an exclusive
lock: a second run on the same output fails at once instead of silently replacing the first one's
result), temporary files named ``.NAME.tmp-*`` and removed by the next run on the same output when a
killed run left them, and the shard buffer both the delta file and Hugging Face model folders are
written through."""
from __future__ import annotations

import math
import numbers
import os
import re
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
from safetensors.torch import save_file
from torch import Tensor

from .errors import OutputBusyError, OutputExistsError, OutputIsInputError, SettingsError
from .tensorio import TensorFileWriter

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None


class OutputLock:
    """An exclusive, non-blocking lock on ``.NAME.lock`` beside ``out``. The kernel drops it when the
    process dies (kill -9 included), so a stale lock file never blocks a later run."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out.with_name(f".{self.out.name}.lock")
        self._fd: int | None = None
        self.made = make_parents(self.out)  # taken back by release() when the run leaves them empty
        if fcntl is None:
            return
        while self._fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise OutputBusyError(f"{self.out}: another deltacomp run is writing it (lock {self.path.name}); "
                                      "wait for it to finish or choose another output") from None
            try:  # the holder before us may have removed the file we locked: lock the current one
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
            else:
                os.close(fd)
        remove_stale(self.out)

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None
        remove_empty(self.made)
        self.made = []


def make_parents(path: Path) -> list[Path]:
    """Create the missing folders above ``path``; return those this call created, outermost first."""
    missing, p = [], path.parent
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.parent.mkdir(parents=True, exist_ok=True)
    return missing[::-1]


def remove_empty(made: list[Path]) -> None:
    """Take back folders ``make_parents`` created, innermost first, as long as they are empty (a run that
    wrote nothing leaves no trace; one that wrote its output stops at the folder holding it)."""
    for p in reversed(made):
        try:
            p.rmdir()
        except OSError:  # not empty (the output, or another program's file), or already gone
            return


def remove_stale(out: Path) -> None:
    """Remove the temporary files and folders (``.NAME.tmp-*``, ``.NAME.old-*``) a killed run on ``out``
    left behind. Called with the output's lock held, so none of them belongs to a live run."""
    prefixes = (f".{out.name}.tmp-", f".{out.name}.old-")
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefixes):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def as_path(value: object, what: str) -> Path:
    """``value`` as a Path, or one SettingsError line when it is no path (None, a number, bytes, "")."""
    if not isinstance(value, (str, os.PathLike)) or isinstance(os.fspath(value), bytes) or not os.fspath(value):
        raise SettingsError(f"{what} must be a non-empty path (str or os.PathLike), got {value!r}")
    return Path(value)


def check_shard_size(max_shard_bytes: object) -> None:
    """--max-shard-size: a positive whole number of bytes."""
    if isinstance(max_shard_bytes, bool) or not isinstance(max_shard_bytes, numbers.Integral):
        raise SettingsError(f"max shard size must be a whole number of bytes, got {max_shard_bytes!r}")
    if max_shard_bytes <= 0:
        raise SettingsError(f"max shard size must be positive, got {max_shard_bytes}")


def refuse_special(path: str | os.PathLike) -> None:
    """An output name that is a device, pipe or socket (``-o /dev/null``) is never replaced: a rename over
    it would swap the device for a regular file, for every program on the machine."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        raise OutputExistsError(f"{path}: exists and is a device, pipe or socket, not a regular file; it is "
                                "never replaced; choose a file name")


def refuse_inputs(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], folder: bool = False) -> None:
    """Refuse an output that would destroy an input of the same run, ``--overwrite`` or not: a file
    output that is one of ``inputs`` (the same file, by any name), or a folder output that holds one
    (it is replaced whole). Checked before any work."""
    out = Path(out)
    if not out.exists():
        return
    for inp in inputs:
        inp = Path(inp)
        try:
            clash = (inp.resolve().is_relative_to(out.resolve()) if folder
                     else os.path.samefile(out, inp))
        except OSError:
            continue
        if clash:
            what = "holds" if folder and not os.path.samefile(out, inp) else "is"
            raise OutputIsInputError(f"{out}: {what} an input of this run ({inp}); writing the output there would "
                                     "destroy it; choose another output")


def normal_mode(path: Path) -> None:
    """Give a folder made by mkdtemp (0700) the permissions a plain mkdir would (0777 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def publish_file(tmp: Path, final: Path, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; without ``overwrite`` never replace a file that appeared meanwhile
    (a hard link fails when the name exists, atomically)."""
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise OutputExistsError(f"{final}: appeared while this run was writing; pass --overwrite to replace it") from None
    except OSError:  # a file system without hard links: the lock still keeps deltacomp runs apart
        if final.exists():
            raise OutputExistsError(f"{final}: exists; pass --overwrite to replace it") from None
        os.replace(tmp, final)
        return
    tmp.unlink()


def save_tensors(tensors: dict[str, Tensor], path: str | os.PathLike, metadata: dict[str, str] | None) -> None:
    """safetensors' save_file, with its I/O failures (disk full, size limit, read-only folder) raised as
    the OSError they are, naming ``path``, so callers report them as the user's environment, not a bug."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError:
        raise
    except Exception as exc:
        m = re.search(r"os error (\d+)", str(exc))
        if m is None:
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a sibling temporary file and rename it over ``path``."""
    path = Path(path)
    refuse_special(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; give a file name")
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never left beside the output
        raise


def prepare_output_dir(out: str | os.PathLike, overwrite: bool = False) -> tuple[Path, Path]:
    """Check ``out`` may be written and make a sibling temporary folder to build it in.

    Returns (final path, temp path). Call ``commit_output_dir`` when done; on failure remove the temp."""
    out = as_path(out, "output folder")
    refuse_special(out)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise OutputExistsError(f"{out}: folder exists and is not empty; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    normal_mode(tmp)
    return out, tmp


def commit_output_dir(tmp: Path, out: Path, overwrite: bool = True) -> None:
    """Replace ``out`` by ``tmp`` with renames only, so a crash never leaves a half-written ``out``."""
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(f"{out}: appeared while this run was writing; pass --overwrite to replace it")
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
    lock = OutputLock(out)
    try:
        final, tmp = prepare_output_dir(out, overwrite=overwrite)
        try:
            yield tmp
            commit_output_dir(tmp, final, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        lock.release()


class ShardBuffer:
    """Tensors streamed into safetensors shards of at most ``max_bytes`` (a group added together is never
    split): each tensor goes to disk as it is added (``tensorio.TensorFileWriter``), so memory holds one
    tensor, never a shard. A shard is finished under a temporary name when the next group would overflow
    it. ``shards`` lists (temporary path, tensor names); ``current`` is the shard being written."""

    def __init__(self, folder: Path, max_bytes: int, metadata: dict[str, str], suffix: str = ""):
        self.folder, self.max_bytes, self.metadata, self.suffix = Path(folder), max_bytes, metadata, suffix
        self.current: TensorFileWriter | None = None
        self.current_bytes = 0
        self.total_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []

    def add(self, tensors: dict[str, Tensor]) -> None:
        self.add_blocks({n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}, lambda n: [tensors[n]])

    def add_blocks(self, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
                   blocks: Callable[[str], Iterable[Tensor]]) -> None:
        """A group of tensors known by (dtype, shape), each written from the blocks ``blocks(name)``
        yields (``TensorFileWriter.add_blocks``), in the order of ``specs``: the shard is chosen from
        the sizes before any data exists."""
        size = sum(math.prod(shape) * dtype.itemsize for dtype, shape in specs.values())
        if self.current is not None and self.current_bytes + size > self.max_bytes:
            self.flush()
        if self.current is None:
            self.current = TensorFileWriter(self.folder / f"shard-{len(self.shards):05d}{self.suffix}")
        for name, (dtype, shape) in specs.items():
            self.current.add_blocks(name, dtype, shape, blocks(name))
        self.current_bytes += size
        self.total_bytes += size

    def flush(self, metadata: dict[str, str] | None = None, empty: bool = False) -> None:
        """Finish the current shard (with ``metadata`` instead of the buffer's, if given); ``empty``
        writes a shard with no tensors when none is open."""
        if self.current is None and empty:
            self.current = TensorFileWriter(self.folder / f"shard-{len(self.shards):05d}{self.suffix}")
        if self.current is None:
            return
        writer, self.current, self.current_bytes = self.current, None, 0
        self.shards.append((writer.close(metadata if metadata is not None else self.metadata), writer.names()))

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None
