"""Mistaken arguments and inputs, through the Python API and the CLI: each is one typed error line
(DeltacompError subclasses), never a TypeError/KeyError/RuntimeError from Python or torch, a usage block,
or a run that silently does something else than asked."""
from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

import deltacomp
from deltacomp import BaseMismatchError, CheckpointError, DeltaFormatError, SettingsError
from deltacomp.cli import main
from deltacomp.errors import UnknownTensorError
from conftest import finetune_of, llama_tensors, write_folder

UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    b = llama_tensors(0)
    base, ft = write_folder(root / "base", b), write_folder(root / "ft", finetune_of(b, 1))
    delta = root / "d.delta.safetensors"
    deltacomp.compress(base, ft, delta, method="bitdelta", progress=False)
    return base, ft, delta


@pytest.mark.parametrize("kwargs,match", [
    ({"ratio": "16"}, "--ratio must be a number, got '16'"),
    ({"ratio": float("inf")}, "--ratio must be > 1 and finite"),
    ({"method": "auto", "bits": "2"}, "--bits must be a number"),
    ({"rules": "mlp=raw"}, "rules must be a list of REGEX=METHOD strings"),
    ({"rules": [5]}, "rule 5: expected REGEX=METHOD"),
    ({"max_shard_bytes": "1GB"}, "max shard size must be a whole number of bytes"),
    ({"method": "bitdelta:masks=1:masks=2"}, "setting masks given twice"),
    ({"method": "svd-mixed", "ratio": 1e30}, r"--ratio 1e\+30 leaves 0 bytes for shape"),
])
def test_compress_bad_arguments(made, tmp_path, kwargs, match):
    base, ft, _ = made
    out = tmp_path / "x.delta.safetensors"
    with pytest.raises(SettingsError, match=match):
        deltacomp.compress(base, ft, out, progress=False, **kwargs)
    assert not out.exists()


@pytest.mark.parametrize("bad", [None, 5, "", b"/tmp/x"])
def test_paths_that_are_no_paths(made, tmp_path, bad):
    base, ft, delta = made
    for call in (lambda: deltacomp.compress(bad, ft, tmp_path / "x.delta.safetensors", progress=False),
                 lambda: deltacomp.compress(base, ft, bad, progress=False),
                 lambda: deltacomp.reconstruct(base, delta, bad, progress=False),
                 lambda: deltacomp.reconstruct(base, bad, tmp_path / "r", progress=False),
                 lambda: deltacomp.load_delta(bad)):
        with pytest.raises(SettingsError, match="must be a non-empty path"):
            call()


def test_unknown_tensor_and_wrong_base_tensor(made):
    _, _, delta = made
    with deltacomp.load_delta(delta) as df:
        for call in (lambda: df.decode("nope"), lambda: df.apply("nope", None), lambda: df.raw_tensors("nope")):
            with pytest.raises(UnknownTensorError, match=f"{delta.name}: holds no parameter 'nope'") as info:
                call()
            assert isinstance(info.value, KeyError) and not str(info.value).startswith("'")
        with pytest.raises(BaseMismatchError, match=rf"{UP}: the base tensor given has shape \[3, 3\].*\[96, 64\]"):
            df.apply(UP, torch.zeros(3, 3))
        with pytest.raises(BaseMismatchError, match="shape"):
            df.apply_rows(UP, torch.zeros(2, 5), 0, 2)


def test_cli_usage_mistakes_are_one_line(made, capsys):
    base, ft, _ = made
    for argv in ([], ["frobnicate"], ["compress", str(base), str(ft)],
                 ["compress", str(base), str(ft), "-o", "x", "--max-shard-size", "abc"],
                 ["compress", str(base), str(ft), "-o", "x", "--ratio", "abc"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ": error: " in err[0] and "--help" in err[0], err


@pytest.mark.parametrize("content", [b"w5 w6 \xff\xfe w7", "w5 caf\xe9".encode("latin-1")])
def test_eval_text_not_utf8(made, tmp_path, capsys, content):
    base, ft, delta = made
    text = tmp_path / "t.txt"
    text.write_bytes(content * 20)
    assert main(["eval", str(base), str(ft), str(delta), "--text", str(text), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--text {text}: not UTF-8 text" in err[0]
    assert main(["eval", str(base), str(ft), str(delta), "--text", str(tmp_path), "-q"]) == 2
    assert "not a regular file" in capsys.readouterr().err


def _duplicate_first_key(raw: bytes, key: str, value) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    text = raw[8:8 + n].decode()
    new = text.replace("{", "{" + json.dumps(key) + ": " + json.dumps(value) + ", ", 1).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    return struct.pack("<Q", len(new)) + new + raw[8 + n:]


def test_duplicate_keys_refused(made, tmp_path):
    """A key given twice in the safetensors header or the deltacomp metadata: the parsers keep one of
    them, and the digest (over the parsed metadata) cannot see the other."""
    base, _, delta = made
    raw = delta.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    dup = tmp_path / "dup.delta.safetensors"
    dup.write_bytes(_duplicate_first_key(raw, f"{UP}.signs", header[f"{UP}.signs"]))
    with pytest.raises(DeltaFormatError, match=f"key '{UP}.signs' appears twice"):
        deltacomp.load_delta(dup)
    meta = header["__metadata__"]["deltacomp"]
    header["__metadata__"]["deltacomp"] = meta.replace('"params": {', '"params": {"' + UP + '": {}, ', 1)
    from forge import write_header

    write_header(dup, header, raw[8 + n:])
    with pytest.raises(DeltaFormatError, match=f"metadata is not valid JSON .*key '{UP}' appears twice"):
        deltacomp.load_delta(dup)
    model = tmp_path / "m.safetensors"
    model.write_bytes(_duplicate_first_key((base / "model.safetensors").read_bytes(), UP, {"dtype": "BF16",
                                           "shape": [1], "data_offsets": [0, 2]}))
    with pytest.raises(CheckpointError, match="appears twice"):
        deltacomp.compress(model, base, tmp_path / "x.delta.safetensors", progress=False)


def test_oversized_config_or_tokenizer_refused_before_reading(made, tmp_path):
    base, ft, _ = made
    big = tmp_path / "ft"
    shutil.copytree(ft, big)
    with open(big / "tokenizer.json", "wb") as f:
        f.truncate(65 * 2**20)  # sparse: costs no disk
    with pytest.raises(CheckpointError, match=r"tokenizer.json: \d+ bytes, above the 67108864 bytes"):
        deltacomp.compress(base, big, tmp_path / "x.delta.safetensors", progress=False)
    assert not (tmp_path / "x.delta.safetensors").exists()


def test_serve_and_sweep_options_checked_before_work(made, tmp_path, capsys, monkeypatch):
    """serve: a port outside 0..65535 or a bad --device used to fail with a traceback-worthy internal
    error after the model loaded; sweep: an unknown method was run as a "skipped" line after every other
    point, and a nan ratio broke the results JSON at the very end."""
    pytest.importorskip("uvicorn")
    from deltacomp.serve import server

    base, ft, delta = made
    monkeypatch.setattr(server, "build_app", lambda *a, **k: pytest.fail("the model was loaded first"))
    for argv, code, want in ((["--port", "99999"], None, "a TCP port is 0..65535"),
                             (["--device", "garbage"], 2, "--device 'garbage': not a device")):
        if code is None:
            with pytest.raises(SystemExit):
                main(["serve", str(base), *argv])
        else:
            assert main(["serve", str(base), *argv]) == code
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and want in err[0], err
    sweep = ["sweep", str(base), str(ft), "-o", str(tmp_path / "sw"), "-q"]
    assert main(sweep + ["--methods", "bitdelta,garbage", "--ratios", "8"]) == 2
    assert "unknown method 'garbage'" in capsys.readouterr().err
    for bad in ("nan", "0", "inf"):
        with pytest.raises(SystemExit):
            main(sweep + ["--methods", "bitdelta", "--ratios", f"8,{bad}"])
        assert "ratios above 1" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_model_index_and_config_bounded_before_reading(made, tmp_path):
    from deltacomp.checkpoint import MAX_INDEX_BYTES

    base, ft, _ = made
    sharded = write_folder(tmp_path / "ft", llama_tensors(1), shards=2)
    with open(sharded / "model.safetensors.index.json", "r+b") as f:
        f.truncate(MAX_INDEX_BYTES + 1)  # sparse
    with pytest.raises(CheckpointError, match=f"model.safetensors.index.json: {MAX_INDEX_BYTES + 1} bytes, above"):
        deltacomp.compress(base, sharded, tmp_path / "x.delta.safetensors", progress=False)
    big = tmp_path / "big"
    shutil.copytree(ft, big)
    with open(big / "config.json", "r+b") as f:
        f.truncate(65 * 2**20)
    with pytest.raises(CheckpointError, match=r"config.json: \d+ bytes, above"):
        deltacomp.compress(base, big, tmp_path / "y.delta.safetensors", progress=False)


def test_api_argument_types(made, tmp_path):
    """Public functions given the wrong kind of argument: a typed one-line error, never an
    AttributeError/TypeError from inside, and never a string silently taken as a list of characters."""
    from deltacomp import DeltacompError, lora
    from deltacomp.serve import generate, patch_model_multi, set_delta_index

    base, ft, delta = made
    cases = [
        (lambda: deltacomp.patch_model(None, delta), "model must be a torch.nn.Module"),
        (lambda: deltacomp.apply_delta_(None, delta), "model must be a torch.nn.Module"),
        (lambda: patch_model_multi(torch.nn.Linear(2, 2), delta), "give a list of delta files"),
        (lambda: deltacomp.summarize(None), "summarize takes an open delta"),
        (lambda: generate(base, [delta], "w5 w6", 2), "give a list of prompt strings"),
        (lambda: generate(base, [delta], ["w5"], "3"), "max_new_tokens must be an integer"),
        (lambda: generate(base, [delta], ["w5"], 2, prompt_delta=[0.5]), "delta indices must be integers"),
        (lambda: lora.export_lora(base, ft, tmp_path / "l", rank="8", progress=False), "--rank must be >= 1 .an integer."),
        (lambda: deltacomp.compress_many(base, str(ft), tmp_path / "m", progress=False), "got one path"),
        (lambda: deltacomp.compress_many(base, [ft], None, progress=False), "must be a non-empty path"),
    ]
    for call, match in cases:
        with pytest.raises(DeltacompError, match=match):
            call()
    from conftest import load_causal_lm

    model = patch_model_multi(load_causal_lm(base), [delta])
    for bad in ([0.5], "a", [True]):
        with pytest.raises(DeltacompError, match="integer delta indices"):
            set_delta_index(model, bad)


@pytest.mark.parametrize("size", [0, -1, "1GB", 1.5])
def test_reconstruct_shard_size_checked_like_compress(made, tmp_path, size):
    base, _, delta = made
    with pytest.raises(SettingsError, match="max shard size must be"):
        deltacomp.reconstruct(base, delta, tmp_path / "rec", max_shard_bytes=size, progress=False)
    assert not (tmp_path / "rec").exists()
