"""The streaming safetensors writer and the map-free reader (deltacomp.tensorio): files equal to
safetensors' own, tensors read back bit-exactly, no file pages left mapped, and a sharded pair that
round-trips bit-exactly through the streaming writers of reconstruct and of the delta file."""
from __future__ import annotations

import pytest

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import deltacomp
from deltacomp.checkpoint import Checkpoint
from deltacomp.tensorio import TensorFileWriter, TensorReader
from tests.conftest import finetune_of, llama_tensors, write_folder


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w.bf16": torch.randn(7, 5, generator=g).to(torch.bfloat16), "a.f32": torch.randn(3, generator=g),
            "s.i8": torch.randint(-5, 5, (13,), dtype=torch.int8, generator=g), "z.f64": torch.randn((), generator=g,
            dtype=torch.float64), "e.empty": torch.zeros(0, 4), "b.bool": torch.tensor([True, False, True]),
            "f8": torch.randn(6, generator=g).to(torch.float8_e4m3fn), "u8": torch.arange(5, dtype=torch.uint8),
            "i64": torch.arange(3), "h.f16": torch.ones(2, 3, dtype=torch.float16),
            "i16": torch.arange(3, dtype=torch.int16), "i32": torch.arange(2, dtype=torch.int32),
            "f8b": torch.randn(3, generator=g).to(torch.float8_e5m2)}


def test_streamed_file_equals_save_file(tmp_path):
    """Added in any order, one at a time, the file is byte for byte what save_file writes."""
    tensors = _mixed()
    save_file(tensors, str(tmp_path / "ref.safetensors"), metadata={"format": "pt"})
    w = TensorFileWriter(tmp_path / "out.safetensors")
    for name in reversed(list(tensors)):
        w.add(name, tensors[name])
    w.close({"format": "pt"})
    assert (tmp_path / "out.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "ref.safetensors"]  # no spill left
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as h, TensorReader(tmp_path / "out.safetensors") as r:
        assert h.metadata() == r.metadata() == {"format": "pt"}
        for name, t in tensors.items():
            for got in (h.get_tensor(name), r.get(name)):
                assert got.dtype == t.dtype and got.shape == t.shape
                assert torch.equal(got.reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))


def test_abort_leaves_nothing(tmp_path):
    w = TensorFileWriter(tmp_path / "x.safetensors")
    w.add("a", torch.ones(4))
    w.abort()
    assert list(tmp_path.iterdir()) == []


def _rss_file_kb() -> int | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))
    except (OSError, StopIteration):
        return None


def test_reader_keeps_no_file_pages_mapped(tmp_path):
    """Reading every tensor of a 64 MB file leaves file-backed RSS where it was (safe_open's memory map
    would keep all 64 MB mapped until closed)."""
    path = tmp_path / "big.safetensors"
    save_file({f"t{i}": torch.full((1024, 1024), float(i)) for i in range(16)}, str(path))
    before = _rss_file_kb()
    if before is None:
        pytest.skip("no /proc/self/status RssFile here: nothing to measure")
    with Checkpoint(path) as ck:
        total = 0.0
        for name in ck.names():
            total += float(ck.get(name)[0, 0])
        assert total == sum(range(16))
        assert _rss_file_kb() - before < 16 * 1024  # well under the file's 64 MB


def test_sharded_pair_round_trips_bit_exactly(tmp_path):
    """Sharded base and fine-tune; a sharded delta file and a sharded reconstruction (tiny shard limits,
    so every writer starts several shards) give back the fine-tune exactly (raw is lossless)."""
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    base, ft = write_folder(tmp_path / "b", b, shards=3), write_folder(tmp_path / "f", f, shards=3)
    out = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, ft, out, method="raw", max_shard_bytes=20_000, progress=False)
    assert len(list(tmp_path.glob("d-*-of-*.delta.safetensors"))) > 1
    with deltacomp.load_delta(out) as df:
        df.verify()
    rec = deltacomp.reconstruct(base, out, tmp_path / "rec", max_shard_bytes=30_000, progress=False)
    assert (rec / "model.safetensors.index.json").is_file() and len(list(rec.glob("model-*.safetensors"))) > 1
    assert not [p for p in rec.iterdir() if p.name.endswith(".data")]
    with Checkpoint(rec) as ck:
        assert sorted(ck.names()) == sorted(f)
        for name, t in f.items():
            got = ck.get(name)
            assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8))
