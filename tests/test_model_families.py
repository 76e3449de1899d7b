"""Model families other than Llama: tensor names transformers renames or merges on load (GPT-NeoX's head,
Mixtral's experts), decoder layers under another name (GPT-2, Bloom, OPT), GPT-2's Conv1D, MoE routers,
and `--method auto` with an unchanged linear. Tiny random models built with transformers in the test."""
from __future__ import annotations

import pytest
import torch

from conftest import finetune_of, llama_tensors, write_folder

transformers = pytest.importorskip("transformers")

from deltacomp import api  # noqa: E402
from deltacomp.calibrate.streamed import decoder_layers  # noqa: E402
from deltacomp.errors import ModelLayoutError, SettingsError  # noqa: E402
from deltacomp.plan import Plan  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, head_dim=8)
FAMILY = {"gpt_neox": {}, "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
          "bloom": dict(n_layer=2, n_head=4),
          "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64), "opt": dict(ffn_dim=64, word_embed_proj_dim=32)}


def _config(family: str):
    return transformers.AutoConfig.for_model(family, **{**TINY, **FAMILY[family]})


def _pair(tmp_path, family: str):
    """(base folder, fine-tune folder): a random model and a copy with every 2-D weight moved a little."""
    cfg = _config(family)
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            if p.dim() >= 2:
                p.add_(0.05 * p.std() * torch.randn(p.shape, generator=g))
    base.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft"


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _keeps_experts_apart(base) -> bool:
    """True when the installed transformers loads Mixtral's experts under their checkpoint names (4.x);
    5.x merges them into one tensor per layer. Asked of transformers itself, not of deltacomp."""
    return "model.layers.0.block_sparse_moe.experts.0.w1.weight" in dict(_load(base).named_parameters())


def _load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("name", ["gpt_neox.embed_in.weight", "embed_out.weight", "output.weight",
                                  "model.tok_embeddings.weight", "model.layers.0.block_sparse_moe.gate.weight",
                                  "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.shared_expert_gate.weight",
                                  "model.layers.3.mlp.router.weight"])
def test_embeddings_heads_and_routers_stay_exact_by_default(name):
    assert Plan("svd-mixed", [], 8.0).assign(name, (8, 32), 2, is_zero=False).codec == "raw"


@pytest.mark.parametrize("name", ["model.layers.0.mlp.gate_proj.weight", "transformer.h.0.attn.c_attn.weight",
                                  "model.layers.0.block_sparse_moe.experts.0.w1.weight",
                                  "model.layers.0.attention.output.weight"])
def test_projections_are_compressed_by_default(name):
    assert Plan("svd-mixed", [], 8.0).assign(name, (8, 32), 2, is_zero=False).codec == "svd-mixed"


def test_auto_with_an_unchanged_linear(tmp_path):
    b = llama_tensors(0)
    f = finetune_of(b, 1, touch=lambda n: "layers" in n and "layers.1.self_attn.q_proj" not in n)
    base, ft = write_folder(tmp_path / "base", b), write_folder(tmp_path / "ft", f)
    out = tmp_path / "auto.dcz"
    api.compress(base, ft, out, method="auto", ratio=8, progress=False)
    with api.load_delta(out) as df:
        assert df.params["model.layers.1.self_attn.q_proj.weight"].codec == "zero"
        got = dict(api.iter_reconstructed(base, df))
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], f["model.layers.1.self_attn.q_proj.weight"])


@pytest.mark.parametrize("family,prefix", [("gpt2", "transformer.h"), ("bloom", "transformer.h"),
                                           ("opt", "model.decoder.layers"), ("gpt_neox", "gpt_neox.layers"),
                                           ("mixtral", "model.layers")])
def test_decoder_layers_of_each_family(family, prefix):
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(_config(family))
    name, layers = decoder_layers(model)
    assert (name, len(layers)) == (prefix, 2)


def test_a_head_renamed_on_load_is_applied_and_served(tmp_path):
    """GPT-NeoX checkpoints name the head embed_out; transformers 5 loads it as lm_head."""
    from deltacomp.serve.patch import patch_model, unpatch_model

    base, ft = _pair(tmp_path, "gpt_neox")
    out = tmp_path / "d.dcz"
    api.compress(base, ft, out, method="bitdelta", rules=[r"embed_out=raw"], progress=False)
    rec = api.reconstruct(base, out, tmp_path / "rec", progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(_load(rec), ids)
    model = api.apply_delta_(_load(base), out)
    torch.testing.assert_close(_logits(model, ids), want, rtol=0, atol=1e-5)
    model = patch_model(_load(base), out)
    torch.testing.assert_close(_logits(model, ids), want, rtol=1e-4, atol=1e-4)
    unpatch_model(model)
    torch.testing.assert_close(_logits(model, ids), _logits(_load(base), ids), rtol=0, atol=0)


def test_merged_experts_evaluate_through_the_checkpoint_and_refuse_serving(tmp_path):
    """Mixtral's per-expert matrices become one tensor per layer on load: eval reconstructs the fine-tune
    instead; applying or serving in place is refused in one line, naming the tensor."""
    from deltacomp.eval.metrics import load_model
    from deltacomp.serve.patch import patch_model

    base, ft = _pair(tmp_path, "mixtral")
    out = tmp_path / "d.dcz"
    api.compress(base, ft, out, method="svd-mixed", ratio=4, progress=False)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(0))
    want = _logits(_load(api.reconstruct(base, out, tmp_path / "rec", progress=False)), ids)
    torch.testing.assert_close(_logits(load_model(base, delta=out), ids), want, rtol=0, atol=0)
    if _keeps_experts_apart(base):  # a transformers that loads experts as they are stored (4.x)
        torch.testing.assert_close(_logits(patch_model(_load(base), out), ids), want, rtol=1e-4, atol=1e-4)
    else:
        with pytest.raises(ModelLayoutError, match=r"experts\.\d+\.w\d\.weight: MixtralForCausalLM holds it merged"):
            patch_model(_load(base), out)


def test_calibration_runs_on_transformer_h_layers(tmp_path):
    from deltacomp.calibrate import calibrate_layerwise

    base, ft = _pair(tmp_path, "bloom")
    src, dst = tmp_path / "d.dcz", tmp_path / "c.dcz"
    api.compress(base, ft, src, method="svd-mixed", ratio=4, progress=False)
    calib = torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    rep = calibrate_layerwise(base, ft, src, dst, calib, progress=False)
    assert rep["tensors"] == 8  # 4 linears per Bloom layer, 2 layers
    assert rep["output_error_calibrated"] < rep["output_error_data_free"]


def test_calibration_refuses_conv1d_layers_in_one_line(tmp_path):
    from deltacomp.calibrate import calibrate_layerwise

    base, ft = _pair(tmp_path, "gpt2")
    src = tmp_path / "d.dcz"
    api.compress(base, ft, src, method="svd-mixed", ratio=4, progress=False)
    calib = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.raises(SettingsError, match=r"transformer\.h\.0\.attn\.c_attn\.weight\) are not the weight of a "
                                            r"torch\.nn\.Linear.*Conv1D layers are not supported"):
        calibrate_layerwise(base, ft, src, tmp_path / "c.dcz", calib, progress=False)


def test_end_to_end_calibration_refuses_merged_experts_before_any_stage(tmp_path):
    from deltacomp.calibrate.distill import check_end_to_end

    base, ft = _pair(tmp_path, "mixtral")
    src = tmp_path / "d.dcz"
    api.compress(base, ft, src, method="svd-mixed", ratio=4, progress=False)
    if _keeps_experts_apart(base):
        pytest.skip("this transformers keeps the experts apart: nothing to refuse")
    with pytest.raises(SettingsError, match=r"calibration \(tune\): model\.layers\.0\.block_sparse_moe\.experts\.0\."
                                            r"w\d\.weight: MixtralForCausalLM merges it"):
        check_end_to_end(ft, src, "tune")
    llama = tmp_path / "llama"
    b = llama_tensors(0)
    base, ft = write_folder(llama / "base", b), write_folder(llama / "ft", finetune_of(b, 1))
    api.compress(base, ft, llama / "d.dcz", method="svd-mixed", ratio=4, progress=False)
    check_end_to_end(ft, llama / "d.dcz", "tune")  # nothing merged: no error
