"""Shared pieces of the CPU kernel benchmarks (benchmarks/kernels.py): the CPU's name and SIMD flags for the
JSON, weight copies that exceed the last-level cache, interleaved timing, the correctness guards every
timed implementation passes first, and the bytes-moved bound at the read bandwidth measured in the run."""
from __future__ import annotations

import os
import platform
import statistics
import time

import torch

CACHE_BYTES = 64 << 20  # rotate through at least this many bytes per implementation (> LLC here)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


_SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
               "avx512_vnni", "amx_bf16", "asimd", "asimddp", "sve", "sve2", "bf16", "i8mm")


def cpu_flags() -> list[str]:
    """The SIMD-related flags of the CPU (x86 "flags", Arm "Features" in /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [fl for fl in _SIMD_FLAGS if fl in have]
    except OSError:
        pass
    return []


def copies_for(nbytes: int, max_copies: int = 64) -> int:
    return max(2, min(max_copies, -(-CACHE_BYTES // max(nbytes, 1))))


def with_env(name: str, value: str, fn):
    """fn run with environment variable ``name`` set to ``value`` (the kernels read it on every call)."""
    def run(i):
        old = os.environ.get(name)
        os.environ[name] = value
        try:
            return fn(i)
        finally:
            if old is None:
                del os.environ[name]
            else:
                os.environ[name] = old
    return run


def time_interleaved(impls: dict, repeats: int) -> tuple[dict, dict]:
    """Median and min ms per implementation, interleaved call by call (after one warm-up call each).
    The min is reported beside the median: on a shared machine the median carries other processes' noise."""
    times = {name: [] for name in impls}
    for fn in impls.values():
        fn(0)
    for i in range(repeats):
        for j, (name, fn) in enumerate(impls.items()):
            t0 = time.perf_counter()
            # a different copy index per call: implementations sharing weights (the signs of sign_matmul and
            # its variants, of fused and base + term) must not find the copy the previous one just read in cache
            fn(1 + i * len(impls) + j)
            times[name].append(time.perf_counter() - t0)
    return ({name: statistics.median(ts) * 1e3 for name, ts in times.items()},
            {name: min(ts) * 1e3 for name, ts in times.items()})


def check(got, want, what: str) -> None:
    # correctness guard: a fast wrong kernel must not produce a table
    tol = 1e-2 * float(want.float().abs().max()) + 1e-3
    assert torch.allclose(got.float(), want.float(), rtol=1e-2, atol=tol), f"{what} disagrees with its reference"


def check_tables(got, want, what: str) -> None:
    # the int8-table ops are inexact (x quantized through its tables, ~1-3% of the delta term per row):
    # a guard against a wrong kernel, not a bound (tests/test_ops_sign_tl.py checks the bound)
    rel = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
    assert rel < 0.05, f"{what} disagrees with its reference (relative error {rel:.3g})"


def read_bandwidth() -> float:
    """Bytes per second of one streaming read (``sum`` of a 256 MB fp32 tensor), best of 5."""
    a = torch.ones(64 << 20)
    a.sum()
    best = min(timed(a.sum) for _ in range(5))
    return a.nbytes / best


def bytes_bound_ms(nbytes: int, bandwidth: float) -> float:
    """The bytes-moved bound: ``nbytes`` read once at the measured read bandwidth, in ms."""
    return nbytes / bandwidth * 1e3


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
