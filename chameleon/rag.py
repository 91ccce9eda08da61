"""Passage RAG: question -> embed -> coarse search -> scan -> top-k passages -> prompt -> generate.

Truncation policy: the prompt must leave room for ``max_new_tokens`` in the model's context
window. Passages are dropped lowest-ranked first until it fits; a question that does not fit on
its own is an error (it is never cut).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from chameleon.corpus import Passage, RagIndex
from retriever.errors import RetrieverError
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

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


class RagPipeline:
    """``retrieval`` is where passages are searched: in this process (the default) or a cluster
    (``chameleon.cluster.ClusterSearcher``); either offers ``quantizer`` and ``scan``."""

    def __init__(self, rag_index: RagIndex, embedder, engine, k: int = 4, nprobe: int = 16, retrieval=None):
        if not 1 <= k <= 64:
            raise RetrieverError(f"k must be between 1 and 64, got {k}")
        self.rag_index = rag_index
        self.embedder = embedder
        self.engine = engine
        if retrieval is None:
            retrieval = Searcher(rag_index.index)
            retrieval.engine.warm_up()
        self.retrieval = retrieval
        self.k = k
        self.nprobe = min(nprobe, rag_index.index.params.nlist)

    def retrieve(self, question: str, timings: dict) -> list[tuple[Passage, float]]:
        started = time.perf_counter()
        query = prepare_vectors(self.embedder.embed([question]), "cos")
        timings["embed_s"] = time.perf_counter() - started
        started = time.perf_counter()
        list_ids, _ = self.retrieval.quantizer.search(query, self.nprobe)
        timings["coarse_s"] = time.perf_counter() - started
        started = time.perf_counter()
        scores, ids, partial = self.retrieval.scan(query, list_ids, self.k)
        timings["retrieval_s"] = time.perf_counter() - started
        timings["retrieval_partial"] = partial
        return [(self.rag_index.passages[i], float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def prompt_tokens(self, question: str, passages: list[Passage], max_new_tokens: int) -> tuple[list[int], int]:
        """Prompt tokens and how many passages it keeps (see the truncation policy)."""
        for keep in range(len(passages), -1, -1):
            context = "\n\n".join(f"[{n + 1}] {p.title}\n{p.text}" for n, p in enumerate(passages[:keep]))
            user = f"Passages:\n{context}\n\nQuestion: {question}" if keep else f"Question: {question}"
            tokens = self.engine.chat_tokens(SYSTEM_PROMPT, user)
            if len(tokens) + max_new_tokens <= self.engine.context_window:
                return tokens, keep
        raise RetrieverError(
            f"the question alone ({len(tokens)} tokens) leaves no room for {max_new_tokens} new tokens "
            f"in the context window of {self.engine.context_window}"
        )

    def ask(self, question: str, max_new_tokens: int = 128, retrieval_interval: int | None = None) -> Answer:
        """Answer ``question``; with ``retrieval_interval`` N, retrieve again every N generated tokens.

        The query is then the question plus the answer so far. When the passages change, the prompt
        is rebuilt with them and generation continues after the answer so far; the KV of the part of
        the prompt that did not change is reused.
        """
        if not isinstance(question, str) or not question.strip():
            raise RetrieverError("the question is empty")
        if not 1 <= max_new_tokens <= 4096:
            raise RetrieverError(f"max_new_tokens must be between 1 and 4096, got {max_new_tokens}")
        if retrieval_interval is not None and not 1 <= retrieval_interval <= max_new_tokens:
            raise RetrieverError(f"the retrieval interval must be between 1 and max_new_tokens, got {retrieval_interval}")
        question = question.strip()
        interval = retrieval_interval or max_new_tokens
        timings: dict = {}
        ranked = self.retrieve(question, timings)
        tokens, kept = self.prompt_tokens(question, [p for p, _ in ranked], max_new_tokens)
        answer: list[int] = []
        state = None
        retrievals, changes, reused = 1, 0, 0
        first_token_at = None
        started = time.perf_counter()
        while True:
            prompt = tokens + answer
            prefix = state.shared_with(prompt) if state is not None else None
            reused += len(prefix.tokens) if prefix is not None else 0
            generation = self.engine.generate(prompt, min(interval, max_new_tokens - len(answer)), prefix)
            first_token_at = first_token_at or time.perf_counter()
            timings.setdefault("ttft_s", generation.ttft_s)
            answer += generation.tokens
            state = generation.state
            if answer[-1] in self.engine.eos_ids or len(answer) >= max_new_tokens:
                break
            fresh = self.retrieve(f"{question}\n{self.engine.tokenizer.decode(answer, skip_special_tokens=True)}", {})
            retrievals += 1
            if [p.id for p, _ in fresh] != [p.id for p, _ in ranked]:
                changes += 1
                ranked = fresh
                tokens, kept = self.prompt_tokens(question, [p for p, _ in ranked], max_new_tokens)
        elapsed = time.perf_counter() - first_token_at
        text = answer[:-1] if answer[-1] in self.engine.eos_ids else answer
        timings.update(
            decode_tokens_per_s=(len(answer) - 1) / elapsed if len(answer) > 1 and elapsed > 0 else 0.0,
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
        return Answer(self.engine.tokenizer.decode(text, skip_special_tokens=True).strip(), sources, rounded)
