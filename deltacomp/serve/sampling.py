"""Choosing the next token (greedy, temperature, top-p, per-request seed) and turning tokens into text
with stop strings, for the server's engine (serve/engine.py).

Each request owns its ``torch.Generator``: with a ``seed`` its samples depend only on its own logits,
never on which other requests shared the batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import SettingsError

MAX_STOPS = 4  # the OpenAI API's limit on stop sequences
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes: int64 or uint64


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise SettingsError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise SettingsError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p}")
        if len(self.stop) > MAX_STOPS or any(not isinstance(s, str) or not s for s in self.stop):
            empty = sum(isinstance(s, str) and not s for s in self.stop)
            raise SettingsError(f"stop must be up to {MAX_STOPS} non-empty strings, got {len(self.stop)} "
                                f"({empty} empty)")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            raise SettingsError(f"seed must be an integer in [-2**63, 2**64), got {self.seed}")

    def generator(self) -> torch.Generator | None:
        """The request's own random stream (None for greedy decoding, which needs none)."""
        if self.temperature == 0.0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: Tensor, params: SamplingParams, gen: torch.Generator | None) -> int:
    """The next token from one row of logits (V,)."""
    if params.temperature == 0.0 or gen is None:
        return int(torch.argmax(logits))
    # the largest logit subtracted first and the temperature kept a normal float32: a temperature near 0
    # (1e-45, or 1e-300, which is 0 in float32) then sends the others to -inf, never to inf or 0 / 0 = NaN,
    # and samples the greedy choice
    z = logits.float()
    probs = torch.softmax((z - z.max()) / max(params.temperature, torch.finfo(torch.float32).tiny), dim=-1)
    if params.top_p < 1.0:
        p_sorted, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = (torch.cumsum(p_sorted, 0) - p_sorted) >= params.top_p
        p_sorted[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, p_sorted)
    return int(torch.multinomial(probs.cpu(), 1, generator=gen))


class TextTracker:
    """Generated tokens -> text, decoded incrementally (a window of tokens, so a multi-byte character
    split over tokens is never emitted half-made) and cut at the first stop string. ``take`` returns the
    text that is safe to send: it holds back any tail that could still grow into a stop string."""

    def __init__(self, tokenizer, stops: tuple[str, ...] = ()):
        self.tok, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self._prefix = self._read = 0  # decode window: ids[_prefix:_read] were already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> bool:
        """Add a token; True when the text now contains a stop string (the text is cut before it)."""
        self.ids.append(token)
        head = self._decode(self.ids[self._prefix:self._read])
        full = self._decode(self.ids[self._prefix:])
        if len(full) > len(head) and not full.endswith("\ufffd"):
            self.text += full[len(head):]
            self._prefix, self._read = self._read, len(self.ids)
        hits = [i for i in (self.text.find(s, self.sent) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take(self, final: bool = False) -> str:
        """Text not yet sent that no stop string can still claim (all of it when ``final``)."""
        end = len(self.text)
        if not final:
            # only a prefix no longer than the text can be its tail: a stop string of a megabyte costs
            # the text's length per token, not the string's length squared (which stalled the engine)
            hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.text) + 1))
                        if self.text.endswith(s[:k])), default=0)
            end -= hold
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent:end], end
        return out
