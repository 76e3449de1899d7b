"""Findings of a third red-team pass, over hostile or broken input model folders (the base and fine-tune
given to compress, reconstruct, eval, generate and serve): a pipe where the weights belong (the run blocked
forever), an index and its shards that disagree with each other or with a model.safetensors beside them
(deltacomp read one set of weights, transformers another), a config of zero layers (eval scored a model
without its layers), config, tokenizer and generation-config values transformers refuses with errors of
its own types (an "internal error ... this is a bug"), and a generation config the server parsed
unchecked. Each is now one CheckpointError line naming the file, refused before any work."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import deltacomp
from deltacomp import CheckpointError
from deltacomp.cli import main
from deltacomp.modelcheck import check_folder
from conftest import finetune_of, llama_config, llama_tensors, word_pair, write_folder

transformers = pytest.importorskip("transformers")
INDEX = "model.safetensors.index.json"
SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """(root, base, fine-tune, bitdelta delta, held-out text): tiny tied Llamas with a word tokenizer."""
    root = tmp_path_factory.mktemp("redteam3")
    return (root, *word_pair(root))


def _one_line(capsys, match: str) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert "internal error" not in err[0] and "Traceback" not in err[0], err[0]
    assert re.search(match, err[0]), err[0]
    return err[0]


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


# -- 1. a pipe where the weights belong ---------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "folder"])
def test_a_pipe_as_weights_is_refused_without_blocking(made, tmp_path, where):
    """Opening a FIFO to read it blocks until a writer comes (holding the GIL, so no signal or thread ended it):
    compress hung forever. A helper process opens the pipe after 10 s, so the unfixed code ends too."""
    root, base, _, _, _ = made
    folder = tmp_path / "ft"
    folder.mkdir()
    fifo = folder / "model.safetensors"
    os.mkfifo(fifo)
    given = fifo if where == "file" else folder
    helper = subprocess.Popen(["sh", "-c", f"sleep 10; exec 3<>'{fifo}'; sleep 1"])
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointError, match=f"{fifo}: not a regular file"):
            deltacomp.compress(base, given, tmp_path / "x.delta.safetensors", method="bitdelta", progress=False)
        assert time.monotonic() - start < 10
    finally:
        helper.kill()
        helper.wait()
    assert not (tmp_path / "x.delta.safetensors").exists()


def test_a_shard_that_is_a_folder_is_not_called_missing(made, tmp_path):
    root, base, _, _, _ = made
    ft = write_folder(tmp_path / "ft", finetune_of(llama_tensors(0), 1), shards=2)
    (ft / SHARD1).unlink()
    (ft / SHARD1).mkdir()
    with pytest.raises(CheckpointError, match=f"{SHARD1}: not a regular file"):
        deltacomp.compress(base, ft, tmp_path / "x.delta.safetensors", progress=False)


# -- 2. the index, its shards and a model.safetensors beside them -------------------------------------------
def _index(folder) -> dict:
    return json.loads((folder / INDEX).read_text())


def _tensor_in_both_shards(folder):
    """The first shard's first tensor also in the second shard, with other values (the index names shard 1)."""
    first = load_file(str(folder / SHARD1))
    second = load_file(str(folder / SHARD2))
    name = next(iter(first))
    second[name] = first[name] * 3
    save_file(second, str(folder / SHARD2))
    return name, SHARD1


def _tensor_the_index_leaves_out(folder):
    index = _index(folder)
    name = next(n for n, f in index["weight_map"].items() if f == SHARD2)
    del index["weight_map"][name]
    (folder / INDEX).write_text(json.dumps(index))
    return name, None


@pytest.mark.parametrize("edit", [_tensor_in_both_shards, _tensor_the_index_leaves_out])
def test_shards_that_disagree_with_their_index_are_refused(made, tmp_path, capsys, edit):
    """transformers loads every tensor of every shard (the last one wins a name given twice); deltacomp read
    only what the index names. A tensor in two shards was compressed from one and evaluated from the other; a
    tensor the index left out was loaded by transformers and silently dropped by deltacomp."""
    root, base, _, _, _ = made
    ft = write_folder(tmp_path / "ft", finetune_of(llama_tensors(0), 1), shards=2)
    name, mapped = edit(ft)
    said = f"maps it to {mapped}" if mapped else "does not name it"
    match = f"{ft / SHARD2}: holds tensor {re.escape(name)}, but {INDEX} {said}; the index and its shards disagree"
    with pytest.raises(CheckpointError, match=match):
        deltacomp.compress(base, ft, tmp_path / "x.delta.safetensors", progress=False)
    out = tmp_path / "x.delta.safetensors"
    assert main(["compress", str(base), str(ft), "-o", str(out), "-q"]) == 2
    _one_line(capsys, "the index and its shards disagree")
    assert not out.exists()


def test_an_index_and_a_single_file_together_are_refused(made, tmp_path):
    """transformers loads model.safetensors when both are present; deltacomp read the shards of the index."""
    root, base, _, _, _ = made
    t = finetune_of(llama_tensors(0), 1)
    ft = write_folder(tmp_path / "ft", t, shards=2)
    save_file({n: v * 2 for n, v in t.items()}, str(ft / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"{ft}: holds both model.safetensors and {INDEX}"):
        deltacomp.compress(base, ft, tmp_path / "x.delta.safetensors", progress=False)
    with pytest.raises(CheckpointError, match="ambiguous"):
        deltacomp.reconstruct(ft, made[3], tmp_path / "rec", progress=False)
    assert not (tmp_path / "rec").exists()
    (ft / "model.safetensors").unlink()
    deltacomp.compress(base, ft, tmp_path / "x.delta.safetensors", progress=False)  # the shards alone: fine


# -- 3. a config of zero layers -----------------------------------------------------------------------------
@pytest.mark.parametrize("layers", [0, -1])
def test_a_config_of_zero_layers_is_refused(made, tmp_path, capsys, layers):
    """The model built had no layers (an empty ModuleList), so no layer tensor of the weights matched a kind of
    parameter it holds: eval exited 0 with the scores of a fine-tune without its layers."""
    root, base, ft, delta, text = made
    bad = _copy(ft, tmp_path / "ft")
    (bad / "config.json").write_text(json.dumps({**llama_config(), "num_hidden_layers": layers}))
    match = f"config.json: num_hidden_layers={layers} leaves out model.layers.0."
    with pytest.raises(CheckpointError, match=match):
        check_folder(bad)
    assert main(["eval", str(base), str(bad), str(delta), "--text", str(text), "--ctx", "32",
                 "--max-tokens", "40", "-q"]) == 2
    _one_line(capsys, match)


# -- 4. values transformers refuses with errors of its own types ---------------------------------------------
CONFIGS = {
    "num_hidden_layers-null": ({"num_hidden_layers": None}, "config.json: .*num_hidden_layers.* expected int"),
    "tie-as-string": ({"tie_word_embeddings": "false"}, "config.json: .*tie_word_embeddings.* expected bool"),
    "heads-not-dividing": ({"num_attention_heads": 3}, "config.json: .*not a multiple of the number of attention"),
    "torch_dtype-garbage": ({"torch_dtype": "float99"}, "config.json: .*float99"),
}


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_generate_config_values_are_one_line(made, tmp_path, capsys, key):
    """generate loaded the tokenizer (which reads config.json) before checking the config: huggingface_hub's
    StrictDataclassError and transformers' AttributeError were "internal error ... this is a bug"."""
    root, base, _, delta, _ = made
    edit, match = CONFIGS[key]
    bad = _copy(base, tmp_path / "base")
    (bad / "config.json").write_text(json.dumps({**llama_config(), **edit}))
    assert main(["generate", str(bad), "--delta", str(delta), "--prompt", "w5 w6", "--max-new-tokens", "2", "-q"]) == 2
    _one_line(capsys, re.escape(str(bad)) + "/" + match)


@pytest.mark.parametrize("fname,text,command,match", [
    ("config.json", '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "generate",
     "RecursionError"),
    ("tokenizer_config.json", "[1]", "generate", "cannot load its tokenizer .*AttributeError"),
    ("generation_config.json", '{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "eval",
     "cannot load its model .*RecursionError"),
    ("tokenizer_config.json", json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": "x"}),
     "generate", "cannot load its tokenizer .*TypeError"),
])
def test_broken_folder_files_are_one_line(made, tmp_path, capsys, fname, text, command, match):
    """A JSON nested too deep (RecursionError), a list where an object belongs (AttributeError), a string
    where a number belongs (TypeError, raised only when the tokenizer encodes): each was an internal error."""
    root, base, ft, delta, words = made
    bad = _copy(base, tmp_path / "base")
    (bad / fname).write_text(text)
    argv = (["generate", str(bad), "--delta", str(delta), "--prompt", "w5 w6", "--max-new-tokens", "2", "-q"]
            if command == "generate" else
            ["eval", str(bad), str(ft), str(delta), "--text", str(words), "--ctx", "32", "--max-tokens", "40", "-q"])
    assert main(argv) == 2
    _one_line(capsys, re.escape(str(bad)) + ".*" + match)


def test_generation_config_token_id_beyond_int64(made, tmp_path, capsys):
    """An eos_token_id past int64 was an OverflowError from inside transformers' generate (exit 1); LLaMA's
    original pad_token_id -1 stays accepted."""
    root, base, _, delta, _ = made
    bad = _copy(base, tmp_path / "base")
    (bad / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 10**30}))
    argv = ["generate", str(bad), "--delta", str(delta), "--prompt", "w5 w6", "--max-new-tokens", "2", "-q"]
    assert main(argv) == 2
    _one_line(capsys, f"{bad}: its generation config .* eos_token_id=1000000000000000000000000000000; a token id")
    (bad / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": -1}))
    assert main(argv) == 0


# -- 5. serve: the base's generation config, and the fine-tune's files carried in a delta -------------------
@pytest.mark.parametrize("text,match", [
    ("garbage", "not valid JSON"),
    ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}", "not valid JSON .*RecursionError"),
    ("[]", "must hold a JSON object, not list"),
    (json.dumps({"eos_token_id": "x"}), "eos_token_id='x' is not a token id"),
])
def test_serve_checks_generation_configs(made, tmp_path, text, match):
    """The server parsed the base's generation_config.json (transformers only warns about a broken one) and the
    one a delta carries with a bare json.loads and int(): a JSONDecodeError or ValueError at start-up."""
    pytest.importorskip("fastapi")
    from deltacomp.serve.server import build_app

    root, base, ft, _, _ = made
    bad = _copy(ft, tmp_path / "ft")
    (bad / "generation_config.json").write_text(text)
    delta = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, bad, delta, method="bitdelta", progress=False)
    with pytest.raises(CheckpointError, match=f"{delta}: its generation_config.json: {match}"):
        build_app(base, {"a": delta}, max_batch=2, max_queue=2)
    if text.startswith(("[", '{"a"')):
        return  # a list, or nested too deep: transformers refuses the base itself (hf_folder's one line)
    with pytest.raises(CheckpointError, match=f"{bad}/generation_config.json: {match}"):
        build_app(bad, {}, max_batch=2, max_queue=2)


def test_serve_refuses_a_delta_carrying_a_broken_tokenizer(made, tmp_path):
    pytest.importorskip("fastapi")
    from deltacomp.serve.server import build_app

    root, base, ft, _, _ = made
    bad = _copy(ft, tmp_path / "ft")
    (bad / "tokenizer.json").write_text("{}")
    delta = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base, bad, delta, method="bitdelta", progress=False)
    with pytest.raises(CheckpointError, match=f"{delta}: the fine-tune's tokenizer files it carries .*KeyError"):
        build_app(base, {"a": delta}, max_batch=2, max_queue=2)


# -- 6. a tokenizer whose ids the model has no rows for ------------------------------------------------------
def test_token_ids_beyond_the_vocab_are_one_line(made, tmp_path, capsys):
    """A tokenizer of 300 words beside a model of 128 rows: an IndexError from the embedding inside the forward
    pass ("internal error") in eval and in generate."""
    from conftest import word_tokenizer

    root, base, ft, delta, _ = made
    words = tmp_path / "words.txt"
    words.write_text(" ".join(f"w{4 + (i * 7) % 290}" for i in range(300)))
    bad_ft, bad_base = _copy(ft, tmp_path / "ft"), _copy(base, tmp_path / "base")
    word_tokenizer(300).save_pretrained(bad_ft)
    word_tokenizer(300).save_pretrained(bad_base)
    assert main(["eval", str(base), str(bad_ft), str(delta), "--text", str(words), "--ctx", "32",
                 "--max-tokens", "40", "-q"]) == 2
    _one_line(capsys, f"the tokenizer of {bad_ft}: token id \\d+ is outside the vocab_size 128 of {bad_ft}/config.json")
    assert main(["generate", str(bad_base), "--delta", str(delta), "--prompt", "w250 w5", "--max-new-tokens", "2",
                 "-q"]) == 2
    _one_line(capsys, f"the tokenizer of {bad_base}: token id 250 is outside the vocab_size 128")
    from deltacomp.eval.metrics import evaluate

    with pytest.raises(CheckpointError, match="the token ids given: token id -1 is outside"):
        evaluate(base, ft, [delta], [5, 6, -1, 7], ctx=32, progress=False)


# -- 7. tensor names a delta file cannot hold ---------------------------------------------------------------
@pytest.mark.parametrize("name,match", [("", "is 0 characters long"), ("x" * 2000, "is 2000 characters long"),
                                        ("model.extra\nweight", "holds a control character")])
def test_tensor_names_a_delta_cannot_hold_are_refused_naming_the_finetune(made, tmp_path, name, match):
    """Refused by the writer's check of its own output: "<delta> (being written): metadata params: ...; the file
    is damaged or was edited", which blamed the delta file for a name in the fine-tune."""
    root, base, _, _, _ = made
    t = finetune_of(llama_tensors(0), 1)
    t[name] = torch.ones(3)
    ft = write_folder(tmp_path / "ft", t)
    out = tmp_path / "x.delta.safetensors"
    with pytest.raises(CheckpointError, match=f"{ft}: tensor name .* {match}"):
        deltacomp.compress(base, ft, out, method="bitdelta", progress=False)
    assert not out.exists()


# -- 8. a config claiming bitsandbytes-quantized weights over plain ones --------------------------------------
@pytest.mark.parametrize("flag,marker", [("load_in_8bit", "SCB"), ("load_in_4bit", "absmax")])
def test_a_config_claiming_bnb_weights_over_plain_ones_is_refused(made, tmp_path, capsys, flag, marker):
    """check_folder left a config with a quantization_config unchecked; over plain bf16 weights the first forward
    pass failed inside bitsandbytes ("internal error (AttributeError: 'Parameter' object has no attribute
    'CB')") in eval and generate. A folder transformers saved quantized still passes."""
    root, base, _, delta, _ = made
    bad = _copy(base, tmp_path / "base")
    (bad / "config.json").write_text(json.dumps({**llama_config(), "quantization_config": {
        "quant_method": "bitsandbytes", flag: True}}))
    match = (f"quantization_config says bitsandbytes {flag}, but no tensor of the weights holds its scales "
             f"\\(\\*\\.{marker}\\)")
    with pytest.raises(CheckpointError, match=match):
        check_folder(bad)
    assert main(["generate", str(bad), "--delta", str(delta), "--prompt", "w5", "--max-new-tokens", "2", "-q"]) == 2
    _one_line(capsys, match)
    pytest.importorskip("bitsandbytes")
    quant = transformers.BitsAndBytesConfig(**{flag: True})
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), quantization_config=quant, dtype=torch.float32)
    model.save_pretrained(tmp_path / "quantized")
    assert check_folder(tmp_path / "quantized") is not None


# -- 9. float tensors of more than two dimensions, and dimensions no delta file holds -------------------------
@pytest.mark.parametrize("shape", [(4, 3, 5), (2, 2, 3, 5), (0, 3, 5)])
@pytest.mark.parametrize("changed", [True, False])
def test_float_tensors_of_three_or_more_dimensions_round_trip(made, tmp_path, shape, changed):
    """Stacked experts ([experts, out, in]) or a convolution's kernel in both base and fine-tune: every method
    ended in "internal error (ValueError: raw: delta must be 1-D or 2-D ...)". They are stored whole."""
    root, base_dir, _, _, _ = made
    name = "model.layers.0.mlp.experts.weight"
    b = llama_tensors(0)
    f = finetune_of(b, 1)
    b[name] = torch.ones(shape)
    f[name] = torch.ones(shape) * (2 if changed else 1)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    out = tmp_path / "x.delta.safetensors"
    deltacomp.compress(base, ft, out, method="svd-mixed", progress=False)
    deltacomp.reconstruct(base, out, tmp_path / "rec", progress=False)
    got = load_file(str(tmp_path / "rec" / "model.safetensors"))[name]
    assert got.shape == shape and torch.equal(got, f[name])


def test_an_empty_tensor_with_a_dimension_above_the_bound_names_the_finetune(made, tmp_path):
    """A 0-element tensor may claim any dimension in a safetensors header (it costs no bytes); one above 2**40
    was refused by the writer's check of its own output, blaming the delta file as damaged."""
    from forge import read_header, write_header

    root, base, ft, _, _ = made
    bad = _copy(ft, tmp_path / "ft")
    header, data = read_header(bad / "model.safetensors")
    header["model.extra.weight"] = {"dtype": "BF16", "shape": [0, 2**62], "data_offsets": [len(data), len(data)]}
    write_header(bad / "model.safetensors", header, data)
    out = tmp_path / "x.delta.safetensors"
    match = f"{bad}: model.extra.weight: shape \\[0, {2**62}\\] has a dimension above"
    with pytest.raises(CheckpointError, match=match):
        deltacomp.compress(base, bad, out, method="bitdelta", progress=False, allow_mismatch=True)
    assert not out.exists()


# -- 10. a model whose forward pass is NaN -------------------------------------------------------------------
def test_eval_refuses_a_model_whose_outputs_are_nan(made, tmp_path, capsys):
    """A fine-tune config.json with "rms_norm_eps": NaN (valid to transformers) makes every logit NaN: eval exited
    0 with a NaN perplexity and a KL of 0.00000 and top-1 agreement 0 for the base and every delta."""
    root, base, ft, delta, text = made
    bad = _copy(ft, tmp_path / "ft")
    (bad / "config.json").write_text(json.dumps(llama_config()).replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": NaN'))
    assert main(["eval", str(base), str(bad), str(delta), "--text", str(text), "--ctx", "32", "--max-tokens", "40",
                 "-q"]) == 2
    _one_line(capsys, "eval: the fine-tune model's forward pass gives NaN log-probs on tokens 0:32")
