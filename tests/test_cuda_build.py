"""Every CUDA kernel file (csrc/cuda/*.cu, torch-free by design) compiles with plain nvcc for sm_90, GPU or
not, so a syntax or template error fails here and not on a user's machine. Skipped without nvcc."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
NVCC = shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if os.path.exists(p)), None)


@pytest.mark.skipif(NVCC is None, reason="nvcc not found (CUDA toolkit not installed)")
def test_every_cu_file_compiles_for_sm90(tmp_path):
    sources = sorted(CUDA_DIR.glob("*.cu"))
    assert sources, f"no .cu files under {CUDA_DIR}"
    arch = os.environ.get("DELTACOMP_NVCC_ARCH", "sm_90")
    procs = {src.name: subprocess.Popen([NVCC, f"-arch={arch}", "-O3", "-std=c++17", "-c", str(src), "-o",
                                         str(tmp_path / (src.stem + ".o"))],
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src in sources}
    failed = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=900)
        if proc.returncode != 0:
            failed[name] = out[-3000:]
    assert not failed, "nvcc failed:\n" + "\n".join(f"--- {k}\n{v}" for k, v in failed.items())
    assert all((tmp_path / (s.stem + ".o")).stat().st_size > 0 for s in sources)
