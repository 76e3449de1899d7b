"""--device for compression: resolution and one-line refusals, and the device path of compress run on
the CPU (device="cpu" explicitly) giving the same file as the default."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import deltacomp
from deltacomp import devices
from deltacomp.codecs import available, get_codec
from deltacomp.errors import SettingsError


def test_resolve_device():
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device(" CPU ".lower()) == torch.device("cpu")
    want = "cuda" if devices.GPU_COMPRESS_CHECKED and torch.cuda.is_available() else "cpu"
    assert devices.resolve_device("auto").type == want and devices.resolve_device(None).type == want
    with pytest.raises(SettingsError, match="not a device"):
        devices.resolve_device("gpu0")
    with pytest.raises(SettingsError, match="compression runs on auto, cpu, cuda"):
        devices.resolve_device("meta")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda():
    with pytest.raises(SettingsError, match="CUDA is not available here"):
        devices.resolve_device("cuda")


def test_codecs_declare_encode_devices():
    for name in available():
        devs = get_codec(name).encode_devices
        assert "cpu" in devs and set(devs) <= {"cpu", "cuda"}, (name, devs)


def test_compress_device_cpu_same_file(pair, tmp_path):
    base, ft = pair[:2]
    a = deltacomp.compress(base, ft, tmp_path / "a.delta.safetensors", method="bitdelta", progress=False)
    b = deltacomp.compress(base, ft, tmp_path / "b.delta.safetensors", method="bitdelta", progress=False,
                           device="cpu")
    da, db = deltacomp.load_delta(tmp_path / "a.delta.safetensors"), deltacomp.load_delta(tmp_path / "b.delta.safetensors")
    for name in da.params:
        ta, tb = da.encoded(name).tensors, db.encoded(name).tensors
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cli_device_cuda_one_line_error(pair, tmp_path):
    base, ft = pair[:2]
    proc = subprocess.run([sys.executable, "-m", "deltacomp.cli", "compress", str(base), str(ft), "-o",
                           str(tmp_path / "x.delta.safetensors"), "--device", "cuda", "-q"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "CUDA is not available here" in lines[0], proc.stderr
    assert not (tmp_path / "x.delta.safetensors").exists()
