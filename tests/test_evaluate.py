"""Known-answer tests for deltacomp.evaluate on tiny random Llama models (built here, in float64 where
the reference needs it)."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deltacomp.eval import metrics as ev
from deltacomp.errors import SettingsError

VOCAB = 120


def _tiny_llama(seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"[UNK]": VOCAB - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """base and fine-tune folders (fine-tune = base + small noise on every tensor), with a tokenizer."""
    root = tmp_path_factory.mktemp("pair")
    base = _tiny_llama(0)
    base.save_pretrained(root / "base")
    _tokenizer().save_pretrained(root / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    base.save_pretrained(root / "ft")
    _tokenizer().save_pretrained(root / "ft")
    return root / "base", root / "ft"


def _ids(n: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- windows
@pytest.mark.parametrize("n", [2, 3, 7, 16, 17, 33, 100])
@pytest.mark.parametrize("ctx,stride", [(1, 1), (4, 4), (4, 1), (4, 3), (8, 5), (16, 16), (5, None)])
def test_windows_score_every_target_exactly_once(n, ctx, stride):
    windows = ev.plan_windows(n, ctx, stride)
    scored = [t for w in windows for t in range(w.first, w.end + 1)]
    assert scored == list(range(1, n))
    for w in windows:
        assert 0 <= w.start < w.first <= w.end <= n - 1
        assert w.end - w.start <= ctx  # never more than ctx inputs
        rows = range(len(scored))[w.rows]
        assert list(rows) == [t - 1 for t in range(w.first, w.end + 1)]
        assert list(range(w.end - w.start)[w.logit_rows]) == [t - 1 - w.start for t in range(w.first, w.end + 1)]
    s = stride or ctx
    for w in windows[1:]:  # after the first window every target keeps >= ctx - stride tokens of context
        assert w.first - w.start >= ctx - s


def test_windows_reject_bad_settings():
    with pytest.raises(SettingsError, match="stride must be in 1..ctx=4"):
        ev.plan_windows(10, 4, 5)
    with pytest.raises(SettingsError, match="ctx must be >= 1"):
        ev.plan_windows(10, 0)
    with pytest.raises(SettingsError, match="at least 2 are needed"):
        ev.plan_windows(1, 4)


# ----------------------------------------------------------------------------- scoring vs float64
def _direct(model_p, model_q, ids, ctx, stride=None):
    """Per-target NLL of q and KL(p || q) in float64, each target t predicted from the tokens
    max(0, window start) .. t-1, one window at a time and unbatched (written out independently)."""
    nll, kl = [], []
    stride = stride or ctx
    done, start = 0, 0
    while done < len(ids) - 1:
        end = min(start + ctx, len(ids) - 1)
        x = ids[None, start:end]
        with torch.no_grad():
            lp = torch.log_softmax(model_p(input_ids=x).logits[0].double(), -1)
            lq = torch.log_softmax(model_q(input_ids=x).logits[0].double(), -1)
        keep = slice(done - start, None) if done > start else slice(None)
        lp, lq = lp[keep], lq[keep]
        tgt = ids[max(done, start) + 1:end + 1]
        done, start = end, start + stride
        nll.append(-lq.gather(1, tgt[:, None])[:, 0])
        kl.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(nll), torch.cat(kl)


@pytest.mark.parametrize("stride", [None, 3])
def test_score_matches_direct_float64(tmp_path, pair, stride):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float64).eval()
    ft = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float64).eval()
    ids, ctx = _ids(45), 8
    windows = ev.plan_windows(len(ids), ctx, stride)
    ref = ev.build_reference(ft, ids, windows, tmp_path / "ref", batch_size=3, progress=False)
    assert ref.logprobs.dtype == np.float64 and ref.logprobs.shape == (44, VOCAB)
    s = ev.score_against(base, ids, windows, ref, batch_size=3, progress=False)
    nll, kl = _direct(ft, base, ids, ctx, stride)
    assert s["nll"] == pytest.approx(float(nll.mean()), rel=1e-10)
    assert s["ppl"] == pytest.approx(math.exp(float(nll.mean())), rel=1e-10)
    assert s["kl"] == pytest.approx(float(kl.mean()), rel=1e-8)
    assert s["kl"] > 1e-4  # the fine-tune really differs, so the check above is not 0 == 0
    ft_nll, _ = _direct(ft, ft, ids, ctx, stride)
    assert ref.summary["nll"] == pytest.approx(float(ft_nll.mean()), rel=1e-10)
    assert 0.0 <= s["top1"] <= 1.0


def test_same_model_gives_zero_kl_and_full_agreement(tmp_path, pair):
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    ids = _ids(70)
    windows = ev.plan_windows(len(ids), 16, 6)
    ref = ev.build_reference(ft, ids, windows, tmp_path / "ref", batch_size=4, progress=False)
    assert ref.logprobs.dtype == np.float32
    s = ev.score_against(ft, ids, windows, ref, batch_size=4, progress=False)
    assert s["kl"] == 0.0 and s["top1"] == 1.0
    assert s["nll"] == pytest.approx(ref.summary["nll"], rel=1e-12)


def test_batching_and_padding_do_not_change_scores(tmp_path, pair):
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float64).eval()
    ids = _ids(50)
    windows = ev.plan_windows(len(ids), 12)  # last window is short, so it gets padded in a batch
    one = ev.build_reference(ft, ids, windows, tmp_path / "a", batch_size=1, progress=False)
    many = ev.build_reference(ft, ids, windows, tmp_path / "b", batch_size=4, progress=False)
    np.testing.assert_allclose(one.logprobs, many.logprobs, rtol=0, atol=1e-10)


def test_gain_recovered():
    assert ev.gain_recovered(3.0, 2.0, 3.0) == 0.0
    assert ev.gain_recovered(3.0, 2.0, 2.0) == 1.0
    assert ev.gain_recovered(3.0, 2.0, 2.5) == 0.5
    assert ev.gain_recovered(2.0, 2.0, 1.0) is None
    assert ev.gain_recovered(2.0, 2.0 + 1e-12, 1.0) is None


# ------------------------------------------------------------------------------------- evaluate
def test_evaluate_without_deltas_tokenizes_and_reuses_cache(tmp_path, pair):
    text = " ".join(f"w{i % 50}" for i in range(0, 300, 7))
    cache = tmp_path / "cache"
    r = ev.evaluate(*pair, [], text, ctx=8, batch_size=2, cache_dir=cache, progress=False)
    assert r["text"]["tokens"] == len(text.split())
    assert r["text"]["scored_tokens"] == r["text"]["tokens"] - 1
    assert r["base"]["ppl"] == pytest.approx(math.exp(r["base"]["nll"]))
    assert r["base"]["kl"] > 0 and r["finetuned"]["kl"] == 0.0
    assert r["base"]["gain_recovered"] == 0.0 and r["finetuned"]["gain_recovered"] == 1.0
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 3 and not any(".tmp" in f for f in files)
    again = ev.evaluate(*pair, [], text, ctx=8, batch_size=2, cache_dir=cache, progress=False)
    assert again["base"] == r["base"] and again["finetuned"] == r["finetuned"]
    md = ev.format_table(r)
    assert md.count("\n|") == 3 and "| base |" in md
    out = tmp_path / "r.json"
    ev.write_json(r, out)
    assert json.loads(out.read_text())["base"]["nll"] == r["base"]["nll"]


def test_evaluate_same_model_as_base_gain_undefined(tmp_path, pair):
    r = ev.evaluate(pair[1], pair[1], [], _ids(40).tolist(), ctx=16, progress=False)
    assert r["base"]["kl"] == 0.0 and r["base"]["top1"] == 1.0
    assert r["base"]["gain_recovered"] is None and r["finetuned"]["gain_recovered"] is None
    assert "n/a" in ev.format_table(r)


def test_max_tokens_and_bad_settings(pair):
    r = ev.evaluate(*pair, [], _ids(100).tolist(), ctx=16, max_tokens=30, progress=False)
    assert r["text"]["tokens"] == 30
    with pytest.raises(SettingsError, match="batch_size"):
        ev.evaluate(*pair, [], _ids(10).tolist(), batch_size=0, progress=False)


# --------------------------------------------------------------------------- end to end with deltas
@pytest.fixture(scope="module")
def deltas(pair, tmp_path_factory):
    import deltacomp

    root = tmp_path_factory.mktemp("deltas")
    out = {}
    for label, ft, method in [("raw", pair[1], "raw"), ("bitdelta", pair[1], "bitdelta"),
                              ("base", pair[0], "bitdelta")]:  # base -> base: an all-zero delta
        out[label] = root / f"{label}.delta.safetensors"
        deltacomp.compress(pair[0], ft, out[label], method=method, progress=False)
    return out


def test_evaluate_deltas_known_answers(pair, deltas):
    text = _ids(60).tolist()
    r = ev.evaluate(*pair, [deltas["raw"], deltas["bitdelta"], deltas["base"]], text, ctx=16, batch_size=2,
                    progress=False)
    raw, bit, base = r["deltas"]
    # lossless (fp32 a + (b - a) may differ from b in the last bit): the fine-tune back
    assert raw["kl"] < 1e-6 and raw["top1"] == 1.0 and raw["weight_rel_error"] < 1e-6
    assert raw["gain_recovered"] == pytest.approx(1.0, abs=1e-4)
    # the zero delta rebuilds the base: its scores are the base's, bit for bit
    assert base["gain_recovered"] == 0.0 and base["kl"] == r["base"]["kl"] and base["nll"] == r["base"]["nll"]
    assert base["weight_rel_error"] == 1.0
    assert set(base["by_codec"]) <= {"zero", "raw"}
    # a lossy delta sits in between
    assert 0 < bit["weight_rel_error"] < 1 and 0 < bit["kl"] < r["base"]["kl"]
    assert bit["bytes"] < raw["bytes"] and bit["ratio"] == pytest.approx(ev.model_bytes(pair[1]) / bit["bytes"])
    assert bit["compressed_ratio"] > 1 and bit["by_codec"]["bitdelta"]["tensors"] == 14
    assert len(bit["weight_rel_error_per_tensor"]) == len(raw["weight_rel_error_per_tensor"]) > 14
    md = ev.format_table(r)
    assert "bitdelta.delta.safetensors" in md and md.count("\n|") == 6


def test_evaluate_refuses_delta_for_another_base(tmp_path, pair, deltas):
    from deltacomp.errors import BaseMismatchError

    other = _tiny_llama(7)
    other.save_pretrained(tmp_path / "other")
    _tokenizer().save_pretrained(tmp_path / "other")
    with pytest.raises(BaseMismatchError, match="differs from the base .* was made against"):
        ev.evaluate(tmp_path / "other", pair[1], [deltas["bitdelta"]], _ids(20).tolist(), progress=False)


# ------------------------------------------------------------------------------------ sweep + CLI
def test_sweep_writes_results_and_skips_unreachable_ratio(tmp_path, pair):
    from deltacomp.eval.sweep import sweep

    text = " ".join(f"w{(i * 13) % 90}" for i in range(80))
    r = sweep(*pair, ["bitdelta", "raw"], [8, 64], tmp_path / "sw", text, ctx=16, progress=False)
    done = {(d["method"], d["ratio_asked"]) for d in r["deltas"]}
    skipped = {(s["method"], s["ratio"]) for s in r["skipped"]}
    assert done | skipped == {("bitdelta", 8), ("bitdelta", 64), ("raw", 8), ("raw", 64)}
    assert ("bitdelta", 64) in skipped  # 1 bit + scales per fp32 weight cannot reach 1/64
    assert all(s["reason"] for s in r["skipped"])
    saved = json.loads((tmp_path / "sw" / "results.json").read_text())
    assert len(saved["deltas"]) == len(r["deltas"]) and saved["skipped"] == r["skipped"]
    md = (tmp_path / "sw" / "results.md").read_text()
    assert "bitdelta @8x" in md and "Skipped:" in md
    png = (tmp_path / "sw" / "rate_distortion.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_cli_eval_and_sweep(tmp_path, pair, deltas, capsys):
    import argparse

    from deltacomp.cli.eval import add_eval_parser

    parser = argparse.ArgumentParser(prog="deltacomp")
    add_eval_parser(parser.add_subparsers(dest="command", required=True))
    (tmp_path / "t.txt").write_text(" ".join(f"w{i % 70}" for i in range(50)))
    args = parser.parse_args(["eval", str(pair[0]), str(pair[1]), str(deltas["bitdelta"]), "--text",
                              str(tmp_path / "t.txt"), "--ctx", "16", "--json", str(tmp_path / "e.json"), "-q"])
    assert args.func(args) == 0
    assert "bitdelta.delta.safetensors" in capsys.readouterr().out
    assert json.loads((tmp_path / "e.json").read_text())["text"]["tokens"] == 50
    args = parser.parse_args(["sweep", str(pair[0]), str(pair[1]), "--methods", "bitdelta", "--ratios", "8",
                              "-o", str(tmp_path / "sw"), "--text", str(tmp_path / "t.txt"), "--ctx", "16", "-q"])
    assert args.ratios == [8.0] and args.func(args) == 0
    assert (tmp_path / "sw" / "rate_distortion.png").is_file()
    with pytest.raises(SystemExit):
        parser.parse_args(["sweep", "a", "b", "--methods", "bitdelta", "--ratios", "8,x", "-o", "o"])
    args = parser.parse_args(["eval", "a", "b", "d", "--text", str(tmp_path / "missing.txt")])
    with pytest.raises(SettingsError, match="missing.txt: no such file"):
        args.func(args)
