"""The HTTP API: Chameleon's own routes and the OpenAI-compatible ones, on one FastAPI app.

``create_app`` assembles it: the routers (``routes/``: probes, Chameleon's, OpenAI's), the error
handlers (``errors``), the middleware (``middleware``), and the context they share (``context``:
the service, admission, API keys, running generations, rendered by ``streaming``).

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

from fastapi import FastAPI

from chameleon.server.context import ServerContext
from chameleon.server.errors import install_error_handlers
from chameleon.server.metrics import Metrics
from chameleon.server.middleware import ObservedMiddleware
from chameleon.server.routes import chameleon, openai, probes
from chameleon.server.service import Service
from chameleon.server.settings import ServeSettings


def create_app(service: Service, settings: ServeSettings, metrics: Metrics) -> FastAPI:
    app = FastAPI(
        title="Chameleon",
        version="0.1.0",
        description="Retrieval-augmented generation over a disaggregated IVF-PQ retrieval tier.",
    )
    install_error_handlers(app)
    for router in (probes.router, chameleon.router, openai.router):
        app.include_router(router)
    app.add_middleware(ObservedMiddleware, metrics=metrics, max_body_bytes=settings.max_body_bytes, access_log=settings.access_log)
    app.state.context = ServerContext(service, settings, metrics)
    return app
