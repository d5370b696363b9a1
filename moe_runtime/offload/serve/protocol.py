"""OpenAI wire format for `moe serve`: request schemas, their checks, errors, response bodies.

Requests are parsed strictly: a field the OpenAI API has and we do not implement (n > 1, logprobs,
tools, penalties other than 0, ...) is refused with a 400 that names it, and so is a field the API
does not have. Types are strict as the API's are (pydantic strict mode): an integer is a JSON
integer (not "5", true or 2.0), a boolean is true/false (not "yes"), a number is finite.
`top_k`, `repetition_penalty` and `return_token_ids` are extensions (vLLM's names).
Every error body is {"error": {"message", "type", "param", "code"}}, as the official clients expect.
"""
from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class OpenAIError(Exception):
    """An error the server answers with an OpenAI-style body and an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields both endpoints share. None means the OpenAI default."""

    model_config = STRICT
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_token_ids: bool = False

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise OpenAIError(400, f"stop has {len(stops)} sequences; at most 4 are allowed", param="stop")
        if any(not s for s in stops):
            raise OpenAIError(400, "stop sequences must be non-empty strings", param="stop")
        return stops

    def check_unsupported(self) -> None:
        if self.n != 1:
            raise OpenAIError(400, f"n={self.n} is not supported by this server; send n=1 (one choice per request)",
                              param="n", code="unsupported_parameter")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise OpenAIError(400, f"{name} is not supported by this server; leave it at 0 (repetition_penalty "
                                       f"is available)", param=name, code="unsupported_parameter")
        if self.logit_bias:
            raise OpenAIError(400, "logit_bias is not supported by this server", param="logit_bias",
                              code="unsupported_parameter")
        if self.stream_options is not None and not self.stream:
            raise OpenAIError(400, "stream_options is only allowed with stream=true", param="stream_options")


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name, ok in (("logprobs", self.logprobs is None), ("best_of", self.best_of in (None, 1)),
                         ("suffix", self.suffix is None), ("echo", not self.echo)):
            if not ok:
                raise OpenAIError(400, f"{name} is not supported by this server; leave it unset",
                                  param=name, code="unsupported_parameter")


class ChatMessage(BaseModel):
    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for p in self.content:
            if p.get("type") != "text" or not isinstance(p.get("text"), str):
                raise OpenAIError(400, f"message content part of type {p.get('type')!r} is not supported; "
                                       f"send text parts only", param="messages", code="unsupported_parameter")
            parts.append(p["text"])
        return "".join(parts)


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if getattr(self, name) not in (None, [], "none"):
                raise OpenAIError(400, f"{name} is not supported by this server (no tool calling); remove it",
                                  param=name, code="unsupported_parameter")
        if self.logprobs or self.top_logprobs:
            raise OpenAIError(400, "logprobs are not supported by this server; leave them unset",
                              param="logprobs", code="unsupported_parameter")
        if self.response_format not in (None, {"type": "text"}):
            raise OpenAIError(400, "response_format other than {'type': 'text'} is not supported",
                              param="response_format", code="unsupported_parameter")

    def new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def parse_request(cls: type[_Sampling], body: Any) -> _Sampling:
    """Validate a decoded JSON body into `cls`; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise OpenAIError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        req = cls.model_validate(body)
    except ValidationError as e:
        errors = e.errors()
        err = errors[0]
        param, tag = _where(err["loc"])
        if err["type"] == "extra_forbidden":
            raise OpenAIError(400, f"Unrecognized request argument supplied: {param}", param=param,
                              code="unsupported_parameter") from None
        if err["type"] == "missing":
            raise OpenAIError(400, f"you must provide the '{param}' parameter", param=param) from None
        if tag:  # a union: each member's error is tagged with its type; name what is accepted
            tags = dict.fromkeys(t for t in (_where(x["loc"])[1] for x in errors if _where(x["loc"])[0] == param) if t)
            raise OpenAIError(400, f"invalid value for '{param}': expected {' or '.join(tags)}", param=param) from None
        raise OpenAIError(400, f"invalid value for '{param}': {err['msg']}, got {_shown(err.get('input'))}",
                          param=param) from None
    req.check_unsupported()
    return req


def _shown(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


_TYPE_TAG = re.compile(r"str|int|float|bool|list\[.*\]|dict\[.*\]")


def _where(loc: tuple) -> tuple[str | None, str | None]:
    """(the field path of a pydantic error location, the union member it was tried as): pydantic
    puts the member's type into the location, ('prompt', 'list[int]', 0) -> ('prompt', 'list[int]')."""
    path = []
    for p in loc:
        if isinstance(p, str) and _TYPE_TAG.fullmatch(p):
            return ".".join(path) or None, p
        path.append(str(p))
    return ".".join(path) or None, None


# ---------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, finish: str | None, *, created: int,
                    usage_counts: tuple[int, int] | None = None, token_ids: list[int] | None = None,
                    prompt_ids: list[int] | None = None) -> dict[str, Any]:
    """A /v1/completions response (usage_counts = (prompt, completion) tokens), or one streamed
    chunk of it (usage_counts None). token_ids / prompt_ids: the return_token_ids extension."""
    choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        if prompt_ids is not None:
            choice["prompt_token_ids"] = prompt_ids
    body = {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": [choice]}
    if usage_counts is not None:
        body["usage"] = usage(*usage_counts)
    return body


def chat_body(rid: str, model: str, text: str, finish: str | None, *, created: int, prompt_tokens: int,
              completion_tokens: int, token_ids: list[int] | None = None,
              prompt_ids: list[int] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                              "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
        choice["prompt_token_ids"] = prompt_ids
    return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chat_chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None,
               token_ids: list[int] | None = None) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    if token_ids is not None:
        choice["token_ids"] = token_ids
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, created: int, obj: str, prompt_tokens: int,
                completion_tokens: int) -> dict[str, Any]:
    """The final chunk of a stream with stream_options.include_usage: no choices, the usage."""
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(prompt_tokens, completion_tokens)}


def now() -> int:
    return int(time.time())


__all__ = ["OpenAIError", "CompletionRequest", "ChatRequest", "ChatMessage", "parse_request", "new_id", "usage",
           "completion_body", "chat_body", "chat_chunk", "usage_chunk", "now"]
