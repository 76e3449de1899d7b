"""The models a server answers for: the base under its own name, and deltas registered by name.

Registering a delta opens only its header (``load_delta`` is lazy), checks it against the base in
memory (names, shapes, fingerprints; each base tensor is hashed once per server, however many deltas
are registered) and loads its tokenizer; its packed tensors are read when the engine first serves it.
A delta made for another base is refused here, before any request can reach it.
"""
from __future__ import annotations

import json
import os
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor, nn

from ..delta import Delta, load_delta
from ..delta_file import base_digest
from ..dtypes import DTYPES
from ..checkpoint import load_failure
from ..errors import BaseMismatchError, CheckpointError, DeltacompError, SettingsError
from .quantized import is_quantized

# the fine-tune's files a tokenizer is rebuilt from (names only: nothing in a delta file picks a path)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")


class UnknownModelError(DeltacompError, KeyError):
    """A request names a model the server does not serve."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class NameTakenError(DeltacompError):
    """A delta is registered under a name already in use."""


@dataclass(eq=False)
class Tenant:
    """One servable model: the base (``delta`` None) or a delta over it, with its tokenizer."""
    name: str
    tokenizer: object
    eos_ids: frozenset[int]
    delta: Delta | None = None
    path: str | None = None
    removed: threading.Event = field(default_factory=threading.Event)

    def chat_prompt(self, messages: list[dict]) -> str:
        """The conversation rendered by this model's chat template, ready for the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SettingsError(f"model {self.name!r} has no chat template (neither its delta file nor the base "
                                "carries one); use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # a template is user-supplied Jinja: any failure is the request's
            raise SettingsError(f"model {self.name!r}: its chat template failed on these messages ({exc})") from None


def _eos_ids(tokenizer, generation_config: dict | None) -> frozenset[int]:
    ids = set()
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = (generation_config or {}).get("eos_token_id")
    ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos] if eos is not None else []))
    return frozenset(ids)


def generation_config(raw: bytes | str, where: str) -> dict:
    """A generation_config.json's object (a base folder's, or the fine-tune's carried in a delta file), with
    an eos_token_id that is a token id or a list of them: else one CheckpointError line naming ``where``."""
    try:
        gen = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{where}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(gen, dict):
        raise CheckpointError(f"{where}: must hold a JSON object, not {type(gen).__name__}")
    eos = gen.get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    if any(i is not None and (isinstance(i, bool) or not isinstance(i, int)) for i in ids):
        raise CheckpointError(f"{where}: eos_token_id={eos!r}"[:300] + " is not a token id (an integer) or a list "
                              "of them")
    return gen


def _tokenizer_from_files(files: dict[str, bytes], where: str):
    """The fine-tune's tokenizer rebuilt from the files embedded in its delta (None if it carries none)."""
    from transformers import AutoTokenizer

    mine = {n: files[n] for n in TOKENIZER_FILES if n in files}
    if not any(n in mine for n in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        return None
    with tempfile.TemporaryDirectory(prefix="deltacomp-tok-") as tmp:
        for n, data in mine.items():
            (Path(tmp) / n).write_bytes(data)
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as exc:  # noqa: BLE001 - sorted by load_failure: what transformers raises for bad files
            why = load_failure(exc)
            if why is None:
                raise
            raise CheckpointError(f"{where}: the fine-tune's tokenizer files it carries ({', '.join(sorted(mine))}) "
                                  f"cannot be loaded ({why})") from None


class Registry:
    """Name -> Tenant, safe to use from the HTTP threads and the engine thread."""

    def __init__(self, model: nn.Module, base_name: str, base_tokenizer, base_generation_config: dict | None):
        # the base's tensors by name, taken before any patching renames modules (the tensors themselves
        # are never changed: multi-tenant serving adds terms, it does not edit weights)
        self.base_state: dict[str, Tensor] = dict(model.named_parameters(remove_duplicate=False))
        self.base_state.update(dict(model.named_buffers(remove_duplicate=False)))
        self.base = Tenant(base_name, base_tokenizer, _eos_ids(base_tokenizer, base_generation_config))
        self.base_tokenizer, self.base_gen = base_tokenizer, base_generation_config
        self._tenants: dict[str, Tenant] = {base_name: self.base}
        self._digests: dict[tuple[str, str], str] = {}
        self._lock = threading.Lock()

    def get(self, name: str) -> Tenant:
        with self._lock:
            t = self._tenants.get(name)
        if t is None:
            raise UnknownModelError(f"model {name!r} does not exist; the server has {self.names()}")
        return t

    def names(self) -> list[str]:
        with self._lock:
            return list(self._tenants)

    def tenants(self) -> list[Tenant]:
        with self._lock:
            return list(self._tenants.values())

    def _check_base(self, df: Delta) -> None:
        """Refuse a delta this base cannot serve: a tensor it lacks, another shape, another fingerprint."""
        for name, info in df.params.items():
            if info.base_rows is not None or not info.has_base:
                raise BaseMismatchError(f"{df.path}: {name} adds tokens or a tensor the base lacks; such a delta "
                                        "cannot share the base with others (reconstruct it and serve it alone)")
            if name not in self.base_state:
                raise BaseMismatchError(f"{df.path}: needs tensor {name}, which the base lacks — wrong base?")
        for name, want in df.base_tensors.items():
            tensor = self.base_state.get(name)
            if tensor is None or is_quantized(tensor):
                continue  # a quantized layer cannot be hashed against the float base (patch.py warns)
            dt = df.metadata.get("base", {}).get("dtypes", {}).get(name)
            key = (name, dt or str(tensor.dtype))
            if key not in self._digests:
                t = tensor.detach().cpu()
                self._digests[key] = base_digest(t.to(DTYPES[dt]) if dt in DTYPES and t.dtype != DTYPES[dt] else t)
            if self._digests[key] != want:
                raise BaseMismatchError(f"{df.path}: tensor {name} differs from the base this delta was made "
                                        "against (fingerprint mismatch) — it was made for another base")

    def add(self, name: str, path: str | os.PathLike) -> Tenant:
        """Register the delta at ``path`` under ``name`` (header, base check and tokenizer only)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise SettingsError(f"a delta name must be a non-empty string of at most 256 characters, got {name!r}")
        with self._lock:
            if name in self._tenants:
                raise NameTakenError(f"model {name!r} already exists; DELETE /v1/deltas/{name} first or pick another name")
        df = load_delta(path)
        try:
            self._check_base(df)
            tok = _tokenizer_from_files(df.files, str(path)) or self.base_tokenizer
            gen = self.base_gen
            if "generation_config.json" in df.files:
                gen = generation_config(df.files["generation_config.json"], f"{path}: its generation_config.json")
        except BaseException:
            df.close()
            raise
        tenant = Tenant(name, tok, _eos_ids(tok, gen), delta=df, path=str(path))
        with self._lock:
            if name in self._tenants:
                df.close()
                raise NameTakenError(f"model {name!r} already exists")
            self._tenants[name] = tenant
        return tenant

    def remove(self, name: str) -> Tenant:
        """Unregister a delta; the engine unloads it and ends its requests at its next step."""
        with self._lock:
            t = self._tenants.get(name)
            if t is None:
                raise UnknownModelError(f"model {name!r} does not exist; the server has {list(self._tenants)}")
            if t is self.base:
                raise SettingsError(f"{name!r} is the base model; it cannot be removed")
            del self._tenants[name]
        t.removed.set()
        return t


def vocab_size(model: nn.Module) -> int:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return int(weight.shape[0]) if weight is not None else int(getattr(model.config, "vocab_size"))


def context_length(model: nn.Module) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)
