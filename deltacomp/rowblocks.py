"""Tensors too large to hold whole in float32, compressed and reconstructed in blocks of rows.

A 70B model's embedding and head are 128256x8192 = 1.05 G elements: 4.2 GB per float32 copy, and the
whole-tensor path holds several (base, fine-tune, their delta, the sum checked by raw's dtype choice).
A tensor above ``checkpoint.BLOCK_ELEMS`` elements whose codec works on row blocks (``Codec.row_blocks``:
raw and zero, what embeddings, heads and unchanged tensors get by default) is instead read from the
checkpoints a block of rows at a time and streamed into the output file, so memory holds one block.
A codec that needs the whole matrix (a per-tensor scale, a top-k, an SVD) still gets it whole: at 70B
widths the largest linear layer is 28672x8192 (0.94 GB in float32).

The result is byte for byte the whole-tensor path's (tests/test_rowblocks.py). ``compress`` reads the
pair twice: once for the checks and statistics (non-finite values, an all-zero delta, the base
fingerprint, the codec's data-dependent settings), once to encode and write each stored field.
``reconstruct`` checksums the stored parameter (streamed), then writes base + delta block by block and
checks the base fingerprint at the end (the output folder is only renamed into place when all is done).
"""
from __future__ import annotations

import math
from typing import Any, Iterator

import torch
from torch import Tensor

from .basecheck import BaseChecker
from .checkpoint import Checkpoint, ShardedWriter, block_rows
from .codecs import get_codec
from .delta import Delta
from .delta_file import NEW_ROWS, DeltaWriter, ParamInfo
from .dtypes import DTYPES, dtype_name
from .errors import NonFiniteError, SettingsError
from .pairing import PairKind, Pairing
from .plan import WHOLE, Plan


def _ranges(start: int, stop: int, step: int) -> Iterator[tuple[int, int]]:
    for a in range(start, stop, step):
        yield a, min(a + step, stop)


def delta_of(ft: Tensor, b: Tensor, base_rows: int | None) -> tuple[Tensor, Tensor]:
    """(the fine-tune's rows shared with the base, their float32 delta; scalars as shape (1,))."""
    shared = ft[:base_rows] if base_rows is not None else ft
    delta = shared.to(torch.float32, copy=True)
    # in place, one float32 copy: the values of ft.float() - b.float() (a narrower b is widened exactly
    # inside the subtraction; a float64 one is rounded to float32 first, as b.float() does)
    delta.sub_(b if b.element_size() <= 4 else b.to(torch.float32))
    return shared, (delta.reshape(1) if delta.dim() == 0 else delta)


def count_nonfinite(t: Tensor) -> int:
    """How many values of ``t`` are NaN or Inf. One pass of a sum first: a NaN or Inf anywhere makes the
    sum NaN or Inf, so a finite sum means none (a sum that overflows only sends it to the exact count);
    torch's isfinite + count is several passes, which made it the larger part of a 1-bit compress."""
    if not t.is_floating_point():
        return 0
    if t.element_size() == 1:  # float8: torch has no isfinite for it
        t = t.float()
    if bool(torch.isfinite(t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32))):
        return 0
    return int(t.numel() - torch.isfinite(t).sum())


def finite_or_refuse(name: str, counts: list[tuple[str, int, int]], allow: bool) -> bool:
    """``counts``: (file, non-finite values, values) of the fine-tune's tensor, then the base's. False
    (store whole) or NonFiniteError when any holds NaN/Inf: its delta would be NaN and codecs with a
    shared scale would spread it over the whole tensor."""
    for path, n, numel in counts:
        if n and not allow:
            raise NonFiniteError(f"{path}: {name}: {n} of {numel} values are NaN or Inf; fix the checkpoint, "
                                 "or pass --allow-nonfinite to store such tensors whole (uncompressed)")
        if n:
            return False
    return True


# -- compress ---------------------------------------------------------------------------------------
class _Scan:
    """The first pass over a pair: yields (delta, base, fine-tune) row blocks and keeps the statistics."""

    def __init__(self, bck: Checkpoint, fck: Checkpoint, p: Pairing, rows: int, step: int, checker_hash):
        self.bck, self.fck, self.p, self.rows, self.step, self.hash = bck, fck, p, rows, step, checker_hash
        self.nonfinite = [0, 0]
        self.nonzero = 0

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        for a, b in _ranges(0, self.rows, self.step):
            ft, base = self.fck.get_rows(self.p.name, a, b), self.bck.get_rows(self.p.name, a, b)
            self.nonfinite[0] += count_nonfinite(ft)
            self.nonfinite[1] += count_nonfinite(base)
            self.hash.update(base.reshape(-1).view(torch.uint8).numpy().data)
            _, delta = delta_of(ft, base, None)
            self.nonzero += int(torch.count_nonzero(delta))
            yield delta, base, ft
        for a, b in _ranges(self.rows, self.fck.shape(self.p.name)[0], self.step):  # added tokens
            self.nonfinite[0] += count_nonfinite(self.fck.get_rows(self.p.name, a, b))


def add_streamed(writer: DeltaWriter, plan: Plan, bck: Checkpoint, fck: Checkpoint, p: Pairing,
                 base_hashes: dict[str, str], shared_settings: dict[str, dict], group_key,
                 allow_nonfinite: bool = False, block_elems: int | None = None) -> bool:
    """Compress one large pairing block by block when its codec works on row blocks, into ``writer``;
    False when it does not qualify (too small, tied, or a codec that needs the whole tensor) and the
    caller must take the whole-tensor path."""
    import hashlib

    shape = tuple(fck.shape(p.name))
    step = block_rows(shape, block_elems)
    if step is None or p.kind == PairKind.TIED or dtype_name(fck.dtype(p.name)) not in DTYPES:
        return False
    info = ParamInfo(p.name, None, shape, dtype_name(fck.dtype(p.name)))
    if p.kind == PairKind.NEW:
        return _add_whole(writer, fck, info, step)
    rows = p.base_rows if p.base_rows is not None else shape[0]
    enc_shape = (rows, *shape[1:])
    try:  # the codec for a changed and for an unchanged delta: both must work on row blocks
        changed, unchanged = (plan.assign(p.name, enc_shape, fck.dtype(p.name).itemsize, z) for z in (False, True))
    except SettingsError:
        return False
    if not (get_codec(changed.codec).row_blocks and get_codec(unchanged.codec).row_blocks):
        return False
    scan = _Scan(bck, fck, p, rows, step, hashlib.sha256())
    blocks = iter(scan)
    settings = _settings(changed, shared_settings, group_key, blocks)
    for _ in blocks:  # the statistics need every block, whatever the codec read
        pass
    if not finite_or_refuse(p.name, [(str(fck.path), scan.nonfinite[0], math.prod(shape)),
                                     (str(bck.path), scan.nonfinite[1], math.prod(enc_shape))], allow_nonfinite):
        return _add_whole(writer, fck, info, step)
    base_hashes[p.name] = scan.hash.hexdigest()[:32]
    a = changed
    if not scan.nonzero:
        a = unchanged
        settings = _settings(a, shared_settings, group_key, iter(_Scan(bck, fck, p, rows, step, hashlib.sha256())))
    codec = get_codec(a.codec)
    specs = {f: (t.dtype, tuple(t.shape)) for f, t in codec.meta_tensors(enc_shape, settings).items()}
    if p.base_rows is not None:
        specs[NEW_ROWS] = (fck.dtype(p.name), (shape[0] - rows, *shape[1:]))
    info.codec, info.base_rows = a.codec, p.base_rows
    params: list[dict[str, Any]] = []

    def source(fld: str) -> Iterator[Tensor]:
        if fld == NEW_ROWS:
            for lo, hi in _ranges(rows, shape[0], step):
                yield fck.get_rows(p.name, lo, hi)
            return
        for lo, hi in _ranges(0, rows, step):
            _, delta = delta_of(fck.get_rows(p.name, lo, hi), bck.get_rows(p.name, lo, hi), None)
            enc = codec.encode(delta, **settings)
            if params and enc.params != params[0]:
                raise ValueError(f"{p.name}: codec {a.codec} gave rows {lo}:{hi} params {enc.params}, "
                                 f"not {params[0]}; it cannot work on row blocks")
            params.append(enc.params)
            yield enc.tensors[fld].cpu()

    writer.add_blocks(info, specs, source)
    info.settings = params[0] if params else codec.encode(torch.zeros(0, *shape[1:]), **settings).params
    return True


def _settings(a, shared_settings: dict[str, dict], group_key, blocks) -> dict[str, Any]:
    codec = get_codec(a.codec)
    settings = {**a.settings, **shared_settings.get(group_key(a), {})}
    return codec.block_settings(settings, a.given, blocks)


def _add_whole(writer: DeltaWriter, fck: Checkpoint, info: ParamInfo, step: int) -> bool:
    """A tensor stored whole (only the fine-tune has it, or it holds NaN/Inf), block by block."""
    codec = get_codec(WHOLE)
    if not codec.row_blocks:
        return False
    empty = codec.whole(fck.get_rows(info.name, 0, 0))
    specs = {f: (t.dtype, (info.shape[0], *t.shape[1:])) for f, t in empty.tensors.items()}
    info.codec, info.has_base, info.settings = empty.codec, False, empty.params

    def source(fld: str) -> Iterator[Tensor]:
        for lo, hi in _ranges(0, info.shape[0], step):
            yield codec.whole(fck.get_rows(info.name, lo, hi)).tensors[fld]

    writer.add_blocks(info, specs, source)
    return True


# -- reconstruct ------------------------------------------------------------------------------------
def write_streamed(writer: ShardedWriter, bck: Checkpoint, df: Delta, checker: BaseChecker, name: str,
                   block_elems: int | None = None) -> bool:
    """Write the fine-tune's tensor ``name`` (base + delta) into ``writer`` block by block when it is
    large and its codec decodes row blocks; False when the caller must take the whole-tensor path."""
    info = df.params[name]
    src = info.tied_to or name
    src_info = df.params[src]
    step = block_rows(tuple(info.shape), block_elems)
    if step is None or not df.row_blocked(src):
        return False
    df.verify_param(src)  # every stored byte checksummed (streamed) before any is used
    rows = src_info.encoded_shape[0] if src_info.has_base else src_info.shape[0]
    check = checker.streamed(src) if src_info.has_base else None

    def blocks() -> Iterator[Tensor]:
        for lo, hi in _ranges(0, rows, step):
            base = None
            if check is not None:
                base = bck.get_rows(src, lo, hi)
                check.update(base)
            yield df.apply_rows(src, base, lo, hi)
        for lo, hi in _ranges(rows, src_info.shape[0], step):  # added tokens
            yield df.apply_rows(src, None, lo, hi)
        if check is not None:
            check.check(str(bck.path))

    writer.add_blocks(name, DTYPES[src_info.dtype], tuple(info.shape), blocks())
    return True
