"""compress-many: several fine-tunes of one base in one job (``deltacomp compress-many``).

Each base tensor is read once and encoded against the matching tensor of every fine-tune; each fine-tune
gets its own delta file, ``DIR/<name>.delta.safetensors``, byte-identical to what ``compress`` writes for it
alone with the same options (the per-tensor step is api.encode_param for both). Memory holds one base
tensor (and its float32 copy) and one fine-tune tensor at a time, whatever the number of fine-tunes.

Names come from the fine-tune paths (a folder's name, a file's name less ``.safetensors``) or from a
manifest (``name=path`` lines, see ``read_manifest``); two fine-tunes with one name are refused. Each
output is written as compress writes it (DeltaWriter: locked, built aside, verified, renamed); an output
that exists is refused up front unless ``overwrite``; when any fine-tune fails, no output is written.

Fine-tunes whose tensors come in the same order share every base read. One that lacks tensors or adds
some still shares the rest; one whose order differs is still right, but reads those base tensors again.
Whole-model pre-passes (``--method auto``, codecs' global statistics) run per fine-tune, as compress runs
them. The encoding runs in this process, or as Ray tasks with ``ray`` (distributed.py).
"""
from __future__ import annotations

import os
import re
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from .api import (EncodedParam, add_encoded, check_rules, encode_param, file_metadata, model_files, prepare_pairs,
                  read_base)
from .checkpoint import Checkpoint, open_checkpoint
from .delta import load_delta
from .delta_file import DEFAULT_MAX_SHARD_BYTES, DeltaWriter, index_path
from .devices import resolve_device
from .errors import OutputExistsError, SettingsError
from .pairing import PairKind, Pairing
from .plan import DEFAULT_METHOD, Plan
from .progress import progress_counter
from .storage import as_path, refuse_inputs
from .summary import summarize

SUFFIX = ".delta.safetensors"
MAX_MANIFEST_BYTES = 1 << 20
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


@dataclass
class Job:
    """One fine-tune of the job: where it is read from and written to, and its progress."""
    name: str
    finetuned: str | os.PathLike  # as given: the file records it, as compress records it
    out: Path
    plan: Plan
    fck: Checkpoint | None = None
    writer: DeltaWriter | None = None
    pairs: list[Pairing] = field(default_factory=list)
    shared: dict[str, dict] = field(default_factory=dict)
    base_hashes: dict[str, str] = field(default_factory=dict)
    next: int = 0


def name_of(path: str | os.PathLike) -> str:
    """``ft/chat`` -> ``chat``; ``ft/chat.safetensors`` -> ``chat``."""
    p = Path(path)
    name = p.name or p.resolve().name
    return name[: -len(".safetensors")] if name.endswith(".safetensors") and name != ".safetensors" else name


def check_name(name: str, where: str) -> str:
    if not _NAME.fullmatch(name) or name.endswith(".index.json"):
        raise SettingsError(f"{where}: {name!r} is not a usable output name (letters, digits, . _ + -, not "
                            "starting with '.' or '-'); name it with --manifest (name=path lines)")
    return name


def read_manifest(path: str | os.PathLike) -> dict[str, str]:
    """A manifest: one ``name=path`` per line (``#`` starts a comment line; blank lines are skipped). A
    relative path is relative to the manifest's folder. Returns {name: path} in the file's order."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"{path}: no such manifest file")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise SettingsError(f"{path}: manifest is {path.stat().st_size} bytes, above the bound {MAX_MANIFEST_BYTES}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise SettingsError(f"{path}: manifest is not UTF-8 text") from None
    out: dict[str, str] = {}
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "=" not in line:
            raise SettingsError(f"{path}:{i}: expected name=path, got {line[:80]!r}")
        name, target = (s.strip() for s in line.split("=", 1))
        check_name(name, f"{path}:{i}")
        if not target:
            raise SettingsError(f"{path}:{i}: {name}: empty path")
        if name in out:
            raise SettingsError(f"{path}:{i}: name {name!r} is given twice")
        out[name] = target if Path(target).is_absolute() else str(path.parent / target)
    if not out:
        raise SettingsError(f"{path}: manifest lists no fine-tune")
    return out


def named_finetunes(finetuned: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike]) -> dict[str, Any]:
    """{output name: path}: a mapping as given, or names derived from the paths; collisions refused."""
    if isinstance(finetuned, (str, bytes, os.PathLike)):
        raise SettingsError(f"compress-many: give the fine-tunes as a list of paths or a {{name: path}} mapping, "
                            f"got one path {finetuned!r}")
    if isinstance(finetuned, Mapping):
        return {check_name(n, "fine-tune name"): p for n, p in finetuned.items()}
    out: dict[str, Any] = {}
    for p in finetuned:
        name = check_name(name_of(p), str(p))
        if name in out:
            raise SettingsError(f"fine-tunes {out[name]} and {p} would both write {name}{SUFFIX}; name them "
                                "apart with --manifest (name=path lines)")
        out[name] = p
    return out


class LocalRunner:
    """Encodes each tensor in this process, at once (``window`` 0: nothing waits)."""
    window = 0

    def __init__(self, device: torch.device, allow_nonfinite: bool):
        self.device, self.allow_nonfinite = device, allow_nonfinite

    def submit(self, job: Job, p: Pairing, ft: torch.Tensor, base) -> EncodedParam:
        return encode_param(job.plan, p, ft, job.fck.path, base, job.shared, self.device, self.allow_nonfinite)

    def result(self, job: Job, p: Pairing, handle: EncodedParam) -> EncodedParam:
        return handle

    def close(self) -> None:
        pass


def _steps(jobs: list[Job]) -> Iterator[tuple[str, list[tuple[Job, Pairing]]]]:
    """(tensor name, the fine-tunes whose next tensor it is): each job's tensors in its own order."""
    while True:
        heads = [j for j in jobs if j.next < len(j.pairs)]
        if not heads:
            return
        name = heads[0].pairs[heads[0].next].name
        members = [(j, j.pairs[j.next]) for j in heads if j.pairs[j.next].name == name]
        for j, _ in members:
            j.next += 1
        yield name, members


def _encode_all(bck: Checkpoint, jobs: list[Job], runner, progress: bool) -> None:
    """Every tensor of every fine-tune, into its writer in the fine-tune's order; each base tensor read
    once for all the fine-tunes whose next tensor it is."""
    bar = progress_counter(sum(len(j.pairs) for j in jobs), desc=f"compress x{len(jobs)}", unit="tensor",
                           enable=progress)
    pending: deque = deque()

    def drain(keep: int) -> None:
        while len(pending) > keep:
            job, p, handle = pending.popleft()
            add_encoded(job.writer, runner.result(job, p, handle), job.base_hashes)
            bar.update()

    try:
        for _, members in _steps(jobs):
            delta_pair = next((p for _, p in members if p.kind == PairKind.DELTA), None)
            base = read_base(bck, delta_pair) if delta_pair is not None else None
            for job, p in members:
                ft = job.fck.get(p.name)
                pending.append((job, p, runner.submit(job, p, ft, base if p.kind == PairKind.DELTA else None)))
            del base, ft
            drain(runner.window)
        drain(0)
    finally:
        bar.close()


def _runner(ray: bool | str | None, ray_cpus: int | None, retries: int, device: torch.device,
            allow_nonfinite: bool, ray_threads: int | None):
    if not ray:
        return LocalRunner(device, allow_nonfinite)
    from .distributed import RayRunner  # imports ray: only on this path

    return RayRunner(None if ray is True else str(ray), ray_cpus, retries, device, allow_nonfinite, ray_threads)


def compress_many(base: str | os.PathLike, finetuned: Sequence[str | os.PathLike] | Mapping[str, str | os.PathLike],
                  out_dir: str | os.PathLike, *, method: str = DEFAULT_METHOD, ratio: float | None = None,
                  rules: Sequence[str] = (), bits: float | None = None, overwrite: bool = False,
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, progress: bool = True,
                  device: str | torch.device | None = "auto", allow_nonfinite: bool = False,
                  allow_mismatch: bool = False, ray: bool | str | None = None, ray_cpus: int | None = None,
                  retries: int = 3, ray_threads: int | None = None) -> dict[str, dict[str, Any]]:
    """Compress every fine-tune in ``finetuned`` (paths, or {name: path}) over ``base`` into
    ``out_dir/<name>.delta.safetensors``; returns {name: summary of its file}. The options are
    compress's (no calibration). ``ray``: True starts a local Ray (``ray_cpus`` CPUs), a string joins
    the cluster at that address; ``retries``: times a Ray task is re-run when its worker dies;
    ``ray_threads``: torch threads per task (default this process's; see distributed.py)."""
    rules = check_rules(rules)
    if ray:
        from .distributed import check_options

        check_options(ray_cpus, retries, ray_threads)
    named = named_finetunes(finetuned)
    if not named:
        raise SettingsError("compress-many: no fine-tune given")
    out_dir = as_path(out_dir, "the output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputExistsError(f"{out_dir}: exists and is not a folder")
    jobs = [Job(n, p, out_dir / f"{n}{SUFFIX}", Plan(method, list(rules), ratio, bits)) for n, p in named.items()]
    device = resolve_device(device)
    for job in jobs:  # every refusal before any work or lock
        for path in (job.out, index_path(job.out)):
            if path.exists() and not overwrite:
                raise OutputExistsError(f"{path}: exists; pass --overwrite to replace it")
            if path.exists():
                refuse_inputs(path, model_files(base, *named.values()))
    with ExitStack() as stack:
        for job in jobs:
            job.writer = DeltaWriter(job.out, overwrite=overwrite, max_shard_bytes=max_shard_bytes)
            stack.callback(job.writer.abort)  # a no-op after finish
        bck = stack.enter_context(open_checkpoint(base))
        for job in jobs:
            job.fck = stack.enter_context(open_checkpoint(job.finetuned))
            job.pairs, job.shared = prepare_pairs(bck, job.fck, job.plan, device, progress, allow_mismatch)
        runner = _runner(ray, ray_cpus, retries, device, allow_nonfinite, ray_threads)
        stack.callback(runner.close)
        _encode_all(bck, jobs, runner, progress)
        for job in jobs:
            job.writer.finish(file_metadata(base, job.finetuned, bck, job.fck, job.plan, job.base_hashes))
    out = {}
    for job in jobs:
        with load_delta(job.out) as df:
            out[job.name] = summarize(df)
    return out
