"""The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions, /health and /metrics."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from foundry.core.errors import UserError
from foundry.infer.engine import Completion, Engine
from foundry.infer.scheduler import TokenLogprob
from foundry.infer.tools import CALL_OPENINGS, split_tool_calls
from foundry.serve.auth import require_key
from foundry.serve.backend import Backend, Draining, Generation, QueueFull
from foundry.serve.config import ServeConfig
from foundry.serve.errors import (
    APIError,
    error_body,
    install_handlers,
    validation_error,
)
from foundry.serve.logprobs import TokenText, chat_entries, completion_logprobs
from foundry.serve.metrics import Metrics
from foundry.serve.page import PREFIX, add_playground
from foundry.serve.prepare import Prepared, prepare_chat, prepare_completion
from foundry.serve.schemas import ChatRequest, CompletionRequest

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


class _ClientGone(Exception):
    """The client of a non-streamed request closed its connection."""


def create_app(config: ServeConfig, backend: Backend) -> FastAPI:
    """The server's app around a backend (its engine attached by whoever loads the model)."""
    app = FastAPI(title="foundry", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.config, app.state.backend = config, backend
    app.state.metrics = metrics = Metrics(
        backend.stats, lambda: backend.aborted,
        speculation=lambda: backend.engine.spec_stats if backend.engine is not None else None)
    app.state.started = int(time.time())
    install_handlers(app)
    app.add_middleware(_CountRequests, counter=metrics.requests)

    @app.get("/health")
    async def health() -> JSONResponse:
        if backend.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        if backend.engine is None:
            return JSONResponse({"status": "loading"}, 503)
        return JSONResponse({"status": "ok"})

    api = APIRouter(dependencies=[Depends(require_key)])

    @api.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @api.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model",
                                            "created": app.state.started, "owned_by": "foundry"}]}

    @api.post("/v1/completions")
    async def completions(request: Request) -> Response:
        arrived = time.perf_counter()
        req = _parse(await _read_json(request, config.max_body_bytes), CompletionRequest)
        prepared = prepare_completion(req, _engine(backend), config)
        return await _answer(request, req, prepared, "text_completion", backend, metrics, config, arrived)

    @api.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        arrived = time.perf_counter()
        req = _parse(await _read_json(request, config.max_body_bytes), ChatRequest)
        prepared = prepare_chat(req, _engine(backend), config)
        return await _answer(request, req, prepared, "chat.completion", backend, metrics, config, arrived)

    app.include_router(api)
    if config.playground:
        add_playground(app)
    return app


def _engine(backend: Backend) -> Engine:
    if backend.draining:
        raise APIError(503, "the server is shutting down; retry on another replica", "server_shutting_down")
    if backend.engine is None:
        raise APIError(503, "the model is still loading; retry when GET /health answers 200", "model_loading",
                       headers={"Retry-After": "1"})
    return backend.engine


async def _read_json(request: Request, limit: int) -> Any:
    """The body as JSON: at most `limit` bytes, strict UTF-8, no lone surrogates."""
    length = request.headers.get("content-length", "")
    too_big = APIError(413, f"the request body is over {limit} bytes (foundry serve --max-body-bytes)",
                       "request_too_large")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})", "invalid_utf8") from None
    try:
        value = json.loads(text)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # a \ud800 escape decodes to a lone surrogate
    except json.JSONDecodeError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    except (UnicodeEncodeError, RecursionError):
        raise APIError(400, "the request body holds invalid Unicode (a lone surrogate escape)", "invalid_utf8") from None
    return value


def _parse(value: Any, schema: type) -> Any:
    if not isinstance(value, dict):
        raise APIError(400, "the request body must be a JSON object", "invalid_value")
    try:
        return schema.model_validate(value)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


def _submit(backend: Backend, prepared: Prepared, retry_after: int) -> Generation:
    try:
        return backend.submit(prepared.prompts, prepared.params)
    except QueueFull:
        raise APIError(429, f"the server's queue is full ({backend.max_queued} requests waiting); retry shortly",
                       "queue_full", headers={"Retry-After": str(retry_after)}) from None
    except Draining:
        raise APIError(503, "the server is shutting down; retry on another replica", "server_shutting_down") from None


async def _answer(request: Request, req: Any, prepared: Prepared, kind: str, backend: Backend,
                  metrics: Metrics, config: ServeConfig, arrived: float) -> Response:
    gen = _submit(backend, prepared, config.retry_after_s)  # the last place an error status can be chosen
    tokenizer = backend.engine.tokenizer if backend.engine is not None else None
    reply = _Reply(kind, req.model, prepared, metrics, arrived, tokenizer)
    if req.stream:
        usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_sse(reply, gen, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watcher = asyncio.create_task(_abort_on_disconnect(request, gen))
    try:
        async for delta in gen:
            reply.take(delta)
    except _ClientGone:
        return Response(status_code=499)  # nobody is left to read it
    except Draining:
        raise APIError(503, "the server shut down before this request finished", "server_shutting_down") from None
    except UserError as exc:  # the engine refused what prepare() let through: still the request's fault
        raise APIError(400, str(exc), "invalid_value") from None
    finally:
        watcher.cancel()
        gen.abort()
    return JSONResponse(reply.whole())


async def _abort_on_disconnect(request: Request, gen: Generation) -> None:
    """Wait for the client to leave (the body is read, so the next message is the disconnect), then abort."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gen.abort()
    gen.fail(_ClientGone())  # wakes the handler, which is waiting for the next delta


async def _sse(reply: _Reply, gen: Generation, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events; a disconnect cancels this generator, and `finally` drops the generation."""
    try:
        for chunk in reply.opening():
            yield _event(chunk, include_usage)
        async for delta in gen:
            for chunk in reply.take(delta):
                yield _event(chunk, include_usage)
        if include_usage:
            yield f"data: {json.dumps(reply.envelope([], stream=True, usage=reply.usage()))}\n\n"
        yield "data: [DONE]\n\n"
    except (Draining, UserError) as exc:  # after the 200 was sent (the grace period ended): say so in the stream
        gone = isinstance(exc, Draining)
        message = "the server shut down before this request finished" if gone else str(exc)
        body = error_body(503 if gone else 400, message, "server_shutting_down" if gone else "invalid_value")
        yield f"data: {json.dumps(body)}\n\n"
    except Exception:  # noqa: BLE001 - the engine failed mid-stream (logged by the backend): end it readably
        body = error_body(500, "internal server error; the server log has the details", "internal_error")
        yield f"data: {json.dumps(body)}\n\n"
    finally:
        gen.abort()


def _event(chunk: dict[str, Any], include_usage: bool) -> str:
    if include_usage:
        chunk["usage"] = None  # OpenAI: every chunk but the last carries usage: null
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


class _Reply:
    """Builds one request's response, whole or as chunks, from the engine's deltas; feeds the metrics.

    Replies that may hold tool calls are not streamed as text until it is clear they are text: a forced
    call is JSON that means nothing until whole, so it is read when it ends and sent as one chunk of
    tool_calls; under "auto" a reply is held only while it may still open as a call ("{" or
    "<tool_call>"), then either streamed as text or, being a call, read whole."""

    def __init__(self, kind: str, model: str, prepared: Prepared, metrics: Metrics, arrived: float,
                 tokenizer: Any = None):
        self.kind, self.model, self.prepared, self.metrics = kind, model, prepared, metrics
        self.id = ("cmpl-" if kind == "text_completion" else "chatcmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.arrived = arrived
        self.first_at: float | None = None
        self.last_at: dict[int, float] = {}
        n = len(prepared.prompts)
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.done: list[Completion | None] = [None] * n
        self.leading = [prepared.strip_leading] * n
        self.token_text = TokenText(tokenizer)
        self.logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]  # every reported token of a choice
        self.unsent: list[list[TokenLogprob]] = [[] for _ in range(n)]  # not yet in a chunk
        self.sent_bytes = [bytearray() for _ in range(n)]  # completions' text_offset of streamed chunks
        # echo with logprobs: each choice's prompt tokens, scored; the echo chunk waits for them.
        self.prompt_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
        self.scored_echo = not self.chat and prepared.echo is not None and prepared.logprobs
        # Per choice: held back (a call, or not yet known: `undecided`) or streamed as text.
        self.buffered = [self.chat and prepared.tool_mode != "none"] * n
        self.undecided = [self.chat and prepared.tool_mode == "auto"] * n

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"

    def envelope(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        kind = self.kind if not extra.get("stream") else ("chat.completion.chunk" if self.chat else self.kind)
        extra.pop("stream", None)
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def opening(self) -> list[dict[str, Any]]:
        """The first chunks of a stream: each chat choice's role, or each completion's echoed prompt."""
        if not self.chat:
            echo = self.prepared.echo or []
            if self.scored_echo:
                return []  # each echo goes out with its prompt's logprobs, once the prompt has been scored
            return [self.envelope([{"index": i, "text": text, "logprobs": None, "finish_reason": None}], stream=True)
                    for i, text in enumerate(echo)]
        return [self.envelope([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                "finish_reason": None}], stream=True) for i in range(len(self.texts))]

    def take(self, delta: Any) -> list[dict[str, Any]]:
        """Record a delta; return the stream chunks it makes."""
        i, text, now = delta.index, delta.text, time.perf_counter()
        chunks = []
        if self.scored_echo and delta.prompt_logprobs is not None:
            self.prompt_logprobs[i] = delta.prompt_logprobs
            logprobs = completion_logprobs(delta.prompt_logprobs, self.token_text, self.sent_bytes[i])
            chunks.append(self.envelope([{"index": i, "text": self.prepared.echo[i], "logprobs": logprobs,
                                          "finish_reason": None}], stream=True))
        if self.prepared.logprobs and delta.logprobs:
            # An end-of-sequence token is no part of the reply's text: it gets no entry either.
            mine = [lp for lp in delta.logprobs if lp.token_id not in self.prepared.stop_ids]
            self.logprobs[i] += mine
            self.unsent[i] += mine
        if self.leading[i]:
            text = text.lstrip()
            self.leading[i] = not text
        if text:
            if self.first_at is None:
                self.first_at = now
                self.metrics.ttft.observe(now - self.arrived)
            if i in self.last_at:
                self.metrics.itl.observe(now - self.last_at[i])
            self.last_at[i] = now
            self.texts[i].append(text)
            if self.undecided[i]:
                chunks += self._decide(i)
            elif not self.buffered[i]:
                chunks.append(self._chunk(i, {"content": text} if self.chat else text, None))
        self.metrics.sampled_tokens.inc(len(delta.token_ids))
        if delta.completion is not None:
            self.done[i] = delta.completion
            self.metrics.generation_tokens.inc(delta.completion.completion_tokens)
            if all(c is not None for c in self.done):
                self.metrics.prompt_tokens.inc(self.prepared.prompt_tokens)
            if self.buffered[i]:
                content, calls, finish = self._read(i)
                piece: dict[str, Any] = {"content": content} if content else {}
                if calls:
                    piece["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
                chunks.append(self._chunk(i, piece, None))
                chunks.append(self._chunk(i, {}, finish))
            else:
                chunks.append(self._chunk(i, {} if self.chat else "", delta.completion.finish_reason))
        return chunks

    def _decide(self, i: int) -> list[dict[str, Any]]:
        """Under "auto": once choice i's text can no longer open as a call, stream it as text from now on."""
        seen = "".join(self.texts[i]).lstrip()
        if any(opening.startswith(seen) or seen.startswith(opening) for opening in CALL_OPENINGS):
            return []  # a call, or still maybe one: held until the reply ends
        self.undecided[i] = self.buffered[i] = False
        return [self._chunk(i, {"content": "".join(self.texts[i])}, None)]

    def _read(self, i: int) -> tuple[str | None, list[dict[str, Any]], str]:
        """(content, tool_calls, finish_reason) of finished choice i."""
        text = "".join(self.texts[i])
        finish = self.done[i].finish_reason if self.done[i] else "length"
        mode = self.prepared.tool_mode
        if mode == "none" or (mode == "auto" and not text.lstrip().startswith(CALL_OPENINGS)):
            return text, [], finish  # "auto" text that did not open as a call is text, streamed or not
        content, calls = split_tool_calls(text, self.prepared.tools)
        if not calls:
            return text, [], finish  # a forced call cut short by max_tokens stays text, with reason "length"
        if mode == "forced":
            content = None  # the constraint allowed nothing but the call
        if not self.prepared.parallel_tool_calls:
            calls = calls[:1]
        return content, calls, "tool_calls"

    def _chunk(self, i: int, piece: Any, finish: str | None) -> dict[str, Any]:
        """A stream chunk of choice i: a chat delta dict or completion text, with the logprobs not yet sent."""
        logprobs, self.unsent[i] = self._logprobs(i, self.unsent[i], self.sent_bytes[i]), []
        if self.chat:
            choice = {"index": i, "delta": piece, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": finish}
        return self.envelope([choice], stream=True)

    def _logprobs(self, i: int, entries: list[TokenLogprob], so_far: bytearray) -> dict[str, Any] | None:
        if not self.prepared.logprobs:
            return None
        if self.chat:
            return {"content": chat_entries(entries, self.token_text), "refusal": None}
        return completion_logprobs(entries, self.token_text, so_far)

    def usage(self) -> dict[str, int]:
        generated = sum(c.completion_tokens for c in self.done if c is not None)
        return {"prompt_tokens": self.prepared.prompt_tokens, "completion_tokens": generated,
                "total_tokens": self.prepared.prompt_tokens + generated}

    def whole(self) -> dict[str, Any]:
        """The non-streamed response."""
        choices = []
        for i in range(len(self.done)):
            logprobs = self._logprobs(i, self.prompt_logprobs[i] + self.logprobs[i], bytearray())
            if self.chat:
                content, calls, finish = self._read(i)
                message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
                if calls:
                    message["tool_calls"] = calls
                choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
            else:
                text, finish = "".join(self.texts[i]), self.done[i].finish_reason if self.done[i] else "length"
                if self.prepared.echo is not None:
                    text = self.prepared.echo[i] + text
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish})
        return self.envelope(choices, usage=self.usage())


class _CountRequests:
    """Pure ASGI middleware counting answers by route and status (BaseHTTPMiddleware would hide disconnects)."""

    def __init__(self, app: Callable, counter: Any):
        self.app, self.counter = app, counter

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        route = path if path in ROUTES else "playground" if path == "/" or path.startswith(PREFIX) else "other"

        async def counting_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.counter.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)
