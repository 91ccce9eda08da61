"""`chameleon bench kvcache`: time to first token under a RAG request stream, per cache policy.

Requests arrive as a Poisson process; each retrieves k (2..5) passages whose popularity follows
Zipf(s) over the passage store, ranked most popular first (as a retriever ranks the best match
first), plus a short question. One engine serves them one at a time: the policy under test
decides which documents' KV is reused (``chameleon.doc_cache``), and the prefill of what is left
runs for real on the engine. Time is virtual but every service time is measured: a request
starts when the engine is free and it has arrived, its TTFT is its wait plus its measured
lookup + prefill. With ``reorder`` the waiting requests are served by cached/computed length
(``CacheAwareQueue``) instead of in arrival order. The arrival rate is ``load`` times the
no-cache capacity, measured first on the same stream. Speculative pipelining is not modelled
(the retrieval tier does not report early candidates yet): every row has ``speculative: false``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from chameleon.corpus import Passage
from chameleon.doc_cache import DocumentKVCache, kv_bytes_per_token
from chameleon.rag import prompt_segments
from coordinator.kv_cache import CacheAwareQueue
from coordinator.prefill_profile import PrefillProfile
from retriever.errors import RetrieverError

ROW_KEYS = ("policy", "reorder", "speculative", "zipf_s", "ttft_p50_ms", "ttft_p99_ms", "throughput_rps", "hit_rate")


@dataclass
class Request:
    arrival: float
    passages: list[Passage]
    question: str


def request_stream(passages: list[Passage], n: int, zipf_s: float, rate: float, seed: int) -> list[Request]:
    """``n`` requests: Poisson arrivals at ``rate`` per second, k in 2..5 Zipf-popular passages each."""
    rng = np.random.default_rng(seed)
    popularity = rng.permutation(len(passages))  # popularity rank -> passage
    weights = 1.0 / np.arange(1, len(passages) + 1) ** zipf_s
    weights /= weights.sum()
    arrivals = np.cumsum(rng.exponential(1.0 / rate, n))
    stream = []
    for i in range(n):
        ranks = np.sort(rng.choice(len(passages), size=int(rng.integers(2, 6)), replace=False, p=weights))
        stream.append(Request(float(arrivals[i]), [passages[popularity[r]] for r in ranks], f"What does passage {i} explain, briefly?"))
    return stream


def serve_stream(engine, stream: list[Request], doc_cache: DocumentKVCache | None, reorder: bool) -> dict:
    """Serve ``stream`` on one engine (virtual clock, measured service times); TTFTs and hit rate."""
    def reuse_ratio(item) -> float:
        request, segments = item
        return doc_cache.tree.reuse_ratio([(str(p.id), len(s)) for p, s in zip(request.passages, segments[1:-1])], len(segments[-1]))

    waiting = CacheAwareQueue(reuse_ratio if reorder else (lambda item: 0.0), window=8)
    clock, next_arrival, ttfts, prompt_tokens, reused = 0.0, 0, [], 0, 0
    for _ in tqdm(range(len(stream)), desc="requests", leave=False):
        if not len(waiting):
            clock = max(clock, stream[next_arrival].arrival)
        while next_arrival < len(stream) and stream[next_arrival].arrival <= clock:
            request = stream[next_arrival]
            waiting.push((request, prompt_segments(engine, request.question, request.passages)))  # tokenized once, on arrival
            next_arrival += 1
        request, segments = waiting.pop()
        started = time.perf_counter()
        tokens = [t for s in segments for t in s]
        prefix, admitted = doc_cache.lookup(segments, [str(p.id) for p in request.passages]) if doc_cache else (None, None)
        generation = engine.generate(tokens, 1, prefix)
        if doc_cache is not None:
            doc_cache.keep(admitted, segments, generation.state)
        service = time.perf_counter() - started
        clock += service
        ttfts.append(clock - request.arrival)
        prompt_tokens += len(tokens)
        reused += len(prefix.tokens) if prefix is not None else 0
    return {
        "ttft_p50_ms": round(float(np.percentile(ttfts, 50)) * 1e3, 1),
        "ttft_p99_ms": round(float(np.percentile(ttfts, 99)) * 1e3, 1),
        "throughput_rps": round(len(stream) / (clock - stream[0].arrival), 3),
        "hit_rate": round(reused / prompt_tokens, 4),
    }


def kvcache_benchmark(
    engine,
    passages: list[Passage],
    profile: PrefillProfile,
    requests: int = 100,
    zipf: tuple[float, ...] = (0.8, 1.1),
    policies: tuple[str, ...] = ("none", "lru", "lfu", "gdsf", "pgdsf"),
    device_docs: int = 32,
    host_docs: int = 64,
    load: float = 0.9,
    seed: int = 0,
) -> list[dict]:
    """One row per (zipf s, policy, reorder); budgets in average passages (KV bytes of that many)."""
    if requests < 10 or not 0 < load < 10 or device_docs < 6 or host_docs < 0:
        raise RetrieverError("need at least 10 requests, 0 < load < 10, device_docs >= 6 and host_docs >= 0")
    sizes = [len(prompt_segments(engine, "q", [p])[1]) for p in passages[:200]]
    template = prompt_segments(engine, "q", passages[:1])[0]
    per_doc = kv_bytes_per_token(engine) * float(np.mean(sizes))
    device_bytes = int(kv_bytes_per_token(engine) * len(template) + device_docs * per_doc)
    rows = []
    for s in zipf:
        # capacity without a cache, on this very stream: sets the arrival rate for every policy
        probe = request_stream(passages, requests, s, rate=1e9, seed=seed)
        capacity = serve_stream(engine, probe[: max(10, requests // 5)], None, reorder=False)["throughput_rps"]
        stream = request_stream(passages, requests, s, rate=load * capacity, seed=seed)
        for policy in policies:
            for reorder in (False, True) if policy != "none" else (False,):
                doc_cache = None
                if policy != "none":
                    doc_cache = DocumentKVCache(engine, policy, device_bytes, int(host_docs * per_doc), profile, template=template)
                measured = serve_stream(engine, stream, doc_cache, reorder)
                rows.append({"policy": policy, "reorder": reorder, "speculative": False, "zipf_s": s, **measured})
    return rows
