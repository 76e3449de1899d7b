"""End to end on the real bundled pair (SmolLM2-135M-Instruct + its Shakespeare fine-tune)."""
from __future__ import annotations

import pytest

import deltacomp
from deltacomp import zoo
from deltacomp.cli.demo import check_reconstruction, generate_sample

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    pair = zoo.ensure_pair("shakespeare", progress=False)
    out = tmp_path_factory.mktemp("real") / "bd.delta.safetensors"
    summary = deltacomp.compress(pair.base, pair.finetuned, out, method="bitdelta", progress=False)
    return pair, out, summary


def test_bitdelta_file_is_small(real):
    _, _, s = real
    assert s["ratio"] >= 10  # whole file vs the fine-tune's safetensors, both counted on disk
    assert s["compressed_tensors"]["bits_per_param"] <= 1.01
    assert s["by_codec"]["bitdelta"]["tensors"] == 210  # 30 layers x 7 projections


def test_reconstruction_is_exact_and_loads(real, tmp_path):
    pair, out, _ = real
    rec = deltacomp.reconstruct(pair.base, out, tmp_path / "rec", progress=False)
    check = check_reconstruction(pair.base, out, rec)
    assert check["max_abs_diff"] == 0.0 and check["tensors"] == 272
    text = generate_sample(rec, "To be, or not to be,", max_new_tokens=8)
    assert isinstance(text, str) and text.strip()


def test_eval_on_heldout_text(real):
    from deltacomp.eval import evaluate

    pair, out, _ = real
    ev = evaluate(pair.base, pair.finetuned, [out], text=pair.heldout, max_tokens=1024, progress=False,
                  weight_metrics=False)
    d = ev["deltas"][0]
    assert ev["finetuned"]["nll"] < ev["base"]["nll"]  # the fine-tune learned something
    assert 0 < d["kl"] < ev["base"]["kl"]              # bitdelta is closer to the fine-tune than the base is
    assert 0 < d["gain_recovered"] <= 1.2
