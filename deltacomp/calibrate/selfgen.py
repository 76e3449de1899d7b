"""Calibration windows the fine-tune writes itself: ``--calib self``.

For users without text of their own. Each window is sampled from the fine-tune, token by token, from its
BOS token (temperature 1, no top-k or top-p, seeded: the same model, sizes and seed give the same windows).
What deltacomp measures is KL(fine-tune || compressed), an expectation over the fine-tune's own next-token
distributions, so the fine-tune's samples are the contexts that measure it; they also follow whatever the
fine-tune learned (its domain, its format), which a generic corpus may not. Cost: one forward pass of the
whole model per token (with its KV cache), in batches of ``BATCH`` windows.
"""
from __future__ import annotations

import os

import torch

from ..errors import SettingsError
from ..progress import progress_bar
from .data import CalibData, _check_sizes
from .distill import _load_model

SELF = "self"
BATCH = 8  # windows generated together (their KV caches are held at once)


def sample_windows(finetuned: str | os.PathLike, n_samples: int, seq_len: int, seed: int = 0,
                   device: str | torch.device = "cpu", progress: bool = False) -> CalibData:
    """``n_samples`` windows of ``seq_len`` tokens sampled from the fine-tune (see the module)."""
    _check_sizes(n_samples, seq_len)
    model = _load_model(finetuned, None, torch.float32).to(device)
    ids = generate(model, n_samples, seq_len, seed=seed, progress=progress)
    return CalibData(ids, {"data": "self (sampled from the fine-tune from its BOS token, temperature 1)",
                           "seed": int(seed)})


@torch.no_grad()
def generate(model: torch.nn.Module, n_samples: int, seq_len: int, *, seed: int = 0,
             progress: bool = False) -> torch.Tensor:
    """(n_samples, seq_len) token ids: the BOS token, then seq_len - 1 tokens sampled from ``model``."""
    cfg = getattr(model, "config", None)
    bos = getattr(cfg, "bos_token_id", None)
    if bos is None:
        bos = getattr(cfg, "eos_token_id", None)
    if isinstance(bos, (list, tuple)):
        bos = bos[0] if bos else None
    if bos is None:
        raise SettingsError("--calib self: the fine-tune's config.json names no bos_token_id (nor eos_token_id) "
                            "to start sampling from; give --calib FILE")
    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out = []
    steps = progress_bar(range(0, n_samples, BATCH), desc="calibration: sampling from the fine-tune", unit="batch",
                         enable=progress)
    try:
        for start in steps:
            rows = min(BATCH, n_samples - start)
            ids = torch.full((rows, 1), int(bos), dtype=torch.int64, device=dev)
            kw, step = {}, ids
            for _ in range(seq_len - 1):
                res = model(input_ids=step, use_cache=True, **kw)
                # the cache, under the name this transformers uses for it ("cache" from 5.x)
                kw = next(({k: res[k]} for k in ("cache", "past_key_values") if res.get(k) is not None), {})
                probs = torch.softmax(res.logits[:, -1].float(), dim=-1)
                step = torch.multinomial(probs, 1, generator=gen)
                ids = torch.cat([ids, step], dim=1)
            out.append(ids.cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)
