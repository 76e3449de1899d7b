"""How well each distortion estimate of ``--method auto`` ranks candidates by their measured KL.

On the bundled shakespeare pair: single-tensor perturbations (one linear's delta replaced by one codec
candidate's reconstruction, every other tensor at the fine-tune), spread over layers, tensor kinds and
codecs (seeded). Each one's KL(fine-tune || perturbed) is measured on held-out text; then the Spearman rank
correlation of that KL with each estimate:

- weight:      ||E||_F^2, E = D - D^ (auto's data-free distortion)
- weight_rel:  ||E||_F^2 / ||W_ft||_F^2 (a data-free sensitivity candidate)
- output:      trace(E H E^T), H = the layer's input Gram on the calibration windows
- fisher:      1/2 sum_i f_i (E H E^T)_ii, f = the output Fisher diagonal, labels sampled (auto's default)
- fisher_mean: 1/2 mean(f) trace(E H E^T) (one scalar per layer)
- fisher_emp:  as fisher with the empirical Fisher (the text's next tokens as labels)

Usage: PYTHONPATH=. python benchmarks/sensitivity.py [--n 36] [--tokens 2048] [--out FILE]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from deltacomp import zoo
from deltacomp.calibrate.data import load_calibration
from deltacomp.calibrate.sensitivity import accumulate
from deltacomp.checkpoint import open_checkpoint
from deltacomp.codecs import available, get_codec
from deltacomp.codecs.base import Encoded
from deltacomp.errors import SettingsError
from deltacomp.eval.metrics import build_reference, load_model, plan_windows, score_against, tokenize

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ESTIMATES = ("weight", "weight_rel", "output", "fisher", "fisher_mean", "fisher_emp")


def pick(model, n: int, ratio: float, seed: int) -> list[tuple[str, str, dict]]:
    """``n`` (tensor, codec, settings): tensors spread over the layers and kinds, codecs in turn, a random
    rung of each codec's ``candidates`` ladder at the tensor's share of a ``ratio`` budget."""
    rng = random.Random(seed)
    names = [f"{n_}.weight" for n_, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n_.split(".")[-1] in KINDS]
    layers = sorted({int(x.split(".layers.")[1].split(".")[0]) for x in names})
    chosen = [f for f in names if int(f.split(".layers.")[1].split(".")[0]) in layers[::max(1, len(layers) // 8)]]
    rng.shuffle(chosen)
    codecs = [c for c in available() if get_codec(c).candidates((64, 64), 512)]
    out = []
    for i, name in enumerate(chosen[:n]):
        shape = tuple(model.get_parameter(name).shape)
        codec = codecs[i % len(codecs)]
        ladder = get_codec(codec).candidates(shape, int(shape[0] * shape[1] * 2 / ratio))
        out.append((name, codec, rng.choice(ladder)))
    return out


def estimates(e: torch.Tensor, w: torch.Tensor, gram: torch.Tensor, f: torch.Tensor, f_emp: torch.Tensor) -> dict:
    e = e.double()
    rows = ((e @ gram.double()) * e).sum(1)
    return {"weight": float((e ** 2).sum()), "weight_rel": float((e ** 2).sum() / (w.double() ** 2).sum()),
            "output": float(rows.sum()), "fisher": 0.5 * float((f.double() * rows).sum()),
            "fisher_mean": 0.5 * float(f.double().mean() * rows.sum()),
            "fisher_emp": 0.5 * float((f_emp.double() * rows).sum())}


def kl_with(model, param: torch.Tensor, weight: torch.Tensor, ids, windows, ref) -> float:
    """KL(fine-tune || the model with ``param`` set to ``weight``) on the held-out windows; ``param`` is
    put back as it was."""
    keep = param.detach().clone()
    with torch.no_grad():
        param.copy_(weight)
    try:
        return score_against(model, ids, windows, ref, progress=False)["kl"]
    finally:
        with torch.no_grad():
            param.copy_(keep)


def run(n: int, tokens: int, ratio: float, seed: int, samples: int, seq_len: int) -> dict:
    pair = zoo.ensure_pair("shakespeare")
    base, ft = Path(pair.base), Path(pair.finetuned)
    torch.manual_seed(seed)
    model = load_model(ft)
    perts = pick(model, n, ratio, seed)
    names = {p[0] for p in perts}
    calib = load_calibration("shakespeare", ft, samples, seq_len)
    t0 = time.perf_counter()
    grams, fishers = accumulate(model, calib.ids, names, labels="sampled")
    t_fisher = time.perf_counter() - t0
    _, fishers_emp = accumulate(model, calib.ids, names, labels="empirical")
    ids = tokenize(ft, pair.heldout)[:tokens + 1]
    windows = plan_windows(int(ids.numel()), 256)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sens-") as tmp, open_checkpoint(base) as bck:
        ref = build_reference(model, ids, windows, Path(tmp) / "ref", progress=False)
        for name, codec_name, settings in perts:
            param = model.get_parameter(name)
            keep = param.detach().clone()
            b = bck.get(name).to(torch.float32)
            delta = keep - b
            codec = get_codec(codec_name)
            try:
                enc = codec.encode(delta, **settings)
            except (SettingsError, ValueError) as exc:
                print(f"skip {name} {codec_name} {settings}: {exc}", file=sys.stderr)
                continue
            dec = codec.decode(Encoded(enc.codec, enc.shape, enc.tensors, enc.params)).reshape(delta.shape)
            kl = kl_with(model, param, b + dec, ids, windows, ref)
            est = estimates(delta - dec, keep, grams[name], fishers[name], fishers_emp[name])
            rows.append({"tensor": name, "codec": codec_name, "settings": settings, "nbytes": enc.nbytes,
                         "kl": kl, **est})
            print(f"{name:45s} {codec_name:10s} {enc.nbytes:>9d} B  KL {kl:.3e}  fisher {est['fisher']:.3e}",
                  file=sys.stderr)
    kls = [r["kl"] for r in rows]
    spear = {k: float(spearmanr(kls, [r[k] for r in rows]).statistic) for k in ESTIMATES}
    ratio_pred = sorted(r["fisher"] / r["kl"] for r in rows if r["kl"] > 0)
    return {"pair": "shakespeare", "perturbations": len(rows), "heldout_tokens": int(ids.numel()) - 1,
            "calibration": calib.describe(), "budget_ratio_for_rungs": ratio, "seed": seed,
            "spearman_vs_measured_kl": spear,
            "fisher_predicted_over_measured_kl": {"median": ratio_pred[len(ratio_pred) // 2],
                                                  "min": ratio_pred[0], "max": ratio_pred[-1]},
            "fisher_pass_seconds": t_fisher, "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=36, help="perturbations (default 36)")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored (default 2048)")
    ap.add_argument("--ratio", type=float, default=16, help="the budget ratio the candidate ladders are cut at")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (default 32, as --calib)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per calibration window (default 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/sensitivity_shakespeare.json")
    a = ap.parse_args(argv)
    res = run(a.n, a.tokens, a.ratio, a.seed, a.samples, a.seq_len)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("perturbations", "spearman_vs_measured_kl",
                                          "fisher_predicted_over_measured_kl")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
