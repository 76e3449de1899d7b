"""Findings of a second red-team pass, over the surfaces the first one (test_hostile_redteam.py,
test_cli_redteam.py) left out: the HTTP server, compress-many, export-lora, sweep, the Python API and the
environment. Each used to end in a 500 or an "internal error" for a user's mistake, a stalled engine, an
unbounded read, a silently wrong file or a silent overwrite; each is now one typed error line, refused
before any work, or served as asked."""
from __future__ import annotations

import json
import re
import threading

import pytest
import torch

import deltacomp
from deltacomp import lora
from deltacomp.cli import main
from deltacomp.errors import NonFiniteError, SettingsError
from deltacomp.serve.sampling import SamplingParams, TextTracker, sample
from conftest import finetune_of, llama_config, llama_tensors, word_model, word_pair, word_tokenizer

transformers = pytest.importorskip("transformers")

UP = "model.layers.1.mlp.up_proj.weight"
_model = word_model


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, base, fine-tune, bitdelta delta, held-out text): tiny tied Llamas with a word tokenizer."""
    root = tmp_path_factory.mktemp("redteam2")
    return (root, *word_pair(root))


def _one_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "internal error" not in err[0] and "Traceback" not in err[0], err[0]
    return err[0]


# -- 1. serve: sampling settings a client sends ------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1e-45, 1e-300])
def test_a_temperature_near_zero_samples_the_greedy_token(temperature):
    """Was a 500 "probability tensor contains either inf, nan" (in a decode step: for every row of the
    batch, whoever sent it): the logits over 1e-45 overflowed, and 1e-300 is 0 in float32."""
    logits = torch.tensor([1.0, 5.0, -3.0, 4.0])
    params = SamplingParams(max_tokens=1, temperature=temperature)
    assert sample(logits, params, params.generator()) == 1


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**30])
def test_a_seed_out_of_torchs_range_is_refused(seed):
    """Was a 500 "Overflow when unpacking long long" from the engine thread."""
    with pytest.raises(SettingsError, match=f"seed must be an integer in .*got {seed}"):
        SamplingParams(max_tokens=1, temperature=1.0, seed=seed)
    for ok in (2**64 - 1, -(2**63)):
        SamplingParams(max_tokens=1, temperature=1.0, seed=ok).generator()


def test_a_huge_stop_string_does_not_stall_the_engine():
    """A 1 MB stop string stalled the engine thread (every tenant's requests) for minutes: each token
    compared every prefix of the stop string with the text's tail, the string's length squared."""
    tok = word_tokenizer(128)
    tracker = TextTracker(tok, ("w" * 400_000,))
    done, sent = threading.Event(), []

    def run():
        for t in tok.encode("w5 w6 w7 w8", add_special_tokens=False):
            tracker.push(t)
            sent.append(tracker.take())
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert done.wait(3), "taking text with a long stop string took over 3 s"
    assert "".join(sent + [tracker.take(final=True)]).split() == ["w5", "w6", "w7", "w8"]


@pytest.fixture(scope="module")
def client(made):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from deltacomp.serve.server import build_app

    _, base, _, delta, _ = made
    app = build_app(base, {"a": delta}, max_batch=4, max_queue=8)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def _post(client, body, path="/v1/completions"):
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@pytest.mark.parametrize("body,status,match", [
    ({"temperature": 1e-45}, 200, None),
    ({"temperature": 1.0, "seed": 2**64}, 400, "seed must be an integer"),
    ({"n": 0}, 400, "n must be 1"),
    ({"stop": ["w" * 100_000] * 5}, 400, r"stop must be up to 4 non-empty strings, got 5 \(0 empty\)"),
])
def test_sampling_requests_over_http(client, body, status, match):
    r = _post(client, {"model": "a", "prompt": "w5 w6", "max_tokens": 3, **body})
    assert r.status_code == status, r.text
    if match:
        assert len(r.text) < 400 and re.search(match, r.json()["error"]["message"])


def test_a_body_without_a_length_is_bounded(client):
    """A chunked body (no Content-Length) went around the 8 MB limit: 40 MB were read into memory and
    served. It is now read up to the limit and refused (413); a small one is served as before."""
    def body(megabytes: int):
        yield b'{"model": "a", "prompt": "w5", "max_tokens": 2'
        for _ in range(megabytes):
            yield b" " * 2**20
        yield b"}"

    for path in ("/v1/completions", "/v1/deltas"):
        r = client.post(path, content=body(40), headers={"content-type": "application/json"})
        assert r.status_code == 413 and "over the limit" in r.json()["error"]["message"], r.text
    r = client.post("/v1/completions", content=body(1), headers={"content-type": "application/json"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


# -- 2. the environment ---------------------------------------------------------------------------------
def test_a_bad_fused_setting_is_one_line(made, capsys, monkeypatch):
    """DELTACOMP_FUSED=maybe was "internal error (ValueError ...); this is a bug" at the first forward pass
    (and a 500 on every request of a server); it is a SettingsError, and serve refuses it at start-up."""
    from deltacomp.serve import dispatch

    _, base, _, delta, _ = made
    monkeypatch.setenv("DELTACOMP_FUSED", "maybe")
    with pytest.raises(SettingsError, match="DELTACOMP_FUSED='maybe': expected one of auto, always, never"):
        dispatch.mode()
    assert main(["generate", str(base), "--delta", str(delta), "--prompt", "w5 w6 w7", "--prompt", "w8",
                 "--max-new-tokens", "2", "-q"]) == 2
    assert "DELTACOMP_FUSED='maybe'" in _one_line(capsys)
    from deltacomp.serve import server

    monkeypatch.setattr(server, "check_folder", lambda *a: pytest.fail("the model was read first"))
    with pytest.raises(SettingsError, match="DELTACOMP_FUSED"):
        server.build_app(base, {"a": delta})


# -- 3. compress-many -----------------------------------------------------------------------------------
def test_compress_many_checks_ray_settings_before_any_work(made, tmp_path, capsys):
    """--ray --ray-cpus -1 started Ray and ended in "internal error (ValueError: Resource quantities must
    be nonnegative ...)"."""
    _, base, ft, _, _ = made
    argv = ["compress-many", str(base), str(ft), "-o", str(tmp_path / "out"), "-m", "bitdelta", "-q", "--ray"]
    for extra, want in ((["--ray-cpus", "-1"], "--ray-cpus must be an integer, 1 or more, got -1"),
                        (["--ray-cpus", "0"], "--ray-cpus must be"),
                        (["--ray-retries", "-3"], "--ray-retries must be an integer, 0 or more, got -3"),
                        (["--ray-threads", "0"], "--ray-threads must be")):
        assert main(argv + extra) == 2
        assert want in _one_line(capsys)
    assert not (tmp_path / "out").exists()


# -- 4. export-lora -------------------------------------------------------------------------------------
def test_export_lora_refuses_a_nonfinite_weight(made, tmp_path, capsys):
    """Wrote an adapter of NaN factors with exit 0."""
    root, base, _, _, _ = made
    t = finetune_of(llama_tensors(0), 5)
    t[UP][0, 0] = float("nan")
    bad = _model(tmp_path / "ftnan", t)
    with pytest.raises(NonFiniteError, match=f"{bad}: {UP}: 1 of 6144 values are NaN or Inf"):
        lora.export_lora(base, bad, tmp_path / "lora", progress=False)
    assert main(["export-lora", str(base), str(bad), "-o", str(tmp_path / "lora"), "-q"]) == 2
    assert UP in _one_line(capsys)
    assert not (tmp_path / "lora").exists()


def test_export_lora_refuses_factors_beyond_the_dtype(made, tmp_path):
    """A delta whose factors pass float16's range wrote Inf into the adapter."""
    _, base, _, _, _ = made
    t = llama_tensors(0)
    t[UP] = (t[UP].float() + 1e12).to(torch.bfloat16)
    big = _model(tmp_path / "big", t)
    with pytest.raises(SettingsError, match=f"{UP}: its LoRA factors hold .* beyond float16's range"):
        lora.export_lora(base, big, tmp_path / "lora", dtype=torch.float16, progress=False)
    assert not (tmp_path / "lora").exists()
    lora.export_lora(base, big, tmp_path / "lora", dtype=torch.float32, progress=False)


def test_export_lora_refuses_another_architecture(made, tmp_path, capsys):
    """compress refused a fine-tune whose config names another architecture; export-lora wrote it."""
    _, base, _, _, _ = made
    config = {**llama_config(), "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    other = _model(tmp_path / "other", finetune_of(llama_tensors(0), 6), config)
    assert main(["export-lora", str(base), str(other), "-o", str(tmp_path / "lora"), "-q"]) == 2
    assert "model_type is 'gpt2' in the fine-tune, 'llama' in the base" in _one_line(capsys)
    assert not (tmp_path / "lora").exists()
    with pytest.warns(UserWarning, match="--allow-mismatch"):
        lora.export_lora(base, other, tmp_path / "lora", progress=False, allow_mismatch=True)
    assert (tmp_path / "lora" / "adapter_config.json").is_file()


# -- 5. sweep -------------------------------------------------------------------------------------------
@pytest.fixture
def no_compress(monkeypatch):
    from deltacomp import api

    monkeypatch.setattr(api, "compress", lambda *a, **k: pytest.fail("compressed before refusing"))


@pytest.mark.parametrize("methods,ratios,want", [
    ("lowrank,lowrank", "4", "lowrank @4.0 and lowrank @4.0 would both write deltas/lowrank-r4"),
    ("lowrank", "4,4.0000001", "lowrank @4.0 and lowrank @4.0000001 would both write"),
])
def test_sweep_refuses_two_points_writing_one_file(made, tmp_path, capsys, no_compress, methods, ratios, want):
    """Each later point overwrote the earlier one's file, and the table showed the last file's scores
    under every label."""
    _, base, ft, _, text = made
    out = tmp_path / "sw"
    assert main(["sweep", str(base), str(ft), "--methods", methods, "--ratios", ratios, "-o", str(out),
                 "--text", str(text), "--ctx", "32", "-q"]) == 2
    assert want in _one_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize("extra,want", [
    (["--max-tokens", "1"], "max_tokens must be >= 2, got 1"),
    (["--stride", "40"], "stride must be in 1..ctx=32, got 40"),
    (["--cache-dir", "FILE"], "--cache-dir .*: exists and is not a folder"),
])
def test_sweep_checks_evaluate_settings_before_compressing(made, tmp_path, capsys, no_compress, extra, want):
    """These were refused by evaluate, after every point had been compressed."""
    _, base, ft, _, text = made
    out = tmp_path / "sw"
    extra = [str(text) if a == "FILE" else a for a in extra]
    assert main(["sweep", str(base), str(ft), "--methods", "bitdelta", "--ratios", "8", "-o", str(out),
                 "--text", str(text), "--ctx", "32", "-q", *extra]) == 2
    assert re.search(want, _one_line(capsys))
    assert not out.exists()


def test_sweep_does_not_silently_replace_an_earlier_sweep(made, tmp_path, capsys, monkeypatch):
    import importlib

    sweep_mod = importlib.import_module("deltacomp.eval.sweep")
    _, base, ft, _, text = made
    out = tmp_path / "sw"
    out.mkdir()
    (out / "results.json").write_text("{}")
    argv = ["sweep", str(base), str(ft), "--methods", "bitdelta", "--ratios", "8", "-o", str(out),
            "--text", str(text), "--ctx", "32", "-q"]
    monkeypatch.setattr(sweep_mod, "evaluate", lambda *a, **k: pytest.fail("ran before refusing"))
    assert main(argv) == 2
    assert f"{out / 'results.json'}: exists" in _one_line(capsys)
    assert (out / "results.json").read_text() == "{}" and not (out / "deltas").exists()
    monkeypatch.undo()
    assert main(argv + ["--overwrite", "--max-tokens", "40"]) == 0
    assert json.loads((out / "results.json").read_text())["deltas"][0]["method"] == "bitdelta"


# -- 6. the Python API ----------------------------------------------------------------------------------
def test_api_wrong_types_are_settings_errors(made, tmp_path):
    """Each was a TypeError (or, for fused, silently taken as True)."""
    _, base, ft, delta, _ = made
    with pytest.raises(SettingsError, match="rules must be a list of REGEX=METHOD strings, got 5"):
        deltacomp.compress(base, ft, tmp_path / "x.delta.safetensors", rules=5, progress=False)
    with pytest.raises(SettingsError, match="rules must be a list of REGEX=METHOD strings, got 3"):
        deltacomp.compress_many(base, [ft], tmp_path / "many", rules=3, progress=False)
    assert not (tmp_path / "x.delta.safetensors").exists() and not (tmp_path / "many").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base))
    with pytest.raises(SettingsError, match="fused must be True, False or None"):
        deltacomp.patch_model(model, delta, fused="maybe")
    with pytest.raises(SettingsError, match="give a list of delta files"):
        deltacomp.generate(base, None, ["w5"])


def test_a_delta_that_fails_to_load_answers_instead_of_hanging(made, client, monkeypatch):
    """An error other than a DeltacompError while the engine loaded a delta (an OSError reading it, a bug)
    left the request taken from the queue but never answered: the client waited forever."""
    engine = client.app.state.server.engine
    reg = engine.registry
    _, _, _, delta, _ = made
    reg.add("b", delta)

    def broken(tenants):
        raise OSError("disk gone")

    monkeypatch.setattr(engine, "_repatch", broken)
    box = {}
    worker = threading.Thread(target=lambda: box.update(r=_post(client, {"model": "b", "prompt": "w5"})), daemon=True)
    worker.start()
    worker.join(20)
    assert "r" in box, "the request was never answered"
    assert box["r"].status_code == 500 and "disk gone" in box["r"].json()["error"]["message"]
    monkeypatch.undo()
    reg.remove("b")
    assert _post(client, {"model": "a", "prompt": "w5", "max_tokens": 2}).status_code == 200
