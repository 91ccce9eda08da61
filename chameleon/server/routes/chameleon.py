"""Chameleon's own routes: ``POST /v1/rag`` (answers with sources and timings), ``POST /v1/search``
(passages for a text or a vector) and ``POST /admin/reload`` (serve the index on disk again)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from chameleon.server import schemas
from chameleon.server.context import ServerContext, authorised, server_context
from chameleon.server.errors import ApiError
from chameleon.server.served_index import ReloadInProgress
from chameleon.server.service import GenerationRequest
from chameleon.server.streaming import RagChunks, Run

router = APIRouter(dependencies=[Depends(authorised)])


@router.post("/v1/rag", response_model=schemas.RagResponse, tags=["chameleon"])
async def rag(body: schemas.RagRequest, ctx: ServerContext = Depends(server_context)):
    max_tokens = ctx.max_tokens_of(body.max_tokens)
    if body.retrieval_interval is not None and body.retrieval_interval > max_tokens:
        raise ApiError(400, f"retrieval_interval ({body.retrieval_interval}) exceeds max_tokens ({max_tokens})")

    def run(on_text, cancelled):
        request = GenerationRequest(max_tokens, body.stops, on_text, cancelled, body.sampling())
        return ctx.service.rag(body.question, request, body.k, body.retrieval_interval, body.mode)

    return await ctx.generate([Run(run, [0])], body.stream, RagChunks(ctx.service.model_id))


@router.post("/v1/search", response_model=schemas.SearchResponse, tags=["chameleon"])
async def search(body: schemas.SearchRequest, ctx: ServerContext = Depends(server_context)):
    hits, timings = await ctx.admitted(ctx.service.search, body.query, body.vector, body.k, body.nprobe)
    steps = {name: value for name, value in timings.as_dict().items() if name != "retrieval_partial"}  # said once, as "partial"
    return {"results": hits, "partial": bool(timings.retrieval_partial), "timings": steps}


@router.post("/admin/reload", tags=["admin"], responses={409: {"description": "A reload is already under way."}})
async def reload(ctx: ServerContext = Depends(server_context)) -> dict:
    """Serve the passage index on disk again after ``chameleon index add``/``remove`` or a
    rebuild. Answers once the new version serves (``reloaded``) or when it is the version
    served already (``reloaded: false``)."""
    try:
        return await ctx.blocking(ctx.service.reload)
    except ReloadInProgress as e:
        raise ApiError(409, str(e), code="reload_in_progress") from None
