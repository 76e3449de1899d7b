"""The server's engine parts without HTTP: the batch KV cache that rows join and leave (kvbatch) gives
each row exactly its own greedy continuation, and the text tracker (sampling) cuts at stop strings
and never sends text a stop string could still claim."""
from __future__ import annotations

import pytest
import torch

from deltacomp.errors import SettingsError
from deltacomp.serve.kvbatch import KVBatch, ModelRunner
from deltacomp.serve.sampling import SamplingParams, TextTracker, sample

transformers = pytest.importorskip("transformers")

PROMPTS = [[1, 5, 9, 13, 40], [1, 90, 4, 33, 33, 12, 6, 7, 8, 9, 10], [1, 20], [1, 7, 7, 7, 7, 7, 7, 7]]


def _model():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                   initializer_range=0.3)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_rows_joining_and_leaving_decode_as_if_alone():
    model = _model()
    lengths = [12, 14, 6, 12]  # row 2 leaves early, rows 2 and 3 join mid-way, with longer and shorter prompts
    batch, rows, done = KVBatch(ModelRunner(model)), [], {}

    def join(i):
        logits, cache = batch.prefill(PROMPTS[i], torch.device("cpu"))
        batch.add(cache)
        rows.append((i, [int(logits.argmax())]))

    join(0)
    join(1)
    for step in range(40):
        if step in (3, 5):
            join({3: 2, 5: 3}[step])
        if not rows:
            break
        logits = batch.step([out[-1] for _, out in rows])
        for (_, out), row in zip(rows, logits):
            out.append(int(row.argmax()))
        keep = [j for j, (i, out) in enumerate(rows) if len(out) < lengths[i]]
        done.update({i: out for j, (i, out) in enumerate(rows) if j not in keep})
        rows = [rows[j] for j in keep]
        batch.keep(keep)
        if rows:
            assert bool(batch.mask[:, 0].any())  # all-padding columns are trimmed
    assert sorted(done) == [0, 1, 2, 3]
    for i, out in done.items():
        with torch.no_grad():
            ref = model.generate(torch.tensor([PROMPTS[i]]), max_new_tokens=lengths[i], do_sample=False,
                                 eos_token_id=None, pad_token_id=3)
        assert out == ref[0, len(PROMPTS[i]):].tolist(), i
    assert len({t for out in done.values() for t in out}) > 4  # not one repeated token


class _CharTok:
    """Each token id is one character (ids 0..25 -> a..z); 26 is a two-token character's first half."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("\ufffd" if i == 26 else "é" if i == 27 else chr(97 + i) for i in ids)


def _run(tokens, stops):
    tr, sent, stopped = TextTracker(_CharTok(), stops), [], False
    for t in tokens:
        stopped = tr.push(t)
        sent.append(tr.take(final=stopped))
        if stopped:
            break
    if not stopped:
        sent.append(tr.take(final=True))
    return sent, stopped


def test_stop_strings_cut_the_text_and_are_never_sent():
    sent, stopped = _run([0, 1, 23, 24, 25, 2], ("xyz",))  # "abxyzc"
    assert stopped and "".join(sent) == "ab"
    assert sent[2] == sent[3] == ""  # "x", "xy" held back: they could start "xyz"
    sent, stopped = _run([0, 23, 24, 1, 2], ("xyz",))  # "axybc": the held-back "xy" is sent once it can't stop
    assert not stopped and "".join(sent) == "axybc"


def test_split_characters_wait_for_their_second_half():
    tr = TextTracker(_CharTok())
    tr.push(0)
    tr.push(26)
    assert tr.take() == "a"
    assert "\ufffd" not in tr.text


def test_sampling_params_are_checked_and_seeded():
    for bad in ({"max_tokens": 0}, {"temperature": -1}, {"top_p": 0}, {"stop": ("a",) * 5}, {"stop": ("",)}):
        with pytest.raises(SettingsError):
            SamplingParams(**bad)
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0, top_p=0.5, seed=3)
    assert [sample(logits, p, p.generator()) for _ in range(3)] == [sample(logits, p, p.generator())] * 3
    assert sample(logits, SamplingParams(temperature=0), None) == int(logits.argmax())
    tiny = SamplingParams(temperature=1.0, top_p=1e-6, seed=0)  # only the most likely token survives top-p
    assert {sample(logits, tiny, tiny.generator()) for _ in range(5)} == {int(logits.argmax())}
