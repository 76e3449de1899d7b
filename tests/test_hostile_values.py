"""Forged (resealed) delta files whose stored values no encoder writes: NaN/Inf scales, factors and
values, garbage entropy-coded streams. Every path that reads them (decode, reconstruct, serving with
patch_model / patch_model_multi, generate) refuses them with one DeltaFormatError line naming the file
and the tensor, instead of writing NaN weights or raising a library's own exception."""
from __future__ import annotations

import shutil

import pytest
import torch

import deltacomp
from deltacomp import DeltaFormatError
from deltacomp.serve import patch_model_multi
from conftest import finetune_of, llama_config, llama_tensors, load_causal_lm, word_tokenizer, write_folder
from forge import rewrite_tensors

UP = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("values")
    b = llama_tensors(0, tied=False)
    base = write_folder(root / "base", b, config=llama_config(tied=False))
    word_tokenizer(128).save_pretrained(str(base))
    ft = write_folder(root / "ft", finetune_of(b, 1), config=llama_config(tied=False))
    out = {}
    for method in ("bitdelta", "svd-mixed", "ternary", "lowrank", "dare", "raw"):
        out[method] = root / f"{method}.delta.safetensors"
        deltacomp.compress(base, ft, out[method], method=method, rules=[f"up_proj={method}"], progress=False)
    return base, out


def _forged(made, tmp_path, method, field, fill):
    base, files = made
    path = tmp_path / files[method].name
    shutil.copy(files[method], path)

    def edit(t):
        t[f"{UP}.{field}"] = fill(t[f"{UP}.{field}"].clone())
    rewrite_tensors(path, edit)
    return base, path


NONFINITE = [("bitdelta", "scale", float("nan")), ("bitdelta", "scale", float("inf")),
             ("svd-mixed", "s", float("nan")), ("svd-mixed", "u_scale8", float("inf")),
             ("svd-mixed", "v_zero2", float("-inf")), ("ternary", "scale", float("nan")),
             ("lowrank", "u", float("inf")), ("lowrank", "s", float("nan")), ("dare", "values", float("nan")),
             ("raw", "values", float("nan"))]


@pytest.mark.parametrize("method,field,value", NONFINITE, ids=[f"{m}-{f}-{v}" for m, f, v in NONFINITE])
def test_nonfinite_stored_values_refused_everywhere(made, tmp_path, method, field, value):
    base, path = _forged(made, tmp_path, method, field, lambda x: x.fill_(value))
    match = f"{path.name}: {UP}: field {field} holds .* NaN or Inf"
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=match):
        df.decode(UP)
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.reconstruct(base, path, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.patch_model(load_causal_lm(base), path)
    with pytest.raises(DeltaFormatError, match=match):
        patch_model_multi(load_causal_lm(base), [path])


def test_garbage_stream_refused_when_served(made, tmp_path):
    """A rANS stream that the decoder rejects with its own ValueError: decode and serving both name the
    file and the tensor (serving used to raise the library's ValueError)."""
    base, path = _forged(made, tmp_path, "ternary", "rans", lambda x: x.zero_())
    match = f"{path.name}: .*{UP}"
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.patch_model(load_causal_lm(base), path)
    with pytest.raises(DeltaFormatError, match=match):
        patch_model_multi(load_causal_lm(base), [made[1]["bitdelta"], path])
    from deltacomp.cli import main

    assert main(["generate", str(base), "--delta", str(path), "--prompt", "w5 w6", "--max-new-tokens", "2"]) == 2


def test_raw_float16_overflow_refused_at_encode():
    from deltacomp.codecs import get_codec
    from deltacomp.errors import SettingsError

    with pytest.raises(SettingsError, match="beyond float16's range"):
        get_codec("raw").encode(torch.tensor([1e6, 0.0]), dtype="float16")


def test_generate_base_without_tokenizer_or_config(made, tmp_path, capsys):
    from deltacomp import CheckpointError
    from deltacomp.cli import main
    from deltacomp.serve import generate

    base, files = made
    bare = tmp_path / "bare"
    shutil.copytree(base, bare)
    for f in bare.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(CheckpointError, match=f"{bare}: cannot load its tokenizer"):
        generate(bare, [files["bitdelta"]], ["w5"], 2)
    (bare / "config.json").unlink()
    for argv in (["generate", str(bare), "--prompt", "w5"], ["generate", str(base / "model.safetensors"), "--prompt", "w5"]):
        assert main(argv) == 2
        err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
        assert len(err) == 1 and "cannot load its" in err[0], err


# -- settings a forger edits (resealed) that the codecs read beyond the declared settings ------------------
def _resealed(made, tmp_path, method, **settings):
    from forge import edit_metadata

    base, files = made
    path = tmp_path / files[method].name
    shutil.copy(files[method], path)
    edit_metadata(path, lambda m: m["params"][UP]["settings"].update(settings), reseal=True)
    return base, path


@pytest.mark.parametrize("alloc", ["8:1+3:1+2:200", "8:50", "", "8:1"])
def test_svd_mixed_allocation_must_match_fields(made, tmp_path, alloc):
    """svd-mixed decodes and serves by its stored "alloc": one that does not describe the stored fields
    (more vectors, fewer, none) used to give a silent zero delta, a short read or a RuntimeError at the
    first forward pass; it is refused on read, for decode and serving alike."""
    base, path = _resealed(made, tmp_path, "svd-mixed", alloc=alloc)
    match = f"{path.name}: {UP}: svd-mixed: field .* the stored allocation"
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=match):
        df.decode(UP)
    with pytest.raises(DeltaFormatError, match=match):
        deltacomp.patch_model(load_causal_lm(base), path, fused=False)


def test_huge_group_size_costs_no_memory(made, tmp_path):
    """The group size is read from the file; a group never spans more than a row, so 2**40 allocates
    nothing more than 128 does (it used to repeat each scale 2**40 times)."""
    from deltacomp.quant.rtn import dequantize, quantize

    w = torch.randn(3, 70)
    codes, scale, zero = quantize(w, 4, 2**40)
    assert scale.shape == (3, 1)
    assert torch.allclose(dequantize(codes, scale, zero, 2**40), dequantize(codes, scale, zero, 70))
    base, path = _resealed(made, tmp_path, "svd-mixed", group_size=2**40)
    with deltacomp.load_delta(path) as df, deltacomp.load_delta(made[1]["svd-mixed"]) as ref:
        assert torch.equal(df.decode(UP), ref.decode(UP))  # every row is shorter than 128: the same groups


def test_ternary_kept_count_must_match_signs(made, tmp_path):
    _, path = _resealed(made, tmp_path, "ternary", kept=0)  # was: a silent zero delta
    with deltacomp.load_delta(path) as df, pytest.raises(DeltaFormatError, match=f"{UP}: signs: .* 0 kept entries"):
        df.decode(UP)


def test_demo_checks_method_before_building_the_pair(monkeypatch, tmp_path):
    from deltacomp import zoo
    from deltacomp.cli.demo import run_demo

    monkeypatch.setattr(zoo, "ensure_pair", lambda *a, **k: pytest.fail("the pair was built first"))
    with pytest.raises(deltacomp.SettingsError, match="unknown method 'garbage'"):
        run_demo(tmp_path / "demo", method="garbage", print_fn=lambda s: None)
    with pytest.raises(deltacomp.SettingsError, match="--ratio must be > 1"):
        run_demo(tmp_path / "demo", ratio=float("nan"), print_fn=lambda s: None)
