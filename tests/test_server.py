"""``deltacomp serve``: the OpenAI-compatible server over one base and several deltas, started on a free
loopback port in a thread and spoken to with the official ``openai`` client and raw HTTP. Greedy outputs
equal each reconstructed fine-tune's, mixed tenants decoding in one batch equal one-at-a-time answers,
bad input is a JSON error, and the engine survives all of it."""
from __future__ import annotations

import json
import threading
import time

import pytest
import torch

import deltacomp

transformers = pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import word_tokenizer  # noqa: E402
from deltacomp.cli import build_parser  # noqa: E402
from deltacomp.serve.server import ServerThread, build_app  # noqa: E402

VOCAB, CONTEXT = 96, 64
TEMPLATE_A = ("{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
              "{% if add_generation_prompt %}w7{% endif %}")
TEMPLATE_B = "{% for m in messages %}w8 {{ m['content'] }} {% endfor %}w9"
PROMPTS = ["w10 w11 w12", "w40 w41 w42 w43 w44 w45 w46", "w90 w4", "w33 w33 w33 w12 w60"]


def _tiny_llama(seed: int):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                   initializer_range=0.3)  # large weights: varied greedy text, not one token
    return transformers.LlamaForCausalLM(cfg)


def _finetune(seed: int, touch):
    ft = _tiny_llama(0)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if touch(n):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return ft


def _save(model, folder, template=None):
    model.save_pretrained(folder)
    tok = word_tokenizer(VOCAB)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A base; fine-tune a (every tensor, embeddings and norms too; its own chat template) as a BitDelta
    delta, b (the layers; another template) as a ternary one; a delta made for another base; and the
    reconstructed fine-tunes as references."""
    tmp = tmp_path_factory.mktemp("server")
    _save(_tiny_llama(0), tmp / "base")
    _save(_finetune(1, lambda n: True), tmp / "ftA", TEMPLATE_A)
    _save(_finetune(2, lambda n: "layers" in n and "norm" not in n), tmp / "ftB", TEMPLATE_B)
    _save(_tiny_llama(7), tmp / "other")
    _save(_finetune(3, lambda n: True), tmp / "ftOther")
    out = {"dir": tmp, "base": tmp / "base"}
    for key, ft, base, method in [("a", "ftA", "base", "bitdelta"), ("b", "ftB", "base", "ternary:density=0.3"),
                                  ("foreign", "ftOther", "other", "bitdelta")]:
        out[key] = tmp / f"{key}.delta.safetensors"
        deltacomp.compress(tmp / base, tmp / ft, out[key], method=method, progress=False)
    for key in ("a", "b"):
        rec = deltacomp.reconstruct(tmp / "base", out[key], tmp / f"rec_{key}", progress=False)
        out[f"model_{key}"] = transformers.AutoModelForCausalLM.from_pretrained(str(rec)).eval()
        out[f"tok_{key}"] = transformers.AutoTokenizer.from_pretrained(str(rec))
    out["model_base"] = transformers.AutoModelForCausalLM.from_pretrained(str(tmp / "base")).eval()
    out["tok_base"] = transformers.AutoTokenizer.from_pretrained(str(tmp / "base"))
    return out


def _reference(pair, key: str, prompt: str, max_tokens: int, chat: bool = False) -> str:
    """Greedy text of the reconstructed fine-tune (or the base) run alone, as Hugging Face generates it."""
    tok, model = pair[f"tok_{key}"], pair[f"model_{key}"]
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
    else:
        ids = tok.encode(prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False, pad_token_id=3)
    return tok.decode(out[0, len(ids):], skip_special_tokens=True)


@pytest.fixture(scope="module")
def server(pair):
    # The tests compare greedy text with the reconstructed fine-tune's, token for token, on a tiny random model
    # full of near ties: bitdelta's terms take the exact kernels, not the int8 tables, whose rounding
    # (test_ops_sign_tl.py) could flip a tie, or not, by which path each batch shape measured faster on a
    # loaded machine. The terms are built when a request first needs a delta, so the setting stays for the
    # server's life.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DELTACOMP_SIGN_KERNEL", "exact")
        app = build_app(pair["base"], {"a": pair["a"], "b": pair["b"]}, max_batch=4, max_queue=32)
        with ServerThread(app) as s:
            s.engine = app.state.server.engine
            yield s
    assert not s.thread.is_alive() and not s.engine._thread.is_alive()  # clean shutdown


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


MODEL = {"a": "a", "b": "b", "base": "base"}


def test_models_lists_base_and_deltas(server):
    ids = [m.id for m in _client(server).models.list().data]
    assert ids == ["base", "a", "b"]


@pytest.mark.parametrize("key", ["a", "b", "base"])
def test_greedy_completion_equals_reconstructed(pair, server, key):
    for prompt in PROMPTS[:2]:
        r = _client(server).completions.create(model=MODEL[key], prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == _reference(pair, key, prompt, 12)
        assert r.usage.prompt_tokens == len(pair[f"tok_{key}"].encode(prompt))
        assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("key", ["a", "b"])
def test_chat_uses_the_finetunes_template(pair, server, key):
    r = _client(server).chat.completions.create(model=key, messages=[{"role": "user", "content": "w20 w21"}],
                                                max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == _reference(pair, key, "w20 w21", 10, chat=True)
    want_prompt = pair[f"tok_{key}"].apply_chat_template([{"role": "user", "content": "w20 w21"}],
                                                         tokenize=False, add_generation_prompt=True)
    assert r.usage.prompt_tokens == len(want_prompt.split())  # one word-level token per word


def test_chat_without_a_template_is_a_400(server):
    with pytest.raises(openai.BadRequestError, match="no chat template"):
        _client(server).chat.completions.create(model="base", messages=[{"role": "user", "content": "w5"}])


def test_streaming_equals_non_streaming(server):
    c = _client(server)
    full = c.completions.create(model="a", prompt=PROMPTS[1], max_tokens=15, temperature=0)
    chunks = list(c.completions.create(model="a", prompt=PROMPTS[1], max_tokens=15, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == full.choices[0].text
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason
    msgs = [{"role": "user", "content": "w30"}]
    full = c.chat.completions.create(model="b", messages=msgs, max_tokens=9, temperature=0)
    chunks = list(c.chat.completions.create(model="b", messages=msgs, max_tokens=9, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_mixed_tenants_in_one_batch_equal_one_at_a_time(pair, server):
    jobs = [(key, p) for p in PROMPTS for key in ("a", "b", "base")]  # 12 requests, 3 tenants, 4 rows at a time
    want = {(k, p): _reference(pair, k, p, 20) for k, p in jobs}
    got, errors = {}, []
    mixed_before = server.engine.counts["mixed_steps"]

    def ask(key, prompt):
        try:
            r = _client(server).completions.create(model=MODEL[key], prompt=prompt, max_tokens=20, temperature=0)
            got[(key, prompt)] = r.choices[0].text
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=j) for j in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert got == want
    assert server.engine.counts["mixed_steps"] > mixed_before  # some steps really ran several tenants at once


def test_stop_max_tokens_and_seed(pair, server):
    c = _client(server)
    ref = _reference(pair, "a", PROMPTS[0], 12).split()
    assert len(ref) >= 4
    cut = c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[ref[3]])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == " ".join(ref)[: " ".join(ref).find(ref[3])]
    r = c.completions.create(model="b", prompt=PROMPTS[2], max_tokens=3, temperature=0)
    assert r.usage.completion_tokens <= 3
    a1, a2 = (c.completions.create(model="a", prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.9,
                                   seed=1234).choices[0].text for _ in range(2))
    assert a1 == a2


def _post(server, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    kw.setdefault("timeout", 30)
    return httpx.post(server.url + path, content=data, headers={"content-type": "application/json"}, **kw)


@pytest.mark.parametrize("body,status,match", [
    ({"model": "nope", "prompt": "w5"}, 404, "does not exist"),
    (b"{not json", 400, "not valid JSON"),
    ({"prompt": "w5"}, 400, "model"),
    ({"model": "a", "prompt": " ".join(["w5"] * CONTEXT)}, 400, "context"),
    ({"model": "a", "prompt": "w5", "max_tokens": CONTEXT}, 400, "max_tokens"),
    ({"model": "a", "prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "a", "prompt": "w5", "n": 2}, 400, "n must be 1"),
    ({"model": "a", "prompt": "w5", "temperature": 5}, 400, "temperature"),
    ({"model": "a", "prompt": ["w5", "w6"]}, 400, "one prompt"),
    ({"model": "a", "prompt": [5, 999]}, 400, "outside the vocabulary"),
    ({"model": "a", "prompt": "w5", "stop": ["w1", "w2", "w3", "w4", "w5"]}, 400, "stop"),
    ({"model": "a", "prompt": "w5", "logprobs": 2}, 400, "logprobs is not supported"),
    ({"model": "a", "prompt": "w5", "presence_penalty": 0.5}, 400, "presence_penalty is not supported"),
])
def test_bad_requests_are_json_errors(server, body, status, match):
    r = _post(server, "/v1/completions", body)
    assert r.status_code == status, r.text
    assert match in r.json()["error"]["message"]


def test_other_http_errors_are_json(server):
    r = _post(server, "/v1/completions", b"x" * (9 * 2**20))
    assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nowhere", timeout=30)
    assert r.status_code == 404 and "error" in r.json()
    r = _post(server, "/v1/chat/completions", {"model": "a", "messages": []})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_add_and_remove_deltas_at_run_time(pair, server):
    r = _post(server, "/v1/deltas", {"name": "b2", "path": str(pair["b"])})
    assert r.status_code == 201 and r.json()["id"] == "b2"
    c = _client(server)
    assert "b2" in [m.id for m in c.models.list().data]
    out = c.completions.create(model="b2", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert out.choices[0].text == _reference(pair, "b", PROMPTS[0], 10)
    assert _post(server, "/v1/deltas", {"name": "b2", "path": str(pair["b"])}).status_code == 409
    r = _post(server, "/v1/deltas", {"name": "x", "path": str(pair["foreign"])})
    assert r.status_code == 400 and r.json()["error"]["code"] == "base_mismatch"
    assert "another base" in r.json()["error"]["message"]
    r = _post(server, "/v1/deltas", {"name": "x", "path": str(pair["dir"] / "missing.delta.safetensors")})
    assert r.status_code == 400 and "no such delta file" in r.json()["error"]["message"]
    assert httpx.delete(server.url + "/v1/deltas/b2", timeout=30).json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="b2", prompt="w5", max_tokens=2)
    assert httpx.delete(server.url + "/v1/deltas/b2", timeout=30).status_code == 404
    assert httpx.delete(server.url + "/v1/deltas/base", timeout=30).status_code == 400
    deadline = time.monotonic() + 10  # the engine unloads b2 at its next pass
    while "b2" in httpx.get(server.url + "/health", timeout=30).json()["loaded"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "b2" not in httpx.get(server.url + "/health", timeout=30).json()["loaded"]
    # the others still answer as before
    assert c.completions.create(model="a", prompt=PROMPTS[0], max_tokens=8, temperature=0).choices[0].text == \
        _reference(pair, "a", PROMPTS[0], 8)


def _slowed(app, seconds: float):
    """Make each decode step of the app's engine take at least ``seconds`` (to hold requests in flight)."""
    batch = app.state.server.engine.batch
    step = batch.step

    def slow(*a, **kw):
        time.sleep(seconds)
        return step(*a, **kw)

    batch.step = slow


def _runs_to_the_end(server, body):
    """The seeded request ``body`` samples no end-of-text token: only the test can end it early."""
    r = _post(server, "/v1/completions", {**body, "stream": False}).json()
    assert r["choices"][0]["finish_reason"] == "length", r


def test_full_queue_answers_429_and_recovers(pair):
    app = build_app(pair["base"], {"a": pair["a"]}, max_batch=1, max_queue=1)
    _slowed(app, 0.05)
    with ServerThread(app) as s:
        body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 30, "temperature": 0}
        results = []
        threads = [threading.Thread(target=lambda: results.append(_post(s, "/v1/completions", body)))
                   for _ in range(2)]
        for t in threads:  # one running, one waiting ...
            t.start()
            time.sleep(0.3)
        r = _post(s, "/v1/completions", body)  # ... and no room for a third
        assert r.status_code == 429 and "retry later" in r.json()["error"]["message"]
        for t in threads:
            t.join(60)
        assert [x.status_code for x in results] == [200, 200]
        assert _post(s, "/v1/completions", {**body, "max_tokens": 2}).status_code == 200


def test_client_disconnect_mid_stream_leaves_others_unaffected(pair):
    app = build_app(pair["base"], {"a": pair["a"], "b": pair["b"]}, max_batch=4)
    _slowed(app, 0.02)
    with ServerThread(app) as s:
        engine = app.state.server.engine
        other = {}
        t = threading.Thread(target=lambda: other.update(r=_post(s, "/v1/completions", {
            "model": "b", "prompt": PROMPTS[1], "max_tokens": 25, "temperature": 0})))
        body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 50, "temperature": 1.0, "seed": 0, "stream": True}
        _runs_to_the_end(s, body)
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            t.start()
            assert r.status_code == 200
            next(r.iter_lines())  # one event, then hang up
        t.join(60)
        assert other["r"].status_code == 200
        assert other["r"].json()["choices"][0]["text"] == _reference(pair, "b", PROMPTS[1], 25)
        deadline = time.monotonic() + 10
        while engine.stats()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine.stats()
        assert stats["running"] == 0 and stats.get("cancelled", 0) == 1
        with pytest.raises(httpx.ReadTimeout):  # a non-streaming client that gives up is noticed too
            _post(s, "/v1/completions", {**body, "stream": False}, timeout=0.5)
        deadline = time.monotonic() + 10
        while engine.stats().get("cancelled", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["cancelled"] == 2 and engine.stats()["running"] == 0
        assert _post(s, "/v1/completions", {"model": "a", "prompt": "w5", "max_tokens": 2}).status_code == 200


def test_cli_parses_serve(tmp_path):
    args = build_parser().parse_args(["serve", "base/", "--delta", "chat=a.delta.safetensors", "--delta", "code=b.ds",
                                      "--port", "0", "--max-batch", "4", "--max-queue", "2", "--base-bits", "8"])
    assert args.delta == [("chat", "a.delta.safetensors"), ("code", "b.ds")]
    assert (args.max_batch, args.max_queue, args.base_bits, args.host) == (4, 2, 8, "127.0.0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "base/", "--delta", "no-name.delta.safetensors"])



def test_removing_a_delta_ends_its_running_requests(pair):
    app = build_app(pair["base"], {"a": pair["a"], "b": pair["b"]}, max_batch=4)
    _slowed(app, 0.02)
    with ServerThread(app) as s:
        body = {"model": "a", "prompt": PROMPTS[0], "max_tokens": 50, "temperature": 1.0, "seed": 0, "stream": True}
        _runs_to_the_end(s, body)
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            next(lines)
            assert httpx.delete(s.url + "/v1/deltas/a", timeout=30).status_code == 200
            events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
        assert "was removed" in events[-1]["error"]["message"]
        r = _post(s, "/v1/completions", {"model": "b", "prompt": PROMPTS[2], "max_tokens": 6, "temperature": 0})
        assert r.json()["choices"][0]["text"] == _reference(pair, "b", PROMPTS[2], 6)


def test_deltacomp_serve_command_starts_answers_and_stops(pair):
    import os
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port (the command binds it itself, moments later)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "deltacomp.cli", "serve", str(pair["base"]), "--delta", f"a={pair['a']}",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                models = httpx.get(url + "/v1/models", timeout=5).json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert [m["id"] for m in models["data"]] == ["base", "a"]
        r = httpx.post(url + "/v1/completions", json={"model": "a", "prompt": PROMPTS[0], "max_tokens": 8,
                                                      "temperature": 0}, timeout=30)
        assert r.json()["choices"][0]["text"] == _reference(pair, "a", PROMPTS[0], 8)
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def test_quantized_base_serves_like_generate(pair):
    pytest.importorskip("bitsandbytes")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized layers cannot be fingerprinted; fp32 -> fp16 casts on CPU
        app = build_app(pair["base"], {"a": pair["a"], "b": pair["b"]}, base_bits=8)
        want = deltacomp.generate(pair["base"], [pair["a"], pair["b"]], [PROMPTS[0], PROMPTS[1], PROMPTS[2]], 10,
                                  prompt_delta=[0, 1, -1], base_bits=8)
    with ServerThread(app) as s:
        got = [_post(s, "/v1/completions", {"model": m, "prompt": p, "max_tokens": 10, "temperature": 0}).json()
               for m, p in zip(("a", "b", "base"), PROMPTS[:3])]
    assert [g["choices"][0]["text"] for g in got] == want
