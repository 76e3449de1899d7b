"""Which codec is best for a tensor at a given size, measured and as each distortion estimate predicts it.

On a bundled pair: for a few linears spread over the layers and kinds, each codec encodes the delta at
about the tensor's share of a ``--ratio`` budget (svd-mixed and lowrank at the ratio, bitdelta with one mask
and a tensor or per-row scale, ternary at the largest density that fits). Each single-tensor perturbation
(that tensor's delta replaced by the candidate's, everything else at the fine-tune) gets its
KL(fine-tune || perturbed) measured on held-out text, and every estimate of auto's:

- output:      trace(E H E^T) (--auto-sensitivity none)
- channel:     1/2 sum_i f_i (E H E^T)_ii, per-channel Fisher, labels sampled (--auto-sensitivity sampled)
- kfac:        1/2 trace(G E H E^T), G = the full Fisher of the linear's outputs (not offered: N x N per linear)
- sequence:    1/2 sum_w <E, J_w>^2, each window's weight gradient (--auto-sensitivity sequence)

What matters for auto is whether an estimate orders the codecs of one tensor as the measured KL does (auto
picks among them) and how far off it is by codec (a bias towards one codec buys it bytes it does not
deserve): the JSON has every row, the pairwise agreement within tensors and measured / predicted by codec.

Usage: PYTHONPATH=. python benchmarks/sensitivity_codecs.py [--pair shakespeare] [--tokens 2048] [--out F]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from deltacomp import zoo
from deltacomp.calibrate import seqfisher
from deltacomp.calibrate.data import load_calibration
from deltacomp.checkpoint import open_checkpoint
from deltacomp.codecs import get_codec
from deltacomp.codecs.base import Encoded
from deltacomp.eval.metrics import build_reference, load_model, plan_windows, tokenize
from sensitivity import kl_with  # benchmarks/sensitivity.py, beside this script

TENSORS = [(1, "self_attn.v_proj"), (4, "mlp.down_proj"), (8, "self_attn.q_proj"), (12, "mlp.gate_proj"),
           (16, "self_attn.o_proj"), (20, "mlp.up_proj"), (26, "self_attn.k_proj"), (29, "mlp.down_proj")]
ESTIMATES = ("weight", "output", "channel", "kfac", "sequence")


def output_fisher(model, ids: torch.Tensor, names: list[str], seed: int = 0):
    """H = x^T x / T and the full output Fisher G = g^T g / T per linear (labels sampled), float64."""
    mods = {n: model.get_submodule(n.removesuffix(".weight")) for n in names}
    H = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in mods.items()}
    G = {n: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for n, m in mods.items()}
    hooks = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))]
    for n, m in mods.items():
        def pre(_m, args, h=H[n]):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            h.add_(x.T @ x)

        def post(_m, _a, out, g_=G[n]):
            def on_grad(g):
                g = g.detach().reshape(-1, g.shape[-1]).double()
                g_.add_(g.T @ g)
            out.register_hook(on_grad)
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    gen = torch.Generator().manual_seed(seed)
    model.eval().requires_grad_(False)
    try:
        for s in range(0, ids.shape[0], 4):
            b = ids[s:s + 4]
            with torch.enable_grad():
                logp = torch.log_softmax(model(input_ids=b, use_cache=False).logits.float(), -1)
                with torch.no_grad():
                    t = torch.multinomial(logp.detach().reshape(-1, logp.shape[-1]).exp(), 1, generator=gen)
                (-logp.gather(-1, t.reshape(b.shape).unsqueeze(-1)).sum()).backward()
    finally:
        for h in hooks:
            h.remove()
    tokens = ids.numel()
    return {n: H[n] / tokens for n in names}, {n: G[n] / tokens for n in names}


def candidates(delta: torch.Tensor, ratio: float) -> list[tuple[str, dict]]:
    share = delta.numel() * 2 / ratio
    out = [("svd-mixed", {"ratio": ratio}), ("lowrank", {"ratio": ratio})]
    if ratio <= 16:
        out += [("bitdelta", {}), ("bitdelta", {"scale": "row"})]
    ternary = get_codec("ternary")
    fits = [d for d in (0.005, 0.01, 0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.3)
            if ternary.encode(delta, density=d).nbytes <= 1.05 * share]
    if fits:
        out.append(("ternary", {"density": fits[-1]}))
    return out


def run(pair_name: str, tokens: int, ratio: float, samples: int, seq_len: int) -> dict:
    pair = zoo.ensure_pair(pair_name)
    base, ft = Path(pair.base), Path(pair.finetuned)
    torch.manual_seed(0)
    model = load_model(ft)
    names = [f"model.layers.{layer}.{kind}.weight" for layer, kind in TENSORS]
    calib = load_calibration(zoo.PAIRS[pair_name].recipe.corpus, ft, samples, seq_len)
    H, G = output_fisher(model, calib.ids, names)
    ids = tokenize(ft, pair.heldout)[:tokens + 1]
    windows = plan_windows(int(ids.numel()), 256)
    rows = []
    with tempfile.TemporaryDirectory(prefix="sens-codecs-") as tmp, open_checkpoint(base) as bck:
        store = seqfisher.collect(model, calib.ids, set(names), tmp)
        model.requires_grad_(False)
        ref = build_reference(model, ids, windows, Path(tmp) / "ref", progress=False)
        for name in names:
            param = model.get_parameter(name)
            keep = param.detach().clone()
            b = bck.get(name).to(torch.float32)
            delta = keep - b
            grads = store[name].reshape(store.windows, -1).double()
            for codec_name, settings in candidates(delta, ratio):
                codec = get_codec(codec_name)
                enc = codec.encode(delta, **settings)
                dec = codec.decode(Encoded(enc.codec, enc.shape, enc.tensors, enc.params)).reshape(delta.shape)
                kl = kl_with(model, param, b + dec, ids, windows, ref)
                e = (delta - dec).double()
                eh = e @ H[name]
                per_row = (eh * e).sum(1)
                rows.append({"tensor": name, "codec": codec_name, "settings": settings, "nbytes": enc.nbytes,
                             "kl": kl, "weight": float((e ** 2).sum()), "output": float(per_row.sum()),
                             "channel": 0.5 * float((torch.diagonal(G[name]) * per_row).sum()),
                             "kfac": 0.5 * float(((G[name] @ e) * eh).sum()),
                             "sequence": 0.5 * float(((grads @ e.reshape(-1)) ** 2).sum())})
                r = rows[-1]
                print(f"{name:42s} {codec_name:9s} {enc.nbytes:>8d} B  KL {kl:.2e}  channel {r['channel']:.2e}  "
                      f"kfac {r['kfac']:.2e}  sequence {r['sequence']:.2e}", file=sys.stderr)
        store.close()
    return {"pair": pair_name, "ratio": ratio, "heldout_tokens": int(ids.numel()) - 1,
            "calibration": calib.describe(), "agreement_within_tensors": _agreement(rows, names),
            "measured_over_predicted_by_codec": _bias(rows), "rows": rows}


def _agreement(rows: list[dict], names: list[str]) -> dict[str, float]:
    """Per estimate: the share of same-tensor candidate pairs it orders as the measured KL does."""
    out = {}
    for k in ESTIMATES:
        agree = total = 0
        for name in names:
            rs = [r for r in rows if r["tensor"] == name]
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    total += 1
                    agree += (rs[i]["kl"] < rs[j]["kl"]) == (rs[i][k] < rs[j][k])
        out[k] = agree / max(1, total)
    return out


def _bias(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per estimate and codec: the median of measured KL / predicted (1 = unbiased; equal across codecs =
    no preference between them)."""
    out = {}
    for k in ESTIMATES[2:]:
        out[k] = {c: statistics.median(r["kl"] / r[k] for r in rows if r["codec"] == c and r[k] > 0)
                  for c in sorted({r["codec"] for r in rows})}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pair", default="shakespeare")
    ap.add_argument("--tokens", type=int, default=2048, help="held-out tokens scored (default 2048)")
    ap.add_argument("--ratio", type=float, default=16)
    ap.add_argument("--samples", type=int, default=32, help="calibration windows (default 32, as --calib)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default="benchmarks/results/sensitivity_codecs_shakespeare.json")
    a = ap.parse_args(argv)
    res = run(a.pair, a.tokens, a.ratio, a.samples, a.seq_len)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps({k: res[k] for k in ("agreement_within_tensors", "measured_over_predicted_by_codec")},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
