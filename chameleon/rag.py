"""Passage RAG: question -> embed -> coarse search -> scan -> top-k passages -> prompt -> generate.

Truncation policy: the prompt must leave room for ``max_new_tokens`` in the model's context
window. Passages are dropped lowest-ranked first until it fits; a question that does not fit on
its own is an error (it is never cut).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from chameleon.corpus import Passage, RagIndex
from chameleon.llm import answer_text, decode_speed
from retriever.errors import RetrieverError
from retriever.search import Searcher
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
    timings: dict = field(default_factory=dict)
    finish_reason: str = "stop"


_PASSAGES = "\ue000chameleon-passages\ue000"  # a private-use marker where the passages go in the template


def passage_pieces(passages: Sequence[Passage]) -> list[str]:
    """The numbered passages as the prompt shows them, one string each (they concatenate)."""
    last = len(passages) - 1
    return [f"[{n + 1}] {p.title}\n{p.text}" + ("\n\n" if n < last else "") for n, p in enumerate(passages)]


def context_block(passages: Sequence[Passage]) -> str:
    return "".join(passage_pieces(passages))


def prompt_segments(engine, question: str, passages: Sequence[Passage], history: Sequence[dict] = (), system: str | None = None) -> list[list[int]]:
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
        raise RetrieverError("the prompt contains the reserved character U+E000")
    head, tail = text.split(_PASSAGES)
    return [encode(head), *map(encode, passage_pieces(passages)), encode(tail)]


class RagPipeline:
    """``retrieval`` is where passages are searched: in this process (the default) or a cluster
    (``chameleon.cluster.ClusterSearcher``); either offers ``quantizer`` and ``scan``.

    Retrieval is thread-safe (one search at a time: the embedder's tokenizer and a cluster's
    socket are not); so is ``ask`` when the engine is (``chameleon.batching.BatchingEngine``,
    ``chameleon.vllm_engine.VllmEngine``). With a ``doc_cache`` (``chameleon.doc_cache.DocumentKVCache``,
    torch engines only) a prompt starts from the cached KV of its template and of the documents it
    shares, in order, with earlier prompts; vLLM finds such prefixes in its own cache.
    """

    def __init__(self, rag_index: RagIndex, embedder, engine, k: int = 4, nprobe: int = 16, retrieval=None, doc_cache=None):
        if not 1 <= k <= 64:
            raise RetrieverError(f"k must be between 1 and 64, got {k}")
        self.rag_index = rag_index
        self.embedder = embedder
        self.engine = engine
        self.doc_cache = doc_cache
        if retrieval is None:
            retrieval = Searcher(rag_index.index)
            retrieval.engine.warm_up()
        self.retrieval = retrieval
        self.k = k
        self.nprobe = min(nprobe, rag_index.index.params.nlist)
        self._retrieval_lock = threading.Lock()

    def retrieve(self, question: str, timings: dict, k: int | None = None, nprobe: int | None = None) -> list[tuple[Passage, float]]:
        """The top-k passages for ``question`` with their scores; fills ``timings``."""
        with self._retrieval_lock:
            started = time.perf_counter()
            query = prepare_vectors(self.embedder.embed([question]), "cos")
            timings["embed_s"] = time.perf_counter() - started
            return self._search(query, timings, k, nprobe)

    def retrieve_vector(self, vector, timings: dict, k: int | None = None, nprobe: int | None = None) -> list[tuple[Passage, float]]:
        """The top-k passages nearest to an embedding ``vector`` (the embedder's dimension)."""
        query = prepare_vectors(as_query_matrix(vector, self.rag_index.index.params.dim), "cos")
        if len(query) != 1:
            raise RetrieverError(f"search takes one vector, got {len(query)}")
        with self._retrieval_lock:
            return self._search(query, timings, k, nprobe)

    def _search(self, query, timings: dict, k: int | None, nprobe: int | None) -> list[tuple[Passage, float]]:
        started = time.perf_counter()
        list_ids, _ = self.retrieval.quantizer.search(query, min(nprobe or self.nprobe, self.rag_index.index.params.nlist))
        timings["coarse_s"] = time.perf_counter() - started
        started = time.perf_counter()
        scores, ids, partial = self.retrieval.scan(query, list_ids, k or self.k)
        timings["retrieval_s"] = time.perf_counter() - started
        timings["retrieval_partial"] = partial
        return [(self.rag_index.passages[i], float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

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
        raise RetrieverError(
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
        return [token for segment in segments for token in segment], kept

    def ask(
        self,
        question: str,
        max_new_tokens: int = 128,
        retrieval_interval: int | None = None,
        k: int | None = None,
        history: Sequence[dict] = (),
        system: str | None = None,
        on_token: Callable[[int], bool] | None = None,
    ) -> Answer:
        """Answer ``question``; with ``retrieval_interval`` N, retrieve again every N generated tokens.

        The query is then the question plus the answer so far. When the passages change, the prompt
        is rebuilt with them and generation continues after the answer so far; the KV of the part of
        the prompt that did not change is reused. ``history``, ``system`` and ``on_token`` are as in
        ``prompt_tokens`` and the engine's ``generate``.
        """
        if not isinstance(question, str) or not question.strip():
            raise RetrieverError("the question is empty")
        if not 1 <= max_new_tokens <= 4096:
            raise RetrieverError(f"max_new_tokens must be between 1 and 4096, got {max_new_tokens}")
        if retrieval_interval is not None and not 1 <= retrieval_interval <= max_new_tokens:
            raise RetrieverError(f"the retrieval interval must be between 1 and max_new_tokens, got {retrieval_interval}")
        if k is not None and not 1 <= k <= 64:
            raise RetrieverError(f"k must be between 1 and 64, got {k}")
        question = question.strip()
        interval = retrieval_interval or max_new_tokens
        timings: dict = {}
        ranked = self.retrieve(question, timings, k)
        segments, kept = self.fit([p for p, _ in ranked], max_new_tokens, lambda chosen: prompt_segments(self.engine, question, chosen, history, system))
        tokens = [token for segment in segments for token in segment]
        prefix, admitted = None, None
        if self.doc_cache is not None:
            prefix, admitted = self.doc_cache.lookup(segments, [str(p.id) for p, _ in ranked[:kept]])
        answer: list[int] = []
        state = None
        retrievals, changes, reused = 1, 0, 0
        first_token_at = None
        started = time.perf_counter()
        while True:
            prompt = tokens + answer
            prefix = state.shared_with(prompt) if state is not None else prefix
            segment_started = time.perf_counter()
            generation = self.engine.generate(prompt, min(interval, max_new_tokens - len(answer)), prefix, on_token)
            reused += generation.cached_tokens
            if state is None and self.doc_cache is not None:
                self.doc_cache.keep(admitted, segments, generation.state)
            first_token_at = first_token_at or segment_started + generation.ttft_s
            timings.setdefault("ttft_s", generation.ttft_s)
            timings["queue_s"] = timings.get("queue_s", 0.0) + generation.queue_s
            answer += generation.tokens
            state = generation.state
            if generation.finish_reason == "stop" or len(answer) >= max_new_tokens:
                break
            fresh = self.retrieve(f"{question}\n{self.engine.tokenizer.decode(answer, skip_special_tokens=True)}", {}, k)
            retrievals += 1
            if [p.id for p, _ in fresh] != [p.id for p, _ in ranked]:
                changes += 1
                ranked = fresh
                tokens, kept = self.prompt_tokens(question, [p for p, _ in ranked], max_new_tokens, history, system)
        timings.update(
            decode_tokens_per_s=decode_speed(len(answer), time.perf_counter() - first_token_at),
            total_s=time.perf_counter() - started,
            prompt_tokens=len(tokens),
            new_tokens=len(answer),
            passages_used=kept,
            retrievals=retrievals,
            passage_changes=changes,
            reused_kv_tokens=reused,
        )
        sources = [
            {"doc_id": p.doc_id, "title": p.title, "score": round(score, 4), "snippet": p.text[:SNIPPET_CHARS]}
            for p, score in ranked[:kept]
        ]
        rounded = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in timings.items()}
        text = answer_text(self.engine.tokenizer, self.engine.eos_ids, answer)
        return Answer(text, sources, rounded, generation.finish_reason)
