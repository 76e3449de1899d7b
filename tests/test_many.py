"""compress-many (deltacomp/many.py, distributed.py): several fine-tunes of one base in one job, each
output byte-identical to compress run on that fine-tune alone; refusals; the Ray path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import deltacomp
from deltacomp.cli import main
from deltacomp.errors import CheckpointError, NonFiniteError, OutputExistsError, SettingsError
from deltacomp.many import compress_many, read_manifest

from conftest import HIDDEN, finetune_of, llama_config, llama_tensors, write_folder

VOCAB2 = 136  # a fine-tune that added 8 tokens


def _bigger_vocab(base: dict, seed: int) -> dict:
    """A fine-tune whose embedding and head gained rows (new tokens)."""
    g = torch.Generator().manual_seed(seed)
    f = finetune_of(base, seed, touch=lambda n: True)
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        f[n] = torch.cat([f[n], (torch.randn(VOCAB2 - f[n].shape[0], HIDDEN, generator=g) * 0.05).to(f[n].dtype)])
    return f


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base and three fine-tunes: plain, one with a bigger vocabulary, one sharded in another order."""
    tmp = tmp_path_factory.mktemp("many")
    b = llama_tensors(0, tied=False)
    cfg = llama_config(tied=False)
    base = write_folder(tmp / "base", b, cfg)
    chat = write_folder(tmp / "chat", finetune_of(b, 1), cfg)
    code = write_folder(tmp / "code", _bigger_vocab(b, 2), {**cfg, "vocab_size": VOCAB2})
    mixed = dict(reversed(list(finetune_of(b, 3, scale=0.02).items())))  # another tensor order, two shards
    math_ = write_folder(tmp / "math", mixed, cfg, shards=2)
    return tmp, base, [chat, code, math_], b


def _single(base, ft, out, **kw) -> bytes:
    deltacomp.compress(base, ft, out, progress=False, **kw)
    return out.read_bytes()


METHODS = [dict(method="bitdelta"), dict(method="svd-mixed", ratio=8), dict(method="ternary:scope=global"),
           pytest.param(dict(method="auto", ratio=8), marks=pytest.mark.slow),  # minutes here: a pass per fine-tune
           dict(method="lowrank:rank=4", rules=[r"mlp\.=ternary:density=0.2"])]


@pytest.mark.parametrize("opts", METHODS, ids=lambda o: o["method"] if isinstance(o, dict) else None)
def test_outputs_are_byte_identical_to_single_compress(family, tmp_path, opts):
    _, base, fts, _ = family
    out = compress_many(base, fts, tmp_path / "many", progress=False, **opts)
    assert list(out) == ["chat", "code", "math"]
    for ft in fts:
        many = (tmp_path / "many" / f"{ft.name}.delta.safetensors").read_bytes()
        assert many == _single(base, ft, tmp_path / f"{ft.name}.delta.safetensors", **opts), ft.name
        assert out[ft.name]["path"].endswith(f"{ft.name}.delta.safetensors")
    with deltacomp.load_delta(tmp_path / "many" / "code.delta.safetensors") as df:
        assert df.params["model.embed_tokens.weight"].base_rows == 128  # the added rows, as compress stores them


def test_sharded_outputs_identical(family, tmp_path):
    _, base, fts, _ = family
    compress_many(base, fts[:2], tmp_path / "many", progress=False, max_shard_bytes=20_000)
    for ft in fts[:2]:
        deltacomp.compress(base, ft, tmp_path / f"{ft.name}.delta.safetensors", progress=False, max_shard_bytes=20_000)
    many = sorted(p.name for p in (tmp_path / "many").iterdir())
    assert len(many) > 4 and any(n.endswith(".index.json") for n in many)
    for name in many:
        assert (tmp_path / "many" / name).read_bytes() == (tmp_path / name).read_bytes(), name


def test_a_finetune_missing_a_tensor_is_treated_as_compress_treats_it(family, tmp_path):
    tmp, base, fts, b = family
    f = finetune_of(b, 4)
    del f["model.layers.1.mlp.up_proj.weight"]
    lacks = write_folder(tmp_path / "lacks", f, llama_config(tied=False))
    with pytest.raises(CheckpointError) as single:
        deltacomp.compress(base, lacks, tmp_path / "x.delta.safetensors", progress=False)
    with pytest.raises(CheckpointError) as many:
        compress_many(base, [fts[0], lacks], tmp_path / "many", progress=False)
    assert str(many.value) == str(single.value) and "lacks 1 base tensor" in str(single.value)
    assert not (tmp_path / "many").exists() or not list((tmp_path / "many").iterdir())  # nothing written
    with pytest.warns(UserWarning, match="lacks 1 base tensor"):
        compress_many(base, [fts[0], lacks], tmp_path / "many", progress=False, allow_mismatch=True)
    for ft in (fts[0], lacks):
        with pytest.warns(UserWarning) if ft is lacks else _nothing():
            single_bytes = _single(base, ft, tmp_path / f"{ft.name}.delta.safetensors", allow_mismatch=True)
        assert (tmp_path / "many" / f"{ft.name}.delta.safetensors").read_bytes() == single_bytes


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_refuses_a_finetune_of_another_base(family, tmp_path):
    _, base, fts, _ = family
    other = llama_tensors(9, tied=False)
    other["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, HIDDEN, dtype=torch.bfloat16)
    stranger = write_folder(tmp_path / "stranger", other, llama_config(tied=False))
    with pytest.raises(CheckpointError, match=r"up_proj.weight: shape \[3, 64\] in the fine-tune .*stranger"):
        compress_many(base, [fts[0], stranger], tmp_path / "many", progress=False)
    alien = write_folder(tmp_path / "alien", llama_tensors(0, tied=False), {**llama_config(tied=False),
                                                                          "model_type": "mistral"})
    with pytest.raises(CheckpointError, match="model_type"):
        compress_many(base, [alien], tmp_path / "many", progress=False)
    assert not (tmp_path / "many").exists()  # the folder it made is taken back too


def test_name_collision_is_refused_in_one_line(family, tmp_path, capsys):
    _, base, fts, b = family
    twin = write_folder(tmp_path / "elsewhere" / "chat", finetune_of(b, 5), llama_config(tied=False))
    rc = main(["compress-many", str(base), str(fts[0]), str(twin), "-o", str(tmp_path / "many"), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "would both write chat.delta.safetensors" in err and "--manifest" in err
    assert not (tmp_path / "many").exists()


def test_existing_output_is_refused_then_replaced_with_overwrite(family, tmp_path, capsys):
    _, base, fts, _ = family
    out = tmp_path / "many"
    out.mkdir()
    (out / "code.delta.safetensors").write_bytes(b"keep me")
    rc = main(["compress-many", str(base), *map(str, fts[:2]), "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "code.delta.safetensors: exists; pass --overwrite" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["code.delta.safetensors"]  # chat not written either
    assert (out / "code.delta.safetensors").read_bytes() == b"keep me"
    assert main(["compress-many", str(base), *map(str, fts[:2]), "-o", str(out), "-q", "--overwrite"]) == 0
    assert "ratio" in capsys.readouterr().out
    assert (out / "code.delta.safetensors").read_bytes() == _single(base, fts[1], tmp_path / "code.delta.safetensors")


def test_a_failing_finetune_leaves_nothing(family, tmp_path):
    _, base, fts, b = family
    f = finetune_of(b, 6)
    f["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    bad = write_folder(tmp_path / "bad", f, llama_config(tied=False))
    with pytest.raises(NonFiniteError, match=r"bad: model.layers.1.mlp.down_proj.weight: 1 of 6144 values"):
        compress_many(base, [fts[0], bad], tmp_path / "many", progress=False)
    assert not (tmp_path / "many").exists()  # no output, no temporary file, no lock, no folder it made


def test_manifest(family, tmp_path, capsys):
    tmp, base, fts, _ = family
    m = tmp / "fts.txt"
    m.write_text("# name=path\nA = chat\n\nB=" + str(fts[1]) + "\n")
    assert read_manifest(m) == {"A": str(tmp / "chat"), "B": str(fts[1])}
    assert main(["compress-many", str(base), "--manifest", str(m), "-o", str(tmp_path / "many"), "-q"]) == 0
    assert sorted(p.name for p in (tmp_path / "many").iterdir()) == ["A.delta.safetensors", "B.delta.safetensors"]
    assert (tmp_path / "many" / "A.delta.safetensors").read_bytes() == _single(
        base, tmp / "chat", tmp_path / "A.delta.safetensors")
    for text, why in [("A=chat\nA=code\n", "given twice"), ("chat\n", "expected name=path"),
                      (".x=chat\n", "not a usable output name"), ("# nothing\n", "lists no fine-tune")]:
        m.write_text(text)
        with pytest.raises(SettingsError, match=why):
            read_manifest(m)
    capsys.readouterr()
    assert main(["compress-many", str(base), str(fts[0]), "--manifest", str(m), "-o", str(tmp_path / "x")]) == 2
    assert "either as paths after BASE or with --manifest" in capsys.readouterr().err


def test_the_local_path_does_not_import_ray(family, tmp_path):
    _, base, fts, _ = family
    code = ("import sys; from deltacomp.cli import main; "
            f"rc = main(['compress-many', {str(base)!r}, {str(fts[0])!r}, '-o', {str(tmp_path / 'o')!r}, '-q']); "
            "assert rc == 0; assert 'ray' not in sys.modules, 'ray imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert r.returncode == 0, r.stderr[-2000:]


# -- Ray ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray", reason="ray is not installed (pip install -e '.[test]' installs it)")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield ray
    ray.shutdown()


def test_ray_outputs_identical_and_errors_one_line(family, tmp_path, local_ray, capsys):
    _, base, fts, b = family
    for opts in (dict(method="bitdelta"), dict(method="svd-mixed", ratio=8)):
        d = tmp_path / opts["method"]
        compress_many(base, fts, d, progress=True, ray=True, **opts)  # reuses the running Ray
        for ft in fts:
            assert (d / f"{ft.name}.delta.safetensors").read_bytes() == _single(
                base, ft, d / f"single-{ft.name}.delta.safetensors", **opts), (opts, ft.name)
    assert local_ray.is_initialized()  # a Ray it did not start is left running
    f = finetune_of(b, 6)
    f["model.layers.0.self_attn.q_proj.weight"][1, 2] = float("inf")
    bad = write_folder(tmp_path / "bad", f, llama_config(tied=False))
    capsys.readouterr()
    rc = main(["compress-many", str(base), str(fts[0]), str(bad), "-o", str(tmp_path / "many"), "-q", "--ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "bad: model.layers.0.self_attn.q_proj.weight: 1 of 4096 values" in err
    assert not (tmp_path / "many").exists()  # the folder it made is taken back too
