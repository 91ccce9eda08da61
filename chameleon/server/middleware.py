"""What wraps every request: its id (``X-Request-ID``), the body size limit, the latency metrics,
and one JSON access-log line when it ends.

The routes add to the access-log line of the request they serve with :func:`note` (its usage, its
error); :func:`request_id` names the request for the OpenAI objects and the server log.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from fastapi.responses import JSONResponse

from chameleon.server.metrics import Metrics

ACCESS_LOG = logging.getLogger("chameleon.access")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# What the access log says of the request being served: its id, and what the routes add
_REQUEST: ContextVar[dict | None] = ContextVar("chameleon_request", default=None)


def note(**fields) -> None:
    """Add ``fields`` to the access log line of the request being served."""
    request = _REQUEST.get()
    if request is not None:
        request.update(fields)


def request_id() -> str:
    request = _REQUEST.get()
    return request["request_id"] if request is not None else uuid.uuid4().hex


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """An error in OpenAI's shape, noted in the request's access-log line."""
    note(error=message)
    return {"error": {"message": message, "type": kind, "code": code, "param": None}}


class ObservedMiddleware:
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
                    error_body(f"the request body exceeds {self.max_body_bytes} bytes", "invalid_request_error", "body_too_large"),
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
