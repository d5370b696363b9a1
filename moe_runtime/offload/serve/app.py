"""The HTTP face of `moe serve`: a FastAPI app with the OpenAI endpoints, SSE streaming, metrics.

    GET  /health                 {"status": "ok"} (503 while shutting down); no key needed
    GET  /metrics                Prometheus text; no key needed
    GET  /v1/models[/{id}]       the one served model
    POST /v1/completions         prompt -> text, stream=true for server-sent events
    POST /v1/chat/completions    messages -> chat template -> text, stream=true for SSE

Each request becomes a scheduler Request whose `emit` callback puts Chunks on an asyncio queue of
the event loop (call_soon_threadsafe: the scheduler is another thread). A client that goes away
(stream closed, or a non-streamed request disconnected) cancels its request: a queued one leaves
the queue at once, a running one frees its row at the next step; it is counted as status 499.

Bodies are read with a bound: a Content-Length over MAX_BODY_BYTES is refused before a byte is
read, a chunked body is refused as soon as it passes the limit (both 413, connection closed).
The JSON must be plain JSON (no NaN/Infinity), at most MAX_JSON_DEPTH deep, and its strings valid
Unicode (no lone UTF-16 surrogates from \\ud800-style escapes): otherwise 400, the connection kept.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from moe_runtime.offload.serve import protocol as P
from moe_runtime.core.generation import SamplingParams
from moe_runtime.offload.serve.metrics import ServerMetrics
from moe_runtime.offload.serve.scheduler import Chunk, Request, Scheduler
from moe_runtime.offload.serve.text import TokenizerAdapter

MAX_BODY_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64
"""Nesting depth allowed in a request body (OpenAI requests nest about 5 deep)."""
CLIENT_CLOSED = 499
"""The status a request whose client went away is counted under (nginx's "client closed request")."""
_SURROGATE = re.compile("[\ud800-\udfff]")
_log = logging.getLogger("uvicorn.error")


@dataclass(kw_only=True)
class ServeContext:
    """Everything the endpoints need; built by offload/serve/server.py."""

    model_name: str
    scheduler: Scheduler
    tokenizer: TokenizerAdapter
    render_chat: Callable[[list[dict[str, str]]], str]
    max_seq_len: int
    eos_token_ids: tuple[int, ...]
    metrics: ServerMetrics
    api_key: str | None = None
    created: int = 0
    closing: bool = False


def create_app(ctx: ServeContext) -> FastAPI:
    app = FastAPI(title="moe serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.add_middleware(_Gate, ctx=ctx)

    @app.exception_handler(P.OpenAIError)
    async def _openai_error(request: HTTPRequest, e: P.OpenAIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(P.OpenAIError(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                                          code="not_found" if e.status_code == 404 else None).body(),
                            status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: HTTPRequest, e: Exception) -> JSONResponse:
        return JSONResponse(P.OpenAIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health():
        if ctx.closing:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok", "running": ctx.scheduler.running, "queued": ctx.metrics.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        _check_model(ctx, model_id)
        return _model_card(ctx)

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        req = P.parse_request(P.CompletionRequest, await _json_body(request))
        _check_model(ctx, req.model)
        ids = _prompt_ids(ctx, req.prompt)
        return await _serve(ctx, request, req, ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: HTTPRequest):
        req = P.parse_request(P.ChatRequest, await _json_body(request))
        _check_model(ctx, req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = ctx.render_chat(messages)
        except ValueError as e:
            raise P.OpenAIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        ids = ctx.tokenizer.encode(text)
        return await _serve(ctx, request, req, ids, chat=True)

    return app


class _Gate:
    """ASGI middleware: the bearer-key check on /v1/*, and request counts by endpoint and status.
    (Plain ASGI, not BaseHTTPMiddleware, so streamed responses and disconnects pass untouched.)"""

    def __init__(self, app, ctx: ServeContext):
        self.app, self.ctx = app, ctx

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, ctx = scope["path"], self.ctx
        known = path in ("/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
        endpoint = path if known else ("/v1/models/{id}" if path.startswith("/v1/models/") else "other")
        if path.startswith("/v1/") and ctx.api_key is not None:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, f"Bearer {ctx.api_key}".encode()):
                ctx.metrics.request(endpoint, 401)
                err = P.OpenAIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                    code="invalid_api_key")
                return await JSONResponse(err.body(), status_code=401)(scope, receive, send)
        status, started = [500], [False]

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        except Exception as e:
            if started[0]:  # mid-response: nothing to answer with, uvicorn closes the connection
                raise
            # Answered here, not by Starlette's ServerErrorMiddleware, which re-raises after its
            # answer, so uvicorn would close a keep-alive connection for any 500.
            _log.exception("moe serve: unexpected error on %s %s", scope["method"], path)
            err = P.OpenAIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error")
            await JSONResponse(err.body(), status_code=500)(scope, receive, send_counted)
        finally:
            ctx.metrics.request(endpoint, status[0])


def _model_card(ctx: ServeContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "moe-runtime",
            "max_model_len": ctx.max_seq_len}


def _check_model(ctx: ServeContext, name: str) -> None:
    if name != ctx.model_name:
        raise P.OpenAIError(404, f"The model '{name}' does not exist; this server serves '{ctx.model_name}' "
                                 f"(GET /v1/models)", param="model", code="model_not_found")


async def _json_body(request: HTTPRequest) -> Any:
    """The request's JSON, read within MAX_BODY_BYTES and checked by _check_json."""
    raw = await _read_body(request)
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:
        raise P.OpenAIError(400, f"the request body nests too deeply (at most {MAX_JSON_DEPTH} levels)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise P.OpenAIError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    _check_json(body)
    return body


async def _read_body(request: HTTPRequest) -> bytes:
    """The body, or a 413 (with Connection: close, so the rest is never read) as soon as it is over
    MAX_BODY_BYTES: from Content-Length before reading, else (chunked) at the chunk that passes it."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large(f"a declared Content-Length of {int(declared)} bytes")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                raise _too_large(f"at least {len(body)} bytes")
    except ClientDisconnect:
        raise P.OpenAIError(CLIENT_CLOSED, "the client closed the connection while sending the body") from None
    return bytes(body)


def _too_large(what: str) -> P.OpenAIError:
    return P.OpenAIError(413, f"request body of {what} is over the {MAX_BODY_BYTES}-byte limit; send a shorter "
                              f"prompt", code="request_too_large", headers={"Connection": "close"})


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _check_json(body: Any) -> None:
    """400 for a body nested over MAX_JSON_DEPTH or holding a lone UTF-16 surrogate (a "\\ud800"
    escape without its pair: valid JSON, but not text that can be encoded, tokenized or echoed)."""
    stack: list[tuple[Any, tuple]] = [(body, ())]
    while stack:
        x, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise P.OpenAIError(400, f"the request body nests too deeply (at most {MAX_JSON_DEPTH} levels)")
        if isinstance(x, dict):
            for k, v in x.items():
                _check_text(k, path)
                stack.append((v, path + (k,)))
        elif isinstance(x, list):
            stack.extend((v, path + (i,)) for i, v in enumerate(x) if isinstance(v, (dict, list, str)))
        elif isinstance(x, str):
            _check_text(x, path)


def _check_text(s: str, path: tuple) -> None:
    if (m := _SURROGATE.search(s)) is not None:
        where = ".".join(map(str, path)) or None
        raise P.OpenAIError(400, f"{where or 'a key'} holds a lone UTF-16 surrogate (\\u{ord(m.group()):04x}) "
                                 f"at character {m.start()}, which is not valid Unicode; send UTF-8 text "
                                 f"(an escaped surrogate needs its pair)", param=where)


def _prompt_ids(ctx: ServeContext, prompt: Any) -> list[int]:
    """A string, a list of token ids, or a list holding one of those (one prompt per request)."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise P.OpenAIError(400, f"a list of {len(prompt)} prompts is not supported; send one prompt per "
                                     f"request", param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if isinstance(prompt, str):
        return ctx.tokenizer.encode(prompt)
    try:
        ctx.tokenizer.check_ids(prompt)
    except ValueError as e:
        raise P.OpenAIError(400, str(e), param="prompt") from None
    return list(prompt)


def _limits(ctx: ServeContext, req: Any, ids: list[int], chat: bool) -> int:
    """The number of new tokens to allow, or a 400 when the prompt or max_tokens does not fit."""
    n, C = len(ids), ctx.max_seq_len
    param = "messages" if chat else "prompt"
    if n == 0:
        raise P.OpenAIError(400, "the prompt is empty; send at least one token", param=param)
    if n >= C:
        raise P.OpenAIError(400, f"This model's maximum context length is {C} tokens. However, your "
                                 f"{param} has {n} tokens; shorten it", param=param, code="context_length_exceeded")
    want = req.new_tokens() if chat else req.max_tokens
    if want is None:
        return C - n
    if n + want > C:
        name = "max_completion_tokens" if chat and req.max_completion_tokens is not None else "max_tokens"
        raise P.OpenAIError(400, f"This model's maximum context length is {C} tokens. However, you requested "
                                 f"{n + want} tokens ({n} in the {param}, {want} in the completion); lower "
                                 f"{name} to at most {C - n}", param=name, code="context_length_exceeded")
    return want


def _sampling(ctx: ServeContext, req: Any, max_new: int) -> SamplingParams:
    """The request's controls; an unseeded sampled request gets a fresh seed of its own (its draws
    then depend on nothing else in the batch)."""
    seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little")
    return SamplingParams(max_new_tokens=max_new, temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                          repetition_penalty=req.repetition_penalty, seed=seed,
                          eos_token_ids=ctx.eos_token_ids, stop=tuple(req.stop_list()))


async def _serve(ctx: ServeContext, http: HTTPRequest, req: Any, ids: list[int], *, chat: bool):
    """Queue the request, then answer in one body or as a stream of server-sent events."""
    params = _sampling(ctx, req, _limits(ctx, req, ids, chat))
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    sreq = Request(prompt_ids=ids, params=params, emit=_emitter(loop, queue))
    if ctx.closing or not ctx.scheduler.submit(sreq):
        if ctx.closing or ctx.scheduler.closing:
            raise P.OpenAIError(503, "the server is shutting down; retry on another instance", type="server_error")
        raise P.OpenAIError(429, f"the request queue is full ({ctx.scheduler.max_queue} waiting); retry later",
                            type="rate_limit_error", code="queue_full")
    rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
    if req.stream:
        events = _sse_chat(ctx, req, sreq, queue, rid, created, ids) if chat else \
            _sse_completion(ctx, req, sreq, queue, rid, created, ids)
        return StreamingResponse(_guarded(ctx, sreq, events), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    text, toks, finish = await _collect(ctx, http, sreq, queue)
    tok_ids = toks if req.return_token_ids else None
    if chat:
        return P.chat_body(rid, ctx.model_name, text, finish, created=created, prompt_tokens=len(ids),
                           completion_tokens=len(toks), token_ids=tok_ids, prompt_ids=ids if tok_ids else None)
    return P.completion_body(rid, ctx.model_name, text, finish, created=created, usage_counts=(len(ids), len(toks)),
                             token_ids=tok_ids, prompt_ids=ids if tok_ids else None)


class _Mailbox:
    """Chunks from the scheduler thread to the event loop: the first chunk of a burst (one decode
    step hands out one per running request) wakes the loop, the rest ride along, so a step of 16
    streams costs one wake-up instead of 16."""

    _boxes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox]" = weakref.WeakKeyDictionary()
    _boxes_lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.items, self.lock, self.scheduled = loop, [], threading.Lock(), False

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "_Mailbox":
        """The loop's mailbox (one per event loop; it goes when the loop does)."""
        with cls._boxes_lock:
            box = cls._boxes.get(loop)
            if box is None:
                box = cls._boxes[loop] = cls(loop)
            return box

    def post(self, queue: asyncio.Queue, chunk: Chunk) -> None:
        with self.lock:
            self.items.append((queue, chunk))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop has closed (shutdown): nobody is listening any more
            with self.lock:
                self.items.clear()
                self.scheduled = False

    def _flush(self) -> None:
        with self.lock:
            items, self.items, self.scheduled = self.items, [], False
        for queue, chunk in items:
            queue.put_nowait(chunk)


def _emitter(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue):
    """The scheduler thread's way into this request's queue on the event loop."""
    box = _Mailbox.of(loop)

    def emit(chunk: Chunk) -> None:
        box.post(queue, chunk)
    return emit


async def _collect(ctx: ServeContext, http: HTTPRequest, sreq: Request, queue: asyncio.Queue
                   ) -> tuple[str, list[int], str]:
    """Wait for the whole answer; a client that disconnects meanwhile cancels it (queued or running),
    and the request is counted as CLIENT_CLOSED, not as a server error."""
    text, toks = [], []
    gone = asyncio.Event()
    watcher = asyncio.create_task(_cancel_on_disconnect(ctx, http, sreq, gone))
    try:
        while True:
            c = await queue.get()
            text.append(c.text)
            toks += c.token_ids
            if c.finish is not None:
                break
    finally:
        watcher.cancel()
        ctx.scheduler.cancel(sreq)  # no-op when finished; frees the row when this task was cancelled
    if c.finish == "cancelled" and gone.is_set():
        raise P.OpenAIError(CLIENT_CLOSED, "the client closed the connection before the answer was ready")
    _raise_unfinished(c)
    return "".join(text), toks, c.finish


async def _cancel_on_disconnect(ctx: ServeContext, http: HTTPRequest, sreq: Request, gone: asyncio.Event) -> None:
    """Wait for the client to go away (the body is read: the next ASGI message is the disconnect)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass
    gone.set()
    ctx.scheduler.cancel(sreq)


def _raise_unfinished(c: Chunk) -> None:
    if c.finish == "error":
        raise P.OpenAIError(500, c.error or "generation failed", type="server_error")
    if c.finish == "cancelled":
        raise P.OpenAIError(503, c.error or "the request was cancelled", type="server_error")


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _guarded(ctx: ServeContext, sreq: Request, events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The event stream; when the client goes away Starlette cancels it and the row is freed."""
    try:
        async for e in events:
            yield e
        yield "data: [DONE]\n\n"
    finally:
        ctx.scheduler.cancel(sreq)


async def _chunks(queue) -> AsyncIterator:
    """One request's chunks from the scheduler, up to and including its last (finish set)."""
    while True:
        c = await queue.get()
        yield c
        if c.finish is not None:
            return


def _failed_event(c) -> str | None:
    """The SSE error event that ends a stream whose request failed or was cancelled, else None."""
    if c.finish not in ("error", "cancelled"):
        return None
    return _sse(P.OpenAIError(500 if c.finish == "error" else 503, c.error or "cancelled",
                              type="server_error").body())


async def _sse_completion(ctx, req, sreq, queue, rid, created, ids) -> AsyncIterator[str]:
    n = 0
    async for c in _chunks(queue):
        if (failed := _failed_event(c)) is not None:
            yield failed
            return
        n += len(c.token_ids)
        if c.text or c.finish or req.return_token_ids:
            body = P.completion_body(rid, ctx.model_name, c.text, c.finish, created=created,
                                     token_ids=c.token_ids if req.return_token_ids else None)
            yield _sse(body)
    if req.stream_options is not None and req.stream_options.include_usage:
        yield _sse(P.usage_chunk(rid, ctx.model_name, created, "text_completion", len(ids), n))


async def _sse_chat(ctx, req, sreq, queue, rid, created, ids) -> AsyncIterator[str]:
    yield _sse(P.chat_chunk(rid, ctx.model_name, created, {"role": "assistant", "content": ""}, None))
    n = 0
    async for c in _chunks(queue):
        if (failed := _failed_event(c)) is not None:
            yield failed
            return
        n += len(c.token_ids)
        tok_ids = c.token_ids if req.return_token_ids else None
        if c.text or tok_ids:
            yield _sse(P.chat_chunk(rid, ctx.model_name, created, {"content": c.text}, None, tok_ids))
        if c.finish is not None:
            yield _sse(P.chat_chunk(rid, ctx.model_name, created, {}, c.finish))
    if req.stream_options is not None and req.stream_options.include_usage:
        yield _sse(P.usage_chunk(rid, ctx.model_name, created, "chat.completion.chunk", len(ids), n))


__all__ = ["ServeContext", "create_app", "MAX_BODY_BYTES"]
