"""``deltacomp serve``: many fine-tunes (deltas over one base in memory) behind one OpenAI-compatible
HTTP endpoint, on FastAPI + uvicorn.

    GET    /v1/models                 the base (under its own name) and every registered delta
    POST   /v1/completions            prompt -> text; "stream": true for server-sent events
    POST   /v1/chat/completions       messages -> reply, with the fine-tune's chat template
    POST   /v1/deltas                 {"name", "path"}: register a delta (checked against the base)
    DELETE /v1/deltas/NAME            unregister it; its running requests end with an error
    GET    /health                    engine counters

The request handlers validate, tokenize and queue; one engine thread (serve/engine.py) runs every
forward pass. Errors are JSON ``{"error": {...}}`` with a 4xx/5xx status; nothing a client sends can
stop the engine or touch another client's request.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Mapping

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..checkpoint import bounded_file, hf_folder
from ..errors import DeltacompError, SettingsError
from ..integrity import MAX_EMBEDDED_FILE_BYTES
from ..modelcheck import check_folder
from .engine import Engine, GenRequest, model_context
from .openai_api import (AddDeltaRequest, ChatRequest, CompletionRequest, Reply, error_body, model_card,
                         sampling_params, status_of)
from .tenants import Registry, Tenant, generation_config, vocab_size

log = logging.getLogger("deltacomp.serve")
MAX_BODY_BYTES = 8 * 2**20  # a request body above this is refused before it is read (413)
COMPLETION_DEFAULT_MAX_TOKENS = 16  # the OpenAI API's default for /v1/completions
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming request checks that its client is still there


def _error(status: int, message: str, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code), status_code=status)


def _validation_message(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "the request body is not valid JSON"
    first = errs[0] if errs else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
    return f"invalid request: {where}: {first.get('msg', 'invalid value')}" + (
        f" (and {len(errs) - 1} more)" if len(errs) > 1 else "")


class BodyLimit:
    """Refuses a body whose declared length is over ``limit`` before it is read (413). A body sent without
    a length (chunked) is read here up to ``limit`` and refused as soon as it passes it, then handed on
    whole. A plain ASGI middleware: Starlette's BaseHTTPMiddleware would hide a client's disconnect from
    the handlers."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            size = dict(scope.get("headers", ())).get(b"content-length", b"").decode("latin-1")
            if size and (not size.isdigit() or int(size) > self.limit):
                msg = f"request body of {size} bytes is over the limit of {self.limit}"
                await _error(413, msg, "body_too_large")(scope, receive, send)
                return
            if not size and scope.get("method") not in ("GET", "HEAD", "DELETE", "OPTIONS"):
                bounded = await self._read_bounded(receive)
                if bounded is None:
                    msg = f"request body (sent without a length) is over the limit of {self.limit} bytes"
                    await _error(413, msg, "body_too_large")(scope, receive, send)
                    return
                receive = bounded
        await self.app(scope, receive, send)

    async def _read_bounded(self, receive):
        """The whole body, read up to the limit, as a receive that gives it in one message and then
        whatever the client sends next (a disconnect); None when the body passes the limit."""
        parts, seen = [], 0
        while True:
            msg = await receive()
            if msg["type"] != "http.request":  # the client left: the app sees it as it would have
                return _replay([msg], receive)
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                return None
            parts.append(msg.get("body", b""))
            if not msg.get("more_body", False):
                return _replay([{"type": "http.request", "body": b"".join(parts), "more_body": False}], receive)


def _replay(messages: list[dict], receive):
    async def replayed():
        return messages.pop(0) if messages else await receive()
    return replayed


class Server:
    """The HTTP side: turns requests into engine work and engine events into responses."""

    def __init__(self, engine: Engine, registry: Registry, max_body_bytes: int = MAX_BODY_BYTES):
        self.engine, self.registry, self.max_body = engine, registry, max_body_bytes
        self.vocab = vocab_size(engine.model)
        self.created = int(time.time())

    # -- request -> token ids -----------------------------------------------------------------------
    def _prompt_ids(self, tenant: Tenant, body: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(body, ChatRequest):
            text = tenant.chat_prompt([m.as_dict() for m in body.messages])
            ids = tenant.tokenizer.encode(text, add_special_tokens=False)  # the template wrote them
        elif isinstance(body.prompt, str):
            ids = tenant.tokenizer.encode(body.prompt)
        elif body.prompt and all(isinstance(p, int) for p in body.prompt):
            ids = list(body.prompt)
        elif len(body.prompt) == 1:
            ids = tenant.tokenizer.encode(body.prompt[0])
        else:
            raise SettingsError(f"give one prompt per request (got {len(body.prompt)}); send several requests, "
                                "the server batches them")
        if not ids:
            raise SettingsError("the prompt is empty (0 tokens)")
        bad = [i for i in ids if not 0 <= i < self.vocab]
        if bad:
            raise SettingsError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab - 1})")
        return ids

    def _max_tokens(self, body: CompletionRequest | ChatRequest, n_prompt: int) -> int:
        room = self.engine.context - n_prompt
        if room < 1:
            raise SettingsError(f"the prompt is {n_prompt} tokens; the model's context is {self.engine.context} "
                                "tokens, which leaves no room to generate")
        asked = body.max_tokens
        if isinstance(body, ChatRequest) and body.max_completion_tokens is not None:
            asked = body.max_completion_tokens
        if asked is None:
            return min(room, COMPLETION_DEFAULT_MAX_TOKENS) if isinstance(body, CompletionRequest) else room
        if asked < 1:
            raise SettingsError(f"max_tokens must be >= 1, got {asked}")
        if asked > room:
            raise SettingsError(f"max_tokens {asked} + the prompt's {n_prompt} tokens exceed the model's context "
                                f"of {self.engine.context} tokens; ask for at most {room}")
        return asked

    # -- generation ---------------------------------------------------------------------------------
    async def generate(self, body: CompletionRequest | ChatRequest, request: Request | None = None):
        tenant = self.registry.get(body.model)
        ids = self._prompt_ids(tenant, body)
        params = sampling_params(body, self._max_tokens(body, len(ids)))
        loop, queue = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:  # called from the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, event)
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        req = GenRequest(tenant, ids, params, emit)
        self.engine.submit(req)
        reply = Reply(tenant.name, isinstance(body, ChatRequest))
        if body.stream:
            return StreamingResponse(self._stream(req, queue, reply, body.include_usage()),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, next_poll = [], time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    event = ("wait",)
                if request is not None and time.monotonic() >= next_poll:
                    next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if await request.is_disconnected():
                        return _error(499, "the client closed the connection", "client_closed")  # never sent
                if event[0] == "text":
                    parts.append(event[1])
                elif event[0] == "done":
                    return reply.full("".join(parts), *event[1:])
                elif event[0] == "error":
                    return _error(event[1], event[2], "generation_failed")
        finally:
            req.cancelled.set()  # no-op once done; frees the row if the handler is cancelled

    async def _stream(self, req: GenRequest, queue: asyncio.Queue, reply: Reply, include_usage: bool):
        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if reply.chat:
                yield sse(reply.chunk(None, role=True))
            while True:
                event = await queue.get()
                if event[0] == "text":
                    yield sse(reply.chunk(event[1]))
                    continue
                if event[0] == "done":
                    yield sse(reply.chunk(None, event[1]))
                    if include_usage:
                        yield sse(reply.usage_chunk(event[2], event[3]))
                else:  # an error after the 200 headers went out: say so in the stream itself
                    yield sse(error_body(event[1], event[2], "generation_failed"))
                yield "data: [DONE]\n\n"
                return
        finally:
            req.cancelled.set()  # the client went away mid-stream: the engine drops the row next step

    # -- deltas -------------------------------------------------------------------------------------
    def models(self) -> dict:
        base = self.registry.base.name
        cards = [model_card(t.name, self.created, None if t.delta is None else base) for t in self.registry.tenants()]
        return {"object": "list", "data": cards}

    async def add_delta(self, body: AddDeltaRequest) -> JSONResponse:
        tenant = await run_in_threadpool(self.registry.add, body.name, body.path)  # reads and hashes: off the loop
        log.info("registered delta %s from %s", tenant.name, tenant.path)
        return JSONResponse(model_card(tenant.name, int(time.time()), self.registry.base.name), status_code=201)

    def remove_delta(self, name: str) -> dict:
        self.registry.remove(name)
        self.engine.wake()
        return {"id": name, "object": "model", "deleted": True}


def create_app(engine: Engine, registry: Registry, *, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; starting it (its lifespan) starts the engine thread, stopping it stops the engine."""
    srv = Server(engine, registry, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.stop)

    app = FastAPI(title="deltacomp serve", lifespan=lifespan)
    app.state.server = srv

    app.add_middleware(BodyLimit, limit=max_body_bytes)

    @app.exception_handler(DeltacompError)
    async def on_deltacomp_error(request: Request, exc: DeltacompError):
        status, code = status_of(exc)
        return _error(status, str(exc), code)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError):
        return _error(400, _validation_message(exc), "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), None)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error ({type(exc).__name__}: {exc})", "internal_error")

    app.get("/v1/models")(srv.models)
    app.get("/health")(lambda: {"status": "ok", **engine.stats()})

    @app.get("/v1/models/{name:path}")
    def get_model(name: str):
        tenant = registry.get(name)
        return model_card(tenant.name, srv.created, None if tenant.delta is None else registry.base.name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await srv.generate(body, request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request):
        return await srv.generate(body, request)

    app.post("/v1/deltas", status_code=201)(srv.add_delta)
    app.delete("/v1/deltas/{name:path}")(srv.remove_delta)
    return app


def build_app(base: str | os.PathLike, deltas: Mapping[str, str | os.PathLike] = (), *, base_name: str | None = None,
              base_bits: int | None = None, dtype=None, device: str | None = None, max_batch: int = 8,
              max_queue: int = 64, context: int | None = None) -> FastAPI:
    """Load the base (a Hugging Face folder) once, register ``deltas`` (name -> file; each checked against
    the base now, its tensors read when first used) and return the app."""
    import torch
    from transformers import AutoTokenizer

    from .generate import load_base

    from . import dispatch

    dispatch.mode()  # a bad DELTACOMP_FUSED fails here, not as a 500 on every request
    config = check_folder(base)  # config.json against the weights, and --max-model-len, before the model loads
    if config is not None:
        model_context(config, context, str(Path(base) / "config.json"))
    model = load_base(base, dtype or torch.float32, base_bits)
    if device and base_bits is None:
        model.to(device)
    with hf_folder(base, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(base))
    gen_file = Path(base) / "generation_config.json"
    gen = None
    if gen_file.is_file():
        bounded_file(gen_file, MAX_EMBEDDED_FILE_BYTES)
        gen = generation_config(gen_file.read_bytes(), str(gen_file))
    registry = Registry(model, base_name or Path(base).resolve().name, tokenizer, gen)
    for name, path in dict(deltas).items():
        registry.add(name, path)
    engine = Engine(model, registry, max_batch=max_batch, max_queue=max_queue, context=context)
    return create_app(engine, registry)


class ServerThread:
    """uvicorn serving ``app`` from a background thread on a socket bound here (port 0: a free port,
    no race): for tests and benchmarks. ``with ServerThread(app) as s: ... s.url``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="deltacomp-http", daemon=True)

    def __enter__(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the HTTP server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
