"""On a GPU: a base model patched with packed deltas (the CUDA kernels serving every term) gives the
logits of the reconstructed fine-tune, for each codec, fp32 and bf16, decode and prefill shapes; and the
multi-tenant rows equal their single-delta models. Skipped without a CUDA device and the CUDA kernels."""
from __future__ import annotations

import pytest
import torch

import deltacomp
from deltacomp import serve as dnn
from deltacomp import ops
from conftest import finetune_of, llama_config, llama_tensors, load_causal_lm, write_folder  # noqa: E402

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and ops.CUDA_KERNELS_BUILT),
    reason="needs a CUDA device and deltacomp._C built with its CUDA kernels (a CUDA build of torch)")

METHODS = {"bit": "bitdelta", "tern": "ternary:density=0.3", "svd": "svd-mixed", "bitrow": "bitdelta:scale=row"}


@pytest.fixture(autouse=True)
def _kernels_on(monkeypatch):
    monkeypatch.setenv("DELTACOMP_CUDA_KERNELS", "1")


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """fp32 tiny Llama base (untied head); a fine-tune changing its layers; one delta per codec and its
    reconstructed folder."""
    tmp = tmp_path_factory.mktemp("cuda_serve")
    base = llama_tensors(0, tied=False, dtype=torch.float32)
    write_folder(tmp / "base", base, llama_config(tied=False))
    write_folder(tmp / "ft", finetune_of(base, 1, scale=0.05), llama_config(tied=False))
    out = {"dir": tmp}
    for key, method in METHODS.items():
        path = tmp / f"{key}.delta.safetensors"
        deltacomp.compress(tmp / "base", tmp / "ft", path, method=method, progress=False)
        out[key] = path
        out[f"rec_{key}"] = deltacomp.reconstruct(tmp / "base", path, tmp / f"rec_{key}", progress=False)
    return out


def _load(path, dtype=torch.float32):
    return load_causal_lm(path, dtype)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids.to("cuda")).logits.float().cpu()


IDS = torch.tensor([[1, 5, 9, 13, 40, 77, 8, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32],
                    [1, 90, 4, 33, 33, 12, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])


@pytest.mark.parametrize("key", list(METHODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patched_on_gpu_equals_reconstructed(pair, key, dtype):
    model = dnn.patch_model(_load(pair["dir"] / "base", dtype), pair[key]).to("cuda")
    rec = _load(pair[f"rec_{key}"], dtype).to("cuda")
    for ids in (IDS, IDS[:1, :1], IDS[:, :3]):  # prefill (M = 36: GEMM path), decode (M = 1), small M
        got, want = _logits(model, ids), _logits(rec, ids)
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        else:  # the patched model adds the delta unrounded, the reconstructed one rounds W to bf16
            assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max())


def test_multi_tenant_on_gpu(pair):
    keys = ["bit", "tern", "svd", "bitrow"]
    model = dnn.patch_model_multi(_load(pair["dir"] / "base"), [pair[k] for k in keys]).to("cuda")
    index = [0, 1, 2, 3, -1, 3, 0]
    ids = torch.randint(4, 96, (len(index), 5), generator=torch.Generator().manual_seed(0))
    dnn.set_delta_index(model, index)
    got = _logits(model, ids)
    base = _load(pair["dir"] / "base").to("cuda")
    for row, t in enumerate(index):
        single = base if t < 0 else dnn.patch_model(_load(pair["dir"] / "base"), pair[keys[t]]).to("cuda")
        torch.testing.assert_close(got[row:row + 1], _logits(single, ids[row:row + 1]), rtol=1e-4, atol=1e-4)
