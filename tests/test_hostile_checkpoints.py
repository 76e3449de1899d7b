"""Checkpoints a user may well have that used to break compress with a message blaming the delta file
("the file is damaged or was edited", from the writer's own check of what it wrote): integer and bool
tensors (quantized weights, masks, position ids), float64 tensors only in the fine-tune, and scalar (0-d)
tensors. Each now round-trips exactly."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import deltacomp
from conftest import finetune_of, llama_tensors, write_folder


def _bits(t):
    return t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t


def _round_trip(tmp_path, b, f, method="bitdelta"):
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method=method, progress=False)
    rec = dict(deltacomp.iter_reconstructed(base, out))
    deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    written = load_file(str(tmp_path / "rec" / "model.safetensors"))
    for got in (rec, written):
        assert got.keys() == f.keys()
        for k, v in f.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
            if not v.is_floating_point() or "extra" in k:
                assert torch.equal(_bits(got[k]), _bits(v)), k
    return out


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("changed", [True, False])
def test_integer_and_bool_tensors_stored_whole(tmp_path, dtype, changed):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    g = torch.Generator().manual_seed(3)
    b["model.extra_buf"] = torch.randint(0, 2, (7, 5), generator=g).to(dtype)
    f["model.extra_buf"] = torch.randint(0, 2, (7, 5), generator=g).to(dtype) if changed else b["model.extra_buf"].clone()
    out = _round_trip(tmp_path, b, f, method="svd-mixed")
    with deltacomp.load_delta(out) as df:
        info = df.params["model.extra_buf"]
        assert (info.codec, info.has_base, info.settings["dtype"]) == ("raw", False, str(dtype).split(".")[1])


def test_float64_tensor_only_in_finetune(tmp_path):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    f["model.extra_f64"] = torch.randn(4, 3, dtype=torch.float64)
    _round_trip(tmp_path, b, f)


@pytest.mark.parametrize("method", ["bitdelta", "svd-mixed", "raw"])
def test_scalar_tensors(tmp_path, method):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    b["model.extra_scale"], f["model.extra_scale"] = torch.tensor(1.5), torch.tensor(2.25)  # changed
    b["model.extra_same"], f["model.extra_same"] = torch.tensor(0.5), torch.tensor(0.5)     # unchanged
    f["model.extra_new"] = torch.tensor(3.0, dtype=torch.bfloat16)                          # only in the fine-tune
    b["model.extra_step"], f["model.extra_step"] = torch.tensor(7), torch.tensor(9)         # integer
    _round_trip(tmp_path, b, f, method=method)


def test_raw_delta_in_integer_dtype_refused(tmp_path):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    with pytest.raises(deltacomp.SettingsError, match="dtype='int8' cannot hold a delta"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="raw:dtype=int8", progress=False)
    assert not (tmp_path / "d.delta.safetensors").exists()
