"""Process-wide allocator setting for long batch jobs (compress, reconstruct, calibrate).

glibc raises its mmap threshold each time a large block is freed (up to 32 MiB on 64-bit), after which
tensors of a few MiB to 32 MiB come from the heap instead of their own mappings; the heap fragments and is
not given back, so a job that allocates and frees one layer's tensors per step grows by a few MiB per layer
(measured: layer-by-layer calibration of a 12-layer model, hidden 512, grew 178 MB with the dynamic threshold
and 4 MB with a fixed one; benchmarks/calib_memory.py). Fixing the threshold at glibc's default (128 KiB)
turns that adjustment off: every large tensor is its own mapping, returned to the system when freed.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

from . import environment

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers
M_TRIM_THRESHOLD = -1
THRESHOLD = 128 * 1024
# training loops (distill, tune) allocate the same tensors every step: there the heap is reused, not grown
TRAINING_MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRAINING_TRIM_THRESHOLD = 256 * 1024 * 1024
_done = False
_libc = None


def bounded_malloc() -> bool:
    """Fix glibc's mmap threshold (once per process). False where there is no glibc (macOS, musl, Windows)
    or ``DELTACOMP_MALLOC=default`` asks to leave the allocator alone."""
    global _done
    if _done:
        return True
    if not sys.platform.startswith("linux") or environment.choice("DELTACOMP_MALLOC") == "default":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _done = mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1
    if _done:
        global _libc
        _libc = libc
    return _done


@contextlib.contextmanager
def training_heap():
    """Within a training loop, blocks of up to 32 MiB come from a heap kept across steps instead of fresh
    mappings (each step otherwise maps, faults in and unmaps the same activations). Measured on the bundled
    pair, 8 tune steps of 4 x 128 tokens, one core: 78 s with the fixed threshold (14.3 M page faults, 33 s
    of it in the kernel), 53 s in this context (4.0 M, 8 s), for a peak RSS of 4.3 GB instead of 3.1 GB.
    The loop's working set is the same every step, so the heap does not grow with the steps; on exit the
    fixed threshold is back and the heap's free top is returned. A no-op unless bounded_malloc() set the
    threshold."""
    if not _done or _libc is None:
        yield
        return
    _libc.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    _libc.mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        _libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD)
        _libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD)
        try:
            _libc.malloc_trim(0)
        except AttributeError:
            pass


def available_bytes(device: str = "cpu") -> int | None:
    """Memory a job can still take on ``device``: MemAvailable from /proc/meminfo for the CPU, free memory
    for a CUDA device; None where it cannot be told (then callers do not refuse)."""
    if str(device).startswith("cuda"):
        import torch

        try:
            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
