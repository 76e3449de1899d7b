"""Every user mistake gets a typed one-line error, and a failed run leaves nothing at the target."""
from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

import deltacomp
from deltacomp import (BaseMismatchError, CheckpointError, ChecksumError, DeltaFormatError, OutputExistsError,
                       SettingsError)
from conftest import finetune_of, llama_tensors, write_folder
from forge import edit_metadata


@pytest.fixture
def delta(tmp_path, pair):
    base, ft, b, f = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, progress=False)
    return base, ft, out


def _rewrite_metadata(path, edit):
    edit_metadata(path, edit, reseal=True)


def test_wrong_base_refused_and_forced(tmp_path, delta):
    _, _, out = delta
    other = write_folder(tmp_path / "other", llama_tensors(7))
    with pytest.raises(BaseMismatchError, match="fingerprint mismatch.*--force"):
        deltacomp.reconstruct(other, out, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rec")]
    with pytest.warns(UserWarning, match="applying anyway"):
        deltacomp.reconstruct(other, out, tmp_path / "rec", progress=False, force=True)
    assert (tmp_path / "rec" / "model.safetensors").is_file()


def test_base_missing_tensor(tmp_path, delta):
    _, _, out = delta
    t = llama_tensors(0)
    del t["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(BaseMismatchError, match="has no tensor model.layers.1.mlp.up_proj.weight"):
        deltacomp.reconstruct(write_folder(tmp_path / "b2", t), out, tmp_path / "rec", progress=False)


def test_corrupted_byte(tmp_path, delta):
    base, _, out = delta
    raw = bytearray(out.read_bytes())
    raw[-10] ^= 0xFF  # inside the data section
    out.write_bytes(bytes(raw))
    df = deltacomp.load_delta(out)
    with pytest.raises(ChecksumError, match="checksum mismatch in .*corrupted"):
        df.verify()
    with pytest.raises(ChecksumError):
        deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()


def test_truncated_file(tmp_path, delta):
    _, _, out = delta
    out.write_bytes(out.read_bytes()[:-100])
    with pytest.raises(DeltaFormatError, match="truncated or corrupted"):
        deltacomp.load_delta(out)


def test_header_corrupted(tmp_path, delta):
    _, _, out = delta
    raw = bytearray(out.read_bytes())
    raw[12] = ord("#")
    out.write_bytes(bytes(raw))
    with pytest.raises(DeltaFormatError):
        deltacomp.load_delta(out)


def test_newer_format_version(tmp_path, delta):
    _, _, out = delta
    _rewrite_metadata(out, lambda m: m.update(format="deltacomp/2"))
    with pytest.raises(DeltaFormatError, match="newer than this deltacomp.*upgrade"):
        deltacomp.load_delta(out)


def test_unknown_codec_in_file(tmp_path, delta):
    _, _, out = delta
    _rewrite_metadata(out, lambda m: m["params"]["model.layers.0.mlp.up_proj.weight"].update(codec="magic"))
    with pytest.raises(DeltaFormatError, match="unknown codec 'magic'"):
        deltacomp.load_delta(out)


def test_field_outside_vocabulary(tmp_path, delta):
    _, _, out = delta
    _rewrite_metadata(out, lambda m: m["params"]["model.layers.0.mlp.up_proj.weight"].update(codec="raw"))
    with pytest.raises(DeltaFormatError, match="not one of codec raw's"):
        deltacomp.load_delta(out)


def test_not_a_delta_file(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(2)}, str(p))
    with pytest.raises(DeltaFormatError, match="not a deltacomp delta"):
        deltacomp.load_delta(p)
    with pytest.raises(DeltaFormatError, match="no such delta file"):
        deltacomp.load_delta(tmp_path / "missing.delta.safetensors")


def test_pickle_refused(tmp_path, pair):
    base, ft, b, f = pair
    (tmp_path / "pk").mkdir()
    torch.save(b, tmp_path / "pk" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickled weights .* refused.*safe_serialization"):
        deltacomp.compress(tmp_path / "pk", ft, tmp_path / "d.delta.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="pickled checkpoints are refused"):
        deltacomp.compress(tmp_path / "pk" / "pytorch_model.bin", ft, tmp_path / "d.delta.safetensors", progress=False)
    assert not (tmp_path / "d.delta.safetensors").exists()


def test_shape_mismatch(tmp_path, pair):
    base, _, b, f = pair
    f = dict(f)
    f["model.layers.0.mlp.up_proj.weight"] = torch.zeros(97, 64, dtype=torch.bfloat16)
    ft = write_folder(tmp_path / "ft_bad", f)
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight: shape \[97, 64\].*\[96, 64\]"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", progress=False)
    assert not (tmp_path / "d.delta.safetensors").exists()
    assert not list(tmp_path.glob(".d.delta*"))


def test_unknown_codec_and_settings(tmp_path, pair):
    base, ft, _, _ = pair
    with pytest.raises(SettingsError, match="unknown method 'magic'; choose one of: .*bitdelta"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="magic", progress=False)
    with pytest.raises(SettingsError, match="unknown setting.*bogus.*valid: scale, masks"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="bitdelta:bogus=1", progress=False)
    with pytest.raises(SettingsError, match="masks='0' must be between 1 and 16"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="bitdelta:masks=0", progress=False)
    with pytest.raises(SettingsError, match="expected REGEX=METHOD"):
        deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", rules=["nomethod"], progress=False)


def test_existing_output_not_overwritten(tmp_path, delta):
    base, ft, out = delta
    before = out.read_bytes()
    with pytest.raises(OutputExistsError, match="exists; pass --overwrite"):
        deltacomp.compress(base, ft, out, method="bitdelta:masks=2", progress=False)
    assert out.read_bytes() == before
    deltacomp.compress(base, ft, out, method="bitdelta:masks=2", progress=False, overwrite=True)
    assert deltacomp.load_delta(out).params["model.layers.0.mlp.up_proj.weight"].settings["masks"] == 2
    (tmp_path / "rec").mkdir()
    (tmp_path / "rec" / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="not empty; pass --overwrite"):
        deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    assert (tmp_path / "rec" / "keep.txt").read_text() == "x"


def test_failure_mid_write_leaves_nothing(tmp_path, pair, monkeypatch):
    base, ft, _, _ = pair
    from deltacomp.codecs import bitdelta

    calls = {"n": 0}
    real = bitdelta.BitDeltaCodec.encode

    def flaky(self, delta, **s):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return real(self, delta, **s)

    monkeypatch.setattr(bitdelta.BitDeltaCodec, "encode", flaky)
    out = tmp_path / "d.delta.safetensors"
    with pytest.raises(RuntimeError, match="simulated crash"):
        deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_nonfinite_count_is_exact(dtype):
    """api._nonfinite's (rowblocks.count_nonfinite) one-sum fast path: exact counts, and a sum that overflows is no false alarm."""
    from deltacomp.api import _nonfinite

    t = torch.randn(33, 7).to(dtype)
    assert _nonfinite(t) == 0
    t[3, 4], t[5, 1], t[6, 2] = float("nan"), float("inf"), float("-inf")
    assert _nonfinite(t) == 3
    assert _nonfinite(torch.full((9,), torch.finfo(dtype).max, dtype=dtype)) == 0  # the sum overflows
    assert _nonfinite(torch.tensor([float("inf"), float("-inf")], dtype=dtype)) == 2  # the sum is NaN
    assert _nonfinite(torch.tensor(float("nan"), dtype=dtype)) == 1
    assert _nonfinite(torch.arange(5)) == 0
