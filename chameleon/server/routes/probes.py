"""``GET /healthz`` (the process answers), ``GET /readyz`` (every tier answers), ``GET /metrics``:
open to probes and scrapers, whatever the API keys."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from chameleon.server.context import ServerContext, server_context

router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A tier does not answer."}})
async def readyz(ctx: ServerContext = Depends(server_context)):
    readiness = await ctx.blocking(ctx.service.readiness)
    return JSONResponse(readiness, status_code=200 if readiness["ready"] else 503)


@router.get("/metrics", response_class=Response)
async def metrics_endpoint(ctx: ServerContext = Depends(server_context)):
    return Response(await ctx.blocking(generate_latest, ctx.metrics.registry), media_type=CONTENT_TYPE_LATEST)
