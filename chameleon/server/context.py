"""What every route shares: the service, the settings and metrics, the threads that run blocking
calls, admission (at most ``max_concurrency`` requests at once), API keys, and running a
request's generations.

One :class:`ServerContext` per app, on ``app.state.context``; routes reach it through
:func:`server_context` and guard themselves with :func:`authorised`.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor

from fastapi import Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from chameleon.engines.sampling import Sampling
from chameleon.server import schemas
from chameleon.server.errors import ApiError
from chameleon.server.metrics import Metrics
from chameleon.server.middleware import note
from chameleon.server.service import Completion, GenerationRequest, Service
from chameleon.server.settings import ServeSettings
from chameleon.server.streaming import Chunks, Run, stream_runs, usage_of

bearer = HTTPBearer(auto_error=False, description="An API key, when the server has any.")


class Admission:
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


class ServerContext:
    def __init__(self, service: Service, settings: ServeSettings, metrics: Metrics):
        self.service, self.settings, self.metrics = service, settings, metrics
        self.workers = ThreadPoolExecutor(max_workers=settings.max_concurrency + 4, thread_name_prefix="chameleon-request")
        self.admission = Admission(settings.max_concurrency, metrics)

    async def blocking(self, function: Callable, *args):
        """``function(*args)`` on a request thread, awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.workers, function, *args)

    async def admitted(self, function: Callable, *args):
        """:meth:`blocking` within one place of admission."""
        self.admission.enter()
        try:
            return await self.blocking(function, *args)
        finally:
            self.admission.leave()

    def max_tokens_of(self, requested: int | None) -> int:
        tokens = requested or self.settings.default_max_tokens
        if tokens > self.settings.max_tokens:
            raise ApiError(400, f"max_tokens is {tokens}; this server allows at most {self.settings.max_tokens}", code="max_tokens")
        return tokens

    def check_openai(self, body: schemas.OpenAIGeneration) -> None:
        if body.model not in (None, self.service.model_id):
            raise ApiError(
                404, f"the model {body.model!r} does not exist; this server runs {self.service.model_id!r}", code="model_not_found"
            )
        if refused := body.refused_parameters:
            raise ApiError(
                400,
                f"this server does not implement {', '.join(refused)}: leave them out or at their defaults",
                code="unsupported_parameter",
            )

    def choice_runs(self, body: schemas.OpenAIGeneration, max_tokens: int, run: Callable[[GenerationRequest], Completion]) -> list[Run]:
        """``run(request)`` once per choice, each drawing with its own seed; greedy choices are all
        the same, so one generation answers them all."""

        def answering(sampling: Sampling | None) -> Callable[..., Completion]:
            return lambda on_text, cancelled: run(GenerationRequest(max_tokens, body.stops, on_text, cancelled, sampling))

        first = body.sampling()
        if first is None or first.greedy:
            return [Run(answering(first), list(range(body.n)))]
        return [Run(answering(body.sampling(i)), [i]) for i in range(body.n)]

    async def generate(self, runs: list[Run], stream: bool, chunks: Chunks) -> Response:
        """Run the generations of a request's choices; answer them whole, or as server-sent events
        rendered by ``chunks``. Each choice holds a place among ``max_concurrency``."""
        admission = self.admission
        slots = sum(len(run.choices) for run in runs)
        if slots > admission.limit:
            raise ApiError(
                400, f"n is {slots}; this server runs at most {admission.limit} generations at once (--max-concurrency)", code="n"
            )
        admission.enter(slots)
        if not stream:
            cancelled = threading.Event()
            futures = [asyncio.ensure_future(self.blocking(run.call, None, cancelled)) for run in runs]
            try:
                done = await asyncio.gather(*futures)
                choices = [(c, run.choices) for c, run in zip(done, runs)]
                note(usage=usage_of(choices))
                return JSONResponse(chunks.whole(choices))
            except BaseException:
                cancelled.set()  # a choice that failed stops the others; their places are free once they have
                await asyncio.gather(*futures, return_exceptions=True)
                raise
            finally:
                admission.leave(slots)
        try:
            events = await stream_runs(runs, self.blocking, chunks)
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


def server_context(request: Request) -> ServerContext:
    return request.app.state.context


def authorised(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """With API keys configured, the request must bear one of them."""
    keys = server_context(request).settings.api_keys
    if not keys:
        return
    given = credentials.credentials if credentials is not None else ""
    if not any(secrets.compare_digest(given.encode(), key.encode()) for key in keys):
        raise ApiError(401, "a valid API key is required (Authorization: Bearer KEY)", "authentication_error", "invalid_api_key")
