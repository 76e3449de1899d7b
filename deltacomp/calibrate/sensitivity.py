"""How much KL to the fine-tune a unit of output error in each linear costs: the diagonal Fisher of each
linear's outputs, for ``--method auto --calib``.

Second-order expansion around the fine-tune (where the KL and its gradient are zero): replacing a linear's
weight W by W - E moves its outputs by dy = -E x at every token, and the mean KL per token of the model's
next-token distributions becomes

    KL ~= 1/2 E_tokens[ dy^T F dy ],   F = E_{label ~ p_ft}[ g g^T ],  g = d log p_ft(label) / dy,

the Fisher of the output. Keeping its diagonal f_i = E[g_i^2] and taking g_i^2 and dy_i^2 as uncorrelated
over tokens gives

    KL ~= 1/2 sum_i f_i (E H E^T)_ii,   H = x^T x / tokens (the input Gram of ``input_grams``),

which auto uses as each candidate's distortion: it is in nats per token, additive over tensors (the
Lagrangian stays exact on the hulls), and weighs each output channel of each layer by what its error does
to the logits downstream.

One forward and one backward pass of the fine-tune per batch of calibration windows: a forward pre-hook on
each linear adds x^T x to its Gram, a hook on its output's gradient adds g^2 per output channel (one vector
per linear); no weight gradient is formed. ``labels="sampled"`` draws every position's label from the
fine-tune's own next-token distribution (seeded): the true Fisher, what the expansion needs. ``"empirical"``
uses the text's next tokens instead (the empirical Fisher: same cost, biased where the fine-tune is unsure;
kept for comparison, benchmarks/sensitivity.py).
"""
from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from ..errors import SettingsError
from .data import CalibData
from .distill import _load_model

LABELS = ("sampled", "empirical")


def describe(labels: str, calib: CalibData) -> dict[str, Any]:
    """What the file's ``source.auto.sensitivity`` records."""
    fisher = "true Fisher (labels sampled from the fine-tune)" if labels == "sampled" else \
        "empirical Fisher (the text's next tokens as labels)"
    return {"estimate": "KL ~= 1/2 sum_i f_i (E H E^T)_ii, f_i = E[(d log p / d y_i)^2] per output channel",
            "fisher": fisher, "labels": labels, "data": calib.describe()}


def output_sensitivities(finetuned: str | os.PathLike, calib: CalibData, names: set[str], *,
                         labels: str = "sampled", batch_size: int = 4, device: str | torch.device = "cpu",
                         seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(input Gram H, output Fisher diagonal f) per linear weight in ``names`` of the fine-tune, from one
    forward + backward pass over ``calib``'s windows; see ``accumulate``."""
    model = _load_model(finetuned, None, torch.float32).to(device)
    return accumulate(model, calib.ids, names, labels=labels, batch_size=batch_size, seed=seed)


def accumulate(model: torch.nn.Module, ids: Tensor, names: set[str], *, labels: str = "sampled",
               batch_size: int = 4, seed: int = 0) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``model``: a causal LM (``model(input_ids=...).logits``); ``ids`` (n, seq_len) token windows.
    Returns H = x^T x / tokens (in_features^2) and f = sum_tokens g^2 / labelled positions (out_features),
    float32 on the CPU, per linear weight name in ``names``. Every name must be a linear of the model."""
    if labels not in LABELS:
        raise SettingsError(f"calibration: sensitivity labels {labels!r} must be one of {', '.join(LABELS)}")
    ids = torch.as_tensor(ids)
    if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < (2 if labels == "empirical" else 1):
        raise SettingsError(f"calibration: the output sensitivity needs at least one window of "
                            f"{2 if labels == 'empirical' else 1}+ tokens (a next token to score), got token ids "
                            f"of shape {tuple(ids.shape)}; give a longer text or a larger --calib-len")
    mods = linears(model, names)
    dev = next(model.parameters()).device
    grams = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64, device=dev) for n, m in mods.items()}
    fish = {n: torch.zeros(m.out_features, dtype=torch.float64, device=dev) for n, m in mods.items()}
    hooks = [model.get_input_embeddings().register_forward_hook(lambda _m, _a, out: out.requires_grad_(True))]
    for n, m in mods.items():
        hooks.append(m.register_forward_pre_hook(_add_gram(grams[n])))
        hooks.append(m.register_forward_hook(_add_grad_squares(fish[n])))
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    tokens = labelled = 0
    was_training, needs = model.training, [p.requires_grad for p in model.parameters()]
    model.eval().requires_grad_(False)
    try:
        for s in range(0, ids.shape[0], batch_size):
            batch = ids[s:s + batch_size].to(dev)
            with torch.enable_grad():
                logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), dim=-1)
                if labels == "sampled":
                    with torch.no_grad():
                        flat = logp.detach().reshape(-1, logp.shape[-1]).exp()
                        target = torch.multinomial(flat, 1, generator=gen).reshape(batch.shape)
                else:  # the text's next token; the last position of a window has none
                    logp, target = logp[:, :-1], batch[:, 1:]
                loss = -logp.gather(-1, target.unsqueeze(-1)).sum()
                loss.backward()
            tokens += batch.numel()
            labelled += target.numel()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
        for p, r in zip(model.parameters(), needs):
            p.requires_grad_(r)
    return ({n: (g / tokens).float().cpu() for n, g in grams.items()},
            {n: (f / labelled).float().cpu() for n, f in fish.items()})


def linears(model: torch.nn.Module, names: set[str]) -> dict[str, torch.nn.Linear]:
    """The linear module of each weight name in ``names`` (sorted); refuses a name that is not one."""
    mods = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = sorted(set(names) - set(mods))
    if missing:
        raise SettingsError(f"calibration: {missing[0]} is not a linear layer of the model "
                            f"({len(missing)} such names)")
    return {n: mods[n] for n in sorted(names)}


def _add_gram(h: Tensor):
    """A forward pre-hook adding x^T x of the module's input to ``h`` (float64)."""
    def hook(_mod, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        h.add_(x.T @ x)
    return hook


def _add_grad_squares(f: Tensor):
    """A forward hook that makes the backward pass add sum_tokens (dL/dy)^2 of the module's output to ``f``."""
    def on_grad(g: Tensor) -> None:  # returns None: the gradient flows on unchanged
        f.add_((g.detach().double() ** 2).reshape(-1, g.shape[-1]).sum(0))

    def hook(_mod, _args, out):
        if out.requires_grad:
            out.register_hook(on_grad)
    return hook
