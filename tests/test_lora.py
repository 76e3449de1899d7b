"""LoRA export: PEFT loads the adapter and its outputs match base + the low-rank delta."""
from __future__ import annotations

import json

import pytest
import torch

import deltacomp
from deltacomp.lora import export_lora, export_lora_from_delta

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


@pytest.fixture
def lowrank_pair(tmp_path):
    base = _tiny()
    base.save_pretrained(tmp_path / "base")
    ft = _tiny()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in ft.named_parameters():
            if "layers" in n and p.dim() == 2:
                p.add_(torch.randn(p.shape[0], 3, generator=g) @ torch.randn(3, p.shape[1], generator=g) * 0.02)
        ft.model.layers[0].input_layernorm.weight.add_(0.1)  # LoRA cannot carry this: must be reported
    ft.save_pretrained(tmp_path / "ft")
    return tmp_path / "base", tmp_path / "ft", base, ft


def _expected_logits(base_dir, adapter_dir, ids):
    """Base + B @ A added by hand in float32 (no PEFT involved)."""
    from safetensors.torch import load_file

    model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    sd = dict(model.named_parameters())
    t = load_file(str(adapter_dir / "adapter_model.safetensors"))
    with torch.no_grad():
        for k in t:
            if k.endswith("lora_A.weight"):
                mod = k[len("base_model.model."):-len(".lora_A.weight")]
                sd[mod + ".weight"].add_(t[k.replace("lora_A", "lora_B")].float() @ t[k].float())
        return model(ids).logits


def test_export_lora_loads_in_peft(tmp_path, lowrank_pair):
    base_dir, ft_dir, _, ft = lowrank_pair
    rep = export_lora(base_dir, ft_dir, tmp_path / "lora", rank=3, dtype=torch.float32, progress=False)
    assert rep["modules"] == 14 and set(rep["ranks"].values()) == {3}
    assert rep["not_carried"] == ["model.layers.0.input_layernorm.weight"]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 3 and cfg["lora_alpha"] == 3
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "lora")
    ids = torch.tensor([[1, 7, 9, 20, 33]])
    with torch.no_grad():
        got = model(ids).logits
        # the deltas are exactly rank 3: the adapter reproduces the fine-tune's linear layers
        ft_no_norm = transformers.AutoModelForCausalLM.from_pretrained(ft_dir, dtype=torch.float32)
        ft_no_norm.model.layers[0].input_layernorm.weight.sub_(0.1)
        torch.testing.assert_close(got, ft_no_norm(ids).logits, atol=2e-4, rtol=1e-3)
        torch.testing.assert_close(got, _expected_logits(base_dir, tmp_path / "lora", ids), atol=1e-5, rtol=1e-5)


def test_export_lora_from_delta_file_with_rank_pattern(tmp_path, lowrank_pair):
    base_dir, ft_dir, _, _ = lowrank_pair
    delta = tmp_path / "d.delta.safetensors"
    deltacomp.compress(base_dir, ft_dir, delta, method="lowrank:rank=2", rules=["mlp\\.=lowrank:rank=3"],
                       progress=False)
    rep = export_lora_from_delta(delta, tmp_path / "lora", dtype=torch.float32)
    assert sorted(set(rep["ranks"].values())) == [2, 3]
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"] == cfg["rank_pattern"]
    assert "model.layers.0.input_layernorm.weight" in rep["not_carried"]
    model = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), tmp_path / "lora")
    ids = torch.tensor([[1, 7, 9, 20, 33]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, _expected_logits(base_dir, tmp_path / "lora", ids),
                                   atol=1e-5, rtol=1e-5)
    # and the adapter is the file's own decoded delta
    df = deltacomp.load_delta(delta)
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    name = "model.layers.1.mlp.up_proj"
    torch.testing.assert_close(t[f"base_model.model.{name}.lora_B.weight"] @ t[f"base_model.model.{name}.lora_A.weight"],
                               df.decode(name + ".weight"), atol=1e-5, rtol=1e-4)


def test_export_lora_refuses_bad_rank(tmp_path, lowrank_pair):
    base_dir, ft_dir, _, _ = lowrank_pair
    with pytest.raises(deltacomp.SettingsError, match="--rank must be >= 1"):
        export_lora(base_dir, ft_dir, tmp_path / "lora", rank=0, progress=False)


def test_cli_export_lora(tmp_path, lowrank_pair, capsys):
    from deltacomp.cli import main

    base_dir, ft_dir, _, _ = lowrank_pair
    assert main(["export-lora", str(base_dir), str(ft_dir), "-o", str(tmp_path / "lora"), "--rank", "3", "-q"]) == 0
    out = capsys.readouterr().out
    assert "14 LoRA modules, rank 3" in out and "input_layernorm" in out
    assert main(["export-lora", str(base_dir), "-o", str(tmp_path / "x")]) == 2
    assert "needs BASE FINETUNED" in capsys.readouterr().err
