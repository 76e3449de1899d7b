"""The tune stage one decoder layer at a time (calibrate/blocktune.py): what --calib runs where the whole
model does not fit. Each layer's students learn the fine-tune's layer output; the codes and bytes stay."""
from __future__ import annotations

import pytest
import torch

import deltacomp
from deltacomp.calibrate.blocktune import METHOD, tune_blockwise

from test_calibrate import llama_pair  # noqa: F401  (a tiny HF pair with a tokenizer)

transformers = pytest.importorskip("transformers")


def _ids(n: int = 16, length: int = 24, seed: int = 0) -> torch.Tensor:
    from test_calibrate import VOCAB

    return torch.randint(2, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def files(llama_pair, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("blocktune")
    base, ft = llama_pair / "base", llama_pair / "ft"
    plain = root / "plain.delta.safetensors"
    deltacomp.compress(base, ft, plain, method="svd-mixed:ratio=6", progress=False)
    tuned = root / "tuned.delta.safetensors"
    report = tune_blockwise(base, ft, plain, tuned, _ids(), steps=40, lr=1e-2, progress=False)
    return base, ft, plain, tuned, report


def _logits(folder, ids: torch.Tensor, delta=None) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if delta is not None:
        deltacomp.apply_delta_(model, delta, progress=False)
    with torch.no_grad():
        return model(input_ids=ids).logits.double()


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> float:
    lt, ls = teacher.log_softmax(-1), student.log_softmax(-1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


def test_each_layer_moves_toward_the_fine_tune(files):
    """Every layer that trained lowered its held-out output error (or kept its stored encodings), and the
    tuned file is closer to the fine-tune's logits than the data-free one, on windows it never saw."""
    base, ft, plain, tuned, report = files
    layers = [r for r in report["per_layer"] if r["tensors"]]
    assert layers and report["layers"] == len(layers)
    for r in layers:
        assert (r["loss_after"] < r["loss_before"]) != r["kept"], r
    assert report["loss_after"] < report["loss_before"]
    ids = _ids(8, 24, seed=7)
    teacher = _logits(ft, ids)
    assert _kl(teacher, _logits(base, ids, tuned)) < 0.95 * _kl(teacher, _logits(base, ids, plain))


def test_codes_and_bytes_stay_and_the_step_is_recorded(files):
    _, _, plain, tuned, report = files
    a, b = deltacomp.load_delta(plain), deltacomp.load_delta(tuned)
    assert sum(i.nbytes for i in a.params.values()) == sum(i.nbytes for i in b.params.values())  # tensors' bytes
    changed = 0
    for name, info in a.params.items():
        ta, tb = a.raw_tensors(name), b.raw_tensors(name)
        assert ta.keys() == tb.keys()
        for f in ta:
            assert ta[f].dtype == tb[f].dtype and ta[f].shape == tb[f].shape
            if info.codec != "svd-mixed" or "_q" in f:
                assert torch.equal(ta[f], tb[f]), f"{name}.{f}"
            else:
                changed += not torch.equal(ta[f], tb[f])
    assert changed > 0 and report["tensors"] > 0
    step = b.source["calibration"][-1]
    assert step["method"] == METHOD and step["steps"] == 40 and step["checked_on"] == "held-out windows"
    from deltacomp.summary import summary_text

    assert f"calibration: {METHOD} (40 steps per layer, mse " in summary_text(deltacomp.summarize(b))  # inspect


def test_a_layer_that_gets_worse_keeps_its_encodings(llama_pair, tmp_path):  # noqa: F811
    """A learning rate that wrecks training: every layer keeps its stored encodings, so the file's tensors
    are the input's, byte for byte."""
    base, ft = llama_pair / "base", llama_pair / "ft"
    plain, out = tmp_path / "p.delta.safetensors", tmp_path / "o.delta.safetensors"
    deltacomp.compress(base, ft, plain, method="svd-mixed:ratio=6", progress=False)
    report = tune_blockwise(base, ft, plain, out, _ids(8), steps=5, lr=50.0, progress=False)
    assert report["kept_layers"] == report["layers"] > 0 and report["tensors"] == 0
    a, b = deltacomp.load_delta(plain), deltacomp.load_delta(out)
    for name in a.params:
        for f, t in a.raw_tensors(name).items():
            assert torch.equal(t, b.raw_tensors(name)[f]), f"{name}.{f}"


def test_bad_steps_refused(files, tmp_path):
    base, ft, plain, _, _ = files
    with pytest.raises(deltacomp.SettingsError, match="positive integer"):
        tune_blockwise(base, ft, plain, tmp_path / "x.delta.safetensors", _ids(4), steps=0, lr=1e-2)
    assert not (tmp_path / "x.delta.safetensors").exists()
