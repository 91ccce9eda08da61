"""What the HTTP routes call: generation, retrieval and readiness behind thread-safe methods.

The engine is a ``BatchingEngine`` or a ``VllmEngine``: concurrent requests decode together, and
those beyond its batch wait for a place (the queue depth). Retrieval has its own lock inside the
pipeline, so ``/v1/search`` is not held up by generation. Text is streamed as it is decoded; stop
strings end generation as soon as they appear and are never sent (the part of the text that could
still become one is held back (``text_stream``).

The passage index can change under a running server (``chameleon index add``/``remove``, or a
rebuild): ``reload`` serves the new version without a restart (``served_index``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from chameleon.engines.sampling import Sampler, Sampling
from chameleon.rag.corpus import RagIndex
from chameleon.rag.pipeline import SNIPPET_CHARS, RagPipeline, context_block
from chameleon.rag.timings import Timings
from chameleon.server.served_index import IndexServing, ServedIndex
from chameleon.server.text_stream import ReportedToken, TextStream, reported_token
from retriever.errors import InvalidInput

PLAIN_SYSTEM_PROMPT = "You are a helpful assistant for Python programmers. Be concise."


@dataclass(frozen=True)
class GenerationRequest:
    """How one answer is generated, whatever the route: at most ``max_tokens`` new tokens, ending
    at the first of the ``stop`` strings; ``on_text(text, tokens)`` gets each piece of the answer as
    it may be sent, with its tokens' log-probabilities when ``sampling`` asks for them (else an
    empty list); ``cancelled`` (set) stops it early; ``sampling``: None for greedy."""

    max_tokens: int
    stop: Sequence[str] = ()
    on_text: Callable[[str, list[ReportedToken]], None] | None = None
    cancelled: threading.Event | None = None
    sampling: Sampling | None = None


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    sources: list[dict] = field(default_factory=list)
    timings: Timings = field(default_factory=Timings)
    logprobs: list[ReportedToken] | None = None  # when the request asked for them


class Service:
    """``reopen(rag_index)`` serves another version of the index (``ServedIndex``): how ``reload``
    starts its tier or its in-process search as the server started the first one.
    ``index_source``: where ``reload`` reads the index again (default: where the first was read)."""

    def __init__(
        self,
        pipeline: RagPipeline,
        model_id: str,
        served: ServedIndex,
        reopen: Callable[[RagIndex], ServedIndex],
        knnlm=None,
        metrics=None,
        index_source: Path | None = None,
    ):
        self.pipeline = pipeline
        self.engine = pipeline.engine
        self.model_id = model_id
        self.embedder_id = pipeline.embedder.name
        self.knnlm = knnlm
        self.metrics = metrics
        self.index = IndexServing(served, reopen, metrics, index_source)
        self._knnlm_lock = threading.Lock()
        if metrics is not None:
            metrics.passages.set_function(lambda: len(self.served.rag_index.passages))

    @property
    def served(self) -> ServedIndex:
        return self.index.served

    # -- readiness and the index ----------------------------------------------------------------

    def tier_info(self) -> dict | None:
        return self.index.tier_info()

    def tier_processes(self) -> list[dict]:
        """The tier processes this server keeps running, and their restarts (none for a tier of others)."""
        keeper = self.served.keeper
        return keeper.supervisor.snapshot() if keeper is not None else []

    def readiness(self) -> dict:
        """``ready`` plus why not: the engine runs, and the index's tier answers (see ``IndexServing.readiness``)."""
        if not getattr(self.engine, "alive", True):
            return {"ready": False, "reason": "the LLM engine has stopped", "index": self.served.describe()}
        return self.index.readiness()

    def reload(self) -> dict:
        return self.index.reload(self.pipeline)

    # -- retrieval ----------------------------------------------------------------------------

    def search(self, query: str | None, vector: list[float] | None, k: int, nprobe: int | None) -> tuple[list[dict], Timings]:
        timings = Timings()
        if (query is None) == (vector is None):
            raise InvalidInput("give exactly one of query (text) and vector")
        if query is not None:
            if not query.strip():
                raise InvalidInput("the query is empty")
            ranked = self.pipeline.retrieve(query, timings, k, nprobe)
        else:
            ranked = self.pipeline.retrieve_vector([vector], timings, k, nprobe)
        self._observe_retrieval(timings)
        return [_source(passage, score, with_passage=True) for passage, score in ranked], timings

    def embed(self, texts: list[str]) -> tuple[np.ndarray, int]:
        """The embedder's vectors of ``texts`` (the passages' and the queries' space) and the tokens it read."""
        return self.pipeline.embed(texts), self.pipeline.embedding_tokens(texts)

    # -- generation ---------------------------------------------------------------------------

    def rag(
        self,
        question: str,
        request: GenerationRequest,
        k: int | None = None,
        retrieval_interval: int | None = None,
        mode: str = "passage",
        history: Sequence[dict] = (),
        system: str | None = None,
    ) -> Completion:
        """Answer ``question`` from the passages (``passage``) or the kNN-LM datastore (``knnlm``,
        queried every ``retrieval_interval`` tokens, default every token)."""
        if mode == "knnlm":
            return self._knnlm(question, request, retrieval_interval or 1)
        running = _Running(self.engine, request)
        answer = self.pipeline.ask(question, request.max_tokens, retrieval_interval, k, history, system, running.on_token, running.sampler)
        self._observe_retrieval(answer.timings)
        timings = replace(answer.timings, prefill_s=answer.timings.ttft_s)
        return self._finish(running, answer.finish_reason, timings.prompt_tokens, timings.reused_kv_tokens, answer.sources, timings)

    def chat(self, messages: list[dict], request: GenerationRequest) -> Completion:
        """The model alone on a conversation (no retrieval)."""
        return self._plain(_Running(self.engine, request), self.engine.chat_tokens(messages), request)

    def complete(self, prompt: str, request: GenerationRequest, rag: bool, k: int | None = None, echo: bool = False) -> Completion:
        """Continue ``prompt`` as raw text; with ``rag``, the retrieved passages come before it.

        With ``echo`` the text returned (and sent first) is the prompt, then its continuation, and
        the log-probabilities asked for cover the prompt's tokens too: how likely the model finds
        the prompt, after the passages with ``rag``. ``max_tokens`` 0 then scores the prompt alone.
        """
        send = request.on_text

        def after_prompt(logprobs: list[ReportedToken]) -> list[ReportedToken]:  # the continuation's offsets follow the echoed prompt
            return [replace(r, offset=r.offset + len(prompt)) for r in logprobs]

        def send_after_prompt(text: str, logprobs: list[ReportedToken]) -> None:
            send(text, after_prompt(logprobs))

        running = _Running(self.engine, request, strip_leading=False, on_text=send_after_prompt if echo and send is not None else None)
        timings = Timings()
        ranked = self.pipeline.retrieve(prompt, timings, k) if rag else []
        self._observe_retrieval(timings)

        def head(kept) -> str:
            return f"Passages:\n{context_block(kept)}\n\n" if kept else ""

        (tokens,), kept = self.pipeline.fit([p for p, _ in ranked], request.max_tokens, lambda kept: [self._encode(head(kept) + prompt)])
        sources = [_source(p, s) for p, s in ranked[:kept]]
        if not echo:
            return self._plain(running, tokens, request, sources, timings)
        echoed = self._echoed(prompt, head([p for p, _ in ranked[:kept]]), tokens, running.reports)
        if send is not None:
            send(prompt, echoed or [])
        completion = self._plain(running, tokens, request, sources, timings)
        logprobs = None if echoed is None else echoed + after_prompt(completion.logprobs)
        return replace(completion, text=prompt + completion.text, logprobs=logprobs)

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer(text)["input_ids"]

    def _echoed(self, prompt: str, head: str, tokens: list[int], reports: Sampler | None) -> list[ReportedToken] | None:
        """The prompt's tokens (those that cover a character of it, after ``head``) with their
        log-probabilities, when ``reports`` asks for them."""
        if reports is None:
            return None
        offsets = self.engine.tokenizer(head + prompt, return_offsets_mapping=True)["offset_mapping"]
        first = next((n for n, (_, end) in enumerate(offsets) if end > len(head)), len(tokens))
        scored = self.engine.prompt_logprobs(tokens, reports.settings.logprobs)
        tokenizer = self.engine.tokenizer
        return [
            reported_token(tokenizer, token, max(0, start - len(head)), score)
            for token, (start, _), score in zip(tokens[first:], offsets[first:], scored[first:])
        ]

    def _plain(self, running: _Running, tokens, request: GenerationRequest, sources=(), timings: Timings | None = None) -> Completion:
        timings = timings if timings is not None else Timings()
        if request.max_tokens == 0:  # an echo that only scores the prompt
            return self._finish(running, "length", len(tokens), 0, list(sources), timings)
        generation = self.engine.generate(list(tokens), request.max_tokens, None, running.on_token, sampling=running.sampler)
        timings = replace(timings, queue_s=generation.queue_s, prefill_s=generation.ttft_s)
        return self._finish(running, generation.finish_reason, len(tokens), generation.cached_tokens, list(sources), timings)

    def _knnlm(self, question: str, request: GenerationRequest, every: int) -> Completion:
        from chameleon.rag.knnlm import generate

        if self.knnlm is None:
            raise InvalidInput("mode knnlm needs a kNN-LM datastore: start the server with --knnlm DIR")
        running = _Running(self.engine, request)
        messages = [{"role": "system", "content": PLAIN_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        tokens = self.engine.chat_tokens(messages)
        with self._knnlm_lock:  # beside the batch, on the same model: one kNN-LM request at a time
            queued = time.perf_counter() - running.started
            generated = generate(self.engine, self.knnlm, tokens, request.max_tokens, running.on_token, every, running.sampler)
        ended = generated[-1] in self.engine.eos_ids or running.stopped
        return self._finish(running, "stop" if ended else "length", len(tokens), 0, [], Timings(queue_s=queued))

    def _finish(self, running: _Running, finish_reason: str, prompt_tokens: int, cached: int, sources, timings: Timings) -> Completion:
        running.finish()
        new_tokens = len(running.stream.tokens)
        timings = replace(timings, ttft_s=running.ttft_s, decode_tokens_per_s=running.decode_speed())
        if self.metrics is not None:
            self.metrics.ttft.observe(timings.ttft_s)
            if timings.decode_tokens_per_s > 0:
                self.metrics.decode_speed.observe(timings.decode_tokens_per_s)
            self.metrics.generated_tokens.inc(new_tokens)
            self.metrics.prefill_tokens.labels("cached").inc(cached)
            self.metrics.prefill_tokens.labels("computed").inc(max(0, prompt_tokens - cached))
        finish_reason = "stop" if running.stream.stopped else finish_reason
        logprobs = running.stream.released if running.reports is not None else None
        return Completion(running.stream.text, finish_reason, prompt_tokens, new_tokens, cached, sources, timings, logprobs)

    def _observe_retrieval(self, timings: Timings) -> None:
        if self.metrics is not None and timings.retrieval_s is not None:
            self.metrics.retrieval.observe(timings.coarse_s + timings.retrieval_s)


class _Running:
    """One generation in flight: its text stream, its clock (TTFT counts from the request's arrival,
    queueing and retrieval included) and its cancellation. ``on_text`` replaces the request's own
    (the echo of a completion shifts what it sends)."""

    def __init__(self, engine, request: GenerationRequest, strip_leading: bool = True, on_text=None):
        self.stream = TextStream(engine.tokenizer, engine.eos_ids, request.stop, strip_leading)
        self.on_text = on_text if on_text is not None else request.on_text
        self.cancelled = request.cancelled
        # the request's draws; the engines report a token's log-probabilities as they choose it, just before its on_token
        self.sampler = request.sampling.sampler() if request.sampling is not None else None
        self.reports = self.sampler if request.sampling is not None and request.sampling.logprobs is not None else None
        self.started = time.perf_counter()
        self.first_token_at: float | None = None
        self.tokens_seen = 0

    @property
    def stopped(self) -> bool:
        return self.stream.stopped or (self.cancelled is not None and self.cancelled.is_set())

    def on_token(self, token: int) -> bool:
        """The engines' ``on_token``: stream the text, stop on a stop string or a cancel."""
        now = time.perf_counter()
        self.first_token_at = self.first_token_at or now
        self.last_token_at, self.tokens_seen = now, self.tokens_seen + 1
        released = len(self.stream.released)
        delta = self.stream.push(token, self.reports.reported[self.tokens_seen - 1] if self.reports is not None else None)
        if delta and self.on_text is not None:
            self.on_text(delta, self.stream.released[released:])
        return self.stopped

    def finish(self) -> None:
        released = len(self.stream.released)
        tail = self.stream.finish()
        if tail and self.on_text is not None:
            self.on_text(tail, self.stream.released[released:])

    @property
    def ttft_s(self) -> float:
        return (self.first_token_at or time.perf_counter()) - self.started

    def decode_speed(self) -> float:
        if self.tokens_seen < 2 or self.last_token_at <= self.first_token_at:
            return 0.0
        return (self.tokens_seen - 1) / (self.last_token_at - self.first_token_at)


def _source(passage, score: float, with_passage: bool = False) -> dict:
    source = {"doc_id": passage.doc_id, "title": passage.title, "score": round(score, 4), "snippet": passage.text[:SNIPPET_CHARS]}
    return {**source, "passage_id": int(passage.id)} if with_passage else source
