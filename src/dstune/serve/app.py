"""The OpenAI-compatible HTTP API: GET /v1/models, POST /v1/chat/completions and POST /v1/completions.

Each request is checked (API key, JSON, field ranges, model id), queued for the one generation worker
(429 when the queue is full), and answered whole or streamed as server-sent events. Every error has
OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status, so the official
clients raise their usual exceptions; a failed request never stops the server. A request's deadline
(``--timeout``) covers its wait in the queue and its generation (504). R1 reasoning (``<think>``) is
returned apart as ``reasoning_content``, as DeepSeek's API does.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from dstune.chat import ThinkFilter
from dstune.serve.host import ModelHost
from dstune.serve.schemas import ApiError, ChatRequest, CompletionRequest, Sampling
from dstune.serve.sse import DONE, Reply, event, usage
from dstune.serve.worker import GenerationWorker, Job, QueueFull, timeout_error


class _KeyCheck:
    """ASGI middleware: ``/v1`` requests need ``Authorization: Bearer <key>``, else 401 (before the body is
    read, so a request without the key learns nothing about the API)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = ApiError(
                    401,
                    "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ClientGone(Exception):
    """The client of a non-streamed request disconnected while it waited."""


def create_app(
    host: ModelHost, *, api_key: str | None = None, max_queue: int = 16, timeout: float = 300.0
) -> FastAPI:
    """The ASGI app serving ``host``; its worker thread runs while the app's lifespan does.

    Args:
        host: the loaded model with its served ids.
        api_key: when set, every request needs ``Authorization: Bearer <api_key>`` (401 otherwise).
        max_queue: requests that may wait while one generates; more are answered 429 at once.
        timeout: seconds a request may take, waiting included, before it is answered 504.
    """
    worker = GenerationWorker(host, max_queue=max_queue)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        yield
        await asyncio.to_thread(worker.stop)

    app = FastAPI(title="dstune serve", lifespan=lifespan)
    if api_key is not None:
        app.add_middleware(_KeyCheck, api_key=api_key)
    app.state.worker, app.state.host, app.state.timeout = worker, host, timeout
    _error_handlers(app)

    @app.get("/v1/models")
    async def models() -> dict:
        data = [
            {"id": name, "object": "model", "created": host.created, "owned_by": "dstune"}
            for name in host.adapters
        ]
        return {"object": "list", "data": data}

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "busy": worker.busy,
            "waiting": worker.waiting,
            "served": worker.served,
            "tokens": worker.tokens,
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        messages = [m.as_template_message() for m in body.messages]
        return await _answer(request, body, Reply(body.model, chat=True), messages=messages)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        return await _answer(request, body, Reply(body.model, chat=False), prompt=body.prompt)

    return app


async def _answer(request: Request, body: Sampling, reply: Reply, *, messages=None, prompt=None):
    """Queues the request, waits for generation to start, then answers whole or as a stream."""
    app = request.app
    host: ModelHost = app.state.host
    if body.model not in host.adapters:
        raise ApiError(
            404,
            f"The model {body.model!r} does not exist; served: {', '.join(host.adapters)}",
            param="model",
            code="model_not_found",
        )
    job = Job(
        model_id=body.model,
        messages=messages,
        prompt=prompt,
        max_tokens=body.max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        seed=body.seed,
        stop=body.stop or [],
        deadline=time.monotonic() + app.state.timeout,
        loop=asyncio.get_running_loop(),
    )
    try:
        app.state.worker.submit(job)
    except QueueFull:
        raise ApiError(
            429,
            f"the server is busy: {app.state.worker.max_queue} requests are waiting "
            f"already (--max-queue); retry later",
            type="rate_limit_exceeded",
            code="rate_limit_exceeded",
        ) from None
    try:
        kind, start = await _next_event(job, request)
        if kind == "error":
            raise start
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            stream = _stream(job, reply, start, include_usage)
            return StreamingResponse(
                stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        return await _whole(job, request, reply, start)
    except BaseException:
        job.cancel.set()  # the client left, or the request failed: free the worker
        raise


async def _next_event(job: Job, request: Request) -> tuple[str, object]:
    """The worker's next event for ``job``; checks twice a second whether the client is still there."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                raise ClientGone() from None
            if time.monotonic() > job.deadline + 30:  # the worker is stuck inside one step
                raise timeout_error() from None


async def _whole(job: Job, request: Request, reply: Reply, start: dict) -> dict:
    pieces: list[str] = []
    while True:
        kind, payload = await _next_event(job, request)
        if kind == "text":
            pieces.append(payload)
        elif kind == "error":
            raise payload
        else:
            break
    text, reasoning = "".join(pieces), None
    if reply.chat:  # leading blanks dropped as in a stream, where trailing ones cannot be known in time
        think = ThinkFilter(thinking=start["thinking"])
        parts = think.feed(text) + think.flush()
        thoughts = [t for t, is_reasoning in parts if is_reasoning]
        if start["thinking"] or thoughts:
            reasoning = "".join(thoughts).lstrip()
        text = "".join(think.answer).lstrip()
    counts = usage(start["prompt_tokens"], payload["completion_tokens"])
    return reply.whole(text, reasoning, payload["finish_reason"], counts)


async def _stream(job: Job, reply: Reply, start: dict, include_usage: bool) -> AsyncIterator[str]:
    """The server-sent events of one reply; leaving early (client gone) stops its generation."""
    think = ThinkFilter(thinking=start["thinking"]) if reply.chat else None
    began = {False: False, True: False}  # whether answer / reasoning text was sent: strip leading space
    try:
        if reply.chat:
            yield reply.chunk(first=True)
        while True:
            kind, payload = await job.events.get()
            if kind == "error":
                yield event(payload.body())
                return
            if kind == "end":
                break
            pieces = think.feed(payload) if think else [(payload, False)]
            for text, reasoning in pieces:
                if think and not began[reasoning]:
                    text = text.lstrip()
                if text:
                    began[reasoning] = True
                    yield reply.chunk(text, reasoning=reasoning)
        for text, reasoning in think.flush() if think else []:
            if text.strip() or began[reasoning]:
                yield reply.chunk(text if began[reasoning] else text.lstrip(), reasoning=reasoning)
        yield reply.chunk(finish_reason=payload["finish_reason"])
        if include_usage:
            yield reply.usage_chunk(usage(start["prompt_tokens"], payload["completion_tokens"]))
        yield DONE
    finally:
        job.cancel.set()


def _error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, FastAPI's validation (400, naming the field), routing, bugs."""

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON body: {first.get('ctx', {}).get('error', first.get('msg'))}"
            return JSONResponse(ApiError(400, message).body(), status_code=400)
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if not where and first.get("type") in ("model_attributes_type", "dict_type"):
            message = "the body must be a JSON object (Content-Type: application/json)"
            return JSONResponse(ApiError(400, message).body(), status_code=400)
        param = ".".join(where) or None
        value = first.get("input")
        shown = param and isinstance(value, (int, float, str)) and len(repr(value)) < 80
        got = f" (got {value!r})" if shown else ""
        message = f"{param or 'body'}: {first.get('msg')}{got}"
        return JSONResponse(ApiError(400, message, param=param).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)

    @app.exception_handler(ClientGone)
    async def gone(request: Request, exc: ClientGone) -> JSONResponse:
        return JSONResponse(ApiError(499, "client closed the request").body(), status_code=499)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        body = ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").body()
        return JSONResponse(body, status_code=500)
