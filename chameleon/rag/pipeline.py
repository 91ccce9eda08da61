"""Passage RAG: question -> embed -> coarse search -> scan -> top-k passages -> prompt -> generate.

Truncation policy: the prompt must leave room for ``max_new_tokens`` in the model's context
window. Passages are dropped lowest-ranked first until it fits; a question that does not fit on
its own is an error (it is never cut).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from chameleon.engines.base import Generation, KVPrefix, LLMEngine, answer_text, decode_speed
from chameleon.engines.sampling import Sampler
from chameleon.rag.corpus import Passage, RagIndex
from chameleon.rag.timings import Timings
from retriever.errors import InvalidInput
from retriever.search import Retrieval, Searcher, SearchResult
from retriever.vectors import as_query_matrix, prepare_vectors

SYSTEM_PROMPT = (
    "You are a helpful assistant for Python programmers. Answer the question using the numbered "
    "passages from the documentation. Be concise."
)
SNIPPET_CHARS = 200


@dataclass
class Answer:
    answer: str
    sources: list[dict]
    timings: Timings = field(default_factory=Timings)
    finish_reason: str = "stop"


_PASSAGES = "\ue000chameleon-passages\ue000"  # a private-use marker where the passages go in the template


def passage_pieces(passages: Sequence[Passage]) -> list[str]:
    """The numbered passages as the prompt shows them, one string each (they concatenate). The
    separator goes in front, so a passage's text depends on its position only, never on how many
    passages follow it: the document KV cache keeps it by position."""
    return [("\n\n" if n else "") + f"[{n + 1}] {p.content}" for n, p in enumerate(passages)]


def context_block(passages: Sequence[Passage]) -> str:
    return "".join(passage_pieces(passages))


def prompt_segments(
    engine, question: str, passages: Sequence[Passage], history: Sequence[dict] = (), system: str | None = None
) -> list[list[int]]:
    """The chat prompt as token segments: the template up to the passages, one segment per
    passage, then the question and the assistant's turn. Each is tokenized on its own, so a
    passage's tokens (and KV) depend only on what comes before it: the unit the document KV
    cache keeps. ``history`` is the conversation before the question; ``system`` replaces the
    default system prompt."""
    user = f"Passages:\n{_PASSAGES}\n\nQuestion: {question}" if passages else f"Question: {question}"
    messages = [{"role": "system", "content": system or SYSTEM_PROMPT}, *history, {"role": "user", "content": user}]
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def encode(piece: str) -> list[int]:
        return engine.tokenizer(piece, add_special_tokens=False)["input_ids"]

    if not passages:
        return [encode(text)]
    if text.count(_PASSAGES) != 1:
        raise InvalidInput("the prompt contains the reserved character U+E000")
    head, tail = text.split(_PASSAGES)
    return [encode(head), *map(encode, passage_pieces(passages)), encode(tail)]


def joined(segments: list[list[int]]) -> list[int]:
    """A prompt's tokens: its segments one after another."""
    return [token for segment in segments for token in segment]


def resume_prefix(speculative: Generation, tokens: list[int], cached: KVPrefix | None) -> KVPrefix | None:
    """Where the prompt ``tokens`` starts after a speculative prefill: the KV of what it shares
    with the speculative prompt (all of it when the speculation stands), or the document cache's
    prefix ``cached`` when that is longer. vLLM keeps the KV itself (no state): None."""
    shared = speculative.state.shared_with(tokens) if speculative.state is not None else None
    if cached is not None and (shared is None or len(cached.tokens) > len(shared.tokens)):
        return cached
    return shared


@dataclass
class _FirstPrompt:
    """A question's first prompt: its passages, token segments, how many passages it keeps, the
    KV it starts from and the document cache's admission (for ``keep``)."""

    ranked: list[tuple[Passage, float]]
    segments: list[list[int]]
    kept: int
    prefix: KVPrefix | None
    admitted: object
    # KV tokens that existed before the request, where a speculative prefill computed part of
    # ``prefix`` (None: the engine's cached_tokens say it)
    reused: int | None = None


class RagPipeline:
    """``retrieval`` is where passages are searched: in this process (the default) or a cluster
    (``chameleon.cluster.ClusterSearcher``); either offers ``quantizer`` and ``scan``.

    Retrieval is thread-safe (one embedding and one search at a time: the embedder's tokenizer
    and a cluster's socket are not); so is ``ask`` when the engine is (``chameleon.engines.batching.BatchingEngine``,
    ``chameleon.engines.vllm_engine.VllmEngine``). With a ``doc_cache`` (``chameleon.rag.doc_cache.DocumentKVCache``,
    torch engines only) a prompt starts from the cached KV of its template and of the documents it
    shares, in order, with earlier prompts; vLLM finds such prefixes in its own cache.

    With ``speculation`` (``coordinator.speculation.SpeculativePrefill``) the first retrieval of a
    question is scanned in two stages, and while the second runs the prompt built from the early
    top-k is prefilled on a worker thread; the answer starts from that KV when the final passages
    are the same, and otherwise prefills again, reusing what the two prompts share.
    """

    def __init__(
        self,
        rag_index: RagIndex,
        embedder,
        engine: LLMEngine,
        k: int = 4,
        nprobe: int = 16,
        retrieval: Retrieval | None = None,
        doc_cache=None,
        speculation=None,
    ):
        if not 1 <= k <= 64:
            raise InvalidInput(f"k must be between 1 and 64, got {k}")
        self.rag_index = rag_index
        self.embedder = embedder
        self.engine = engine
        self.doc_cache = doc_cache
        if retrieval is None:
            retrieval = Searcher(rag_index.index)
            retrieval.engine.warm_up()
        self.retrieval = retrieval
        self.k = k
        self.nprobe = nprobe  # at most the lists of the index searched (it may be reloaded)
        self._retrieval_lock = threading.Lock()
        self._embedding_lock = threading.Lock()
        self.speculation = speculation
        self._speculator = ThreadPoolExecutor(speculation.limit, "speculative-prefill") if speculation is not None else None

    def swap_index(self, rag_index: RagIndex, retrieval: Retrieval) -> None:
        """Search ``rag_index`` through ``retrieval`` from the next search on (another version of
        the same index: the embedder's dimension). The search in flight ends on the previous pair."""
        if rag_index.index.params.dim != self.rag_index.index.params.dim:
            raise InvalidInput(f"the new index has dimension {rag_index.index.params.dim}, not {self.rag_index.index.params.dim}")
        with self._retrieval_lock:
            self.rag_index, self.retrieval = rag_index, retrieval

    def retrieve(
        self, question: str, timings: Timings | None = None, k: int | None = None, nprobe: int | None = None, on_early=None
    ) -> list[tuple[Passage, float]]:
        """The top-k passages for ``question`` with their scores; fills ``timings`` when given. ``on_early``:
        as in :meth:`_search`."""
        timings = timings if timings is not None else Timings()
        started = time.perf_counter()
        query = prepare_vectors(self.embed([question]), "cos")
        timings.embed_s = time.perf_counter() - started
        with self._retrieval_lock:
            return self._search(query, timings, k, nprobe, on_early)

    def embed(self, texts: list[str]) -> np.ndarray:
        """The embedder's vectors of ``texts``. A long list is embedded a batch at a time, so that
        the questions of other requests get their turn in between."""
        vectors = []
        for start in range(0, len(texts), self.embedder.batch_size):
            with self._embedding_lock:
                vectors.append(self.embedder.embed(texts[start : start + self.embedder.batch_size]))
        return np.concatenate(vectors) if vectors else np.empty((0, self.embedder.dim), np.float32)

    def embedding_tokens(self, texts: list[str]) -> int:
        """The tokens the embedder reads for ``texts`` (OpenAI's usage of an embeddings request)."""
        with self._embedding_lock:
            return self.embedder.count_tokens(texts)

    def retrieve_vector(self, vector, timings: Timings, k: int | None = None, nprobe: int | None = None) -> list[tuple[Passage, float]]:
        """The top-k passages nearest to an embedding ``vector`` (the embedder's dimension)."""
        query = prepare_vectors(as_query_matrix(vector, self.rag_index.index.params.dim), "cos")
        if len(query) != 1:
            raise InvalidInput(f"search takes one vector, got {len(query)}")
        with self._retrieval_lock:
            return self._search(query, timings, k, nprobe)

    def _search(self, query, timings: Timings, k: int | None, nprobe: int | None, on_early=None) -> list[tuple[Passage, float]]:
        """The top-k passages; with ``on_early``, the scan runs in two stages (when there are at
        least two lists) and ``on_early(early top-k passages)`` runs between them."""
        started = time.perf_counter()
        list_ids, _ = self.retrieval.quantizer.search(query, min(nprobe or self.nprobe, self.rag_index.index.params.nlist))
        timings.coarse_s = time.perf_counter() - started
        started = time.perf_counter()
        early = self.speculation.early_lists(list_ids.shape[1]) if on_early is not None else None
        if early is None:
            result = self.retrieval.scan(query, list_ids, k or self.k)
        else:
            staged = self.retrieval.scan_staged(query, list_ids, k or self.k, early)
            on_early(self._passages(staged.early()))
            result = staged.final()
        timings.retrieval_s = time.perf_counter() - started
        timings.retrieval_partial = result.partial
        return self._passages(result)

    def _passages(self, result: SearchResult) -> list[tuple[Passage, float]]:
        return [(self.rag_index.passages[i], float(s)) for i, s in zip(result.ids[0], result.distances[0]) if i >= 0]

    def _first_prompt(self, question: str, timings: Timings, k: int | None, max_new_tokens: int, render) -> _FirstPrompt:
        """Retrieve for ``question``, build its prompt and find the KV it starts from (speculating
        on the early top-k when asked to)."""
        speculative: list = []  # (segments, tokens, admission, future) of the prefill started on the early top-k
        cut_short = threading.Event()  # set when the speculative prefill is not wanted any more

        def speculate(early_ranked) -> None:
            early_ranked = self._canonical(early_ranked)
            segments, kept = self.fit([p for p, _ in early_ranked], max_new_tokens, render)
            if not self.speculation.begin():
                return
            prefix, admitted = self._cached_prefix(segments, early_ranked[:kept])
            tokens = joined(segments)
            speculative.append(
                (segments, tokens, admitted, self._speculator.submit(self.engine.generate, tokens, 1, prefix, None, cut_short.is_set))
            )

        try:
            ranked = self._canonical(self.retrieve(question, timings, k, on_early=speculate if self.speculation is not None else None))
            segments, kept = self.fit([p for p, _ in ranked], max_new_tokens, render)
        except Exception:
            cut_short.set()
            for _, early_tokens, _, future in speculative:  # the engine is the caller's again only once it is done
                future.exception()
                self.speculation.end(early_tokens, ())
            raise
        if not speculative:
            return _FirstPrompt(ranked, segments, kept, *self._cached_prefix(segments, ranked[:kept]))
        early_segments, early_tokens, early_admitted, future = speculative[0]
        tokens = joined(segments)
        if early_tokens != tokens:
            cut_short.set()  # its KV up to the chunk it stops at still serves what the final prompt shares
        try:
            generation = future.result()
        finally:
            confirmed = self.speculation.end(early_tokens, tokens)
        timings.speculation = "confirmed" if confirmed else "restarted"
        if self.doc_cache is not None:
            self.doc_cache.keep(early_admitted, early_segments, generation)
        if confirmed:
            return _FirstPrompt(ranked, segments, kept, resume_prefix(generation, tokens, None), None, generation.cached_tokens)
        cached, admitted = self._cached_prefix(segments, ranked[:kept])
        return _FirstPrompt(
            ranked, segments, kept, resume_prefix(generation, tokens, cached), admitted, len(cached.tokens) if cached is not None else 0
        )

    def _canonical(self, ranked: list[tuple[Passage, float]]) -> list[tuple[Passage, float]]:
        """``ranked`` in the document cache's order (with vLLM: its resident documents first, which
        changes where passages stand in the prompt); as retrieved without a cache."""
        if self.doc_cache is None:
            return ranked
        return [ranked[i] for i in self.doc_cache.order([p.key for p, _ in ranked])]

    def _cached_prefix(self, segments: list[list[int]], ranked: list[tuple[Passage, float]]):
        """The document cache's KV prefix for a prompt and its admission (None, None without a cache)."""
        if self.doc_cache is None:
            return None, None
        return self.doc_cache.lookup(segments, [p.key for p, _ in ranked])

    def fit(
        self, passages: Sequence[Passage], max_new_tokens: int, render: Callable[[Sequence[Passage]], list[list[int]]]
    ) -> tuple[list[list[int]], int]:
        """``render(kept passages)`` (token segments) for the most passages that leave room for
        ``max_new_tokens`` (the truncation policy), and how many it keeps."""
        for keep in range(len(passages), -1, -1):
            segments = render(passages[:keep])
            length = sum(map(len, segments))
            if length + max_new_tokens <= self.engine.context_window:
                return segments, keep
        raise InvalidInput(
            f"the prompt alone ({length} tokens) leaves no room for {max_new_tokens} new tokens "
            f"in the context window of {self.engine.context_window}"
        )

    def prompt_tokens(
        self, question: str, passages: list[Passage], max_new_tokens: int, history: Sequence[dict] = (), system: str | None = None
    ) -> tuple[list[int], int]:
        """Prompt tokens and how many passages it keeps (see the truncation policy).

        ``history`` is the conversation before the question; ``system`` replaces the default system prompt.
        """
        segments, kept = self.fit(passages, max_new_tokens, lambda chosen: prompt_segments(self.engine, question, chosen, history, system))
        return joined(segments), kept

    def ask(
        self,
        question: str,
        max_new_tokens: int = 128,
        retrieval_interval: int | None = None,
        k: int | None = None,
        history: Sequence[dict] = (),
        system: str | None = None,
        on_token: Callable[[int], bool] | None = None,
        sampling: Sampler | None = None,
    ) -> Answer:
        """Answer ``question``; with ``retrieval_interval`` N, retrieve again every N generated tokens.

        The query is then the question plus the answer so far. When the passages change, the prompt
        is rebuilt with them and generation continues after the answer so far; the KV of the part of
        the prompt that did not change is reused. ``history``, ``system``, ``on_token`` and
        ``sampling`` are as in ``prompt_tokens`` and the engine's ``generate``.
        """
        if not isinstance(question, str) or not question.strip():
            raise InvalidInput("the question is empty")
        if not 1 <= max_new_tokens <= 4096:
            raise InvalidInput(f"max_new_tokens must be between 1 and 4096, got {max_new_tokens}")
        if retrieval_interval is not None and not 1 <= retrieval_interval <= max_new_tokens:
            raise InvalidInput(f"the retrieval interval must be between 1 and max_new_tokens, got {retrieval_interval}")
        if k is not None and not 1 <= k <= 64:
            raise InvalidInput(f"k must be between 1 and 64, got {k}")
        question = question.strip()
        interval = retrieval_interval or max_new_tokens
        timings = Timings()
        first = self._first_prompt(
            question, timings, k, max_new_tokens, lambda chosen: prompt_segments(self.engine, question, chosen, history, system)
        )
        ranked, segments, kept, prefix, admitted = first.ranked, first.segments, first.kept, first.prefix, first.admitted
        tokens = joined(segments)
        answer: list[int] = []
        state = None
        retrievals, changes, reused = 1, 0, 0
        first_token_at = None
        started = time.perf_counter()
        while True:
            prompt = tokens + answer
            prefix = state.shared_with(prompt) if state is not None else prefix
            segment_started = time.perf_counter()
            generation = self.engine.generate(prompt, min(interval, max_new_tokens - len(answer)), prefix, on_token, sampling=sampling)
            reused += generation.cached_tokens if state is not None or first.reused is None else first.reused
            if state is None and admitted is not None:
                self.doc_cache.keep(admitted, segments, generation)
            first_token_at = first_token_at or segment_started + generation.ttft_s
            if timings.ttft_s is None:
                timings.ttft_s = generation.ttft_s
            timings.queue_s = (timings.queue_s or 0.0) + generation.queue_s
            answer += generation.tokens
            state = generation.state
            if generation.finish_reason == "stop" or len(answer) >= max_new_tokens:
                break
            fresh = self._canonical(self.retrieve(f"{question}\n{self.engine.tokenizer.decode(answer, skip_special_tokens=True)}", k=k))
            retrievals += 1
            if [p.id for p, _ in fresh] != [p.id for p, _ in ranked]:
                changes += 1
                ranked = fresh
                tokens, kept = self.prompt_tokens(question, [p for p, _ in ranked], max_new_tokens, history, system)
        timings.decode_tokens_per_s = decode_speed(len(answer), time.perf_counter() - first_token_at)
        timings.total_s = time.perf_counter() - started
        timings.prompt_tokens, timings.new_tokens, timings.passages_used = len(tokens), len(answer), kept
        timings.retrievals, timings.passage_changes, timings.reused_kv_tokens = retrievals, changes, reused
        sources = [
            {"doc_id": p.doc_id, "title": p.title, "score": round(score, 4), "snippet": p.text[:SNIPPET_CHARS]}
            for p, score in ranked[:kept]
        ]
        text = answer_text(self.engine.tokenizer, self.engine.eos_ids, answer)
        return Answer(text, sources, timings, generation.finish_reason)
