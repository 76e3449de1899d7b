"""The OpenAI API's request and response shapes as the server speaks them (serve/server.py): request
bodies validated by pydantic, responses and stream chunks built as plain dicts, errors as
``{"error": {"message", "type", "param", "code"}}`` with the HTTP status the error type maps to."""
from __future__ import annotations

import time
import uuid
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..errors import BaseMismatchError, DeltacompError, DeltaFormatError, SettingsError
from .engine import QueueFullError, ShuttingDownError
from .sampling import SamplingParams
from .tenants import NameTakenError, UnknownModelError


class _Request(BaseModel):
    # fields clients send that the server does not use (user, presence_penalty, ...) are accepted
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: Optional[bool] = False
    stream_options: Optional[dict[str, Any]] = None
    n: Optional[int] = 1

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    prompt: Union[str, list[str], list[int]]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def as_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):  # content parts: only text is served
            if any(p.get("type") != "text" for p in content):
                raise SettingsError("only text content parts are supported in messages")
            content = "".join(str(p.get("text", "")) for p in content)
        return {"role": self.role, "content": content or ""}


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = None


class AddDeltaRequest(BaseModel):
    name: str
    path: str


# accepted API fields this server does not implement: refused when set, rather than silently ignored
UNSUPPORTED = ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "presence_penalty", "frequency_penalty",
               "tools", "functions", "tool_choice", "response_format")


def sampling_params(body: _Request, max_tokens: int) -> SamplingParams:
    extra = body.model_extra or {}
    used = [k for k in UNSUPPORTED if extra.get(k) not in (None, False, 0, "", [], {})]
    used += ["best_of"] if extra.get("best_of") not in (None, 1) else []
    if used:
        raise SettingsError(f"{used[0]} is not supported by this server; leave it out")
    if body.n not in (None, 1):
        raise SettingsError(f"n must be 1 (got {body.n}); send separate requests, the server batches them")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    return SamplingParams(max_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                          top_p=1.0 if body.top_p is None else body.top_p, stop=stop, seed=body.seed)


# -- errors -----------------------------------------------------------------------------------------
STATUS = [(UnknownModelError, 404, "model_not_found"), (NameTakenError, 409, "model_exists"),
          (QueueFullError, 429, "queue_full"), (ShuttingDownError, 503, "shutting_down"),
          (BaseMismatchError, 400, "base_mismatch"), (DeltaFormatError, 400, "invalid_delta_file"),
          (SettingsError, 400, "invalid_value"), (DeltacompError, 400, "invalid_request")]


def status_of(exc: DeltacompError) -> tuple[int, str]:
    return next((s, c) for t, s, c in STATUS if isinstance(exc, t))


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict:
    kind = ("invalid_request_error" if status < 500 and status != 429 else
            "rate_limit_error" if status == 429 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- responses --------------------------------------------------------------------------------------
class Reply:
    """The ids and stamps one request's response (or stream of chunks) shares."""

    def __init__(self, model: str, chat: bool):
        self.model, self.chat = model, chat
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def full(self, text: str, reason: str, prompt_tokens: int, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        return {**self._head("text_completion"),
                "choices": [{"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def model_card(name: str, created: int, parent: str | None) -> dict:
    """A delta's card names the base it runs over as its parent."""
    return {"id": name, "object": "model", "created": created, "owned_by": "deltacomp", "root": parent or name,
            "parent": parent}
