"""The rows the server's engine decodes together, and their KV cache.

How the cache is kept (the simple, correct choice; its costs are stated):
- A request joining the batch is prefilled alone (batch of one, no padding), so its prompt is processed
  exactly as a single-request model would; its cache is then merged into the batch's.
- The batch holds one Hugging Face ``DynamicCache`` whose per-layer keys/values are (B, H, L, D),
  LEFT-padded: row i's real tokens are the last ``mask[i].sum()`` columns. Keys are cached after RoPE,
  so padding a row's cache on the left changes nothing once the mask hides the padding; each decode step
  passes the row's own position (its count of real tokens).
- A row leaving is dropped with an index select; columns that are padding for every remaining row are
  trimmed.
Cost: merging or dropping rows copies the whole cache (O(B x L) per layer) — once per join or leave, not
per step; a short request next to a long one pays attention over the long one's padding until it
leaves; each joiner's prefill is its own forward pass (no batched prefill). Decode steps themselves
append one column per layer, as Hugging Face's own ``generate`` does.
Only full-attention caches are handled (sliding-window layers are refused).
"""
from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn

from ..errors import DeltacompError


def _layers(cache) -> list:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise DeltacompError(f"serving needs a transformers DynamicCache with per-layer keys/values; got "
                             f"{type(cache).__name__} (upgrade transformers)")
    for layer in layers:
        if getattr(layer, "is_sliding", False) or not hasattr(layer, "keys"):
            raise DeltacompError(f"the serving engine handles full-attention models only; this model's cache "
                                 f"has a {type(layer).__name__} layer")
    return layers


def _pad_left(t: Tensor, n: int) -> Tensor:
    """Pad (B, H, L, D) on the left of L with n zero columns."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], dim=2)


class ModelRunner:
    """Calls the model the same way whatever the installed transformers names its cache argument."""

    def __init__(self, model: nn.Module):
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" in params

    def __call__(self, ids: Tensor, mask: Tensor | None, pos: Tensor | None, cache) -> tuple[Tensor, object]:
        """Logits of each row's last position (B, V) and the cache (updated in place when given)."""
        kw = {self.cache_kw: cache} if cache is not None else {}
        if self.keep_kw:
            kw["logits_to_keep"] = 1  # a long prompt would otherwise make T x V logits
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        new = getattr(out, "cache", None)
        if new is None:
            new = getattr(out, "past_key_values", None)
        return out.logits[:, -1, :], new if new is not None else cache


class KVBatch:
    """B rows decoding together: one left-padded cache and its (B, L) mask of real tokens."""

    def __init__(self, runner: ModelRunner):
        self.run = runner
        self.cache = None
        self.mask: Tensor | None = None  # (B, L) int64: 1 = a real token of that row

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def prefill(self, ids: list[int], device: torch.device):
        """Process one prompt alone; returns its last logits (V,) and its cache (to ``add`` later)."""
        x = torch.tensor([ids], dtype=torch.int64, device=device)
        logits, cache = self.run(x, torch.ones_like(x), None, None)
        _layers(cache)
        return logits[0], cache

    def add(self, cache) -> None:
        """Append a prefilled row (its cache from ``prefill``) as the last row."""
        new = _layers(cache)
        n = new[0].keys.shape[2]
        row = torch.ones(1, n, dtype=torch.int64, device=new[0].keys.device)
        if self.cache is None:
            self.cache, self.mask = cache, row
            return
        old = _layers(self.cache)
        L = self.mask.shape[1]
        width = max(L, n)
        for a, b in zip(old, new):
            a.keys = torch.cat([_pad_left(a.keys, width - L), _pad_left(b.keys, width - n)], dim=0)
            a.values = torch.cat([_pad_left(a.values, width - L), _pad_left(b.values, width - n)], dim=0)
        self.mask = torch.cat([nn.functional.pad(self.mask, (width - L, 0)),
                               nn.functional.pad(row, (width - n, 0))], dim=0)

    def step(self, last: list[int]) -> Tensor:
        """One decode step: feed each row its last token; returns the next-token logits (B, V)."""
        dev = self.mask.device
        x = torch.tensor(last, dtype=torch.int64, device=dev).reshape(-1, 1)
        pos = self.mask.sum(dim=1, keepdim=True)  # positions 0..n-1 were the row's n real tokens
        self.mask = torch.cat([self.mask, torch.ones_like(x)], dim=1)
        logits, self.cache = self.run(x, self.mask, pos, self.cache)
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows (in this order) and trim the columns that are now padding for all."""
        if not rows:
            self.cache = self.mask = None
            return
        if rows == list(range(len(self))):
            return
        idx = torch.tensor(rows, dtype=torch.int64, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        real = mask.any(dim=0).nonzero()
        start = int(real[0]) if real.numel() else mask.shape[1]
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, idx)[:, :, start:]
            layer.values = layer.values.index_select(0, idx)[:, :, start:]
        self.mask = mask[:, start:]
