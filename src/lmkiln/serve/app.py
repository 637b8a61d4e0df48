"""The FastAPI app of `lmkiln serve`: OpenAI-compatible completions and chat, /health, the chat page.

Handlers run on the event loop and never touch the model: they check the key, read and validate
the body, encode the prompt, hand the request to the scheduler's thread (`BatchScheduler`) and
relay its updates, a token's text at a time, as one JSON answer or as server-sent events ending in
`data: [DONE]`. A streaming client that disconnects cancels its request, which frees its row of
the batch at the next decoding step. Every error is OpenAI's error object with a status code.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lmkiln.infer.batching import BatchScheduler, GenerationRequest, QueueFull, ShuttingDown, Update
from lmkiln.infer.chat import ChatFormat, TemplateError
from lmkiln.model.generate import Sampling
from lmkiln.serve.protocol import ApiError, ChatCompletionRequest, CompletionRequest, parse_body

log = logging.getLogger("lmkiln")


@dataclass
class ServeSettings:
    model_name: str
    """The id clients pass as `model`; requests naming another model get 404."""
    context: int
    """The model's context in tokens (prompt and answer together)."""
    api_key: str | None = None
    """Required as `Authorization: Bearer KEY` on /v1/* when set; compared in constant time."""
    max_body_bytes: int = 1 << 20
    """Largest request body accepted (413 above)."""
    max_prompt_tokens: int = 0
    """Longest prompt accepted; 0 means the context minus one (400 above)."""
    max_tokens: int = 0
    """Most tokens a request may ask for, and the default when it asks for none; 0 means the context."""

    def __post_init__(self) -> None:
        self.max_prompt_tokens = min(self.max_prompt_tokens or self.context - 1, self.context - 1)
        self.max_tokens = self.max_tokens or self.context


class _Outbox:
    """Updates of one decoding step, handed to the event loop in one call: the loop wakes once per
    step instead of once per token of every request (the scheduler calls `flush` after each step)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[tuple[asyncio.Queue, Update]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, update: Update) -> None:  # on the scheduler's thread
        with self._lock:
            self._pending.append((queue, update))

    def flush(self) -> None:  # on the scheduler's thread
        with self._lock:
            batch, self._pending = self._pending, []
        if batch and self.loop is not None:
            # RuntimeError: the event loop has closed, nobody waits for these answers any more
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(self._deliver, batch)

    @staticmethod
    def _deliver(batch: list[tuple[asyncio.Queue, Update]]) -> None:
        for queue, update in batch:
            queue.put_nowait(update)


class _Job:
    """A request handed to the scheduler, and its updates delivered back on the event loop."""

    def __init__(
        self, outbox: _Outbox, prompt_ids: list[int], sampling: Sampling, stop_ids: frozenset[int]
    ) -> None:
        self.prompt_tokens = len(prompt_ids)
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self.request = GenerationRequest(
            prompt_ids, sampling, stop_ids, lambda update: outbox.put(self.updates, update)
        )

    async def stream(self) -> AsyncIterator[Update]:
        while True:
            update = await self.updates.get()
            yield update
            if update.finish_reason is not None:
                return

    async def collect(self) -> tuple[str, Update]:
        parts = []
        try:
            async for update in self.stream():
                parts.append(update.text)
        finally:  # the handler was cancelled (client gone, server stopping): free the row
            self.request.cancelled.set()
        if update.finish_reason == "error":
            raise ApiError(500, "generation failed; see the server's log", code="generation_failed")
        if update.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled", code="cancelled")
        return "".join(parts), update

    def usage(self, update: Update) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": update.tokens,
            "total_tokens": self.prompt_tokens + update.tokens,
        }


def _sse(payload: dict | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    return f"data: {data}\n\n"


def _error_response(err: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, or 413 as soon as it passes `limit` bytes (declared or streamed)."""
    too_large = ApiError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(scheduler: BatchScheduler, chat_format: ChatFormat, settings: ServeSettings) -> FastAPI:
    """The app; its lifespan starts the scheduler thread and, at shutdown, drains it."""

    outbox = _Outbox()
    scheduler.after_step = outbox.flush

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        outbox.loop = asyncio.get_running_loop()
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.close)

    app = FastAPI(title="lmkiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_error_handlers(app)
    created = int(time.time())
    tokenizer = chat_format.tokenizer

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "missing API key: send `Authorization: Bearer KEY`", code="missing_api_key")
        if not hmac.compare_digest(given.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "invalid API key", code="invalid_api_key")

    async def parse(request: Request, schema):
        authorize(request)
        params = parse_body(await read_body(request, settings.max_body_bytes), schema)
        if params.model != settings.model_name:
            raise ApiError(
                404,
                f"model {params.model!r} does not exist; this server serves {settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        return params

    def start(prompt_ids: list[int], params, prompt_param: str) -> _Job:
        if len(prompt_ids) > settings.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {settings.context} tokens "
                f"and this server accepts prompts of at most {settings.max_prompt_tokens}",
                param=prompt_param,
                code="context_length_exceeded",
            )
        limit = params.token_limit()
        if limit is not None and limit > settings.max_tokens:
            raise ApiError(
                400,
                f"max_tokens is {limit}; this server generates at most {settings.max_tokens} tokens per request",
                param="max_tokens",
                code="max_tokens_too_large",
            )
        sampling = Sampling(
            max_new_tokens=limit or settings.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            seed=params.seed,
            stop=params.stop_strings(),
        )
        job = _Job(outbox, prompt_ids, sampling, chat_format.stop_ids)
        try:
            scheduler.submit(job.request)
        except QueueFull as err:
            raise ApiError(429, f"the server is busy ({err}); retry later", code="queue_full") from None
        except ShuttingDown:
            raise ApiError(503, "the server is shutting down", code="shutting_down") from None
        return job

    @app.get("/health")
    async def health() -> dict:
        status = "ok" if scheduler.accepting else "draining"
        return {"status": status, "model": settings.model_name, **scheduler.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(resources.files("lmkiln.serve").joinpath("static/chat.html").read_text("utf-8"))

    def model_card() -> dict:
        return {
            "id": settings.model_name,
            "object": "model",
            "created": created,
            "owned_by": "lmkiln",
            "context_length": settings.context,
            "chat_template": chat_format.template is not None,
        }

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request) -> dict:
        authorize(request)
        if model_id != settings.model_name:
            raise ApiError(404, f"model {model_id!r} does not exist", param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        params = await parse(request, CompletionRequest)
        prompt_ids = tokenizer.encode(params.prompt_text()) or [tokenizer.eos_id]  # "" starts a document
        job = start(prompt_ids, params, "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": settings.model_name}
        if params.stream:
            return _stream(job, params.include_usage(), _completion_chunk(head))
        text, end = await job.collect()
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}
        return {**head, "object": "text_completion", "choices": [choice], "usage": job.usage(end)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        params = await parse(request, ChatCompletionRequest)
        try:
            prompt_ids = chat_format.encode([m.as_dict() for m in params.messages])
        except TemplateError as err:
            raise ApiError(422, f"messages: {err}", param="messages", code="invalid_value") from None
        job = start(prompt_ids, params, "messages")
        head = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": settings.model_name,
        }
        if params.stream:
            return _stream(job, params.include_usage(), _chat_chunk(head))
        text, end = await job.collect()
        message = {"role": "assistant", "content": text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": end.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": job.usage(end)}

    return app


def _completion_chunk(head: dict):
    def chunk(text: str | None, finish_reason: str | None) -> dict:
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {**head, "object": "text_completion", "choices": [choice]}

    return chunk


def _chat_chunk(head: dict):
    def chunk(text: str | None, finish_reason: str | None) -> dict:
        delta = {"role": "assistant", "content": ""} if text is None else {"content": text} if text else {}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "object": "chat.completion.chunk", "choices": [choice]}

    return chunk


def _stream(job: _Job, include_usage: bool, chunk) -> StreamingResponse:
    """Server-sent events: a first chunk, one per piece of text, the finish reason, [usage], [DONE]."""

    async def events() -> AsyncIterator[str]:
        try:
            yield _sse(chunk(None, None))
            async for update in job.stream():
                if update.finish_reason in ("error", "cancelled"):
                    failure = ApiError(
                        500 if update.finish_reason == "error" else 503, "generation ended early"
                    )
                    yield _sse(failure.body())
                    break
                if update.text:
                    yield _sse(chunk(update.text, None))
                if update.finish_reason is not None:
                    yield _sse(chunk("", update.finish_reason))
                    if include_usage:
                        yield _sse({**chunk("", None), "choices": [], "usage": job.usage(update)})
            yield _sse("[DONE]")
        finally:  # also when the client went away mid-stream: its row is freed at the next step
            job.request.cancelled.set()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed"}
        message = f"{request.method} {request.url.path}: {err.detail}"
        return _error_response(ApiError(err.status_code, message, code=codes.get(err.status_code)))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(422, str(err.errors()[:1]), code="invalid_value"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return _error_response(
            ApiError(500, "internal server error; see the server's log", code="internal_error")
        )
