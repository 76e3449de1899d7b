"""The DELTACOMP_* environment variables: every one deltacomp reads, with its valid values, checked in one place.

``check()`` refuses a variable set to a value it does not take (a ``SettingsError``: one line naming the
variable, the value and the valid ones), so a typo such as ``DELTACOMP_SIGN_KERNEL=exakt`` no longer falls back
to the default without a word. It returns notes for what is legal but not what was asked: a ``DELTACOMP_*``
name that is no setting (with the close one it may be a typo of), and a ``DELTACOMP_ISA`` path this CPU lacks.
The CLI runs it before every command, ``patch_model`` / ``patch_model_multi`` before serving.

``choice(name)`` is the parsed value for the modules that read a setting (None when unset). The C++ kernels
read ``DELTACOMP_ISA``, ``DELTACOMP_SIGN_KERNEL`` and ``DELTACOMP_LOWRANK_KERNEL`` themselves on every call, with
the same values as here; the build-time ones are read by setup.py, which checks its own.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass

from .errors import SettingsError

PREFIX = "DELTACOMP_"


@dataclass(frozen=True)
class Variable:
    name: str
    values: tuple[str, ...] | None  # None: any value (a path, a count)
    what: str
    build_time: bool = False
    exact: bool = False  # read by the C++ kernels too, which compare the value as it is (case, spaces)


VARIABLES = {v.name: v for v in (
    Variable("DELTACOMP_FUSED", ("auto", "always", "never"),
             "serving: fused base + delta kernel per layer (auto = measured per layer and shape)"),
    Variable("DELTACOMP_ISA", ("avx512", "avx2", "neon", "portable"),
             "CPU kernels: force one code path (a path the CPU lacks leaves the best one)", exact=True),
    Variable("DELTACOMP_CPU_ISA", ("generic", "baseline"), "CPU kernels: the older name of DELTACOMP_ISA",
             exact=True),
    Variable("DELTACOMP_SIGN_KERNEL", ("tables", "exact", "simd", "lut8"),
             "1-bit sign kernels at one x row: the int8 tables (default) or an exact kernel", exact=True),
    Variable("DELTACOMP_LOWRANK_KERNEL", ("int8", "exact", "direct"),
             "svd-mixed factor kernels at one x row: int8 tables (default) or an exact kernel", exact=True),
    Variable("DELTACOMP_LAYER_PLANS", ("0", "1"), "serving: layer plans (one native call per patched layer)"),
    Variable("DELTACOMP_CUDA_KERNELS", ("0", "1"), "CUDA tensors: the extension's CUDA kernels (opt-in)"),
    Variable("DELTACOMP_MALLOC", ("default", "bounded"),
             "batch commands: bounded = fix glibc's mmap threshold (the default), default = leave it"),
    Variable("DELTACOMP_CACHE", None, "folder of the bundled pairs (default ~/.cache/deltacomp)"),
    Variable("DELTACOMP_OPENMP", ("0", "1"), "build: OpenMP in the kernels", build_time=True),
    Variable("DELTACOMP_NO_EXT", ("0", "1"), "build: skip the C++ extension", build_time=True),
    Variable("DELTACOMP_REQUIRE_EXT", ("0", "1"), "build: a failed extension build is an error", build_time=True),
    Variable("DELTACOMP_FUZZ_CASES", None, "tests: cases per fuzz target"),
    Variable("DELTACOMP_NVCC_ARCH", None, "tests: the arch the nvcc compile test targets"),
)}


def choice(name: str) -> str | None:
    """The value of a registered variable, or None when unset or empty; a value it does not take is a
    SettingsError. Values are compared in lower case without surrounding spaces, except those the C++
    kernels read too (``exact``), which must be written as listed."""
    var = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None or not raw.strip():
        return None
    value = raw if var.exact else raw.strip().lower()
    if var.values is None or value in var.values:
        return value
    written = " exactly as written" if var.exact else ""
    raise SettingsError(f"environment variable {name}={raw!r}: expected one of {', '.join(var.values)}{written}, "
                        "or unset")


def check(isa_now: Callable[[], str] | None = None) -> list[str]:
    """Every set DELTACOMP_* run-time variable against its values (raises on the first bad one); returns notes
    for unknown DELTACOMP_* names and, given how to ask the kernels' code path now (``isa_now``, e.g.
    ``ops.cpu_isa``; asked only when DELTACOMP_ISA is set), a DELTACOMP_ISA path this CPU or build lacks."""
    notes = []
    for name in sorted(k for k in os.environ if k.startswith(PREFIX)):
        if name not in VARIABLES:
            close = difflib.get_close_matches(name, VARIABLES, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            notes.append(f"note: environment variable {name} is not a deltacomp setting and is ignored{hint}")
        elif not VARIABLES[name].build_time:
            choice(name)
    asked = choice("DELTACOMP_ISA")
    now = isa_now() if asked and isa_now else None
    if now and now not in ("torch", asked):
        notes.append(f"note: DELTACOMP_ISA={asked}: this CPU or build has no {asked} path; the kernels take {now}")
    return notes
