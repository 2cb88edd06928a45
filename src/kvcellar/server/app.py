"""The HTTP server: OpenAI-compatible completions, the ``/cache`` controller API, metrics, health.

Endpoints
    ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` = server-sent
    events), ``GET /v1/models``, ``GET /health``, ``GET /metrics``, and the controller API
    ``POST /cache/lookup|pin|unpin|clear``, ``GET /cache/stats``.

Tenants
    The API key names the tenant (:mod:`kvcellar.server.auth`); generation and controller calls
    use that tenant's cache engine, so tenants never reuse each other's KV.

Concurrency
    Generation runs in worker threads; the model itself does one forward step at a time behind a
    FIFO lock, so concurrent generations interleave token by token. At most
    ``max_concurrent_requests`` generations hold a slot; later requests wait for one (that wait,
    plus the wait for the model before the prefill, is the queue time in metrics and in the
    ``x-kvcellar-queue-ms`` header), and with more than ``max_queued_requests`` already waiting the
    server answers 429. Events travel from the worker thread to the response through an asyncio
    queue; when the client goes away the worker stops after the current token and frees the model.

Headers
    ``x-kvcellar-cached-tokens``: prompt tokens served from the KV cache. For a non-streaming
    request this is the real number. A streaming response must send its headers before the body,
    so there it is the engine's lookup made right after the request got its slot (an estimate: a
    concurrent request may store or evict chunks in between); the ``usage`` of the last chunk
    (``stream_options.include_usage``) carries the real number. ``x-kvcellar-queue-ms`` is, for a
    streaming response, only the wait for a slot (the wait for the model is known later).

Errors
    Every error has the OpenAI shape ``{"error": {"message", "type", "param", "code"}}``: 401 for a
    missing or unknown key, 403 for a forbidden controller call, 404 for an unknown model or path,
    409 for controller calls when the cache is disabled, 422 for malformed JSON or wrong types,
    429 when the queue is full, 400 for every other bad request (including a prompt that does not
    fit in the context). A 500 means a bug; it is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from kvcellar.config import Settings
from kvcellar.errors import PromptTooLongError
from kvcellar.kv.engine import CacheEngine
from kvcellar.llm import LLM, GenerationOutput, StreamEvent
from kvcellar.server.auth import Authenticator, AuthMiddleware, Caller
from kvcellar.server.metrics import ServerMetrics
from kvcellar.server.schemas import (
    APIError,
    AssistantMessage,
    CacheControl,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    ChoiceDelta,
    ClearBody,
    ClearResponse,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Health,
    LookupResponse,
    ModelCard,
    ModelList,
    PinBody,
    PinResponse,
    PromptBody,
    PromptTokensDetails,
    SemanticClearBody,
    SemanticFeedbackBody,
    UnpinResponse,
    Usage,
)
from kvcellar.server.semantic import SemanticLayer, SemanticRequest

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
ROLES = ("system", "user", "assistant")
_SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts
_END = object()  # the worker thread is done
_GONE = object()  # the client disconnected
_DISCONNECT_POLL_S = 0.5  # how often a non-streaming request checks that its client is there


# --- admission: a bounded number of generations, a bounded queue ---------------------------------


class Admission:
    """At most ``limit`` holders; at most ``max_waiting`` waiters, beyond that 429.

    Used from the event loop only: a generation's slot is released by a done-callback of its
    worker thread's future, which runs in the loop.
    """

    def __init__(self, limit: int, max_waiting: int) -> None:
        self.limit = limit
        self.max_waiting = max_waiting
        self._sem = asyncio.Semaphore(limit)
        self.waiting = 0
        self.running = 0

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises a 429 APIError when full."""
        if self._sem.locked() and self.waiting >= self.max_waiting:
            raise APIError(
                429,
                f"server busy: {self.running} requests running and {self.waiting} waiting "
                f"(max_queued_requests={self.max_waiting}); retry later",
                code="rate_limit_exceeded",
            )
        t0 = time.perf_counter()
        self.waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        return time.perf_counter() - t0

    def release(self) -> None:
        self.running -= 1
        self._sem.release()


# --- the server's state -------------------------------------------------------------------------


class _State:
    def __init__(self, llm: LLM, settings: Settings) -> None:
        self.llm = llm
        self.settings = settings
        self.model_name = settings.served_model_name or settings.model
        self.model_aliases = {self.model_name, settings.model, llm.runner.name}
        fingerprint = str(getattr(llm.runner, "fingerprint", self.model_name))
        self.system_fingerprint = (
            "fp_" + hashlib.blake2b(fingerprint.encode(), digest_size=5).hexdigest()
        )
        self.created = int(time.time())
        self.auth = Authenticator(settings)
        self.admission = Admission(settings.max_concurrent_requests, settings.max_queued_requests)
        self.executor = ThreadPoolExecutor(
            max_workers=settings.max_concurrent_requests, thread_name_prefix="kvcellar-gen"
        )
        self.runs: set[_Generation] = set()
        self.metrics = ServerMetrics(
            tier_stats=lambda: llm.engine.storage.stats() if llm.engine is not None else [],
            requests_running=lambda: self.admission.running,
            requests_waiting=lambda: self.admission.waiting,
            model_queue_depth=llm.runner.lock.waiting,
        )
        self.semantic = (
            SemanticLayer(settings, self.model_name, self.metrics.registry, llm.runner)
            if settings.semantic_cache else None
        )


# --- one generation in a worker thread -----------------------------------------------------------


class _Generation:
    """Runs ``llm.stream`` in a worker thread and hands its events to the event loop.

    The slot taken from :class:`Admission` is released when the thread ends, so the number of
    generations using the model really is bounded, even after a client went away.
    """

    def __init__(
        self, state: _State, ids: list[int], params: dict[str, Any], tenant: str, wait_s: float
    ) -> None:
        self.state = state
        self.ids = ids
        self.params = params
        self.tenant = tenant
        self.wait_s = wait_s
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.cancelled = threading.Event()
        self._next_check = 0.0

    def start(self) -> None:
        self.state.runs.add(self)
        future = self.loop.run_in_executor(self.state.executor, self._produce)
        future.add_done_callback(self._finished)

    def _finished(self, _future: asyncio.Future[None]) -> None:
        self.state.runs.discard(self)
        self.state.admission.release()

    def cancel(self) -> None:
        self.cancelled.set()

    def _put(self, item: object) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled.set()

    def _produce(self) -> None:
        if self.cancelled.is_set():
            return
        stream = self.state.llm.stream(self.ids, tenant=self.tenant, **self.params)
        try:
            for event in stream:
                if event.output is not None:
                    self._record(event.output)
                elif self.cancelled.is_set():
                    self.state.metrics.cancelled.inc()
                    log.info("client went away; generation stopped early")
                    return
                self._put(event)
        except Exception as exc:
            self._put(exc)
        finally:
            stream.close()
            self._put(_END)

    def _record(self, out: GenerationOutput) -> None:
        self.state.metrics.observe_generation(
            prompt_tokens=out.prompt_tokens,
            cached_tokens=out.cached_tokens,
            completion_tokens=out.completion_tokens,
            ttft_s=self.wait_s + out.ttft_s,
            queue_s=self.wait_s + out.queue_s,
            total_s=self.wait_s + out.total_s,
        )

    async def get(self, request: Request | None = None) -> object:
        """The next event, exception or ``_END``; with ``request``, ``_GONE`` (and the worker
        stopped) once the client disconnected (checked every ``_DISCONNECT_POLL_S``)."""
        if request is None:
            return await self.queue.get()
        while True:
            now = time.monotonic()
            if now >= self._next_check:
                self._next_check = now + _DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.cancel()
                    return _GONE
            try:
                return await asyncio.wait_for(self.queue.get(), timeout=_DISCONNECT_POLL_S)
            except TimeoutError:
                continue


class _EventStream(StreamingResponse):
    """Server-sent events that stop the generation when the response ends for any reason."""

    def __init__(
        self, content: AsyncIterator[str], run: _Generation, headers: dict[str, str]
    ) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.cancel()


# --- request checks -----------------------------------------------------------------------------


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _check_model(state: _State, model: str) -> None:
    if model not in state.model_aliases:
        raise APIError(
            404,
            f"the model {model!r} does not exist on this server; it serves {state.model_name!r}",
            param="model",
            code="model_not_found",
        )


def _neutral(body: BaseModel, checks: Sequence[tuple[str, Callable[[Any], bool]]]) -> None:
    """Refuse features that would change the answer but are not implemented."""
    for name, ok in checks:
        value = getattr(body, name)
        if value is not None and not ok(value):
            raise _bad(f"{name}={value!r} is not supported by this server; omit it", param=name)


def _sampling(body: ChatCompletionRequest | CompletionRequest, requested: int | None, name: str):
    """Validated sampling keywords for ``llm.stream`` (max_tokens is added later)."""
    if body.n is not None and body.n != 1:
        raise _bad(f"n={body.n} is not supported: only n=1 (one choice per request)", param="n")
    if requested is not None and requested < 1:
        raise _bad(f"{name} must be at least 1, got {requested}", param=name)
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0.0 <= temperature <= 2.0:
        raise _bad(f"temperature must be in [0, 2], got {temperature}", param="temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 < top_p <= 1.0:
        raise _bad(f"top_p must be in (0, 1], got {top_p}", param="top_p")
    if body.seed is not None and not _SEED_RANGE[0] <= body.seed <= _SEED_RANGE[1]:
        raise _bad("seed must fit in 64 bits", param="seed")
    stop = body.stop
    if isinstance(stop, list) and len(stop) > MAX_STOP_SEQUENCES:
        raise _bad(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    _neutral(
        body,
        [
            ("frequency_penalty", lambda v: v == 0),
            ("presence_penalty", lambda v: v == 0),
            ("logit_bias", lambda v: not v),
        ],
    )
    return {"temperature": temperature, "top_p": top_p, "seed": body.seed, "stop": stop}


def _chat_messages(messages: Sequence[ChatMessage], param: str = "messages") -> list[dict]:
    if not messages:
        raise _bad("messages must be a non-empty list of {role, content} objects", param=param)
    out = []
    for i, m in enumerate(messages):
        if m.role not in ROLES:
            raise _bad(
                f"messages[{i}].role {m.role!r} is not supported; use one of {', '.join(ROLES)}",
                param=f"{param}[{i}].role",
            )
        if m.content is None:
            if m.role != "assistant":
                raise _bad(f"messages[{i}].content is missing", param=f"{param}[{i}].content")
            text = ""
        elif isinstance(m.content, str):
            text = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                if part.type != "text" or part.text is None:
                    raise _bad(
                        f"messages[{i}].content[{j}] of type {part.type!r} is not supported; "
                        "only text parts ({'type': 'text', 'text': ...})",
                        param=f"{param}[{i}].content[{j}]",
                    )
                texts.append(part.text)
            text = "\n".join(texts)
        out.append({"role": m.role, "content": text})
    return out


def _completion_prompt(prompt: Any) -> str | list[int]:
    if isinstance(prompt, str):
        return prompt
    if prompt and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    if len(prompt) == 1:
        return prompt[0]
    raise _bad(
        "give one prompt per request (a string or a list of token ids); batches are not supported",
        param="prompt",
    )


async def _tokenize(state: _State, prompt: Any, param: str) -> list[int]:
    try:
        ids = await run_in_threadpool(state.llm.tokenize, prompt)
    except (ValueError, TypeError) as exc:
        raise _bad(str(exc), param=param) from None
    if not ids:
        raise _bad("the prompt is empty", param=param)
    return ids


def _max_tokens(state: _State, n_prompt: int, requested: int | None, param: str) -> int:
    max_context = state.llm.runner.max_context
    if requested is None:
        requested = min(DEFAULT_MAX_TOKENS, max_context - n_prompt)
        if requested < 1:
            raise APIError(
                400,
                f"prompt of {n_prompt} tokens leaves no room in the model's context of "
                f"{max_context} tokens; shorten the prompt",
                param=param,
                code="context_length_exceeded",
            )
    try:
        state.llm.runner.check_length(n_prompt, requested)
    except PromptTooLongError as exc:
        raise APIError(400, str(exc), param=param, code="context_length_exceeded") from None
    return requested


# --- response pieces ----------------------------------------------------------------------------


def _usage(out: GenerationOutput) -> Usage:
    return Usage(
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        total_tokens=out.prompt_tokens + out.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=out.cached_tokens),
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class _ChatFormat:
    prefix = "chatcmpl-"

    def __init__(self, state: _State, rid: str, created: int, include_usage: bool) -> None:
        self.base = {"id": rid, "created": created, "model": state.model_name}
        self.base["system_fingerprint"] = state.system_fingerprint
        self.include_usage = include_usage

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> str:
        d = ChatCompletionChunk(**self.base, choices=choices, usage=usage).model_dump(mode="json")
        for c in d["choices"]:
            c["delta"] = {k: v for k, v in c["delta"].items() if v is not None}
        if not self.include_usage:
            d.pop("usage")
        return _sse(d)

    def start(self) -> list[str]:
        return [self._chunk([ChatChunkChoice(delta=ChoiceDelta(role="assistant", content=""))])]

    def delta(self, text: str) -> str:
        return self._chunk([ChatChunkChoice(delta=ChoiceDelta(content=text))])

    def finish(self, out: GenerationOutput) -> list[str]:
        chunks = [
            self._chunk([ChatChunkChoice(delta=ChoiceDelta(), finish_reason=out.finish_reason)])
        ]
        if self.include_usage:
            chunks.append(self._chunk([], _usage(out)))
        return chunks

    def whole(self, out: GenerationOutput) -> dict[str, Any]:
        return ChatCompletion(
            **self.base,
            choices=[
                ChatChoice(
                    message=AssistantMessage(content=out.text), finish_reason=out.finish_reason
                )
            ],
            usage=_usage(out),
        ).model_dump(mode="json")


class _TextFormat:
    prefix = "cmpl-"

    def __init__(self, state: _State, rid: str, created: int, include_usage: bool) -> None:
        self.base = {"id": rid, "created": created, "model": state.model_name}
        self.base["system_fingerprint"] = state.system_fingerprint
        self.include_usage = include_usage

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        d = Completion(**self.base, choices=choices, usage=usage).model_dump(mode="json")
        if not self.include_usage:
            d.pop("usage")
        return _sse(d)

    def start(self) -> list[str]:
        return []

    def delta(self, text: str) -> str:
        return self._chunk([CompletionChoice(text=text)])

    def finish(self, out: GenerationOutput) -> list[str]:
        chunks = [self._chunk([CompletionChoice(text="", finish_reason=out.finish_reason)])]
        if self.include_usage:
            chunks.append(self._chunk([], _usage(out)))
        return chunks

    def whole(self, out: GenerationOutput) -> dict[str, Any]:
        return Completion(
            **self.base,
            choices=[CompletionChoice(text=out.text, finish_reason=out.finish_reason)],
            usage=_usage(out),
        ).model_dump(mode="json")


# --- generation endpoint logic ------------------------------------------------------------------


def _early_error(exc: BaseException, param: str) -> BaseException:
    """An exception ``llm.stream`` raised before its first token, as an HTTP error."""
    if isinstance(exc, PromptTooLongError):
        return APIError(400, str(exc), param=param, code="context_length_exceeded")
    if isinstance(exc, (ValueError, TypeError)):
        return _bad(str(exc), param=param)
    return exc


async def _serve_generation(
    state: _State,
    request: Request,
    *,
    fmt_cls: type[_ChatFormat] | type[_TextFormat],
    prompt: Any,
    param: str,
    requested_max: int | None,
    sampling: dict[str, Any],
    stream: bool,
    include_usage: bool,
    semantic: SemanticRequest | None = None,
) -> Response:
    caller: Caller = request.state.caller
    ids = await _tokenize(state, prompt, param)
    max_tokens = _max_tokens(state, len(ids), requested_max, param)
    wait_s = await state.admission.acquire()
    started = False
    try:
        if await request.is_disconnected():
            return Response(status_code=499)  # gone while waiting: never start the model
        cached_hint = 0
        engine = state.llm.engine_for(caller.tenant)
        if stream and engine is not None:
            hit = await run_in_threadpool(engine.lookup, ids)
            cached_hint = min(hit, len(ids) - 1)
        params = {**sampling, "max_tokens": max_tokens}
        if state.settings.role == "prefill":
            params["prefill_only"] = True
        run = _Generation(state, ids, params, caller.tenant, wait_s)
        run.start()  # from here the worker thread releases the slot when it ends
        started = True
    finally:
        if not started:
            state.admission.release()

    fmt = fmt_cls(state, f"{fmt_cls.prefix}{uuid.uuid4().hex}", int(time.time()), include_usage)

    if not stream:
        parts: list[str] = []
        while True:
            item = await run.get(request)
            if item is _GONE:
                return Response(status_code=499)  # nobody reads it; counted in metrics
            if isinstance(item, BaseException):
                raise _early_error(item, param) if not parts else item
            if item is _END:
                raise RuntimeError("generation ended without an output")
            assert isinstance(item, StreamEvent)
            if item.output is not None:
                out = item.output
                break
            parts.append(item.delta)
        headers = {
            "x-kvcellar-cached-tokens": str(out.cached_tokens),
            "x-kvcellar-prefilled-tokens": str(out.prefilled_tokens),
            "x-kvcellar-queue-ms": f"{(wait_s + out.queue_s) * 1000:.1f}",
        }
        if semantic is not None and state.semantic is not None:
            await state.semantic.store(semantic, out.text)
            headers.update(semantic.header)
        return JSONResponse(fmt.whole(out), headers=headers)

    # Streaming: wait for the first event so an error before any token is still a plain HTTP
    # error (the status line has not been sent yet).
    first = await run.get()
    if isinstance(first, BaseException):
        raise _early_error(first, param)
    if first is _END:
        raise RuntimeError("generation ended without an output")

    async def body() -> AsyncIterator[str]:
        try:
            for chunk in fmt.start():
                yield chunk
            item = first
            while item is not _END:
                if isinstance(item, BaseException):
                    log.error("generation failed mid-stream", exc_info=item)
                    err = APIError(500, f"generation failed: {type(item).__name__}")
                    yield _sse(err.body())
                    return
                assert isinstance(item, StreamEvent)
                if item.output is not None:
                    for chunk in fmt.finish(item.output):
                        yield chunk
                    if semantic is not None and state.semantic is not None:
                        await state.semantic.store(semantic, item.output.text)  # complete only
                elif item.delta:
                    yield fmt.delta(item.delta)
                item = await run.get()
            yield "data: [DONE]\n\n"
        finally:
            run.cancel()

    headers = {
        "x-kvcellar-cached-tokens": str(cached_hint),
        "x-kvcellar-queue-ms": f"{wait_s * 1000:.1f}",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
    }
    if semantic is not None:
        headers.update(semantic.header)
    return _EventStream(body(), run, headers)


async def _serve_cached(
    state: _State, prompt: list[dict], semantic: SemanticRequest, *, stream: bool,
    include_usage: bool,
) -> Response:
    """A semantic-cache hit: the stored answer, as JSON or replayed as a stream, no model run."""
    hit = semantic.decision.hit
    ids = await _tokenize(state, prompt, "messages")
    answer_ids = await run_in_threadpool(state.llm.tokenize, hit.response)
    out = GenerationOutput(
        text=hit.response, token_ids=answer_ids, prompt_tokens=len(ids), cached_tokens=len(ids),
        prefilled_tokens=0, finish_reason="stop", ttft_s=0.0, total_s=0.0)
    fmt = _ChatFormat(state, f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), include_usage)
    headers = {"x-kvcellar-cached-tokens": str(len(ids)), "x-kvcellar-prefilled-tokens": "0",
               **semantic.header}
    if not stream:
        return JSONResponse(fmt.whole(out), headers=headers)

    async def replay() -> AsyncIterator[str]:
        for chunk in fmt.start():
            yield chunk
        # word-sized deltas, like a generation would send them
        pieces = re.findall(r"\s*\S+", hit.response) or [hit.response]
        trailing = hit.response[len("".join(pieces)):]
        for piece in pieces[:-1]:
            yield fmt.delta(piece)
        yield fmt.delta(pieces[-1] + trailing)
        for chunk in fmt.finish(out):
            yield chunk
        yield "data: [DONE]\n\n"

    return StreamingResponse(replay(), media_type="text/event-stream",
                             headers={**headers, "cache-control": "no-cache"})


# --- controller helpers -------------------------------------------------------------------------


def _engine(state: _State, tenant: str) -> CacheEngine:
    engine = state.llm.engine_for(tenant)
    if engine is None:
        raise APIError(
            409,
            "the KV cache is disabled on this server (enabled: false); there is nothing to "
            "look up, pin or clear",
            code="cache_disabled",
        )
    return engine


async def _controller_tokens(state: _State, body: PromptBody) -> list[int]:
    given = [k for k in ("text", "messages", "tokens") if getattr(body, k) is not None]
    if len(given) != 1:
        raise _bad("give exactly one of 'text', 'messages' or 'tokens'")
    name = given[0]
    prompt: Any = getattr(body, name)
    if name == "messages":
        prompt = _chat_messages(prompt)
    return await _tokenize(state, prompt, name)


# --- middleware ---------------------------------------------------------------------------------


class _MetricsMiddleware:
    """Counts every HTTP request by route path and status code."""

    def __init__(self, app: ASGIApp, state: _State, paths: Callable[[], set[str]]) -> None:
        self.app = app
        self.state = state
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope["path"]
            endpoint = path if path in self.paths() else "other"
            self.state.metrics.requests.labels(endpoint, str(status)).inc()


# --- the app ------------------------------------------------------------------------------------


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts = []
    param = None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            return f"the request body is not valid JSON: {detail}".rstrip(": "), None
        if not loc and err.get("type") == "missing":
            return "the request body is missing: send a JSON object", None
        where = ".".join(loc) or "body"
        param = param or (".".join(loc) or None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts), param


def create_app(llm: LLM, settings: Settings) -> FastAPI:
    """The FastAPI app serving ``llm`` with the server settings of ``settings``."""
    state = _State(llm, settings)
    if state.auth.open:
        log.warning(
            "no api_keys configured: the server is OPEN; every request is tenant %r with admin "
            "rights (set api_keys/admin_keys to require keys)",
            settings.tenant,
        )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        for run in list(state.runs):
            run.cancel()
        state.executor.shutdown(wait=False, cancel_futures=True)
        if state.semantic is not None:
            state.semantic.close()

    app = FastAPI(title="kvcellar", version="0.1.0", lifespan=lifespan)
    app.state.kvcellar = state
    route_paths: set[str] = set()
    app.add_middleware(AuthMiddleware, authenticator=state.auth)
    app.add_middleware(_MetricsMiddleware, state=state, paths=lambda: route_paths)

    # --- errors ---
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        headers = {"retry-after": "1"} if exc.status == 429 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(PromptTooLongError)
    async def _too_long(_request: Request, exc: PromptTooLongError) -> JSONResponse:
        err = APIError(400, str(exc), code="context_length_exceeded")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(APIError(422, message, param=param).body(), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        err = APIError(exc.status_code, message, type="invalid_request_error")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error in %s %s", request.method, request.url.path, exc_info=exc)
        err = APIError(500, f"internal server error ({type(exc).__name__}); see the server log")
        return JSONResponse(err.body(), status_code=500)

    # --- OpenAI API ---
    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        requested = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        sampling = _sampling(body, requested, name)
        _neutral(
            body,
            [
                ("logprobs", lambda v: not v),
                ("top_logprobs", lambda v: v == 0),
                ("tools", lambda v: not v),
                ("functions", lambda v: not v),
                ("response_format", lambda v: v.get("type", "text") == "text"),
            ],
        )
        messages = _chat_messages(body.messages)
        stream = bool(body.stream)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        prompt, semantic = messages, None
        if state.semantic is not None:
            caller: Caller = request.state.caller
            semantic = SemanticRequest(
                messages, caller.tenant, body.cache or CacheControl(),
                {**sampling, "max_tokens": requested})
            await state.semantic.lookup(
                semantic, state.admission.waiting + state.admission.running)
            if semantic.decision is not None and semantic.decision.hit is not None:
                return await _serve_cached(
                    state, messages, semantic, stream=stream, include_usage=include_usage)
            prompt = await state.semantic.augment(semantic)
        return await _serve_generation(
            state,
            request,
            fmt_cls=_ChatFormat,
            prompt=prompt,
            param="messages",
            requested_max=requested,
            sampling=sampling,
            stream=stream,
            include_usage=include_usage,
            semantic=semantic,
        )

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        _check_model(state, body.model)
        sampling = _sampling(body, body.max_tokens, "max_tokens")
        _neutral(
            body,
            [
                ("logprobs", lambda v: v == 0),
                ("echo", lambda v: not v),
                ("best_of", lambda v: v == 1),
                ("suffix", lambda v: not v),
            ],
        )
        prompt = _completion_prompt(body.prompt)
        return await _serve_generation(
            state,
            request,
            fmt_cls=_TextFormat,
            prompt=prompt,
            param="prompt",
            requested_max=body.max_tokens,
            sampling=sampling,
            stream=bool(body.stream),
            include_usage=bool(body.stream_options and body.stream_options.include_usage),
        )

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=state.model_name, created=state.created)])

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> ModelCard:
        _check_model(state, model_id)
        return ModelCard(id=state.model_name, created=state.created)

    # --- operations ---
    @app.get("/health")
    async def health() -> Health:
        return Health(
            model=state.model_name,
            cache_enabled=llm.engine is not None,
            queue_depth=llm.runner.lock.waiting(),
            requests_running=state.admission.running,
            requests_waiting=state.admission.waiting,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        text = await run_in_threadpool(state.metrics.render)
        return Response(text, media_type=state.metrics.content_type)

    # --- controller API ---
    @app.post("/cache/lookup")
    async def cache_lookup(body: PromptBody, request: Request) -> LookupResponse:
        engine = _engine(state, request.state.caller.tenant)
        ids = await _controller_tokens(state, body)
        cached = await run_in_threadpool(engine.lookup, ids)
        per_tier = await run_in_threadpool(engine.lookup_per_tier, ids)
        return LookupResponse(prompt_tokens=len(ids), cached_tokens=cached, per_tier=per_tier)

    @app.post("/cache/pin")
    async def cache_pin(body: PinBody, request: Request) -> PinResponse:
        engine = _engine(state, request.state.caller.tenant)
        if body.ttl_s is not None and not body.ttl_s > 0:
            raise _bad("ttl_s must be a positive number of seconds (or null: until unpinned)")
        ids = await _controller_tokens(state, body)
        return PinResponse(pinned_tokens=await run_in_threadpool(engine.pin, ids, body.ttl_s))

    @app.post("/cache/unpin")
    async def cache_unpin(body: PromptBody, request: Request) -> UnpinResponse:
        engine = _engine(state, request.state.caller.tenant)
        ids = await _controller_tokens(state, body)
        return UnpinResponse(unpinned_chunks=await run_in_threadpool(engine.unpin, ids))

    @app.post("/cache/clear")
    async def cache_clear(request: Request, body: ClearBody | None = None) -> ClearResponse:
        body = body or ClearBody()
        caller: Caller = request.state.caller
        engine = _engine(state, caller.tenant)
        if body.all or body.tier is not None:
            if body.tenant is not None or (body.all and body.tier is not None):
                raise _bad("give one of 'tenant', 'tier' or 'all'")
            if not caller.admin:
                raise APIError(
                    403,
                    "clearing a whole tier or every tenant needs an admin key",
                    code="admin_required",
                )
            tiers = await run_in_threadpool(engine.storage.stats)
            if body.all:
                n = sum(t.entries for t in tiers)
                await run_in_threadpool(engine.storage.clear)
                log.warning("cache cleared: every tier, every tenant (%d entries)", n)
                return ClearResponse(cleared="all", deleted_entries=n)
            found = [t for t in tiers if t.name == body.tier]
            if not found:
                names = ", ".join(t.name for t in tiers) or "none"
                raise _bad(f"no tier named {body.tier!r} (tiers: {names})", param="tier")
            await run_in_threadpool(engine.storage.clear_tier, body.tier)
            log.warning("cache tier %s cleared (%d entries)", body.tier, found[0].entries)
            return ClearResponse(cleared="tier", tier=body.tier, deleted_entries=found[0].entries)
        target = body.tenant if body.tenant is not None else caller.tenant
        if target != caller.tenant and not caller.admin:
            raise APIError(
                403,
                f"tenant {caller.tenant!r} may not clear tenant {target!r}'s cache",
                param="tenant",
                code="forbidden_tenant",
            )
        if not target:
            raise _bad("tenant must not be empty", param="tenant")
        n = await run_in_threadpool(_engine(state, target).clear_tenant)
        return ClearResponse(cleared="tenant", tenant=target, deleted_entries=n)

    @app.get("/cache/stats")
    async def cache_stats(request: Request) -> dict[str, Any]:
        tenant = request.state.caller.tenant
        stats = await run_in_threadpool(_engine(state, tenant).stats)
        return {"tenant": tenant, **stats}

    # --- semantic cache controller ---
    def _semantic() -> SemanticLayer:
        if state.semantic is None:
            raise APIError(409, "the semantic cache is off on this server (semantic_cache: "
                           "false)", code="semantic_cache_disabled")
        return state.semantic

    @app.post("/cache/semantic/feedback")
    async def semantic_feedback(body: SemanticFeedbackBody, request: Request) -> dict[str, Any]:
        layer = _semantic()
        caller: Caller = request.state.caller
        owner = await layer.tenant_of(body.entry_id)
        if owner is None or (owner != caller.tenant and not caller.admin):
            # another tenant's entry is as absent as a deleted one
            raise APIError(404, f"no semantic cache entry {body.entry_id}", param="entry_id",
                           code="entry_not_found")
        await run_in_threadpool(layer.cache.feedback, body.entry_id, body.correct)
        return {"entry_id": body.entry_id, "recorded": True}

    @app.post("/cache/semantic/clear")
    async def semantic_clear(request: Request,
                             body: SemanticClearBody | None = None) -> dict[str, Any]:
        layer = _semantic()
        caller: Caller = request.state.caller
        target = (body.tenant if body and body.tenant is not None else caller.tenant)
        if target != caller.tenant and not caller.admin:
            raise APIError(403, f"tenant {caller.tenant!r} may not clear tenant {target!r}'s "
                           "semantic cache", param="tenant", code="forbidden_tenant")
        n = await run_in_threadpool(layer.cache.clear, target)
        return {"tenant": target, "deleted_entries": n}

    @app.get("/cache/semantic/stats")
    async def semantic_stats(request: Request) -> dict[str, Any]:
        layer = _semantic()
        caller: Caller = request.state.caller
        entries = await run_in_threadpool(layer.cache.backend.count, caller.tenant)
        out: dict[str, Any] = {"tenant": caller.tenant, "entries": entries}
        if caller.admin:  # counters are over all tenants
            out["all_tenants"] = await run_in_threadpool(layer.cache.stats)
        return out

    route_paths.update(getattr(r, "path", "") for r in app.routes)
    return app


def run(settings: Settings) -> None:
    """Load the model and cache of ``settings`` and serve them on ``settings.host:port``."""
    import uvicorn

    llm = LLM(**settings.model_dump())
    try:
        llm.generate(
            "Warm-up.", max_tokens=1, use_cache=False
        )  # first-call costs, not in a request
        app = create_app(llm, settings)
        log.info(
            "serving %s on http://%s:%d (%s, role %s)",
            settings.served_model_name or settings.model,
            settings.host,
            settings.port,
            "cache on" if llm.engine is not None else "cache off",
            settings.role,
        )
        if settings.role != "both" and not settings.remote_url:
            log.warning(
                "role %s without remote_url: the hand-off only works through a disk tier that "
                "both workers share",
                settings.role,
            )
        uvicorn.run(app, host=settings.host, port=settings.port, timeout_graceful_shutdown=10)
    finally:
        llm.close()
