"""Layer-by-layer calibration reads one decoder layer at a time (calibrate/streamed.py): the same results as
with the whole model loaded, never more than one layer in memory, and a clean fallback where the checkpoint's
names do not match the model's."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, finetune_of, llama_config, llama_tensors, load_causal_lm, write_folder
from safetensors.torch import save_file

import deltacomp
from deltacomp.calibrate import layerwise, streamed
from deltacomp.calibrate.data import from_ids


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def folders(tmp_path, request):
    cfg = {**llama_config(tied=request.param), "num_hidden_layers": 3}
    import conftest
    old, conftest.LAYERS = conftest.LAYERS, 3
    try:
        b = llama_tensors(0, tied=request.param)
    finally:
        conftest.LAYERS = old
    f = finetune_of(b, 1, scale=0.03)
    return write_folder(tmp_path / "base", b, cfg, shards=2), write_folder(tmp_path / "ft", f, cfg)


def _calib():
    return from_ids(torch.randint(4, VOCAB, (600,), generator=torch.Generator().manual_seed(5)), 16, 12)


def _whole(path, config_json, dtype, *, stream=True):
    return streamed.open_layered(path, config_json, dtype, stream=False)


def test_streamed_model_is_built_on_meta_and_materializes_one_module(folders):
    _, ft = folders
    with streamed.open_layered(ft, None, torch.float32) as lm:
        assert lm.streamed and len(lm.layers) == 3
        assert all(p.is_meta for p in lm.model.parameters())
        ref = load_causal_lm(ft)
        with lm.materialized(lm.layers[1]) as layer:
            for n, p in layer.named_parameters():
                assert torch.equal(p, ref.get_parameter(f"model.layers.1.{n}")), n
            assert all(p.is_meta for p in lm.layers[0].parameters())
        assert all(p.is_meta for p in lm.model.parameters())
        # the rotary frequencies are real buffers (computed at build time, not left on meta)
        assert not any(b.is_meta for b in lm.model.buffers())


def test_input_grams_streamed_equal_whole_model(folders, monkeypatch):
    _, ft = folders
    calib = _calib()
    names = {f"model.layers.{i}.{n}.weight" for i in range(3) for n in ("self_attn.q_proj", "mlp.down_proj")}
    names.discard("model.layers.2.mlp.down_proj.weight")
    got = layerwise.input_grams(ft, calib, names, batch_size=5)
    monkeypatch.setattr(layerwise, "open_layered", _whole)
    want = layerwise.input_grams(ft, calib, names, batch_size=5)
    assert set(got) == set(want) == names
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7)


def test_layerwise_calibration_streamed_is_identical_and_holds_one_layer(folders, tmp_path, monkeypatch):
    base, ft = folders
    src = tmp_path / "rtn.delta.safetensors"
    deltacomp.compress(base, ft, src, method="svd-mixed:groups=4:3+2:6:group_size=16", progress=False)
    live = []

    def count(_mod, _args):  # how many decoder layers hold real weights while a layer runs
        live.append(sum(not next(layer.parameters()).is_meta for layer in lm_box[0].layers))

    lm_box = []
    real_open = streamed.open_layered

    def spying_open(*a, **k):
        lm = real_open(*a, **k)
        lm_box.append(lm)
        for layer in lm.layers:
            layer.register_forward_pre_hook(count)
        return lm

    monkeypatch.setattr(layerwise, "open_layered", spying_open)
    out_s = tmp_path / "streamed.delta.safetensors"
    layerwise.calibrate_layerwise(base, ft, src, out_s, _calib(), progress=False)
    assert lm_box[0].streamed and live and max(live) == 1
    monkeypatch.setattr(layerwise, "open_layered", _whole)
    out_w = tmp_path / "whole.delta.safetensors"
    layerwise.calibrate_layerwise(base, ft, src, out_w, _calib(), progress=False)
    a, b = deltacomp.load_delta(out_s), deltacomp.load_delta(out_w)
    assert set(a.params) == set(b.params)
    for name in a.params:
        torch.testing.assert_close(a.decode(name), b.decode(name), rtol=0, atol=0)


def _renamed(ft, tmp_path, rename) -> tuple:
    """A copy of ``ft`` whose tensor names ``rename`` changes; (its folder, the reference model)."""
    odd = tmp_path / "odd"
    odd.mkdir()
    ref = load_causal_lm(ft)
    kept = {n: p.detach().clone() for n, p in ref.state_dict().items()
            if n != "lm_head.weight" or not ref.config.tie_word_embeddings}
    save_file({rename(n): p for n, p in kept.items()}, str(odd / "model.safetensors"))
    (odd / "config.json").write_text((ft / "config.json").read_text())
    return odd, ref


def test_renamed_checkpoint_falls_back_to_whole_load(folders, tmp_path):
    """A base-model checkpoint (no "model." prefix, which transformers maps) is not streamed: it loads the
    transformers way, with the checkpoint's weights."""
    odd, ref = _renamed(folders[1], tmp_path, lambda n: n.removeprefix("model."))
    with streamed.open_layered(odd, None, torch.float32) as lm:
        assert not lm.streamed  # names differ: loaded the transformers way instead of streamed
        torch.testing.assert_close(dict(lm.model.named_parameters())["model.embed_tokens.weight"],
                                   ref.model.embed_tokens.weight)


def test_unmappable_checkpoint_names_are_refused(folders, tmp_path):
    """Names transformers cannot map either ("transformer." in front) are refused in one line, where
    transformers would initialise every parameter at random."""
    odd, _ = _renamed(folders[1], tmp_path, lambda n: f"transformer.{n}")
    with pytest.raises(deltacomp.DeltacompError, match="would initialise them at random"):
        streamed.open_layered(odd, None, torch.float32)


def test_config_is_required_for_a_single_file(tmp_path, folders):
    _, ft = folders
    with pytest.raises(deltacomp.DeltacompError, match="needs its config.json"):
        streamed.open_layered(ft / "model.safetensors", None, torch.float32)
    cfg = json.loads((ft / "config.json").read_text())
    with streamed.open_layered(ft / "model.safetensors", json.dumps(cfg).encode(), torch.float32) as lm:
        assert lm.streamed and len(lm.layers) == 3
