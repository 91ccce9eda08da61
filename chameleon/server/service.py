"""What the HTTP routes call: generation, retrieval and readiness behind thread-safe methods.

The engine is a ``BatchingEngine`` or a ``VllmEngine``: concurrent requests decode together, and
those beyond its batch wait for a place (the queue depth). Retrieval has its own lock inside the
pipeline, so ``/v1/search`` is not held up by generation. Text is streamed as it is decoded; stop
strings end generation as soon as they appear and are never sent (the part of the text that could
still become one is held back).

The passage index can change under a running server (``chameleon index add``/``remove``, or a
rebuild): ``reload`` opens the new version beside the one being served, its tier processes
included, switches searches to it between two searches, then stops the old one. Requests in
flight go on; a later retrieval of the same answer already searches the new version.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from chameleon.engines.sampling import Sampling, TokenLogprob
from chameleon.rag.corpus import RagIndex
from chameleon.rag.pipeline import SNIPPET_CHARS, RagPipeline, context_block
from coordinator.client import RetrievalClient
from retriever.errors import RetrieverError

PLAIN_SYSTEM_PROMPT = "You are a helpful assistant for Python programmers. Be concise."


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    sources: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    logprobs: list[ReportedToken] | None = None  # when the request asked for them


@dataclass(frozen=True)
class ReportedToken:
    """A token of an answer with its log-probabilities, as OpenAI's ``logprobs`` show it: its text,
    where that starts in the answer, and the most likely tokens' (text, log-probability)."""

    text: str
    offset: int
    logprob: float | None  # None for the first token of a prompt: nothing comes before it
    top: tuple[tuple[str, float], ...]


class TextStream:
    """Incremental detokenization: the new text each token adds, cut at the first stop string.

    Tokens pushed with their log-probabilities are ``released`` (as :class:`ReportedToken`) with
    the text they start: the tokens of the answer sent so far, and never one cut off with a stop
    string."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] = (), strip_leading: bool = True):
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.stop = [s for s in stop if s]
        self.strip_leading = strip_leading
        self.tokens: list[int] = []
        self.text = ""
        self.stopped = False
        self.released: list[ReportedToken] = []
        self._sent = 0
        self._whole_characters = 0  # of the text so far, a character still split across tokens left out
        self._unreleased: list[tuple[int, TokenLogprob]] = []  # (offset, log-probabilities) of tokens not yet sent

    def push(self, token: int, logprob: TokenLogprob | None = None) -> str:
        """Feed one generated token (and its log-probabilities); returns the text that is now safe to send."""
        if self.stopped or token in self.eos_ids:
            return ""
        if logprob is not None:
            self._unreleased.append((self._whole_characters, logprob))
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        text = text.lstrip() if self.strip_leading else text
        self._whole_characters = len(text.rstrip("\ufffd"))
        if text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return ""
        self.text = text
        cuts = [i for i in (text.find(s, max(0, self._sent - len(s))) for s in self.stop) if i >= 0]
        if cuts:
            self.text, self.stopped = text[: min(cuts)], True
            return self._release(len(self.text))
        held = max((n for s in self.stop for n in range(len(s) - 1, 0, -1) if text.endswith(s[:n])), default=0)
        return self._release(len(text) - held)

    def finish(self) -> str:
        """The text held back for a stop string that never came."""
        return self._release(len(self.text))

    def _release(self, end: int) -> str:
        delta = self.text[self._sent : end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        while self._unreleased and self._unreleased[0][0] < self._sent:
            offset, logprob = self._unreleased.pop(0)
            self.released.append(_reported(self.tokenizer, logprob.token, offset, logprob))
        return delta


def _reported(tokenizer, token: int, offset: int, logprob: TokenLogprob | None) -> ReportedToken:
    """``token`` at ``offset`` of a text with its log-probabilities (None: the first token of a
    prompt, which nothing predicts), the tokens as text."""

    def text(token: int) -> str:
        return tokenizer.decode([token])

    if logprob is None:
        return ReportedToken(text(token), offset, None, ())
    return ReportedToken(text(token), offset, logprob.logprob, tuple((text(t), lp) for t, lp in logprob.top))


@dataclass
class ServedIndex:
    """One version of the passage index as the server serves it: its passages, what searches them
    (a ``retriever.Searcher`` in this process, or a ``chameleon.cluster.ClusterSearcher``) and, with
    a tier, a client of its coordinator (readiness, metrics) and the directory of its processes."""

    rag_index: RagIndex
    retrieval: object
    tier: RetrievalClient | None = None
    state_dir: Path | None = None

    def describe(self) -> dict:
        where = {"retrieval": "tier", "state_dir": str(self.state_dir)} if self.tier is not None else {"retrieval": "in-process"}
        return {
            "path": str(self.rag_index.path),
            "passages": len(self.rag_index.passages),
            "fingerprint": self.rag_index.fingerprint,
            **where,
        }

    def close(self, discard_copies: bool = False) -> list[int]:
        """Close the clients and stop the tier's processes (their pids); with ``discard_copies``,
        also delete the re-sharded copy of the index the tier made (a retired version's)."""
        if self.tier is None:
            return []
        from chameleon import cluster

        self.retrieval.close()
        self.tier.close()
        index_copy = Path(cluster.read_state(self.state_dir)["index"])
        stopped = cluster.down(self.state_dir)
        if discard_copies and index_copy.parent == self.state_dir:
            shutil.rmtree(index_copy, ignore_errors=True)
        return stopped


class ReloadInProgress(RetrieverError):
    pass


class Service:
    """``reopen(rag_index)`` serves another version of the index (``ServedIndex``): how ``reload``
    starts its tier or its in-process search as the server started the first one."""

    def __init__(
        self,
        pipeline: RagPipeline,
        model_id: str,
        served: ServedIndex,
        reopen: Callable[[RagIndex], ServedIndex],
        knnlm=None,
        metrics=None,
    ):
        self.pipeline = pipeline
        self.engine = pipeline.engine
        self.model_id = model_id
        self.embedder_id = pipeline.embedder.name
        self.knnlm = knnlm
        self.metrics = metrics
        self.served = served
        self._reopen = reopen
        self._tier_lock = threading.Lock()  # the coordinator's client is not thread-safe
        self._knnlm_lock = threading.Lock()
        self._reloading = threading.Lock()
        if metrics is not None:
            metrics.passages.set_function(lambda: len(self.served.rag_index.passages))

    # -- readiness ----------------------------------------------------------------------------

    def tier_info(self) -> dict | None:
        """The coordinator's view of the nodes, None when retrieval is in process or it does not answer."""
        with self._tier_lock:
            if self.served.tier is None:
                return None
            try:
                return self.served.tier.info(timeout=1.0)
            except RetrieverError:
                return None

    def readiness(self) -> dict:
        """``ready`` plus why not: the engine runs, and every shard has a live node when retrieval
        runs in a tier; ``index``: the version served."""
        index = {"index": self.served.describe()}
        if not getattr(self.engine, "alive", True):
            return {"ready": False, "reason": "the LLM engine has stopped", **index}
        if self.served.tier is None:
            return {"ready": True, "retrieval": "in-process", **index}
        info = self.tier_info()
        if info is None:
            return {"ready": False, "retrieval": "tier", "reason": "the coordinator does not answer", **index}
        live = {n["shard"] for n in info["nodes"] if n["alive"]}
        missing = sorted(set(range(info["nshards"])) - live)
        if missing:
            return {"ready": False, "retrieval": "tier", "reason": f"no live node for shard(s) {missing}", **index}
        return {"ready": True, "retrieval": "tier", "shards": info["nshards"], "nodes": len(info["nodes"]), **index}

    # -- the index ------------------------------------------------------------------------------

    def reload(self) -> dict:
        """Serve the passage index on disk if it is another version than the one served (see the
        module's docstring). Whatever fails before the switch leaves the served version as it was."""
        if not self._reloading.acquire(blocking=False):
            raise ReloadInProgress("a reload is already under way")
        outcome = "refused"
        try:
            started = time.perf_counter()
            current = self.served
            rag_index = RagIndex(current.rag_index.path, self.pipeline.embedder.fingerprint)
            if rag_index.fingerprint == current.rag_index.fingerprint:
                outcome = "unchanged"
                return {"reloaded": False, "index": current.describe(), "seconds": round(time.perf_counter() - started, 3)}
            fresh = self._reopen(rag_index)
            try:
                self.pipeline.swap_index(fresh.rag_index, fresh.retrieval)
            except BaseException:
                fresh.close(discard_copies=True)
                raise
            with self._tier_lock:
                self.served = fresh
            outcome = "reloaded"
            stopped = current.close(discard_copies=True)
            return {
                "reloaded": True,
                "index": fresh.describe(),
                "previous": current.describe(),
                "stopped_processes": len(stopped),
                "seconds": round(time.perf_counter() - started, 3),
            }
        finally:
            self._reloading.release()
            if self.metrics is not None:
                self.metrics.reloads.labels(outcome).inc()

    # -- retrieval ----------------------------------------------------------------------------

    def search(self, query: str | None, vector: list[float] | None, k: int, nprobe: int | None) -> tuple[list[dict], dict]:
        timings: dict = {}
        if (query is None) == (vector is None):
            raise RetrieverError("give exactly one of query (text) and vector")
        if query is not None:
            if not query.strip():
                raise RetrieverError("the query is empty")
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
        max_tokens: int,
        k: int | None = None,
        retrieval_interval: int | None = None,
        mode: str = "passage",
        history: Sequence[dict] = (),
        system: str | None = None,
        stop: Sequence[str] = (),
        on_text: Callable[[str, list[ReportedToken]], None] | None = None,
        cancelled: threading.Event | None = None,
        sampling: Sampling | None = None,
    ) -> Completion:
        """Answer ``question`` from the passages (``passage``) or the kNN-LM datastore (``knnlm``,
        queried every ``retrieval_interval`` tokens, default every token). ``on_text(text,
        tokens)`` gets each piece of the answer as it may be sent, with its tokens' log-probabilities
        when ``sampling`` asks for them (else an empty list)."""
        if mode == "knnlm":
            return self._knnlm(question, max_tokens, retrieval_interval or 1, stop, on_text, cancelled, sampling)
        request = _Request(self.engine, stop, on_text, cancelled, sampling)
        answer = self.pipeline.ask(question, max_tokens, retrieval_interval, k, history, system, request.on_token, sampling)
        self._observe_retrieval(answer.timings)
        timings = {**answer.timings, "prefill_s": answer.timings["ttft_s"]}
        return self._finish(request, answer.finish_reason, timings["prompt_tokens"], timings["reused_kv_tokens"], answer.sources, timings)

    def chat(
        self, messages: list[dict], max_tokens: int, stop: Sequence[str] = (), on_text=None, cancelled=None, sampling=None
    ) -> Completion:
        """The model alone on a conversation (no retrieval)."""
        request = _Request(self.engine, stop, on_text, cancelled, sampling)
        return self._plain(request, self.engine.chat_tokens(messages), max_tokens, sampling)

    def complete(
        self,
        prompt: str,
        max_tokens: int,
        rag: bool,
        k: int | None = None,
        stop: Sequence[str] = (),
        on_text=None,
        cancelled=None,
        sampling=None,
        echo: bool = False,
    ) -> Completion:
        """Continue ``prompt`` as raw text; with ``rag``, the retrieved passages come before it.

        With ``echo`` the text returned (and sent first) is the prompt, then its continuation, and
        the log-probabilities asked for cover the prompt's tokens too: how likely the model finds
        the prompt, after the passages with ``rag``. ``max_tokens`` 0 then scores the prompt alone.
        """
        send = on_text

        def after_prompt(logprobs: list[ReportedToken]) -> list[ReportedToken]:  # the continuation's offsets follow the echoed prompt
            return [replace(r, offset=r.offset + len(prompt)) for r in logprobs]

        def send_after_prompt(text: str, logprobs: list[ReportedToken]) -> None:
            send(text, after_prompt(logprobs))

        request = _Request(
            self.engine, stop, send_after_prompt if echo and send is not None else send, cancelled, sampling, strip_leading=False
        )
        timings: dict = {}
        ranked = self.pipeline.retrieve(prompt, timings, k) if rag else []
        self._observe_retrieval(timings)

        def head(kept) -> str:
            return f"Passages:\n{context_block(kept)}\n\n" if kept else ""

        (tokens,), kept = self.pipeline.fit([p for p, _ in ranked], max_tokens, lambda kept: [self._encode(head(kept) + prompt)])
        sources = [_source(p, s) for p, s in ranked[:kept]]
        if not echo:
            return self._plain(request, tokens, max_tokens, sampling, sources, timings)
        echoed = self._echoed(prompt, head([p for p, _ in ranked[:kept]]), tokens, request.reports)
        if send is not None:
            send(prompt, echoed or [])
        completion = self._plain(request, tokens, max_tokens, sampling, sources, timings)
        logprobs = None if echoed is None else echoed + after_prompt(completion.logprobs)
        return replace(completion, text=prompt + completion.text, logprobs=logprobs)

    def _encode(self, text: str) -> list[int]:
        return self.engine.tokenizer(text)["input_ids"]

    def _echoed(self, prompt: str, head: str, tokens: list[int], reports: Sampling | None) -> list[ReportedToken] | None:
        """The prompt's tokens (those that cover a character of it, after ``head``) with their
        log-probabilities, when ``reports`` asks for them."""
        if reports is None:
            return None
        offsets = self.engine.tokenizer(head + prompt, return_offsets_mapping=True)["offset_mapping"]
        first = next((n for n, (_, end) in enumerate(offsets) if end > len(head)), len(tokens))
        scored = self.engine.prompt_logprobs(tokens, reports.logprobs)
        tokenizer = self.engine.tokenizer
        return [
            _reported(tokenizer, token, max(0, start - len(head)), score)
            for token, (start, _), score in zip(tokens[first:], offsets[first:], scored[first:])
        ]

    def _plain(self, request: _Request, tokens, max_tokens: int, sampling: Sampling | None, sources=(), timings=None) -> Completion:
        if max_tokens == 0:  # an echo that only scores the prompt
            return self._finish(request, "length", len(tokens), 0, list(sources), timings or {})
        generation = self.engine.generate(list(tokens), max_tokens, None, request.on_token, sampling=sampling)
        timings = {**(timings or {}), "queue_s": generation.queue_s, "prefill_s": generation.ttft_s}
        return self._finish(request, generation.finish_reason, len(tokens), generation.cached_tokens, list(sources), timings)

    def _knnlm(self, question, max_tokens, every, stop, on_text, cancelled, sampling) -> Completion:
        from chameleon.rag.knnlm import generate

        if self.knnlm is None:
            raise RetrieverError("mode knnlm needs a kNN-LM datastore: start the server with --knnlm DIR")
        request = _Request(self.engine, stop, on_text, cancelled, sampling)
        messages = [{"role": "system", "content": PLAIN_SYSTEM_PROMPT}, {"role": "user", "content": question}]
        tokens = self.engine.chat_tokens(messages)
        with self._knnlm_lock:  # beside the batch, on the same model: one kNN-LM request at a time
            queued = time.perf_counter() - request.started
            generated = generate(self.engine, self.knnlm, tokens, max_tokens, request.on_token, every, sampling)
        ended = generated[-1] in self.engine.eos_ids or request.stopped
        return self._finish(request, "stop" if ended else "length", len(tokens), 0, [], {"queue_s": queued})

    def _finish(self, request: _Request, finish_reason: str, prompt_tokens: int, cached: int, sources, timings) -> Completion:
        request.finish()
        new_tokens = len(request.stream.tokens)
        timings = {**timings, "ttft_s": request.ttft_s, "decode_tokens_per_s": request.decode_speed()}
        if self.metrics is not None:
            self.metrics.ttft.observe(timings["ttft_s"])
            if timings["decode_tokens_per_s"] > 0:
                self.metrics.decode_speed.observe(timings["decode_tokens_per_s"])
            self.metrics.generated_tokens.inc(new_tokens)
            self.metrics.prefill_tokens.labels("cached").inc(cached)
            self.metrics.prefill_tokens.labels("computed").inc(max(0, prompt_tokens - cached))
        finish_reason = "stop" if request.stream.stopped else finish_reason
        rounded = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in timings.items()}
        logprobs = request.stream.released if request.reports is not None else None
        return Completion(request.stream.text, finish_reason, prompt_tokens, new_tokens, cached, sources, rounded, logprobs)

    def _observe_retrieval(self, timings: dict) -> None:
        if self.metrics is not None and "retrieval_s" in timings:
            self.metrics.retrieval.observe(timings["coarse_s"] + timings["retrieval_s"])


class _Request:
    """One generation in flight: its text stream, its clock (TTFT counts from the request's arrival,
    queueing and retrieval included) and its cancellation."""

    def __init__(
        self, engine, stop: Sequence[str], on_text, cancelled: threading.Event | None, sampling: Sampling | None, strip_leading: bool = True
    ):
        self.stream = TextStream(engine.tokenizer, engine.eos_ids, stop, strip_leading)
        self.on_text, self.cancelled = on_text, cancelled
        # the engines report a token's log-probabilities as they choose it, just before its on_token
        self.reports = sampling if sampling is not None and sampling.logprobs is not None else None
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
