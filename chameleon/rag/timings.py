"""Where a request's time went, and what it cost in tokens: filled in as the request runs, by the
pipeline (retrieval), the engine (queue, prefill, decode) and the server, and reported as the
``timings`` of ``/v1/rag``, of ``/v1/search`` and of the ``chameleon`` field of the OpenAI routes."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Timings:
    """Seconds (``*_s``), rates and counts; None where the request did not do that step."""

    embed_s: float | None = None  # the question's embedding
    coarse_s: float | None = None  # the coarse quantizer: the lists to probe
    retrieval_s: float | None = None  # the scan, in process or through the tier
    retrieval_partial: bool | None = None  # shards were missing from the answer
    speculation: str | None = None  # "confirmed" or "restarted": the prefill on the tier's early top-k
    queue_s: float | None = None  # waiting for a place in the engine's batch
    prefill_s: float | None = None
    ttft_s: float | None = None
    decode_tokens_per_s: float | None = None
    total_s: float | None = None
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    passages_used: int | None = None  # the passages that fit the prompt
    retrievals: int | None = None  # 1, or more with iterative retrieval
    passage_changes: int | None = None  # retrievals that changed the passages
    reused_kv_tokens: int | None = None  # prompt tokens whose KV came from a cache

    def as_dict(self) -> dict:
        """The steps the request did, seconds rounded to 10 µs."""
        return {name: round(value, 5) if isinstance(value, float) else value for name, value in asdict(self).items() if value is not None}
