"""The HTTP API: Chameleon's own routes and the OpenAI-compatible ones, on one FastAPI app.

- ``POST /v1/rag``, ``POST /v1/search``: retrieval-augmented answers with sources and timings,
  and search alone (text or vector).
- ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``: OpenAI-compatible,
  streaming included, retrieval-augmented unless the request says ``"rag": false``.
- ``POST /v1/embeddings``: OpenAI-compatible, with the embedder the passages were indexed with
  (its vectors search ``/v1/search``).
- ``GET /healthz`` (the process answers), ``GET /readyz`` (every tier answers), ``GET /metrics``.
- ``POST /admin/reload``: serve the passage index on disk again once it has changed.

Every response carries an ``X-Request-ID`` (the request's own when it sends a sane one), which
also names the OpenAI objects (``chatcmpl-ID``); with the access log on, each request ends with
one JSON line on the ``chameleon.access`` logger (route, status, time, tokens, the error if any),
and an error inside a stream is logged with its traceback on ``chameleon.server``.

Errors have OpenAI's shape (``{"error": {"message", "type", "code", "param"}}``) so its clients
report them. With API keys configured every ``/v1`` and ``/admin`` route needs ``Authorization:
Bearer KEY``; health, readiness and metrics stay open for probes and scrapers. Requests beyond
``max_concurrency`` (running or queued) get 429 at once rather than waiting without bound; a
streamed request keeps its place until its stream ends. An error found before the first token of a
stream is an ordinary 4xx response; one after it ends the stream with an ``error`` event.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException

from chameleon.server import schemas
from chameleon.server.metrics import Metrics
from chameleon.server.service import Completion, ReloadInProgress, ReportedToken, Service
from chameleon.server.settings import ServeSettings
from coordinator.client import RemoteError
from retriever.errors import RetrieverError


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


ACCESS_LOG = logging.getLogger("chameleon.access")
SERVER_LOG = logging.getLogger("chameleon.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What the access log says of the request being served: its id, and what the routes add
_REQUEST: ContextVar[dict | None] = ContextVar("chameleon_request", default=None)


def _note(**fields) -> None:
    """Add ``fields`` to the access log line of the request being served."""
    request = _REQUEST.get()
    if request is not None:
        request.update(fields)


def _request_id() -> str:
    request = _REQUEST.get()
    return request["request_id"] if request is not None else uuid.uuid4().hex


def _error_body(message: str, kind: str, code: str | None = None) -> dict:
    _note(error=message)
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


def create_app(service: Service, settings: ServeSettings, metrics: Metrics) -> FastAPI:
    app = FastAPI(
        title="Chameleon",
        version="0.1.0",
        description="Retrieval-augmented generation over a disaggregated IVF-PQ retrieval tier.",
    )
    workers = ThreadPoolExecutor(max_workers=settings.max_concurrency + 4, thread_name_prefix="chameleon-request")
    admission = _Admission(settings.max_concurrency, metrics)
    bearer = HTTPBearer(auto_error=False, description="An API key, when the server has any.")

    async def blocking(function: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(workers, function, *args)

    def authorised(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if not settings.api_keys:
            return
        given = credentials.credentials if credentials is not None else ""
        if not any(secrets.compare_digest(given.encode(), key.encode()) for key in settings.api_keys):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error", "invalid_api_key")

    def max_tokens_of(requested: int | None) -> int:
        tokens = requested or settings.default_max_tokens
        if tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens is {tokens}; this server allows at most {settings.max_tokens}", code="max_tokens")
        return tokens

    def check_openai(body: schemas._Generation) -> None:
        if body.model not in (None, service.model_id):
            raise ApiError(404, f"the model {body.model!r} does not exist; this server runs {service.model_id!r}", code="model_not_found")
        if refused := body.refused_parameters:
            raise ApiError(
                400,
                f"this server does not implement {', '.join(refused)}: leave them out or at their defaults",
                code="unsupported_parameter",
            )

    async def generate(runs: list[_Run], stream: bool, chunks: _Chunks) -> Response:
        """Run the generations of a request's choices; answer them whole, or as server-sent events
        rendered by ``chunks``. Each choice holds a place among ``max_concurrency``."""
        slots = sum(len(run.choices) for run in runs)
        if slots > admission.limit:
            raise ApiError(
                400, f"n is {slots}; this server runs at most {admission.limit} generations at once (--max-concurrency)", code="n"
            )
        admission.enter(slots)
        if not stream:
            cancelled = threading.Event()
            futures = [asyncio.ensure_future(blocking(run.call, None, cancelled)) for run in runs]
            try:
                done = await asyncio.gather(*futures)
                choices = [(c, run.choices) for c, run in zip(done, runs)]
                _note(usage=_usage(choices))
                return JSONResponse(chunks.whole(choices))
            except BaseException:
                cancelled.set()  # a choice that failed stops the others; their places are free once they have
                await asyncio.gather(*futures, return_exceptions=True)
                raise
            finally:
                admission.leave(slots)
        try:
            events = await _stream(runs, blocking, chunks)
        except BaseException:
            admission.leave(slots)
            raise

        async def body() -> AsyncIterator[str]:
            try:
                async for event in events:
                    yield event
            finally:
                admission.leave(slots)

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def choice_runs(body: schemas._Generation, run: Callable) -> list[_Run]:
        """``run(on_text, cancelled, sampling)`` once per choice, each drawing with its own seed;
        greedy choices are all the same, so one generation answers them all."""
        first = body.sampling()
        if first is None or first.greedy:
            return [_Run(lambda on_text, cancelled: run(on_text, cancelled, first), list(range(body.n)))]
        return [_Run(lambda on_text, cancelled, i=i: run(on_text, cancelled, body.sampling(i)), [i]) for i in range(body.n)]

    # -- exceptions -----------------------------------------------------------------------------

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(_error_body(e.message, e.kind, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(RetrieverError)
    async def _retriever_error(request: Request, e: RetrieverError):
        if isinstance(e, RemoteError) and e.code in ("unavailable", "shutting_down", "overloaded"):
            return JSONResponse(_error_body(str(e), "service_unavailable", e.code), status_code=503)
        return JSONResponse(_error_body(str(e), "invalid_request_error"), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse(_error_body(problems, "invalid_request_error", "invalid_body"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse(_error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code, headers=e.headers)

    # -- probes -----------------------------------------------------------------------------------

    @app.get("/healthz", tags=["probes"])
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", tags=["probes"], responses={503: {"description": "A tier does not answer."}})
    async def readyz():
        readiness = await blocking(service.readiness)
        return JSONResponse(readiness, status_code=200 if readiness["ready"] else 503)

    @app.get("/metrics", tags=["probes"], response_class=Response)
    async def metrics_endpoint():
        return Response(await blocking(generate_latest, metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- Chameleon's API --------------------------------------------------------------------------

    @app.post("/v1/rag", response_model=schemas.RagResponse, dependencies=[Depends(authorised)], tags=["chameleon"])
    async def rag(body: schemas.RagRequest):
        max_tokens = max_tokens_of(body.max_tokens)
        if body.retrieval_interval is not None and body.retrieval_interval > max_tokens:
            raise ApiError(400, f"retrieval_interval ({body.retrieval_interval}) exceeds max_tokens ({max_tokens})")

        def run(on_text, cancelled):
            return service.rag(
                body.question,
                max_tokens,
                body.k,
                body.retrieval_interval,
                body.mode,
                stop=body.stops,
                on_text=on_text,
                cancelled=cancelled,
                sampling=body.sampling(),
            )

        return await generate([_Run(run, [0])], body.stream, _RagChunks(service.model_id))

    @app.post("/v1/search", response_model=schemas.SearchResponse, dependencies=[Depends(authorised)], tags=["chameleon"])
    async def search(body: schemas.SearchRequest):
        admission.enter()
        try:
            hits, timings = await blocking(service.search, body.query, body.vector, body.k, body.nprobe)
        finally:
            admission.leave()
        partial = bool(timings.pop("retrieval_partial", False))
        return {"results": hits, "partial": partial, "timings": {k: round(v, 6) for k, v in timings.items()}}

    # -- administration ---------------------------------------------------------------------------

    @app.post(
        "/admin/reload",
        dependencies=[Depends(authorised)],
        tags=["admin"],
        responses={409: {"description": "A reload is already under way."}},
    )
    async def reload() -> dict:
        """Serve the passage index on disk again after ``chameleon index add``/``remove`` or a
        rebuild. Answers once the new version serves (``reloaded``) or when it is the version
        served already (``reloaded: false``)."""
        try:
            return await blocking(service.reload)
        except ReloadInProgress as e:
            raise ApiError(409, str(e), code="reload_in_progress") from None

    # -- OpenAI-compatible API --------------------------------------------------------------------

    @app.get("/v1/models", dependencies=[Depends(authorised)], tags=["openai"])
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "chameleon"} for name in (service.model_id, service.embedder_id)
            ],
        }

    @app.post("/v1/embeddings", dependencies=[Depends(authorised)], tags=["openai"])
    async def embeddings(body: schemas.EmbeddingRequest):
        if body.model not in (None, service.embedder_id):
            raise ApiError(
                404,
                f"the embedding model {body.model!r} does not exist; this server embeds with {service.embedder_id!r}",
                code="model_not_found",
            )
        dim = service.pipeline.embedder.dim
        if body.dimensions not in (None, dim):
            raise ApiError(400, f"this embedder's vectors have {dim} dimensions, not {body.dimensions}", code="dimensions")
        admission.enter()
        try:
            vectors, tokens = await blocking(service.embed, body.texts)
        finally:
            admission.leave()
        encode = (
            (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64" else (lambda v: v.tolist())
        )
        data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
        return {"object": "list", "data": data, "model": service.embedder_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)], tags=["openai"])
    async def chat_completions(body: schemas.ChatCompletionRequest):
        check_openai(body)
        max_tokens = max_tokens_of(body.max_completion_tokens or body.max_tokens)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
        if body.rag:
            if messages[-1]["role"] != "user":
                raise ApiError(400, 'with rag, the last message must be the user\'s question (or send "rag": false)')
            if body.retrieval_interval is not None and body.retrieval_interval > max_tokens:
                raise ApiError(400, f"retrieval_interval ({body.retrieval_interval}) exceeds max_tokens ({max_tokens})")
            system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
            history = [m for m in messages[:-1] if m["role"] != "system"]

            def run(on_text, cancelled, sampling):
                return service.rag(
                    messages[-1]["content"],
                    max_tokens,
                    body.k,
                    body.retrieval_interval,
                    "passage",
                    history,
                    system,
                    body.stops,
                    on_text,
                    cancelled,
                    sampling,
                )
        else:

            def run(on_text, cancelled, sampling):
                return service.chat(messages, max_tokens, body.stops, on_text, cancelled, sampling)

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await generate(
            choice_runs(body, run), body.stream, _OpenAIChunks(service.model_id, "chat", include_usage, body.reported_logprobs is not None)
        )

    @app.post("/v1/completions", dependencies=[Depends(authorised)], tags=["openai"])
    async def completions(body: schemas.CompletionRequest):
        check_openai(body)
        max_tokens = 0 if body.max_tokens == 0 else max_tokens_of(body.max_tokens)  # 0: only the echoed prompt

        def run(on_text, cancelled, sampling):
            return service.complete(body.prompt, max_tokens, body.rag, body.k, body.stops, on_text, cancelled, sampling, body.echo)

        include_usage = body.stream_options is not None and body.stream_options.include_usage
        return await generate(
            choice_runs(body, run), body.stream, _OpenAIChunks(service.model_id, "text", include_usage, body.reported_logprobs is not None)
        )

    app.add_middleware(_Observed, metrics=metrics, max_body_bytes=settings.max_body_bytes, access_log=settings.access_log)
    app.state.service, app.state.workers = service, workers
    return app


class _Admission:
    """Counts admitted requests (on the event loop, so no lock); refuses past the limit."""

    def __init__(self, limit: int, metrics: Metrics):
        self.limit, self.metrics, self.active = limit, metrics, 0

    def enter(self, slots: int = 1) -> None:
        if self.active + slots > self.limit:
            self.metrics.rejected.inc()
            asked = f"; this request asks for {slots} (its choices)" if slots > 1 else ""
            raise ApiError(
                429,
                f"the server is at its limit of {self.limit} concurrent requests{asked}; retry shortly",
                "rate_limit_error",
                "concurrency_limit",
            )
        self.active += slots
        self.metrics.inflight.set(self.active)

    def leave(self, slots: int = 1) -> None:
        self.active -= slots
        self.metrics.inflight.set(self.active)


@dataclass
class _Run:
    """One generation of a request, ``call(on_text, cancelled)``, and the choices it answers."""

    call: Callable[..., Completion]
    choices: list[int]


async def _stream(runs: list[_Run], blocking, chunks: _Chunks) -> AsyncIterator[str]:
    """Start every run and wait for the first text of any (or a failure first, raised here);
    returns the events of the whole stream. Closing the stream early cancels the generations."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()  # (run number, (text, its tokens' logprobs)), then (run number, None) when it ends
    cancelled = threading.Event()
    tasks = []
    for number, run in enumerate(runs):

        def on_text(text, logprobs, n=number):
            loop.call_soon_threadsafe(queue.put_nowait, (n, (text, logprobs)))

        task = asyncio.ensure_future(blocking(run.call, on_text, cancelled))
        task.add_done_callback(lambda _, n=number: queue.put_nowait((n, None)))
        tasks.append(task)
    first = await queue.get()
    if first[1] is None and tasks[first[0]].exception() is not None:
        cancelled.set()
        tasks[first[0]].result()  # what went wrong before any text: an ordinary error response

    async def events() -> AsyncIterator[str]:
        try:
            for event in chunks.opening([index for run in runs for index in run.choices]):
                yield event
            done: dict[int, Completion] = {}
            number, piece = first
            while True:
                if piece is not None:
                    for index in runs[number].choices:
                        yield chunks.delta(*piece, index)
                else:
                    try:
                        done[number] = tasks[number].result()
                    except Exception as e:  # after the first token the status line is gone: report in the stream
                        if not isinstance(e, RetrieverError):
                            SERVER_LOG.error("request %s failed in its stream", _request_id(), exc_info=e)
                        yield chunks.error(_error_body(str(e) if isinstance(e, RetrieverError) else "internal error", "server_error"))
                        return
                    for index in runs[number].choices:
                        for event in chunks.finished(done[number], index):
                            yield event
                    if len(done) == len(runs):
                        break
                number, piece = await queue.get()
            choices = [(done[n], run.choices) for n, run in enumerate(runs)]
            _note(usage=_usage(choices))
            for event in chunks.closing(choices):
                yield event
        finally:
            cancelled.set()

    return events()


def _sse(data: dict | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


Choices = list[tuple[Completion, list[int]]]  # each generation and the choices it answers


class _Chunks(Protocol):
    """How one route renders its choices: whole, or as the events of a stream."""

    def whole(self, choices: Choices) -> dict: ...
    def opening(self, indices: list[int]) -> list[str]: ...
    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str: ...
    def finished(self, completion: Completion, index: int) -> list[str]: ...
    def closing(self, choices: Choices) -> list[str]: ...
    def error(self, body: dict) -> str: ...


class _RagChunks:
    """``/v1/rag`` (one choice): a ``token`` event per piece of text, then ``done`` with the whole response."""

    def __init__(self, model_id: str):
        self.model_id = model_id

    def whole(self, choices: Choices) -> dict:
        c = choices[0][0]
        return {
            "answer": c.text,
            "sources": c.sources,
            "finish_reason": c.finish_reason,
            "model": self.model_id,
            "usage": _usage(choices),
            "cache": {"cached_tokens": c.cached_tokens, "prompt_tokens": c.prompt_tokens},
            "timings": c.timings,
        }

    def opening(self, indices: list[int]) -> list[str]:
        return []

    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str:
        return _sse({"text": text}, "token")

    def finished(self, completion: Completion, index: int) -> list[str]:
        return []

    def closing(self, choices: Choices) -> list[str]:
        return [_sse(self.whole(choices), "done")]

    def error(self, body: dict) -> str:
        return _sse(body, "error")


class _OpenAIChunks:
    """OpenAI's ``chat.completion`` / ``text_completion`` objects and their streamed chunks. With
    several choices, the ``chameleon`` field (sources, timings) is the first choice's. With
    ``logprobs``, each choice (each chunk) carries its tokens' log-probabilities in the route's shape."""

    def __init__(self, model_id: str, kind: str, include_usage: bool, logprobs: bool = False):
        self.model_id, self.kind, self.include_usage, self.logprobs = model_id, kind, include_usage, logprobs
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{_request_id()}"
        self.created = int(time.time())

    def _object(self, chunk: bool) -> dict:
        name = ("chat.completion" if self.kind == "chat" else "text_completion") + (".chunk" if chunk and self.kind == "chat" else "")
        return {"id": self.id, "object": name, "created": self.created, "model": self.model_id}

    def _logprobs(self, tokens: list[ReportedToken] | None) -> dict | None:
        if not self.logprobs or tokens is None:
            return None
        if self.kind == "text":
            return {
                "tokens": [t.text for t in tokens],
                "token_logprobs": [t.logprob for t in tokens],  # None for a prompt's first token
                "top_logprobs": [None if t.logprob is None else dict(t.top) for t in tokens],
                "text_offset": [t.offset for t in tokens],
            }

        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(*other) for other in t.top]} for t in tokens],
            "refusal": None,
        }

    def _choice(self, index: int, text: str | None, finish_reason: str | None, first: bool = False, logprobs=None) -> dict:
        if self.kind == "text":
            return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": self._logprobs(logprobs)}
        delta = ({"role": "assistant"} if first else {}) | ({"content": text} if text is not None else {})
        return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": self._logprobs(logprobs)}

    def whole(self, choices: Choices) -> dict:
        rendered = []
        for c, indices in choices:
            for index in indices:
                if self.kind == "chat":
                    message = {"role": "assistant", "content": c.text}
                    rendered.append(
                        {"index": index, "message": message, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.logprobs)}
                    )
                else:
                    rendered.append(
                        {"index": index, "text": c.text, "finish_reason": c.finish_reason, "logprobs": self._logprobs(c.logprobs)}
                    )
        rendered.sort(key=lambda choice: choice["index"])
        return {**self._object(False), "choices": rendered, "usage": _usage(choices), "chameleon": _extension(choices[0][0])}

    def opening(self, indices: list[int]) -> list[str]:
        if self.kind != "chat":
            return []
        return [_sse({**self._object(True), "choices": [self._choice(index, "", None, first=True)]}) for index in sorted(indices)]

    def delta(self, text: str, logprobs: list[ReportedToken], index: int) -> str:
        return _sse({**self._object(True), "choices": [self._choice(index, text, None, logprobs=logprobs)]})

    def finished(self, completion: Completion, index: int) -> list[str]:
        return [
            _sse(
                {
                    **self._object(True),
                    "choices": [self._choice(index, None, completion.finish_reason)],
                    "chameleon": _extension(completion),
                }
            )
        ]

    def closing(self, choices: Choices) -> list[str]:
        usage = [_sse({**self._object(True), "choices": [], "usage": _usage(choices)})] if self.include_usage else []
        return [*usage, _sse("[DONE]")]

    def error(self, body: dict) -> str:
        return _sse(body)


def _usage(choices: Choices) -> dict:
    """The prompt once (every choice has the same), the new tokens of every choice."""
    first = choices[0][0]
    completion_tokens = sum(c.completion_tokens * len(indices) for c, indices in choices)
    return {
        "prompt_tokens": first.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": first.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": first.cached_tokens},
    }


def _extension(c: Completion) -> dict:
    return {"sources": c.sources, "timings": c.timings}


class _Observed:
    """ASGI middleware: gives every request an id (``X-Request-ID``), refuses bodies over the limit
    (413), times every request by route and, with ``access_log``, logs a line when it ends."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, access_log: bool = True):
        self.app, self.metrics, self.max_body_bytes, self.access_log = app, metrics, max_body_bytes, access_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = {"code": 500}
        asked = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request = {"request_id": asked if _REQUEST_ID.fullmatch(asked) else uuid.uuid4().hex}
        _REQUEST.set(request)

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request["request_id"].encode())]}
            await send(message)

        try:
            body = await self._read_body(receive)
            if body is None:
                response = JSONResponse(
                    _error_body(f"the request body exceeds {self.max_body_bytes} bytes", "invalid_request_error", "body_too_large"),
                    status_code=413,
                )
                return await response(scope, receive, observed_send)
            return await self.app(scope, _replay(body, receive), observed_send)
        finally:
            route = scope.get("route")
            label = getattr(route, "path", "unmatched")
            seconds = time.perf_counter() - started
            self.metrics.requests.labels(label, str(status["code"])).inc()
            self.metrics.latency.labels(label).observe(seconds)
            if self.access_log:
                client = scope.get("client") or ("", 0)
                line = {
                    "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "method": scope["method"],
                    "path": scope["path"],
                    "route": label,
                    "status": status["code"],
                    "seconds": round(seconds, 4),
                    "client": client[0],
                    **request,
                }
                ACCESS_LOG.info(json.dumps(line))

    async def _read_body(self, receive) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the disconnect, for streaming responses that watch for it

    return replayed
