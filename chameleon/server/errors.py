"""Errors as the HTTP API answers them: in OpenAI's shape, with the status of their kind.

:data:`HTTP_STATUS` is the one place an error kind of :mod:`retriever.errors` becomes a status
(looked up along the error's classes, most specific first). The routes' own refusals (401, 404 for
an unknown model, 409, 429…) are :class:`ApiError` with their status.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from chameleon.server.middleware import error_body
from retriever.errors import ChameleonError, InvalidInput, NotFound, Timeout, Unavailable, Unsupported

# kind -> (status, OpenAI error type)
HTTP_STATUS: dict[type[ChameleonError], tuple[int, str]] = {
    InvalidInput: (400, "invalid_request_error"),
    Unsupported: (400, "invalid_request_error"),
    NotFound: (404, "invalid_request_error"),
    Timeout: (504, "service_unavailable"),
    Unavailable: (503, "service_unavailable"),
    ChameleonError: (500, "server_error"),
}


class ApiError(Exception):
    """A route's own refusal, with its status, OpenAI error type and code."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def status_of(error: ChameleonError) -> tuple[int, str]:
    """The HTTP status and OpenAI error type of ``error``'s kind."""
    return next(HTTP_STATUS[kind] for kind in type(error).__mro__ if kind in HTTP_STATUS)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        headers = {"Retry-After": "1"} if e.status == 429 else {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return JSONResponse(error_body(e.message, e.kind, e.code), status_code=e.status, headers=headers)

    @app.exception_handler(ChameleonError)
    async def _chameleon_error(request: Request, e: ChameleonError):
        status, kind = status_of(e)
        return JSONResponse(error_body(str(e), kind, getattr(e, "code", None)), status_code=status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
        return JSONResponse(error_body(problems, "invalid_request_error", "invalid_body"), status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code, headers=e.headers)
