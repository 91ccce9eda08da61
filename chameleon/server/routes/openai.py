"""The OpenAI-compatible routes: ``POST /v1/chat/completions`` and ``POST /v1/completions``
(streaming included, retrieval-augmented unless the request says ``"rag": false``),
``POST /v1/embeddings`` (the embedder the passages were indexed with) and ``GET /v1/models``."""

from __future__ import annotations

import base64

from fastapi import APIRouter, Depends

from chameleon.server import schemas
from chameleon.server.context import ServerContext, authorised, server_context
from chameleon.server.errors import ApiError
from chameleon.server.service import Completion, GenerationRequest
from chameleon.server.streaming import OpenAIChunks

router = APIRouter(dependencies=[Depends(authorised)], tags=["openai"])


@router.get("/v1/models")
async def models(ctx: ServerContext = Depends(server_context)) -> dict:
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "chameleon"}
            for name in (ctx.service.model_id, ctx.service.embedder_id)
        ],
    }


@router.post("/v1/embeddings")
async def embeddings(body: schemas.EmbeddingRequest, ctx: ServerContext = Depends(server_context)):
    if body.model not in (None, ctx.service.embedder_id):
        raise ApiError(
            404,
            f"the embedding model {body.model!r} does not exist; this server embeds with {ctx.service.embedder_id!r}",
            code="model_not_found",
        )
    dim = ctx.service.pipeline.embedder.dim
    if body.dimensions not in (None, dim):
        raise ApiError(400, f"this embedder's vectors have {dim} dimensions, not {body.dimensions}", code="dimensions")
    vectors, tokens = await ctx.admitted(ctx.service.embed, body.texts)
    encode = (
        (lambda v: base64.b64encode(v.astype("<f4").tobytes()).decode()) if body.encoding_format == "base64" else (lambda v: v.tolist())
    )
    data = [{"object": "embedding", "index": i, "embedding": encode(vector)} for i, vector in enumerate(vectors)]
    return {"object": "list", "data": data, "model": ctx.service.embedder_id, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


@router.post("/v1/chat/completions")
async def chat_completions(body: schemas.ChatCompletionRequest, ctx: ServerContext = Depends(server_context)):
    ctx.check_openai(body)
    max_tokens = ctx.max_tokens_of(body.max_completion_tokens or body.max_tokens)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text} for m in body.messages]
    if body.rag:
        if messages[-1]["role"] != "user":
            raise ApiError(400, 'with rag, the last message must be the user\'s question (or send "rag": false)')
        if body.retrieval_interval is not None and body.retrieval_interval > max_tokens:
            raise ApiError(400, f"retrieval_interval ({body.retrieval_interval}) exceeds max_tokens ({max_tokens})")
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system") or None
        history = [m for m in messages[:-1] if m["role"] != "system"]

        def run(request: GenerationRequest) -> Completion:
            return ctx.service.rag(messages[-1]["content"], request, body.k, body.retrieval_interval, "passage", history, system)
    else:

        def run(request: GenerationRequest) -> Completion:
            return ctx.service.chat(messages, request)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await ctx.generate(
        ctx.choice_runs(body, max_tokens, run),
        body.stream,
        OpenAIChunks(ctx.service.model_id, "chat", include_usage, body.reported_logprobs is not None),
    )


@router.post("/v1/completions")
async def completions(body: schemas.CompletionRequest, ctx: ServerContext = Depends(server_context)):
    ctx.check_openai(body)
    max_tokens = 0 if body.max_tokens == 0 else ctx.max_tokens_of(body.max_tokens)  # 0: only the echoed prompt

    def run(request: GenerationRequest) -> Completion:
        return ctx.service.complete(body.prompt, request, body.rag, body.k, body.echo)

    include_usage = body.stream_options is not None and body.stream_options.include_usage
    return await ctx.generate(
        ctx.choice_runs(body, max_tokens, run),
        body.stream,
        OpenAIChunks(ctx.service.model_id, "text", include_usage, body.reported_logprobs is not None),
    )
