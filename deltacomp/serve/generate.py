"""Multi-tenant generation: one base model in memory, several deltas served from their packed form,
one batch in which each prompt names its delta (``deltacomp generate``)."""
from __future__ import annotations

import logging
import numbers
import os
from typing import Sequence

import torch

from ..checkpoint import hf_folder
from ..errors import CheckpointError, DeltacompError, SettingsError
from ..modelcheck import check_folder, check_token_ids
from .patch import patch_model_multi, set_delta_index


BASE_BITS = (8, 4)


class _Once(logging.Filter):
    """Lets each distinct message through once: on CPU bitsandbytes logs "MatMul8bitLt: inputs will be
    cast from torch.float32 to float16" on every 8-bit matmul (every layer of every decoding step)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        new = msg not in self.seen
        self.seen.add(msg)
        return new


def load_base(base: str | os.PathLike, dtype: torch.dtype = torch.float32, bits: int | None = None):
    """The base model (a Hugging Face folder) for serving, in eval mode. ``bits``: None = as stored (in
    ``dtype``); 8 or 4 = its linear layers quantized on load by bitsandbytes through transformers'
    ``BitsAndBytesConfig`` (8: LLM.int8 ``Linear8bitLt``; 4: NF4 ``Linear4bit`` computing in ``dtype``).
    transformers keeps the output head (and embeddings, norms) unquantized. Deltas are then served as
    terms over the quantized layers (``deltacomp.serve.modules``); the base itself is never dequantized."""
    from transformers import AutoModelForCausalLM

    check_folder(base)  # config.json against the weights, before transformers allocates what it describes
    if bits is None:
        with hf_folder(base, "model"):
            return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
    if bits not in BASE_BITS:
        raise SettingsError(f"load_base: bits must be one of {BASE_BITS} (or None: the base as stored), got {bits}")
    try:
        import bitsandbytes  # noqa: F401  (checked here for a clear message; transformers imports it)
    except ImportError as exc:
        raise DeltacompError(f"a {bits}-bit base needs bitsandbytes: pip install 'deltacomp[bnb]' "
                             f"(bitsandbytes==0.50.2) ({exc})") from exc
    from transformers import BitsAndBytesConfig

    if bits == 8:
        quant = BitsAndBytesConfig(load_in_8bit=True)
        log = logging.getLogger("bitsandbytes.autograd._functions")
        if not any(isinstance(f, _Once) for f in log.filters):
            log.addFilter(_Once())
    else:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    with hf_folder(base, "model"):
        return AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype, quantization_config=quant).eval()


def _check_lengths(tok, prompts: Sequence[str], max_new_tokens: int, config, base) -> None:
    """Every prompt is at least one token of the model's vocabulary, and the longest one plus ``max_new_tokens``
    fits the model's max_position_embeddings (when its config names one)."""
    encoded = [tok(p)["input_ids"] for p in prompts]
    lengths = [len(ids) for ids in encoded]
    if any(lengths):
        every = [i for ids in encoded for i in ids]
        check_token_ids(min(every), max(every), config, base, f"the tokenizer of {base}")
    empty = [i for i, n in enumerate(lengths) if n == 0]
    if empty:
        raise SettingsError(f"generate: prompt {empty[0]} ({prompts[empty[0]]!r:.60}) is 0 tokens for the tokenizer "
                            f"of {base}; give text it encodes")
    limit = getattr(config, "max_position_embeddings", None) if config is not None else None
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        return
    longest = max(lengths)
    if longest + max_new_tokens > limit:
        room = limit - longest
        fix = f"use --max-new-tokens {room} or less" if room > 0 else "shorten the prompt"
        raise SettingsError(f"generate: a {longest}-token prompt + max_new_tokens {max_new_tokens} is above the "
                            f"max_position_embeddings {limit} of {base}; {fix}")


def _check_special_token_ids(model, base) -> None:
    """The special token ids ``model.generate`` reads from the generation config (generation_config.json, else
    config.json) are integers it can hold: one beyond int64 was an OverflowError from inside transformers (LLaMA's
    original pad_token_id -1 is fine)."""
    gen = getattr(model, "generation_config", None)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        value = getattr(gen, key, None)
        ids = value if isinstance(value, (list, tuple)) else [value]
        if any(i is not None and (isinstance(i, bool) or not isinstance(i, int) or not -2**63 <= i < 2**63)
               for i in ids):
            raise CheckpointError(f"{base}: its generation config (generation_config.json or config.json) has "
                                  f"{key}={value!r}"[:300] + "; a token id is an integer that fits in int64")


def generate(base: str | os.PathLike, deltas: Sequence[str | os.PathLike], prompts: Sequence[str],
             max_new_tokens: int = 32, *, prompt_delta: Sequence[int] | None = None,
             dtype: torch.dtype = torch.float32, force: bool = False, model=None, tokenizer=None,
             base_bits: int | None = None) -> list[str]:
    """Greedy continuations of ``prompts``; prompt i runs with delta ``prompt_delta[i]`` (an index into
    ``deltas``, -1 = the base alone; default: every prompt with delta 0, or the base when no delta is
    given). The base (a Hugging Face folder) is loaded once, in ``dtype`` (``base_bits`` 8 or 4: its
    linear layers quantized by bitsandbytes, see ``load_base``), and patched with all deltas
    (``patch_model_multi``); the whole batch is one ``generate`` call, left-padded. ``model`` /
    ``tokenizer``: already loaded base objects to use instead of loading ``base`` (the model is patched
    in place). Returns the generated text of each prompt, prompt excluded."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise SettingsError(f"generate: give a list of prompt strings, got {prompts!r}"[:200])
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise SettingsError(f"generate: prompt {empty[0]} is empty; give text to continue")
    if isinstance(deltas, (str, os.PathLike)):
        raise SettingsError(f"generate: give a list of delta files, got one path {deltas!r}")
    if not isinstance(deltas, Sequence):
        raise SettingsError(f"generate: give a list of delta files ([] for the base alone), got {deltas!r}"[:200])
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1:
        raise SettingsError(f"generate: max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_delta is None:
        prompt_delta = [0 if deltas else -1] * len(prompts)
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in prompt_delta):
        raise SettingsError(f"generate: delta indices must be integers, got {list(prompt_delta)!r}")
    prompt_delta = [int(i) for i in prompt_delta]
    if len(prompt_delta) != len(prompts):
        raise SettingsError(f"generate: {len(prompts)} prompts but {len(prompt_delta)} delta indices; give one "
                            "--prompt-delta per --prompt (or none: all prompts use the first delta)")
    bad = [i for i in prompt_delta if not -1 <= i < len(deltas)]
    if bad:
        raise SettingsError(f"generate: delta index {bad[0]} is out of range; {len(deltas)} delta(s) given, "
                            f"valid indices are -1 (base) to {len(deltas) - 1}")
    if base_bits is not None and base_bits not in BASE_BITS:
        raise SettingsError(f"generate: base_bits must be one of {BASE_BITS} or None, got {base_bits}")
    if base_bits is not None and model is not None:
        raise SettingsError("generate: base_bits quantizes the base on load; with model= pass a model "
                            "loaded quantized (deltacomp.serve.load_base) instead")
    from transformers import AutoTokenizer

    config = model.config if model is not None else check_folder(base)  # config.json first: the tokenizer reads it
    if tokenizer is None:
        with hf_folder(base, "tokenizer"):
            tokenizer = AutoTokenizer.from_pretrained(str(base))
    tok = tokenizer
    with hf_folder(base, "tokenizer"):  # its tokenizer_config.json's values are used only when it encodes
        _check_lengths(tok, prompts, max_new_tokens, config, base)
    if model is None:
        model = load_base(base, dtype, base_bits)
    model.eval()
    _check_special_token_ids(model, base)
    if deltas:
        patch_model_multi(model, list(deltas), force=force)
        set_delta_index(model, prompt_delta)
    elif any(i != -1 for i in prompt_delta):
        raise DeltacompError("generate: prompts name deltas but none were given")
    tok.padding_side = "left"  # new tokens are appended on the right of every row
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if pad is None:
        raise DeltacompError(f"generate: the tokenizer of {base} has neither a pad nor an eos token")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    enc = tok(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
