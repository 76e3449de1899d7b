"""The server's engine: one thread owns the model and runs every forward pass.

Requests for any mix of tenants (deltas and the base) decode together: before each pass the batch rows
name their delta (``set_delta_index``) and the multi-tenant modules route each row to its delta's term.
Continuous batching: between steps, finished, cancelled and removed requests leave and waiting ones join
(each prefilled alone, its KV cache merged into the batch's: serve/kvbatch.py says how and at what cost).

Deltas load lazily: the model is patched with the deltas in use (``patch_model_multi``) when a request
first needs one, and re-patched without a delta once it is removed. A re-patch rebuilds the serving
terms of every loaded delta (their packed tensors are read again), between two steps, so in-flight rows
keep their caches; the base is not hashed again (the registry checked each delta when it was added).

The HTTP side talks to the engine only through ``submit`` (a bounded queue) and each request's ``emit``
callback, which the engine calls from its thread with ("text", str), ("done", finish_reason,
prompt_tokens, completion_tokens) or ("error", http_status, message).
"""
from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..errors import DeltacompError, SettingsError
from .kvbatch import KVBatch, ModelRunner
from .modules import MultiDeltaLinear, MultiDeltaModule
from .patch import patch_model_multi, set_delta_index, unpatch_model
from .sampling import SamplingParams, TextTracker, sample
from .tenants import Registry, Tenant

log = logging.getLogger("deltacomp.serve")
COUNTERS = ("completed", "cancelled", "rejected_queue_full", "generated_tokens", "prefill_tokens", "prefill_ms",
            "steps", "batched_rows", "mixed_steps", "loads", "repatches")


class QueueFullError(DeltacompError):
    """The bounded queue of waiting requests is full (HTTP 429)."""


class ShuttingDownError(DeltacompError):
    """The engine is stopping or stopped and takes no more requests (HTTP 503)."""


def model_context(config, context: int | None = None, source: str = "the model") -> int:
    """Prompt + generated tokens at most: ``context`` (--max-model-len), which may not exceed the model's
    max_position_embeddings, or that limit itself (2048 for a config that names none). ``source`` names the
    config in the error."""
    limit = getattr(config, "max_position_embeddings", None)
    limit = limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
    if context is None:
        return limit or 2048
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise SettingsError(f"context (--max-model-len) must be an integer >= 1, got {context!r}")
    if limit is not None and context > limit:
        raise SettingsError(f"--max-model-len {context} is above the max_position_embeddings {limit} of {source}; "
                            f"give {limit} or less")
    return context


@dataclass(eq=False)
class GenRequest:
    tenant: Tenant
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None]
    cancelled: threading.Event = field(default_factory=threading.Event)
    # engine-side state
    tracker: TextTracker | None = None
    gen: torch.Generator | None = None
    last: int = -1
    n_out: int = 0

    def fail(self, status: int, message: str) -> None:
        self.emit(("error", status, message))


class Engine:
    """Runs the decode loop in its own thread; ``max_batch`` rows at most, ``max_queue`` waiting."""

    def __init__(self, model: nn.Module, registry: Registry, *, max_batch: int = 8, max_queue: int = 64,
                 context: int | None = None):
        if max_batch < 1 or max_queue < 1:  # every request passes through the queue, so it needs a place
            raise SettingsError(f"max_batch and max_queue must be >= 1, got {max_batch} and {max_queue}")
        self.model, self.registry = model.eval(), registry
        self.max_batch, self.max_queue = max_batch, max_queue
        self.context = model_context(model.config, context)
        self.device = next(model.parameters()).device
        self.batch = KVBatch(ModelRunner(model))
        self.rows: list[GenRequest] = []
        self.loaded: list[Tenant] = []  # patched deltas; row delta index = position here (-1: base)
        self._waiting: collections.deque[GenRequest] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # every key made here, so that stats() copying it from another thread never sees it grow
        self.counts = collections.Counter(dict.fromkeys(COUNTERS, 0))

    # -- the HTTP side --------------------------------------------------------------------------------
    def start(self) -> "Engine":
        self._thread = threading.Thread(target=self._loop, name="deltacomp-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, end every request with 503, and join the thread."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: GenRequest) -> None:
        with self._cv:
            if self._stopping or self._thread is None or not self._thread.is_alive():
                raise ShuttingDownError("the server is shutting down; no new requests are taken")
            if len(self._waiting) >= self.max_queue:  # first free the places of clients that left
                kept = collections.deque(r for r in self._waiting if not r.cancelled.is_set())
                self.counts["cancelled"] += len(self._waiting) - len(kept)
                self._waiting = kept
            if len(self._waiting) >= self.max_queue:
                self.counts["rejected_queue_full"] += 1
                raise QueueFullError(f"too many requests: {len(self._waiting)} already waiting (--max-queue "
                                     f"{self.max_queue}) and {len(self.rows)} running; retry later")
            self._waiting.append(req)
            self._cv.notify()

    def wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def stats(self) -> dict:
        with self._cv:
            waiting = len(self._waiting)
        return {"running": len(self.rows), "waiting": waiting, "max_batch": self.max_batch,
                "max_queue": self.max_queue, "loaded": [t.name for t in self.loaded], **self.counts}

    # -- the engine thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopping or self._waiting or self.rows):
                    self._cv.wait(timeout=0.5)
                    if any(t.removed.is_set() for t in self.loaded):
                        break
                if self._stopping:
                    break
            try:
                self._sync()
                self._admit()
                if self.rows:
                    self._decode()
            except Exception as exc:  # a bug or an out-of-memory in one step must not stop the server
                log.exception("engine step failed")
                self._fail_rows(500, f"internal error while decoding ({type(exc).__name__}: {exc})")
        self._fail_rows(503, "the server shut down before this request finished")
        with self._cv:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for req in waiting:
            req.fail(503, "the server shut down before this request started")

    def _fail_rows(self, status: int, message: str) -> None:
        rows, self.rows = self.rows, []
        self.batch.keep([])
        for req in rows:
            req.fail(status, message)

    def _sync(self) -> None:
        """Drop rows whose client left or whose delta was removed; unload removed deltas."""
        keep = []
        for i, req in enumerate(self.rows):
            if req.cancelled.is_set():
                self.counts["cancelled"] += 1
            elif req.tenant.removed.is_set():
                req.fail(404, f"model {req.tenant.name!r} was removed while this request ran")
            else:
                keep.append(i)
        if len(keep) != len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.batch.keep(keep)
        gone = [t for t in self.loaded if t.removed.is_set()]
        if gone:
            self._repatch([t for t in self.loaded if t not in gone])
            for t in gone:
                t.delta.close()

    def _repatch(self, tenants: list[Tenant]) -> None:
        if self.loaded:
            unpatch_model(self.model)
            self.loaded = []
        if tenants:
            patch_model_multi(self.model, [t.delta for t in tenants], verify_base=False)
            self.loaded = list(tenants)
            self._move_terms()
        self.counts["repatches"] += 1

    def _move_terms(self) -> None:
        """Put the new serving terms on the base's device (the base itself is not moved: a quantized
        base cannot be)."""
        if self.device.type == "cpu":
            return
        for mod in self.model.modules():
            if isinstance(mod, (MultiDeltaLinear, MultiDeltaModule)):
                inner = getattr(mod, "base", None) or getattr(mod, "module", None)
                for child in mod.children():
                    if child is not inner:
                        child.to(self.device)
                for name, buf in list(mod._buffers.items()):
                    if buf is not None:
                        mod._buffers[name] = buf.to(self.device)

    def _ensure_loaded(self, tenant: Tenant) -> None:
        if tenant.delta is None or tenant in self.loaded:
            return
        before = list(self.loaded)
        try:
            self._repatch(before + [tenant])
        except Exception:
            self._repatch(before)
            raise
        self.counts["loads"] += 1

    def _index(self, tenant: Tenant) -> int:
        return -1 if tenant.delta is None else self.loaded.index(tenant)

    def _set_index(self, tenants: list[Tenant]) -> None:
        if self.loaded:
            set_delta_index(self.model, torch.tensor([self._index(t) for t in tenants], device=self.device))

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch:
            with self._cv:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                self.counts["cancelled"] += 1
                continue
            if req.tenant.removed.is_set():
                req.fail(404, f"model {req.tenant.name!r} was removed before this request started")
                continue
            try:
                self._ensure_loaded(req.tenant)
            except DeltacompError as exc:
                req.fail(400, f"model {req.tenant.name!r} cannot be served: {exc}")
                continue
            except Exception as exc:  # a bug or an OSError: this request's answer, not a client left waiting
                log.exception("loading a delta failed")
                req.fail(500, f"internal error loading model {req.tenant.name!r} ({type(exc).__name__}: {exc})")
                continue
            try:
                self._start(req)
            except Exception as exc:
                log.exception("prefill failed")
                req.fail(500, f"internal error during prefill ({type(exc).__name__}: {exc})")

    def _start(self, req: GenRequest) -> None:
        """Prefill one request alone, take its first token, and add it to the batch unless it is done."""
        req.tracker = TextTracker(req.tenant.tokenizer, req.params.stop)
        req.gen = req.params.generator()
        self._set_index([req.tenant])
        t0 = time.perf_counter()
        logits, cache = self.batch.prefill(req.prompt_ids, self.device)
        self.counts["prefill_tokens"] += len(req.prompt_ids)
        self.counts["prefill_ms"] += int((time.perf_counter() - t0) * 1e3)
        if not self._advance(req, sample(logits, req.params, req.gen)):
            self.batch.add(cache)
            self.rows.append(req)

    def _decode(self) -> None:
        self._set_index([r.tenant for r in self.rows])
        logits = self.batch.step([r.last for r in self.rows])
        self.counts["steps"] += 1
        self.counts["batched_rows"] += len(self.rows)
        self.counts["mixed_steps"] += len({id(r.tenant) for r in self.rows}) > 1  # tenants sharing one pass
        keep = [i for i, (req, row) in enumerate(zip(self.rows, logits))
                if not self._advance(req, sample(row, req.params, req.gen))]
        if len(keep) != len(self.rows):
            self.rows = [self.rows[i] for i in keep]
            self.batch.keep(keep)

    def _advance(self, req: GenRequest, token: int) -> bool:
        """Record one generated token; send the text it makes safe; True when the request is done."""
        req.last = token
        req.n_out += 1
        self.counts["generated_tokens"] += 1
        reason = None
        if token in req.tenant.eos_ids or req.tracker.push(token):
            reason = "stop"
        elif req.n_out >= req.params.max_tokens or len(req.prompt_ids) + req.n_out >= self.context:
            reason = "length"
        text = req.tracker.take(final=reason is not None)
        if text:
            req.emit(("text", text))
        if reason is not None:
            self.counts["completed"] += 1
            req.emit(("done", reason, len(req.prompt_ids), req.n_out))
        return reason is not None
