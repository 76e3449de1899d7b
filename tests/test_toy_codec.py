"""A codec defined here, in the test, and registered: everything else (compress, inspect, reconstruct, eval,
patch_model, the multi-tenant path, meta sizing) must work with it without touching another file. This is
what "adding a codec touches one folder" means."""
from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor

import deltacomp
from deltacomp import serve
from deltacomp.codecs import Codec, Encoded, Setting, get_codec, register, unregister

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from conftest import word_tokenizer, load_causal_lm  # noqa: E402

VOCAB = 96


class ToyInt8Codec(Codec):
    """The delta rounded to int8 with one fp32 scale per row (max |row| / 127)."""

    name = "toy-int8"
    description = "int8 per-row absmax (a test codec)"
    fields = ("q", "scale")
    settings = (Setting("clip", float, 1.0, "fraction of max |row| mapped to 127",
                        check=lambda v: 0 < v <= 1, check_msg="must be in (0, 1]"),)

    def encode(self, delta: Tensor, **settings: Any) -> Encoded:
        self.check_input(delta)
        s = self.resolve_settings(settings)
        mat = delta.reshape(1, -1) if delta.dim() == 1 else delta
        scale = (mat.abs().amax(dim=1) * s["clip"] / 127).clamp_min(1e-12)
        q = torch.round(mat / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return Encoded(self.name, tuple(delta.shape), {"q": q, "scale": scale.float()}, dict(s))

    def decode(self, enc: Encoded) -> Tensor:
        t = enc.tensors
        return (t["q"].float() * t["scale"][:, None]).reshape(enc.shape)

    def meta_tensors(self, shape, settings):
        rows, k = (shape[0], shape[1]) if len(shape) == 2 else (1, shape[0])
        return {"q": torch.empty(rows, k, dtype=torch.int8, device="meta"),
                "scale": torch.empty(rows, dtype=torch.float32, device="meta")}

    def stats(self, enc: Encoded) -> dict[str, Any]:
        return {"saturated": int((enc.tensors["q"].abs() == 127).sum())}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    register(ToyInt8Codec, builtin=False)
    tmp = tmp_path_factory.mktemp("toy")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp / "base")
    word_tokenizer(VOCAB).save_pretrained(tmp / "base")
    for name, seed in (("ftA", 1), ("ftB", 2)):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            ft = transformers.LlamaForCausalLM(cfg)
            ft.load_state_dict(base.state_dict())
            for n, p in ft.named_parameters():
                if "layers" in n:
                    p.add_(torch.randn(p.shape, generator=g) * 0.05)
        ft.save_pretrained(tmp / name)
        word_tokenizer(VOCAB).save_pretrained(tmp / name)
    out = {"dir": tmp}
    for name in ("ftA", "ftB"):
        out[name] = tmp / f"{name}.delta.safetensors"
        out[f"summary_{name}"] = deltacomp.compress(tmp / "base", tmp / name, out[name], method="toy-int8:clip=1",
                                                    progress=False)
    yield out
    unregister(ToyInt8Codec.name)


def _load(path, dtype=torch.float32):
    return load_causal_lm(path, dtype)


IDS = torch.tensor([[1, 5, 9, 13, 40, 77, 8], [1, 90, 4, 33, 33, 12, 6]])


def test_compress_and_inspect(toy):
    s = toy["summary_ftA"]
    assert s["by_codec"]["toy-int8"]["tensors"] == 14  # 7 projections x 2 layers
    assert 3.5 < s["compressed_tensors"]["ratio"] < 4  # int8 of fp32, plus a 4-byte scale per row
    assert all("saturated" in t["stats"] for t in s["tensors"] if t["codec"] == "toy-int8")
    from deltacomp.cli import main

    assert main(["inspect", str(toy["ftA"])]) == 0


def test_exact_size_on_meta(toy):
    codec = get_codec("toy-int8")
    with deltacomp.load_delta(toy["ftA"]) as df:
        for name, info in df.params.items():
            if info.codec == "toy-int8":
                assert codec.exact_nbytes(info.shape, info.settings) == info.nbytes


def test_reconstruct_equals_base_plus_decoded(toy):
    rec = deltacomp.reconstruct(toy["dir"] / "base", toy["ftA"], toy["dir"] / "rec", progress=False)
    base, got = _load(toy["dir"] / "base").state_dict(), _load(rec).state_dict()
    with deltacomp.load_delta(toy["ftA"]) as df:
        for n in df.params:
            if df.params[n].codec == "toy-int8":
                torch.testing.assert_close(got[n], base[n] + df.decode(n), rtol=0, atol=1e-6)


def test_eval(toy):
    from deltacomp.eval import evaluate

    text = " ".join(f"w{4 + (i * 7) % 90}" for i in range(200))
    r = evaluate(toy["dir"] / "base", toy["dir"] / "ftA", [toy["ftA"]], text, ctx=32, progress=False)
    row = r["deltas"][0]
    assert row["weight_rel_error"] < 0.05 and row["kl"] < r["base"]["kl"]


def test_patch_model_and_multi_tenant(toy):
    want_a = _load(toy["dir"] / "ftA")(IDS).logits.detach()
    model = serve.patch_model(_load(toy["dir"] / "base"), toy["ftA"])
    assert sum(isinstance(m, serve.DeltaLinear) for m in model.modules()) == 14
    with torch.no_grad():
        one = model(IDS).logits
    torch.testing.assert_close(one, want_a, rtol=0.05, atol=0.05)  # int8 error only

    multi = serve.patch_model_multi(_load(toy["dir"] / "base"), [toy["ftA"], toy["ftB"]])
    assert sum(isinstance(m, serve.MultiDeltaLinear) for m in multi.modules()) == 14
    serve.set_delta_index(multi, [0, 1])
    with torch.no_grad():
        rows = multi(IDS).logits
    single_b = serve.patch_model(_load(toy["dir"] / "base"), toy["ftB"])
    with torch.no_grad():
        torch.testing.assert_close(rows[0], one[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(rows[1], single_b(IDS).logits[1], rtol=1e-5, atol=1e-5)
