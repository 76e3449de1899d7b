"""Compress -> file -> reconstruct on tiny Llama-style checkpoints: exactness, sharding, pairing rules."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import deltacomp
from deltacomp.checkpoint import open_checkpoint
from conftest import finetune_of, llama_config, llama_tensors, write_folder


def _reconstructed(folder):
    with open_checkpoint(folder) as ck:
        return {n: ck.get(n) for n in ck.names()}


def _expected(base, df, name):
    info = df.params[name]
    src = info.tied_to or name
    return df.apply(src, base.get(src)).reshape(info.shape)


@pytest.mark.parametrize("base_shards,ft_shards", [(1, 1), (3, 2)])
def test_roundtrip_bit_exact(tmp_path, base_shards, ft_shards):
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    base = write_folder(tmp_path / "base", b, shards=base_shards)
    ft = write_folder(tmp_path / "ft", f, shards=ft_shards)
    out = tmp_path / "ft.delta.safetensors"
    s = deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    assert s["by_codec"]["bitdelta"]["tensors"] == 14
    rec = deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False, max_shard_bytes=20_000)
    assert (rec / "model.safetensors.index.json").is_file()  # the output was sharded
    got = _reconstructed(rec)
    assert set(got) == set(f)
    df = deltacomp.load_delta(out)
    for n in f:
        # exactly base + decode(file), cast to the fine-tune's dtype
        want = (b[n].float() + df.decode(n).reshape(b[n].shape)).to(f[n].dtype)
        assert torch.equal(got[n], want), n
        assert got[n].dtype == f[n].dtype
    # tensors stored raw/zero come back exactly as the fine-tune had them
    for n in f:
        if df.params[n].codec in ("raw", "zero"):
            assert torch.equal(got[n], f[n]), n
    assert json.loads((rec / "config.json").read_text()) == llama_config()
    assert (rec / "generation_config.json").is_file()


def test_sharded_delta_file(tmp_path, pair):
    base, ft, b, f = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, progress=False, max_shard_bytes=1500)
    assert not out.exists()
    index = tmp_path / "d.delta.safetensors.index.json"
    assert index.is_file()
    shards = sorted(tmp_path.glob("d-*-of-*.delta.safetensors"))
    assert len(shards) > 1
    df = deltacomp.load_delta(out)
    df.verify()
    one = tmp_path / "one.delta.safetensors"
    deltacomp.compress(base, ft, one, progress=False)
    single = deltacomp.load_delta(one)
    for n in f:
        assert torch.equal(df.decode(n), single.decode(n))
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary leftovers


def test_bits_per_param_and_zero_cost(tmp_path, pair):
    base, ft, b, f = pair
    s = deltacomp.compress(base, ft, tmp_path / "d.delta.safetensors", method="bitdelta", progress=False)
    bd = s["by_codec"]["bitdelta"]
    assert bd["bits_per_param"] <= 1.01 + 32 * 14 / bd["params"]  # one fp32 scale per tensor on tiny tensors
    assert s["by_codec"]["zero"]["nbytes"] == 0  # unchanged embedding and final norm cost nothing


def test_added_tokens(tmp_path):
    b = llama_tensors(0, vocab=128)
    f = finetune_of(b, 1)
    g = torch.Generator().manual_seed(5)
    new = (torch.randn(6, b["model.embed_tokens.weight"].shape[1], generator=g) * 0.05).to(torch.bfloat16)
    f["model.embed_tokens.weight"] = torch.cat([b["model.embed_tokens.weight"], new])
    base = write_folder(tmp_path / "base", b)
    ft = write_folder(tmp_path / "ft", f, config=llama_config(vocab=134))
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    df = deltacomp.load_delta(out)
    info = df.params["model.embed_tokens.weight"]
    assert info.base_rows == 128 and info.shape == (134, 64)
    rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False))
    assert torch.equal(rec["model.embed_tokens.weight"], f["model.embed_tokens.weight"])


def test_tied_embeddings_stored_once(tmp_path):
    b = llama_tensors(0, tied=True)
    b["lm_head.weight"] = b["model.embed_tokens.weight"]
    f = finetune_of(b, 1, touch=lambda n: "layers" in n or "embed" in n)
    f["lm_head.weight"] = f["model.embed_tokens.weight"]
    base = write_folder(tmp_path / "base", {k: v.clone() for k, v in b.items()})
    ft = write_folder(tmp_path / "ft", {k: v.clone() for k, v in f.items()})
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    df = deltacomp.load_delta(out)
    assert df.params["lm_head.weight"].tied_to == "model.embed_tokens.weight"
    assert df.params["lm_head.weight"].nbytes == 0
    assert df.params["model.embed_tokens.weight"].nbytes > 0
    rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False))
    assert torch.equal(rec["lm_head.weight"], rec["model.embed_tokens.weight"])
    assert torch.equal(rec["model.embed_tokens.weight"], f["model.embed_tokens.weight"])


def test_tensor_only_in_finetune_stored_whole(tmp_path, pair):
    base, _, b, f = pair
    f = dict(f)
    f["score.weight"] = torch.randn(3, 64).to(torch.bfloat16)
    ft = write_folder(tmp_path / "ft2", f)
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    df = deltacomp.load_delta(out)
    assert df.params["score.weight"].has_base is False
    rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False))
    assert torch.equal(rec["score.weight"], f["score.weight"])


def test_single_safetensors_files(tmp_path, pair):
    _, _, b, f = pair
    from safetensors.torch import save_file
    save_file(b, str(tmp_path / "b.safetensors"))
    save_file(f, str(tmp_path / "f.safetensors"))
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(tmp_path / "b.safetensors", tmp_path / "f.safetensors", out, progress=False)
    rec = _reconstructed(deltacomp.reconstruct(tmp_path / "b.safetensors", out, tmp_path / "rec", progress=False))
    assert set(rec) == set(f)


def test_fp32_and_fp16_inputs(tmp_path):
    for dt in (torch.float32, torch.float16):
        b = llama_tensors(0, dtype=dt)
        f = finetune_of(b, 1)
        base = write_folder(tmp_path / f"b{dt}", b)
        ft = write_folder(tmp_path / f"f{dt}", f)
        out = tmp_path / f"{dt}.delta.safetensors"
        deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
        rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / f"r{dt}", progress=False))
        assert all(rec[n].dtype == dt for n in rec)
        df = deltacomp.load_delta(out)
        for n in f:
            if df.params[n].codec == "raw":
                assert torch.equal(rec[n], f[n]), n


def test_apply_delta_matches_reconstruct(tmp_path, pair):
    base, ft, b, f = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)

    class M(torch.nn.Module):
        pass

    m = M()
    for n, v in b.items():  # a module whose parameter names are the checkpoint's
        parent = m
        *path, leaf = n.split(".")
        for p in path:
            if not hasattr(parent, p):
                parent.add_module(p, torch.nn.Module())
            parent = getattr(parent, p)
        parent.register_parameter(leaf, torch.nn.Parameter(v.clone(), requires_grad=False))
    deltacomp.apply_delta_(m, out)
    rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False))
    for n, p in m.named_parameters():
        assert torch.equal(p, rec[n]), n


def test_ternary_global_scope_one_threshold(tmp_path, pair):
    """ComPEFT's global scope: one threshold over every compressed tensor, found by a streamed pre-pass."""
    base, ft, b, f = pair
    out = tmp_path / "g.delta.safetensors"
    deltacomp.compress(base, ft, out, method="ternary:scope=global:density=0.1", progress=False)
    df = deltacomp.load_delta(out)
    tern = [n for n, i in df.params.items() if i.codec == "ternary"]
    assert len(tern) == 14
    thresholds = {df.params[n].settings["threshold"] for n in tern}
    assert len(thresholds) == 1
    t = thresholds.pop()
    deltas = torch.cat([(f[n].float() - b[n].float()).reshape(-1) for n in tern])
    assert t == pytest.approx(torch.topk(deltas.abs(), int(round(0.1 * deltas.numel()))).values[-1].item())
    kept = sum(int(df.params[n].settings["kept"]) for n in tern)
    assert kept == int((deltas.abs() >= t).sum())
    rec = _reconstructed(deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False))
    assert set(rec) == set(f)


def test_embedded_files_round_trip(tmp_path, pair):
    """Config and tokenizer files ride in the metadata (large ones compressed) and come back byte-exact."""
    base, ft, _, _ = pair
    big = ("{" + ",".join(f'"tok{i}": {i}' for i in range(20000)) + "}").encode()
    (ft / "tokenizer.json").write_bytes(big)
    (ft / "tokenizer.model").write_bytes(bytes(range(256)) * 3)  # binary
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    meta = deltacomp.load_delta(out).metadata["files"]
    assert isinstance(meta["config.json"], str) and "zlib_base64" in meta["tokenizer.json"]
    assert out.stat().st_size < len(big) / 2
    rec = deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    for name in ("tokenizer.json", "tokenizer.model", "config.json", "generation_config.json"):
        assert (rec / name).read_bytes() == (ft / name).read_bytes(), name


def test_stats_reads_only_codecs_that_have_statistics(tmp_path, pair, monkeypatch):
    """inspect's per-tensor statistics: a codec without any (raw, bitdelta) costs no read of its tensors;
    one with them (ternary) still reads."""
    from deltacomp.delta import Delta

    base, ft, _, _ = pair
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    out2 = tmp_path / "t.delta.safetensors"
    deltacomp.compress(base, ft, out2, method="ternary", progress=False)
    read = []
    real = Delta.raw_tensors
    monkeypatch.setattr(Delta, "raw_tensors", lambda self, name: read.append(name) or real(self, name))
    with deltacomp.load_delta(out) as df:
        assert all(df.stats(n) == {} for n in df.params) and not read
    with deltacomp.load_delta(out2) as df:
        tern = [n for n, i in df.params.items() if i.codec == "ternary"]
        assert tern and all(isinstance(df.stats(n), dict) for n in tern) and read
