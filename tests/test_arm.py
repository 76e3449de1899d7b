"""The raw CPU kernels (csrc/cpu/*.cpp, no torch) against scalar double references in a standalone
driver (tests/arm/kernel_check.cpp): built for aarch64 and run under qemu-user, so the NEON and portable
paths are checked on an x86 machine; built for the host, checking every path it has; and built by Clang
(for the host, and for aarch64 without OpenMP as a Mac builds it) and without OpenMP.

    apt-get install g++-aarch64-linux-gnu qemu-user clang libomp-dev   # Debian / Ubuntu
    python -m pytest -q -m arm tests/test_arm.py

Skips (with the reason) when the cross compiler or qemu-aarch64 is missing."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ("isa", "sign_kernels", "simd8_kernels", "fused_kernels", "ternary_kernels", "lowrank_kernels",
           "lowrank_generic", "lowrank_simd", "lowrank_avx2", "lowrank_tl_avx2", "lowrank_tl_generic", "tl4_pack")


def _build(compiler: str, out: Path, static: bool, openmp: bool = True, extra: tuple[str, ...] = ()) -> None:
    cmd = [compiler, *extra, "-std=c++17", "-O2", "-fopenmp" if openmp else "-Wno-unknown-pragmas",
           *(["-static"] if static else []), f"-I{ROOT / 'csrc/cpu'}", str(ROOT / "tests/arm/kernel_check.cpp"),
           *(str(ROOT / f"csrc/cpu/{k}.cpp") for k in KERNELS), "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}"


def _run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(cmd)}: kernels disagree with the reference:\n{done.stdout[-4000:]}"
    return done.stdout


@pytest.mark.arm
def test_kernels_aarch64_under_qemu(tmp_path):
    cxx, qemu = shutil.which("aarch64-linux-gnu-g++"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None:
        pytest.skip("needs aarch64-linux-gnu-g++ and qemu-aarch64 (apt-get install g++-aarch64-linux-gnu qemu-user)")
    exe = tmp_path / "kernel_check_aarch64"
    _build(cxx, exe, static=True)  # static: qemu-user needs no aarch64 sysroot
    out = _run([qemu, str(exe), "neon", "portable"])
    assert "neon: path neon, all kernels match" in out and "portable: path portable, all kernels match" in out, out


@pytest.mark.arm
def test_kernels_host_build(tmp_path):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ on the PATH")
    exe = tmp_path / "kernel_check"
    _build(cxx, exe, static=False)
    out = _run([str(exe), "avx512", "avx2", "neon", "portable"])  # paths this CPU lacks run its best one
    assert out.count("all kernels match") == 4, out


@pytest.mark.arm
def test_kernels_clang_build(tmp_path):
    """The kernels built by Clang (Apple's compiler on Apple silicon): no GCC-only builtins on the paths Clang
    compiles (the portable loops, the table lookup), every kernel against the float64 references."""
    cxx = shutil.which("clang++") or shutil.which("clang++-14")
    if cxx is None:
        pytest.skip("needs clang++ (apt-get install clang libomp-dev)")
    probe = subprocess.run([cxx, "-fopenmp", "-x", "c++", "-E", "-"], input="#include <omp.h>\n", capture_output=True,
                           text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip("clang++ has no OpenMP headers (apt-get install libomp-dev)")
    exe = tmp_path / "kernel_check_clang"
    _build(cxx, exe, static=False)
    out = _run([str(exe), "neon", "portable"])  # Clang builds get the portable path on x86 (no target clones)
    assert out.count("all kernels match") == 2, out


@pytest.mark.arm
def test_kernels_without_openmp(tmp_path):
    """The kernels built without OpenMP (setup.py's DELTACOMP_OPENMP=0, the macOS default): single-threaded,
    every path this CPU has against the float64 references."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("needs g++ on the PATH")
    exe = tmp_path / "kernel_check_no_openmp"
    _build(cxx, exe, static=False, openmp=False)
    out = _run([str(exe), "avx512", "avx2", "neon", "portable"])
    assert out.count("all kernels match") == 4, out


@pytest.mark.arm
def test_kernels_clang_aarch64_under_qemu(tmp_path):
    """What an Apple silicon build compiles: Clang for aarch64 without OpenMP (the macOS default), the NEON
    and portable paths under qemu against the float64 references (linked with the aarch64 GNU sysroot)."""
    cxx, qemu = shutil.which("clang++") or shutil.which("clang++-14"), shutil.which("qemu-aarch64")
    if cxx is None or qemu is None or shutil.which("aarch64-linux-gnu-g++") is None:
        pytest.skip("needs clang++, qemu-aarch64 and the aarch64 GNU toolchain (its sysroot)")
    exe = tmp_path / "kernel_check_clang_aarch64"
    _build(cxx, exe, static=True, openmp=False, extra=("--target=aarch64-linux-gnu",))
    out = _run([qemu, str(exe), "neon", "portable"])
    assert "neon: path neon, all kernels match" in out and "portable: path portable, all kernels match" in out, out
