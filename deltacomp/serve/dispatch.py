"""Which path a ``DeltaLinear`` serves a batch with, decided from measurements on this machine.

A layer that can fuse (a plain fp32/bf16 ``nn.Linear`` base and a one-mask BitDelta delta) has two
ways to compute ``base(x) + x @ delta^T``: the fused kernel (``sign_matmul_fused``: one pass over W and
the signs), or the base layer's own matmul plus the separate delta term (``sign_matmul``). Which is
faster depends on the CPU, the code path (``torch.ops.deltacomp.cpu_isa()``), the dtypes, the layer
shape and the number of rows: the fused kernels were 0.6x-1.4x the dense matmul across the AVX-512,
AVX2 and portable paths when this was written. So no rule is fixed here: the first call for a
(device, code path, threads, dtypes, N x K, row bucket, asking module) key times both paths on that
call's own tensors (interleaved, best of ``REPEATS``; timed again, up to ``ROUNDS`` times in all, while
the two are within ``CLOSE`` of each other, where one preempted call on a shared machine would decide)
and caches the winner for the process; later calls look it up.
Decisions and their timings are listed by ``decisions()`` (benchmarks/kernels.py records them).
A module may keep the decision for the last input it saw (serve/modules.py) while ``plan_state()``, the
rest of what the decision depends on (the settings below, the thread count, ``reset``), stays the same.

    DELTACOMP_FUSED=auto (default) | always | never     # overrides the measurement for every layer
"""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
from torch import Tensor

from .. import environment, ops
from ..codecs import term as _term

REPEATS = 5  # timed calls per path after one warm-up each; the minimum is kept (noise only adds time)
CLOSE = 1.10  # best times within this factor of each other are timed again ...
ROUNDS = 3  # ... up to this many rounds of REPEATS in all (the minimum over all of them is kept)
_ENV = "DELTACOMP_FUSED"
_cache: dict[tuple, bool] = {}
_records: list[dict] = []
_generation = 0  # counts reset() calls: decisions kept by modules (plan_state) from before one are dropped


def mode() -> str:
    """The DELTACOMP_FUSED setting; an unknown value is a SettingsError (a ValueError) that lists the
    valid ones."""
    return environment.choice(_ENV) or "auto"


def row_bucket(m: int) -> int:
    """Rows of x rounded up to 1, 4, 16, 64, 256, ... (the timing of one call stands for its bucket)."""
    b = 1
    while b < m:
        b *= 4
    return b


_isa_by_env: dict[str | None, str] = {}


def _cpu_path() -> str:
    """``ops.cpu_isa()``, looked up once per value of DELTACOMP_ISA (the path depends on it and the CPU
    alone; asking the extension costs more than the rest of a small layer's dispatch)."""
    env = os.environ.get("DELTACOMP_ISA")
    path = _isa_by_env.get(env)
    if path is None:
        path = _isa_by_env[env] = ops.cpu_isa()
    return path


_PLAN_ENV = (_ENV, "DELTACOMP_ISA", "DELTACOMP_LAYER_PLANS")  # the settings a kept path depends on (plan_state)
# os.environ's own dict (what os.environ.get reads, its keys encoded): a lookup in it costs 0.1 us where
# os.environ.get costs 1 us (the key encoded, a KeyError raised and caught when unset), and plan_state runs
# for every patched layer of a decode step. os.environ.get where the platform's os.environ has no such dict.
try:
    _ENV_DATA, _ENV_KEYS = os.environ._data, tuple(os.environ.encodekey(k) for k in _PLAN_ENV)
    if not isinstance(_ENV_DATA, dict):
        raise AttributeError("os.environ._data")
except AttributeError:  # pragma: no cover - CPython's os.environ has both
    _ENV_DATA, _ENV_KEYS = os.environ, _PLAN_ENV


def plan_state() -> tuple:
    """What every decision depends on besides the module and its input: the DELTACOMP_FUSED, DELTACOMP_ISA
    and DELTACOMP_LAYER_PLANS settings (as set, unparsed), torch's thread count, the number of ``reset``
    calls so far and of serving terms moved (``codecs.term.moved``: a term moved alone, without its layer,
    leaves the layer plans its layer keeps holding its old tensors). A module that keeps the path it took
    for its last input (shape, dtype), and the layer plan built for it, takes them again while this is
    unchanged; otherwise it asks ``prefer_fused`` again (which parses the setting and may measure)."""
    get = _ENV_DATA.get
    keys = _ENV_KEYS
    return get(keys[0]), get(keys[1]), get(keys[2]), torch.get_num_threads(), _generation, _term.moves


def _key(x2: Tensor, weight: Tensor, kind: str) -> tuple:
    if x2.is_cpu:  # (is_cpu: no device object built; this runs for every patched layer of a decode step)
        device, path = "cpu", _cpu_path()
    else:
        device = path = x2.device.type
    m = x2.shape[0]
    return (device, path, torch.get_num_threads(), weight.dtype, x2.dtype,
            weight.shape, 1 if m == 1 else row_bucket(m), kind)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_pair(fused: Callable[[], Tensor], unfused: Callable[[], Tensor], device: torch.device) -> tuple[float, float]:
    """Best-of-REPEATS seconds of each path, calls interleaved so machine noise hits both alike."""
    best = [float("inf"), float("inf")]
    with torch.no_grad():
        fused(), unfused()  # warm-up: first-call allocations and library initialisation
        for _ in range(REPEATS):
            for i, fn in enumerate((fused, unfused)):
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                best[i] = min(best[i], time.perf_counter() - t0)
    return best[0], best[1]


def prefer_fused(x2: Tensor, weight: Tensor, fused: Callable[[], Tensor], unfused: Callable[[], Tensor],
                 kind: str = "single") -> bool:
    """True when the fused path is the one to take for this batch. ``x2`` (M, K) is the batch,
    ``weight`` the base weight; ``fused`` / ``unfused`` compute the layer's output each way (they are
    called only the first time a key is seen, to time them). ``kind`` names the module asking
    ("single": DeltaLinear, "multi": MultiDeltaLinear with every row on one delta), whose unfused paths
    cost differently, so each has its own decisions."""
    setting = mode()
    if setting != "auto":
        return setting == "always"
    key = _key(x2, weight, kind)
    hit = _cache.get(key)
    if hit is None:
        if torch.compiler.is_compiling():  # no timing inside a trace: the fused kernel is one op
            return True
        t_fused, t_unfused = _time_pair(fused, unfused, x2.device)
        rounds = 1
        while rounds < ROUNDS and max(t_fused, t_unfused) <= CLOSE * min(t_fused, t_unfused):
            f2, u2 = _time_pair(fused, unfused, x2.device)
            t_fused, t_unfused, rounds = min(t_fused, f2), min(t_unfused, u2), rounds + 1
        hit = _cache[key] = t_fused <= t_unfused
        _records.append({"device": key[0], "path": key[1], "threads": key[2], "w_dtype": str(key[3]),
                         "x_dtype": str(key[4]), "n": key[5][0], "k": key[5][1], "rows_bucket": key[6],
                         "module": kind,
                         "rows_timed": int(x2.shape[0]), "fused_ms": t_fused * 1e3,
                         "unfused_ms": t_unfused * 1e3, "rounds": rounds, "chosen": "fused" if hit else "unfused"})
    return hit


def decisions() -> list[dict]:
    """Every measurement made in this process, with its timings and the path chosen."""
    return [dict(r) for r in _records]


def reset() -> None:
    """Forget every decision (the next call of each key measures again, the modules' kept ones too)."""
    global _generation
    _generation += 1
    _cache.clear()
    _records.clear()
