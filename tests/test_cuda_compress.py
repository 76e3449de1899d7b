"""Compression on a GPU (compress(device="cuda")): every codec's file decodes within a stated tolerance of
the CPU path's (the same weight error to 2%, bitdelta's signs equal but for entries at rounding distance
from zero), and codecs that cannot encode on CUDA fall back to the CPU. Skipped without a CUDA device."""
from __future__ import annotations

import pytest
import torch

import deltacomp
from deltacomp.codecs import get_codec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

METHODS = ["bitdelta", "bitdelta:scale=row", "bitdelta:masks=2", "svd-mixed", "lowrank:rank=8",
           "ternary:density=0.2", "raw"]


@pytest.mark.parametrize("method", METHODS)
def test_gpu_file_matches_cpu_file(pair, tmp_path, method):
    base, ft, b, f = pair
    paths = {}
    for dev in ("cpu", "cuda"):
        paths[dev] = tmp_path / f"{dev}.delta.safetensors"
        deltacomp.compress(base, ft, paths[dev], method=method, device=dev, progress=False)
    cpu, gpu = deltacomp.load_delta(paths["cpu"]), deltacomp.load_delta(paths["cuda"])
    assert cpu.params.keys() == gpu.params.keys()
    for name, info in cpu.params.items():
        if info.tied_to or not info.has_base:
            continue
        delta = f[name].float() - b[name].float()
        dc, dg = cpu.decode(name).reshape(delta.shape), gpu.decode(name).reshape(delta.shape)
        ec, eg = float((dc - delta).norm()), float((dg - delta).norm())
        assert eg <= 1.02 * ec + 1e-6 * float(delta.norm()) + 1e-12, f"{method} {name}: GPU error {eg} vs CPU {ec}"
        if get_codec(info.codec).name == "bitdelta":
            signs_c, signs_g = cpu.encoded(name).tensors, gpu.encoded(name).tensors
            differ = sum(int((signs_c[k] != signs_g[k]).sum()) for k in signs_c if k.startswith("signs"))
            assert differ <= max(1, delta.numel() // 10000), f"{name}: {differ} sign bytes differ"
