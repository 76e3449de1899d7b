"""deltacomp/memory.py: the batch commands fix glibc's mmap threshold, so large tensors freed one layer after
another go back to the system instead of fragmenting the heap."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent("""
    import sys, torch
    from deltacomp.memory import bounded_malloc
    if sys.argv[1] == "fixed":
        assert bounded_malloc()
    def rss():
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
    big = torch.ones(48 * 2**20 // 4)  # one large block freed: glibc raises its threshold to this size
    del big
    start, keep = rss(), []
    for i in range(40):  # a "layer" of 12 MiB tensors allocated and freed, with a small survivor each time
        tmp = [torch.ones(3 * 2**20) for _ in range(4)]
        keep.append(torch.ones(64 * 1024))
        del tmp
    print(rss() - start)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt and /proc are Linux's")
def test_fixed_threshold_returns_freed_tensors():
    def growth(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(out.stdout.split()[-1])

    fixed = growth("fixed")
    assert fixed < 20, f"RSS grew {fixed} MB over 40 freed layers with the threshold fixed"


def test_opt_out(monkeypatch):
    import deltacomp.memory as m

    monkeypatch.setattr(m, "_done", False)
    monkeypatch.setenv("DELTACOMP_MALLOC", "default")
    assert m.bounded_malloc() is False
