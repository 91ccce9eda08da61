"""`chameleon bench kvcache`: time to first token under a RAG request stream, per cache policy.

Requests arrive as a Poisson process. Each is about a passage drawn by Zipf(s) popularity: its
query is that passage's embedding, the retrieval tier finds the top k (2..5) passages for it (a
real search of the passage index: the passage itself first, then its neighbours), and the prompt
is those passages plus a short question. One engine serves the requests one at a time: the policy
under test decides which documents' KV is reused (``chameleon.doc_cache``) and the prefill of what
is left runs for real on the engine. Time is virtual, every service time is measured: retrieval
runs when a request arrives (the tier is a resource of its own, so searches overlap with the
engine's work), the request then waits for the engine, and its TTFT is retrieval + wait + lookup
+ prefill. With ``reorder`` the waiting requests are served by cached/computed length
(``CacheAwareQueue``) instead of in arrival order. With ``speculative`` the search reports an early
top-k after half its lists (``coordinator.speculation``); when the engine is idle then, prefill
starts on it, and the request's first token stands at the final answer if the passages are the
same, or prefill runs again (the speculative one cannot be cut short) on the final prompt. The
arrival rate is ``load`` times the no-cache capacity, measured first on the same stream.

Each cache first serves ``warmup`` requests of the same stream, back to back and not counted,
so that the measured requests see the steady state: from a cold cache, a short stream's hit
rate is mostly first-time misses, the same for every policy, and the policies only differ
once the tiers are full and they start to choose what to evict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from chameleon.corpus import Passage, RagIndex
from chameleon.doc_cache import DocumentKVCache, kv_bytes_per_token
from chameleon.llm import Generation
from chameleon.rag import joined, prompt_segments, resume_prefix
from coordinator.kv_cache import CacheAwareQueue
from coordinator.prefill_profile import PrefillProfile
from coordinator.speculation import SpeculativePrefill
from retriever.errors import RetrieverError
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

EARLY_FRACTION = 0.5  # the early answer comes after half the probed lists
ROW_KEYS = ("policy", "reorder", "speculative", "zipf_s", "ttft_p50_ms", "ttft_p99_ms", "throughput_rps", "hit_rate")


@dataclass
class Request:
    arrival: float
    about: Passage  # the passage the request is about; its embedding is the query
    k: int
    question: str
    passages: list[Passage] = field(default_factory=list)  # the retrieved top-k
    early: list[Passage] = field(default_factory=list)  # the top-k after the first half of the lists
    early_s: float = 0.0  # measured search time to the early answer ...
    retrieval_s: float = 0.0  # ... and to the final one


def request_stream(passages: list[Passage], n: int, zipf_s: float, rate: float, seed: int, drift: int = 0) -> list[Request]:
    """``n`` requests: Poisson arrivals at ``rate`` per second, each about a Zipf-popular passage, k
    in 2..5. With ``drift``, popularity is drawn again every ``drift`` requests (a new hot set)."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(len(passages))  # popularity rank -> passage
    weights = 1.0 / np.arange(1, len(passages) + 1) ** zipf_s
    weights /= weights.sum()
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    ranks = rng.choice(len(passages), size=n, p=weights)
    stream = []
    for i in range(n):
        if drift and i and i % drift == 0:
            popularity = rng.permutation(len(passages))
        about = passages[popularity[ranks[i]]]
        stream.append(Request(float(arrivals[i]), about, int(rng.integers(2, 6)), f"What does passage {i} explain, briefly?"))
    return stream


def retrieve(stream: list[Request], rag_index: RagIndex, embedder, nprobe: int, early: int) -> None:
    """Fill each request's passages (final, and early: after the first ``early`` lists) and its measured search times."""
    searcher = Searcher(rag_index.index)
    searcher.engine.warm_up()
    about = sorted({r.about.id: r.about for r in stream}.values(), key=lambda p: p.id)
    queries = dict(zip((p.id for p in about), prepare_vectors(embedder.embed([f"{p.title}\n{p.text}" for p in about]), "cos")))
    for request in stream:
        query = queries[request.about.id][None]
        started = time.perf_counter()
        list_ids, _ = searcher.quantizer.search(query, nprobe)
        staged = searcher.scan_staged(query, list_ids, request.k, early)
        _, early_ids, _ = staged.early()
        request.early_s = time.perf_counter() - started
        _, ids, _ = staged.final()
        request.retrieval_s = time.perf_counter() - started
        request.passages = [rag_index.passages[i] for i in ids[0] if i >= 0]
        request.early = [rag_index.passages[i] for i in early_ids[0] if i >= 0]


def serve_stream(
    engine, stream: list[Request], doc_cache: DocumentKVCache | None, reorder: bool, speculation: SpeculativePrefill | None = None,
    warmup: list[Request] = (),
) -> dict:
    """Serve ``stream`` on one engine (virtual clock, measured service times); TTFTs and hit rate.
    ``warmup`` requests go through the cache first, in order, uncounted."""
    def reuse_ratio(item) -> float:
        request, segments = item
        return doc_cache.tree.reuse_ratio([(str(p.id), len(s)) for p, s in zip(request.passages, segments[1:-1])], len(segments[-1]))

    def prefill(segments: list[list[int]], passages: list[Passage], resume: Generation | None = None):
        """Lookup + prefill to the first token: (generation, seconds, tokens the document cache gave)."""
        started = time.perf_counter()
        tokens = joined(segments)
        cached, admitted = doc_cache.lookup(segments, [str(p.id) for p in passages]) if doc_cache else (None, None)
        prefix = resume_prefix(resume, tokens, cached) if resume is not None else cached
        generation = engine.generate(tokens, 1, prefix)
        if admitted is not None:
            doc_cache.keep(admitted, segments, generation)
        return generation, time.perf_counter() - started, len(cached.tokens) if cached is not None else 0

    def speculate(request: Request, early_at: float):
        """Prefill on the early answer from ``early_at``, again on the final one if it differs:
        (the prompt served, when its first token stands, tokens the document cache gave)."""
        segments = prompt_segments(engine, request.question, request.early)
        generation, seconds, shared = prefill(segments, request.early)
        first_token_at = max(early_at + seconds, request.arrival + request.retrieval_s)
        final = prompt_segments(engine, request.question, request.passages)
        if speculation.end(joined(segments), joined(final)):
            return segments, first_token_at, shared
        _, seconds, shared = prefill(final, request.passages, resume=generation)  # the speculative one ran to its end
        return final, first_token_at + seconds, shared

    if doc_cache is not None:
        for request in tqdm(warmup, desc="warm-up", leave=False):
            prefill(prompt_segments(engine, request.question, request.passages), request.passages)
    waiting = CacheAwareQueue(reuse_ratio if reorder else (lambda item: 0.0), window=8)
    ready = sorted(stream, key=lambda r: r.arrival + r.retrieval_s)
    clock, next_ready, ttfts, prompt_tokens, reused = 0.0, 0, [], 0, 0
    for _ in tqdm(range(len(stream)), desc="requests", leave=False):
        upcoming = ready[next_ready] if not len(waiting) else None  # the engine is idle until it is retrieved
        early_at = max(clock, upcoming.arrival + upcoming.early_s) if upcoming is not None else None
        if upcoming is not None and speculation is not None and early_at < upcoming.arrival + upcoming.retrieval_s and speculation.begin():
            next_ready += 1  # early answer in: prefill on it while the search finishes
            request = upcoming
            segments, clock, shared = speculate(request, early_at)
        else:
            if upcoming is not None:
                clock = max(clock, upcoming.arrival + upcoming.retrieval_s)
            while next_ready < len(ready) and ready[next_ready].arrival + ready[next_ready].retrieval_s <= clock:
                retrieved = ready[next_ready]
                waiting.push((retrieved, prompt_segments(engine, retrieved.question, retrieved.passages)))  # tokenized once, when retrieved
                next_ready += 1
            request, segments = waiting.pop()
            _, seconds, shared = prefill(segments, request.passages)
            clock += seconds
        ttfts.append(clock - request.arrival)
        prompt_tokens += sum(map(len, segments))
        reused += shared
    return {
        "ttft_p50_ms": round(float(np.percentile(ttfts, 50)) * 1e3, 1),
        "ttft_p99_ms": round(float(np.percentile(ttfts, 99)) * 1e3, 1),
        "throughput_rps": round(len(stream) / (clock - stream[0].arrival), 3),
        "hit_rate": round(reused / prompt_tokens, 4),
    }


def kvcache_benchmark(
    engine,
    rag_index: RagIndex,
    embedder,
    profile: PrefillProfile,
    requests: int = 100,
    zipf: tuple[float, ...] = (0.8, 1.1),
    policies: tuple[str, ...] = ("none", "lru", "lfu", "gdsf", "pgdsf"),
    speculative: tuple[bool, ...] = (False, True),
    device_docs: int = 32,
    host_docs: int = 64,
    load: float = 0.9,
    nprobe: int = 8,
    seed: int = 0,
    warmup: int = 100,
) -> list[dict]:
    """One row per (zipf s, policy, reorder, speculative); budgets in average passages (KV bytes of
    that many). Every cache is warmed by the ``warmup`` requests before the measured ``requests``."""
    if not 0 <= warmup <= 100_000:
        raise RetrieverError(f"warmup must be 0..100000 requests, got {warmup}")
    if requests < 10 or not 0 < load < 10 or device_docs < 6 or host_docs < 0 or not 2 <= nprobe <= rag_index.index.params.nlist:
        raise RetrieverError(f"need at least 10 requests, 0 < load < 10, device_docs >= 6, host_docs >= 0 and 2 <= nprobe <= {rag_index.index.params.nlist}")
    passages = rag_index.passages
    sizes = [len(prompt_segments(engine, "q", [p])[1]) for p in passages[:200]]
    template = prompt_segments(engine, "q", passages[:1])[0]
    per_doc = kv_bytes_per_token(engine) * float(np.mean(sizes))
    device_bytes = int(kv_bytes_per_token(engine) * len(template) + device_docs * per_doc)
    early = SpeculativePrefill(early_fraction=EARLY_FRACTION).early_lists(nprobe)
    rows = []
    for s in zipf:
        # capacity without a cache, on this very stream: sets the arrival rate for every policy
        probe = request_stream(passages, max(10, requests // 5), s, rate=1e9, seed=seed)
        retrieve(probe, rag_index, embedder, nprobe, early)
        serve_stream(engine, probe, None, reorder=False)  # untimed: a cold engine's first prefills run slower
        capacity = serve_stream(engine, probe, None, reorder=False)["throughput_rps"]
        stream = request_stream(passages, warmup + requests, s, rate=load * capacity, seed=seed)
        retrieve(stream, rag_index, embedder, nprobe, early)
        warm, stream = stream[:warmup], stream[warmup:]
        for policy in policies:
            for reorder in (False, True) if policy != "none" else (False,):
                for speculate in speculative:
                    doc_cache = None
                    if policy != "none":
                        doc_cache = DocumentKVCache(engine, policy, device_bytes, int(host_docs * per_doc), profile, template=template)
                    speculation = SpeculativePrefill(early_fraction=EARLY_FRACTION) if speculate else None
                    measured = serve_stream(engine, stream, doc_cache, reorder, speculation, warm)
                    extra = {"speculation": speculation.stats} if speculation is not None else {}
                    row = {"policy": policy, "reorder": reorder, "speculative": speculate, "zipf_s": s, **measured}
                    rows.append({**row, "warmup_requests": warmup, **extra})
    return rows
