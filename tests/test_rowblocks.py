"""Large tensors compressed and reconstructed in blocks of rows (deltacomp.rowblocks): with a tiny block
size forced, every file is byte for byte what the whole-tensor path writes (delta files, checksums and
metadata included; reconstructed folders), over the cases the whole path handles: bf16-exact and float32
raw deltas, added tokens, an unchanged embedding, a tensor only the fine-tune has, NaN stored whole or
refused, a tied head, user rules, sharded outputs; a wrong base and a corrupted file are still caught."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import deltacomp
from deltacomp import api, checkpoint, rowblocks
from deltacomp.errors import BaseMismatchError, ChecksumError, NonFiniteError
from tests.conftest import finetune_of, llama_config, llama_tensors, write_folder

TINY = 200  # elements per block: 3 rows of the test embeddings (hidden 64)


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if not p.name.startswith(".")}


@pytest.fixture
def spy(monkeypatch):
    """Counts the tensors each streamed path really took."""
    taken = {"compress": 0, "reconstruct": 0}

    def wrap(fn, key):
        def inner(*a, **k):
            ok = fn(*a, **k)
            taken[key] += bool(ok)
            return ok
        return inner

    monkeypatch.setattr(api, "add_streamed", wrap(rowblocks.add_streamed, "compress"))
    monkeypatch.setattr(api, "write_streamed", wrap(rowblocks.write_streamed, "reconstruct"))
    return taken


def _both(tmp_path, monkeypatch, spy, base, ft, *, streamed_min=1, **kw) -> tuple[Path, Path]:
    """Compress and reconstruct with the default block size (whole path for these small tensors) and
    with TINY; assert identical outputs; return the whole path's delta and folder."""
    out = {}
    for label, block in (("whole", checkpoint.BLOCK_ELEMS), ("blocks", TINY)):
        monkeypatch.setattr(checkpoint, "BLOCK_ELEMS", block)
        before = dict(spy)
        delta = tmp_path / f"{label}.delta.safetensors"
        deltacomp.compress(base, ft, delta, progress=False, **kw)
        rec = deltacomp.reconstruct(base, delta, tmp_path / f"{label}-rec", progress=False)
        if label == "blocks":
            assert spy["compress"] - before["compress"] >= streamed_min
            assert spy["reconstruct"] - before["reconstruct"] >= streamed_min
        else:
            assert spy == before
        out[label] = (delta, rec)
    whole, blocks = out["whole"], out["blocks"]
    assert _delta_files(whole[0]) == _delta_files(blocks[0])
    assert _files(whole[1]) == _files(blocks[1])
    return whole


def _delta_files(path: Path) -> dict[str, bytes]:
    stem = path.name.removesuffix(".delta.safetensors")
    out = {}
    for p in sorted(path.parent.iterdir()):
        if p.name.startswith(stem) and p.is_file():  # an index names its shards: without the stem
            data = p.read_bytes()
            out[p.name.replace(stem, "")] = data.replace(stem.encode(), b"") if p.name.endswith(".json") else data
    return out


def _pair(tmp_path, base: dict, ft: dict, config=None) -> tuple[Path, Path]:
    return (write_folder(tmp_path / "base", base, config, shards=2),
            write_folder(tmp_path / "ft", ft, config, shards=2))


def _ulps(t: torch.Tensor, seed: int) -> torch.Tensor:
    """``t`` moved by -3..3 units in the last place: a delta exact in bf16 (raw keeps bf16)."""
    g = torch.Generator().manual_seed(seed)
    return (t.view(torch.int16) + torch.randint(-3, 4, t.shape, generator=g, dtype=torch.int16)).view(t.dtype)


def test_bf16_exact_and_float32_raw(tmp_path, monkeypatch, spy):
    base = llama_tensors(0, vocab=67, tied=False)
    ft = finetune_of(base, 1)
    ft["model.embed_tokens.weight"] = _ulps(base["model.embed_tokens.weight"], 2)  # raw stays bf16
    ft["lm_head.weight"] = (base["lm_head.weight"].float() * 1.37 + 0.01).bfloat16()  # raw goes float32
    delta, rec = _both(tmp_path, monkeypatch, spy, *_pair(tmp_path, base, ft, llama_config(67, tied=False)),
                       streamed_min=2)
    with deltacomp.load_delta(delta) as df:
        assert df.params["model.embed_tokens.weight"].settings["dtype"] == "bfloat16"
        assert df.params["lm_head.weight"].settings["dtype"] == "float32"
    got = dict(deltacomp.iter_reconstructed(tmp_path / "base", delta))
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(got[name], ft[name])


def test_added_tokens_unchanged_and_new_tensor(tmp_path, monkeypatch, spy):
    base = llama_tensors(0, vocab=61, tied=False)
    ft = finetune_of(base, 1)
    g = torch.Generator().manual_seed(3)
    ft["model.embed_tokens.weight"] = torch.cat([_ulps(base["model.embed_tokens.weight"], 4),
                                                 torch.randn(9, 64, generator=g).bfloat16()])  # 9 added rows
    ft["lm_head.weight"] = base["lm_head.weight"].clone()  # unchanged: the zero codec
    ft["extra.proj.weight"] = torch.randn(30, 64, generator=g).bfloat16()  # only in the fine-tune
    base_dir, ft_dir = _pair(tmp_path, base, ft, llama_config(61, tied=False))
    delta, _ = _both(tmp_path, monkeypatch, spy, base_dir, ft_dir, streamed_min=3)
    with deltacomp.load_delta(delta) as df:
        assert df.params["model.embed_tokens.weight"].base_rows == 61
        assert df.params["lm_head.weight"].fields == []
        assert not df.params["extra.proj.weight"].has_base
    got = dict(deltacomp.iter_reconstructed(base_dir, delta))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "extra.proj.weight"):
        assert torch.equal(got[name], ft[name])


def test_tied_head_rules_and_shards(tmp_path, monkeypatch, spy):
    base = llama_tensors(0, vocab=53, tied=False)
    base["lm_head.weight"] = base["model.embed_tokens.weight"].clone()
    ft = finetune_of(base, 1)
    ft["model.embed_tokens.weight"] = _ulps(base["model.embed_tokens.weight"], 5)
    ft["lm_head.weight"] = ft["model.embed_tokens.weight"].clone()
    base_dir, ft_dir = _pair(tmp_path, base, ft, llama_config(53, tied=True))
    delta, _ = _both(tmp_path, monkeypatch, spy, base_dir, ft_dir, rules=["embed_tokens=raw:dtype=float16"],
                     max_shard_bytes=4096)
    assert json.loads(Path(str(delta) + ".index.json").read_text())  # sharded
    with deltacomp.load_delta(delta) as df:
        assert df.params["lm_head.weight"].tied_to == "model.embed_tokens.weight"
        assert df.params["model.embed_tokens.weight"].settings["dtype"] == "float16"


def test_nonfinite_stored_whole_or_refused(tmp_path, monkeypatch, spy):
    base = llama_tensors(0, vocab=47, tied=False)
    ft = finetune_of(base, 1)
    ft["lm_head.weight"] = _ulps(base["lm_head.weight"], 6)
    ft["lm_head.weight"][40, 3] = float("nan")
    base_dir, ft_dir = _pair(tmp_path, base, ft, llama_config(47, tied=False))
    delta, _ = _both(tmp_path, monkeypatch, spy, base_dir, ft_dir, allow_nonfinite=True)
    with deltacomp.load_delta(delta) as df:
        assert not df.params["lm_head.weight"].has_base
    messages = []
    for block in (checkpoint.BLOCK_ELEMS, TINY):
        monkeypatch.setattr(checkpoint, "BLOCK_ELEMS", block)
        with pytest.raises(NonFiniteError) as err:
            deltacomp.compress(base_dir, ft_dir, tmp_path / "x.delta.safetensors", progress=False)
        messages.append(str(err.value))
    assert messages[0] == messages[1] and "1 of 3008 values" in messages[0]


def test_wrong_base_and_corruption_caught(tmp_path, monkeypatch):
    base = llama_tensors(0, vocab=59, tied=False)
    ft = finetune_of(base, 1)
    ft["lm_head.weight"] = _ulps(base["lm_head.weight"], 7)
    base_dir, ft_dir = _pair(tmp_path, base, ft, llama_config(59, tied=False))
    monkeypatch.setattr(checkpoint, "BLOCK_ELEMS", TINY)
    delta = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base_dir, ft_dir, delta, progress=False)
    other = dict(base)
    other["lm_head.weight"] = base["lm_head.weight"].clone()
    other["lm_head.weight"][58, 15] += 1
    wrong = write_folder(tmp_path / "wrong", other, llama_config(59, tied=False))
    with pytest.raises(BaseMismatchError, match="lm_head.weight"):
        deltacomp.reconstruct(wrong, delta, tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()
    with pytest.warns(UserWarning, match="lm_head.weight"):
        deltacomp.reconstruct(wrong, delta, tmp_path / "forced", progress=False, force=True)
    data = bytearray((tmp_path / "d.delta.safetensors").read_bytes())
    with deltacomp.load_delta(delta) as df:  # flip one byte of lm_head's stored values
        reader = df._handles[df._where["lm_head.weight.values"]]
        _, _, begin, _ = reader._entries["lm_head.weight.values"]
        at = reader._start + begin + 100
    data[at] ^= 1
    (tmp_path / "d.delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="lm_head.weight"):
        deltacomp.reconstruct(base_dir, delta, tmp_path / "rec2", progress=False)


def test_block_rows():
    assert rowblocks.block_rows((10, 4), 8) == 2
    assert rowblocks.block_rows((10, 4), 40) is None  # fits in one block
    assert rowblocks.block_rows((10, 100), 8) == 1    # a row larger than a block: one row at a time
    assert rowblocks.block_rows((1000,), 8) is None   # 1-D (norms, biases) stays whole
    assert rowblocks.block_rows((1, 1000), 8) is None


def test_reader_rows_and_writer_blocks(tmp_path):
    from safetensors.torch import save_file

    from deltacomp.tensorio import TensorFileWriter, TensorReader

    t = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    save_file({"t": t}, str(tmp_path / "a.safetensors"))
    with TensorReader(tmp_path / "a.safetensors") as r:
        assert torch.equal(r.get_rows("t", 2, 6), t[2:6]) and r.get_rows("t", 3, 3).shape == (0, 5)
        with pytest.raises(ValueError, match="rows 5:8"):
            r.get_rows("t", 5, 8)
        assert b"".join(c.numpy().tobytes() for c in r.iter_bytes("t", 16)) == t.numpy().tobytes()
    w = TensorFileWriter(tmp_path / "b.safetensors")
    w.add_blocks("t", torch.float32, (7, 5), [t[:3], t[3:4], t[4:]])
    w.close()
    assert (tmp_path / "b.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()
    w = TensorFileWriter(tmp_path / "c.safetensors")
    with pytest.raises(ValueError, match="gave 60 of the 140 bytes"):
        w.add_blocks("t", torch.float32, (7, 5), [t[:3]])
    with pytest.raises(ValueError, match="dtype torch.float16"):
        w.add_blocks("u", torch.float32, (7, 5), [t.half()])
    w.abort()
