"""Forged (resealed) delta files from a red-team pass, each of which used to be read without complaint:
a compressed tensor recorded with an integer dtype, finite stored factors whose product overflows,
position streams with trailing bytes (which the Golomb-Rice decoder unpacked at ~75x their size), an
``inspect`` that verified checksums but not the stored values every decoder refuses, and non-finite
numbers in the metadata JSON (which ``inspect --json`` printed as invalid JSON). Each is now one
DeltaFormatError line naming the file and the tensor (exit 2 at the CLI), refused before memory is spent."""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

import deltacomp
from deltacomp import DeltaFormatError
from deltacomp.cli import main
from deltacomp.integrity import integrity_digest
from deltacomp.quant import positions as P
from conftest import finetune_of, llama_config, llama_tensors, write_folder
from forge import edit_metadata, manifest, read_header, rewrite_tensors, write_header

UP = "model.layers.0.mlp.up_proj.weight"
COMPRESSED = ("bitdelta", "svd-mixed", "lowrank", "ternary", "dare", "svd-sparse")
STORED = {f"{m}-{s}": f"{m}:storage={s}" for m in ("ternary", "dare") for s in P.available_storages()}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("redteam")
    b = llama_tensors(0, tied=False)
    base = write_folder(root / "base", b, config=llama_config(tied=False))
    ft = write_folder(root / "ft", finetune_of(b, 1), config=llama_config(tied=False))
    out = {}
    for key, method in {**{m: m for m in COMPRESSED + ("raw",)}, **STORED}.items():
        out[key] = root / f"{key}.delta.safetensors"
        deltacomp.compress(base, ft, out[key], method=method, rules=[f"up_proj={method}"], progress=False)
    return base, out


def _copy(made, tmp_path, key):
    base, files = made
    path = tmp_path / files[key].name
    shutil.copy(files[key], path)
    return base, path


def _cli_refuses(argv, capsys, match) -> None:
    """The CLI exits 2 with one error line matching ``match`` (no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert re.search(match, err[0]), err[0]


# -- 1. a compressed tensor recorded with a non-float dtype ------------------------------------------------
@pytest.mark.parametrize("method", COMPRESSED)
@pytest.mark.parametrize("dtype", ["bool", "uint8", "int64"])
def test_compressed_tensor_with_integer_dtype_refused(made, tmp_path, capsys, method, dtype):
    """reconstruct used to write an all-True bool or all-zero integer weight with exit 0."""
    base, path = _copy(made, tmp_path, method)
    edit_metadata(path, lambda m: m["params"][UP].update(dtype=dtype))
    match = f"{path.name}: {UP}: .*dtype {dtype}"
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.load_delta(path)
    _cli_refuses(["reconstruct", str(base), str(path), "-o", str(tmp_path / "rec"), "-q"], capsys, match)
    assert not (tmp_path / "rec").exists()
    _cli_refuses(["inspect", str(path)], capsys, match)


# -- 2. finite stored values whose decoded delta overflows ------------------------------------------------
OVERFLOW = {
    "lowrank": lambda t: t.update({f"{UP}.{f}": torch.full_like(t[f"{UP}.{f}"], v)
                                   for f, v in (("s", 3e38), ("u", 65504), ("v", 65504))}),
    "svd-mixed": lambda t: t.update({f"{UP}.s": torch.full_like(t[f"{UP}.s"], 3e38),
                                     f"{UP}.u_scale8": torch.full_like(t[f"{UP}.u_scale8"], 65504)}),
}


@pytest.mark.parametrize("method", sorted(OVERFLOW))
def test_finite_factors_that_overflow_refused(made, tmp_path, capsys, method):
    """Each stored value is finite, their product is not: reconstruct wrote Inf, serving computed Inf. The
    codec's check_stored bounds the factors' product, so every path refuses it (inspect and serving too)."""
    base, path = _copy(made, tmp_path, method)
    rewrite_tensors(path, OVERFLOW[method])
    match = f"{path.name}: {UP}: .*beyond float32's range"
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=match):
        df.decode(UP)
    _cli_refuses(["reconstruct", str(base), str(path), "-o", str(tmp_path / "rec"), "-q"], capsys, match)
    assert not (tmp_path / "rec").exists()
    _cli_refuses(["inspect", str(path)], capsys, match)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base))
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.patch_model(model, path)


def test_apply_refuses_new_nonfinite_values_but_keeps_the_base_own(made):
    """base + delta overflowing (here a base near float32's limit) is refused; a base that already held a
    NaN (allowed with --allow-nonfinite) gives the same NaN back, which is no new non-finite value."""
    _, files = made
    with deltacomp.load_delta(files["bitdelta"]) as df:
        shape = df.params[UP].encoded_shape
        with pytest.raises(DeltaFormatError, match=f"{UP}: base \\+ delta holds .* NaN or Inf .*the base holds 0"):
            df.apply(UP, torch.full(shape, 3.4e38))
        base = torch.zeros(shape)
        base[0, 0] = float("nan")
        out = df.apply(UP, base)
        assert int((~out.isfinite()).sum()) == 1 and out[0, 0].isnan()
    with deltacomp.load_delta(files["raw"]) as df:  # a row-blocked codec, rebuilt a block of rows at a time
        with pytest.raises(DeltaFormatError, match=f"{UP} rows 0:2: base \\+ delta holds 128 NaN or Inf"):
            df.apply_rows(UP, torch.full((2, *shape[1:]), 3.4e38), 0, 2)


# -- 3. position streams: bounded before they are unpacked, no trailing data --------------------------------
TRAILING = [("ternary-golomb", "rice_q"), ("ternary-golomb", "rice_r"), ("dare-golomb", "rice_q"),
            ("dare-golomb", "rice_r"), ("ternary-bitmap", "mask"), ("ternary-zstd", "zmask"),
            ("dare-rans", "rans")]


@pytest.mark.parametrize("key,field", [c for c in TRAILING if c[0] in STORED], ids=lambda v: str(v))
def test_position_stream_with_trailing_bytes_refused(made, tmp_path, capsys, monkeypatch, key, field):
    """1 MB of zero bytes after a stream: decoded as if absent (and, in a Golomb-Rice unary stream, unpacked
    to 8 bools and an int64 index per bit first). Refused from its length, before anything is unpacked."""
    base, path = _copy(made, tmp_path, key)
    pad = 1 << 20
    rewrite_tensors(path, lambda t: t.update({f"{UP}.{field}": torch.cat([t[f"{UP}.{field}"],
                                                                          torch.zeros(pad, dtype=torch.uint8)])}))
    unpacked = []
    real = np.unpackbits
    monkeypatch.setattr(np, "unpackbits", lambda a, *args, **kw: unpacked.append(np.asarray(a).size)
                        or real(a, *args, **kw))
    match = f"{path.name}: {UP}: .*{field}"
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=match):
        df.decode(UP)
    assert all(n < pad for n in unpacked), unpacked
    monkeypatch.undo()
    _cli_refuses(["reconstruct", str(base), str(path), "-o", str(tmp_path / "rec"), "-q"], capsys, match)
    _cli_refuses(["inspect", str(path)], capsys, match)  # the codec's check_stored bounds it without decoding


@pytest.mark.parametrize("key", sorted(STORED))
def test_position_streams_round_trip_exactly(made, key):
    """The bounds leave every stream an encoder writes alone (each storage, both codecs)."""
    base, files = made
    with deltacomp.load_delta(files[key]) as df:
        df.verify()
        assert df.params[UP].settings["storage"] == key.split("-", 1)[1]
        assert df.decode(UP).isfinite().all()


def test_golomb_stream_bounds_are_exact():
    """The unary stream is refused one byte past its bound, the remainder stream one byte past k*r bits;
    streams at the bound decode."""
    g = torch.Generator().manual_seed(0)
    numel = 5000
    for kept in (0, 1, 7, 300, numel):
        pos = torch.randperm(numel, generator=g)[:kept].sort().values
        tensors, params = P.encode_support(pos, numel, storage="golomb")
        got, _ = P.decode_support(tensors, params, numel, with_signs=False)
        assert torch.equal(got, pos)
        for f in ("rice_q", "rice_r"):
            longer = {**tensors, f: torch.cat([tensors[f], torch.zeros(1, dtype=torch.uint8)])}
            with pytest.raises(DeltaFormatError, match=f):
                P.decode_support(longer, params, numel, with_signs=False)


# -- 4. inspect verifies what the decoders check ----------------------------------------------------------
@pytest.mark.parametrize("alloc", ["9:1+3:1+2:1", "8:-1+3:2+2:1", "", "8:100+3:1+2:1", 5])
def test_inspect_verifies_the_stored_values(made, tmp_path, capsys, alloc):
    """inspect (verification on by default) exited 0 on an svd-mixed allocation reconstruct refuses."""
    base, path = _copy(made, tmp_path, "svd-mixed")
    edit_metadata(path, lambda m: m["params"][UP]["settings"].update(alloc=alloc))
    match = f"{path.name}: .*{UP}"
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=match):
        df.verify()
    _cli_refuses(["inspect", str(path)], capsys, match)
    _cli_refuses(["reconstruct", str(base), str(path), "-o", str(tmp_path / "rec"), "-q"], capsys, match)
    capsys.readouterr()
    assert main(["inspect", str(path), "--no-verify"]) in (0, 2)  # not asked to verify: no traceback either


def test_inspect_verify_checks_stored_nonfinite_values(made, tmp_path, capsys):
    base, path = _copy(made, tmp_path, "bitdelta")
    rewrite_tensors(path, lambda t: t.update({f"{UP}.scale": torch.full_like(t[f"{UP}.scale"], float("nan"))}))
    _cli_refuses(["inspect", str(path)], capsys, f"{path.name}: {UP}: field scale holds")


def test_verify_checks_a_large_tensor_a_block_of_rows_at_a_time(made, tmp_path, monkeypatch):
    """A parameter above BLOCK_ELEMS whose codec works on row blocks (a 70B embedding stored as its delta
    is 2 GB) is checked in blocks of rows, never read whole."""
    import deltacomp.checkpoint as C

    _, path = _copy(made, tmp_path, "raw")
    with deltacomp.load_delta(path) as df:
        df.verify()  # the genuine file, whole
    rewrite_tensors(path, lambda t: t[f"{UP}.values"].view(-1)[-1:].fill_(float("nan")))
    monkeypatch.setattr(C, "BLOCK_ELEMS", 1000)
    rows = []
    with deltacomp.load_delta(path) as df:
        real = df.field_rows
        monkeypatch.setattr(df, "field_rows", lambda *a: rows.append(a[2:]) or real(*a))
        with pytest.raises(DeltaFormatError, match=f"{path.name}: {UP}: field values holds 1 NaN or Inf"):
            df.verify()
    assert rows and max(b - a for a, b in rows) == 1000 // 64 and rows[-1][1] == 96


# -- 5. non-finite numbers in the metadata JSON -----------------------------------------------------------
def _reseal_text(path, old: str, new: str) -> None:
    """Replace text in the metadata JSON and recompute the digest over what a reader parses."""
    header, data = read_header(path)
    text = header["__metadata__"]["deltacomp"].replace(old, new, 1)
    meta = json.loads(text)
    text = text.replace(meta["integrity"]["sha256"], integrity_digest(meta, manifest(header)))
    header["__metadata__"]["deltacomp"] = text
    write_header(path, header, data)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_nonfinite_number_in_metadata_refused(made, tmp_path, capsys, literal):
    """inspect --json printed ``"ratio": NaN`` (invalid JSON); 1e400 parses to inf the same way."""
    _, path = _copy(made, tmp_path, "bitdelta")
    edit_metadata(path, lambda m: m["source"].update(ratio=12345.5))
    _reseal_text(path, "12345.5", literal)
    match = f"{path.name}: metadata holds the non-finite number {literal}"
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.load_delta(path)
    _cli_refuses(["inspect", str(path), "--json"], capsys, match)


# -- a dangling link at the output path -------------------------------------------------------------------
@pytest.mark.parametrize("calib", [False, True])
def test_dangling_link_at_the_output_is_refused_up_front(made, tmp_path, capsys, calib, monkeypatch):
    """Used to: compress everything, then say the output "appeared while this run was writing"."""
    base, files = made
    out = tmp_path / "x.delta.safetensors"
    out.symlink_to(tmp_path / "nowhere")
    from deltacomp import api
    monkeypatch.setattr(api, "_compress", lambda *a, **k: pytest.fail("the run started"))
    ft = base.parent / "ft"
    argv = ["compress", str(base), str(ft), "-o", str(out), "--method", "bitdelta", "-q"]
    if calib:
        text = tmp_path / "t.txt"
        text.write_text("w5 w6 w7 " * 50)
        argv += ["--calib", str(text), "--calib-samples", "2", "--calib-len", "8"]
        monkeypatch.setattr("deltacomp.calibrate.options.load_data", lambda *a, **k: pytest.fail("data loaded"))
    _cli_refuses(argv, capsys, "is a link to nothing; pass --overwrite")
    assert out.is_symlink() and not out.exists()


# -- explicit settings that cost more than the tensor itself ---------------------------------------------
def test_settings_larger_than_the_tensor_are_noted(made, tmp_path, capsys):
    """lowrank:rank=100000 is clamped to the tensor's full rank, which stores more bytes than the fine-tune's
    own tensor: compress (and inspect) say so in a note naming the largest offender; a normal file has none."""
    base, files = made
    ft = files["raw"].parent / "ft"
    out = tmp_path / "big.delta.safetensors"
    assert main(["compress", str(base), str(ft), "-o", str(out), "--method", "lowrank:rank=100000", "-q"]) == 0
    text = capsys.readouterr().out
    notes = [line for line in text.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, text
    assert re.match(r"note: \d+ compressed tensor\(s\) take more bytes than in the fine-tune \(largest excess: "
                    r"model\.layers\.\d+\.\S+, lowrank ", notes[0]), notes[0]
    assert "delta file" in notes[1] and "larger than the fine-tune" in notes[1]
    s = deltacomp.summarize(deltacomp.load_delta(out))
    assert s["oversized"] and all(t["nbytes"] > t["finetuned_bytes"] for t in s["tensors"] if t["name"] in s["oversized"])
    assert main(["inspect", str(files["bitdelta"])]) == 0
    assert "note:" not in capsys.readouterr().out
