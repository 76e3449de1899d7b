"""Model-level effect of the inexact int8-table path of bitdelta at one x row (``sign_matmul_tl``): the
bundled base patched with a bitdelta file twice (``patch_model``), once with the exact kernels
(DELTACOMP_SIGN_KERNEL=exact while patching) and once with the int8 tables (the default on AVX2), run
token by token with a KV cache over windows of held-out text, against the dense fine-tune on the same
windows. Reported as by ``lowrank_tl_kl.py``: KL(exact || int8) and top-1 agreement between the two, next
to the file's own KL(fine-tune || exact), so the tables' share of the error can be read off.

    deltacomp compress BASE FT --method bitdelta -o bitdelta.delta.safetensors
    PYTHONPATH=. taskset -c 1 python benchmarks/sign_tl_kl.py --delta bitdelta.delta.safetensors \\
        --tokens 4096 --out benchmarks/results/sign_tl_kl_shakespeare.json
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from deltacomp import zoo  # noqa: E402
from deltacomp.serve.generate import load_base  # noqa: E402
from deltacomp.serve.patch import patch_model  # noqa: E402
import lowrank_tl_kl  # noqa: E402
from lowrank_tl_kl import _stepwise_logprobs, _windows  # noqa: E402


def _patched(base: Path, delta: str, exact: bool):
    old = os.environ.get("DELTACOMP_SIGN_KERNEL")
    os.environ["DELTACOMP_SIGN_KERNEL"] = "exact" if exact else "tl"  # read when the terms are built
    try:
        return patch_model(load_base(base, torch.float32), delta)
    finally:
        if old is None:
            os.environ.pop("DELTACOMP_SIGN_KERNEL")
        else:
            os.environ["DELTACOMP_SIGN_KERNEL"] = old


def run(args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    zdir = zoo.cache_dir() / "zoo"
    base = Path(args.base) if args.base else zdir / "smollm2-135m-instruct"
    ft = Path(args.finetuned) if args.finetuned else zdir / "smollm2-135m-instruct-shakespeare-6fca8143e7"
    tok = AutoTokenizer.from_pretrained(str(base))
    ids = torch.tensor(tok(zoo.corpus_text(args.corpus, split="heldout"))["input_ids"], dtype=torch.long)
    dense = AutoModelForCausalLM.from_pretrained(str(ft), dtype=torch.float32).eval()
    models = {"exact": _patched(base, args.delta, True), "int8": _patched(base, args.delta, False)}
    res = lowrank_tl_kl.compare(_windows(ids, args.tokens, args.window), dense,
                                lambda mode, w: _stepwise_logprobs(models[mode], w), ("exact", "int8"))
    terms = [m for m in models["int8"].modules() if hasattr(m, "_tl_on")]
    res.update({"delta": str(args.delta), "corpus": args.corpus, "split": "heldout", "window": args.window,
                "bitdelta_terms": len(terms), "terms_with_tables": sum(bool(m._tl_on) for m in terms)})
    return res


if __name__ == "__main__":
    lowrank_tl_kl.main(run=run, doc=__doc__, what="a bitdelta")
