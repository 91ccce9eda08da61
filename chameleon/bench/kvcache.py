"""`chameleon bench kvcache`: time to first token under a RAG request stream, per cache policy.

Requests arrive as a Poisson process. Each is about a passage drawn by Zipf(s) popularity: its
query is that passage's embedding, the retrieval tier finds the top k (2..5) passages for it (a
real search of the passage index: the passage itself first, then its neighbours), and the prompt
is those passages plus a short question. One engine serves the requests one at a time: the policy
under test decides which documents' KV is reused (``chameleon.rag.doc_cache``) and the prefill of what
is left runs for real on the engine. Time is virtual, every service time is measured: retrieval
runs when a request arrives (the tier is a resource of its own, so searches overlap with the
engine's work), the request then waits for the engine, and its TTFT is retrieval + wait + lookup
+ prefill. With ``reorder`` the waiting requests are served by cached/computed length
(``CacheAwareQueue``) instead of in arrival order. With ``speculative`` the search reports an early
top-k after half its lists (``coordinator.speculation``); when the engine is idle then, prefill
starts on it, and the request's first token stands at the final answer if the passages are the
same; if not, the speculative prefill is cut short when the final answer comes (at the end of the
prompt chunk it is in then) and prefill runs again on the final prompt.

The arrival rate is ``load`` times the no-cache capacity, measured first on the very requests of
the stream (each served back to back: the mean service time without a cache is known, so the
no-cache row's utilization is ``load``, up to how much its timings drift). Each row also reports
``capacity_rps``: its requests over the seconds the engine was busy with them, the throughput that
configuration sustains, and ``utilization``: the offered rate over that capacity. The
configurations of one load take turns request by request (:func:`interleaved`), each with its own
cache, queue and clock, so that the machine's drifting speed falls on all of them alike.

Each row's stream begins with ``warmup`` requests that arrive, wait and are served like the
others but are not counted, so that the measured requests see the steady state of the cache and
of the queue: from a cold cache, a short stream's hit rate is mostly first-time misses, the same
for every policy (the policies only differ once the tiers are full and they choose what to
evict), and from an empty queue, waiting near saturation takes hundreds of requests to build up.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from chameleon.engines.base import Generation
from chameleon.rag.corpus import Passage, RagIndex
from chameleon.rag.doc_cache import DocumentKVCache, kv_bytes_per_token
from chameleon.rag.pipeline import joined, prompt_segments, resume_prefix
from coordinator.kv_cache import CacheAwareQueue
from coordinator.prefill_profile import PrefillProfile
from coordinator.speculation import SpeculativePrefill
from retriever.errors import InvalidInput
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

EARLY_FRACTION = 0.5  # the early answer comes after half the probed lists
ROW_KEYS = (
    "policy",
    "reorder",
    "speculative",
    "zipf_s",
    "ttft_p50_ms",
    "ttft_p99_ms",
    "ttft_mean_ms",
    "throughput_rps",
    "hit_rate",
    "capacity_rps",
    "load",
)


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
    queries = dict(zip((p.id for p in about), prepare_vectors(embedder.embed([p.content for p in about]), "cos")))
    for request in stream:
        query = queries[request.about.id][None]
        started = time.perf_counter()
        list_ids, _ = searcher.quantizer.search(query, nprobe)
        staged = searcher.scan_staged(query, list_ids, request.k, early)
        early_ids = staged.early().ids
        request.early_s = time.perf_counter() - started
        ids = staged.final().ids
        request.retrieval_s = time.perf_counter() - started
        request.passages = [rag_index.passages[i] for i in ids[0] if i >= 0]
        request.early = [rag_index.passages[i] for i in early_ids[0] if i >= 0]


def served(
    engine,
    stream: list[Request],
    doc_cache: DocumentKVCache | None,
    reorder: bool,
    speculation: SpeculativePrefill | None = None,
    warmup: list[Request] = (),
) -> Generator[None, None, dict]:
    """Serve ``warmup`` then ``stream`` on one engine (virtual clock, measured service times),
    pausing after each request (see :func:`interleaved`); returns the TTFTs, hit rate and busy
    time of the ``stream`` requests. The warm-up requests arrive first and are served like the
    others, uncounted."""

    def reuse_ratio(item) -> float:
        _, passages, segments = item
        return doc_cache.tree.reuse_ratio([(p.key, len(s)) for p, s in zip(passages, segments[1:-1])], len(segments[-1]))

    def in_cache_order(passages: list[Passage]) -> list[Passage]:
        """The passages where the document cache puts them in the prompt (``RagPipeline._canonical``)."""
        return [passages[i] for i in doc_cache.order([p.key for p in passages])] if doc_cache is not None else passages

    def prefill(segments: list[list[int]], passages: list[Passage], resume: Generation | None = None, cancel_after: float | None = None):
        """Lookup + prefill to the first token, cancelled ``cancel_after`` seconds in when given:
        (generation, seconds, tokens whose KV was reused)."""
        started = time.perf_counter()
        tokens = joined(segments)
        cached, admitted = doc_cache.lookup(segments, [p.key for p in passages]) if doc_cache else (None, None)
        prefix = resume_prefix(resume, tokens, cached) if resume is not None else cached
        cancelled = (lambda: time.perf_counter() - started >= cancel_after) if cancel_after is not None else None
        generation = engine.generate(tokens, 1, prefix, cancelled=cancelled)
        if admitted is not None:
            doc_cache.keep(admitted, segments, generation)
        if cached is not None:
            reused = len(cached.tokens)
        else:  # an engine that keeps the KV itself (vLLM) says what it reused; a speculative head is no cache hit
            reused = generation.cached_tokens if resume is None else 0
        return generation, time.perf_counter() - started, reused

    def speculate(request: Request, early_at: float):
        """Prefill on the early answer from ``early_at``, cut short when the final one comes and
        differs, then on the final one: (the prompt served, when its first token stands, tokens the
        document cache gave, engine seconds)."""
        early, passages = in_cache_order(request.early), in_cache_order(request.passages)
        segments = prompt_segments(engine, request.question, early)
        final = prompt_segments(engine, request.question, passages)
        final_at = request.arrival + request.retrieval_s
        speculated, wanted = joined(segments), joined(final)  # the engine learns whether they differ at ``final_at``
        generation, seconds, shared = prefill(segments, early, cancel_after=None if speculated == wanted else final_at - early_at)
        first_token_at = max(early_at + seconds, final_at)
        if speculation.end(speculated, wanted):
            return segments, first_token_at, shared, seconds
        _, again, shared = prefill(final, passages, resume=generation)
        return final, first_token_at + again, shared, seconds + again

    counted = {id(request) for request in stream}
    requests = [*warmup, *stream]
    waiting = CacheAwareQueue(reuse_ratio if reorder else (lambda item: 0.0), window=8)
    ready = sorted(requests, key=lambda r: r.arrival + r.retrieval_s)
    clock, next_ready, ttfts, prompt_tokens, reused, busy = 0.0, 0, [], 0, 0, 0.0
    for _ in range(len(requests)):
        upcoming = ready[next_ready] if not len(waiting) else None  # the engine is idle until it is retrieved
        early_at = max(clock, upcoming.arrival + upcoming.early_s) if upcoming is not None else None
        if upcoming is not None and speculation is not None and early_at < upcoming.arrival + upcoming.retrieval_s and speculation.begin():
            next_ready += 1  # early answer in: prefill on it while the search finishes
            request = upcoming
            segments, clock, shared, seconds = speculate(request, early_at)
        else:
            if upcoming is not None:
                clock = max(clock, upcoming.arrival + upcoming.retrieval_s)
            while next_ready < len(ready) and ready[next_ready].arrival + ready[next_ready].retrieval_s <= clock:
                retrieved = ready[next_ready]
                passages = in_cache_order(retrieved.passages)
                waiting.push((retrieved, passages, prompt_segments(engine, retrieved.question, passages)))  # tokenized once, when retrieved
                next_ready += 1
            request, passages, segments = waiting.pop()
            _, seconds, shared = prefill(segments, passages)
            clock += seconds
        if id(request) in counted:
            ttfts.append(clock - request.arrival)
            prompt_tokens += sum(map(len, segments))
            reused += shared
            busy += seconds
        yield
    return {
        "ttft_p50_ms": round(float(np.percentile(ttfts, 50)) * 1e3, 1),
        "ttft_p99_ms": round(float(np.percentile(ttfts, 99)) * 1e3, 1),
        "ttft_mean_ms": round(float(np.mean(ttfts)) * 1e3, 1),
        "throughput_rps": round(len(stream) / (clock - stream[0].arrival), 3),
        "hit_rate": round(reused / prompt_tokens, 4),
        "capacity_rps": round(len(stream) / busy, 3),
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
    loads: tuple[float, ...] = (0.9,),
    nprobe: int = 8,
    seed: int = 0,
    warmup: int = 100,
) -> list[dict]:
    """One row per (zipf s, load, policy, reorder, speculative); budgets in average passages (KV
    bytes of that many). Every row's ``warmup`` requests come before its measured ``requests``."""
    if not 0 <= warmup <= 100_000:
        raise InvalidInput(f"warmup must be 0..100000 requests, got {warmup}")
    if not loads or not all(0 < load < 10 for load in loads):
        raise InvalidInput(f"every load must be above 0 and below 10 (a fraction of the no-cache capacity), got {loads}")
    if requests < 10 or device_docs < 6 or host_docs < 0 or not 2 <= nprobe <= rag_index.index.params.nlist:
        raise InvalidInput(f"need at least 10 requests, device_docs >= 6, host_docs >= 0 and 2 <= nprobe <= {rag_index.index.params.nlist}")
    passages = rag_index.passages
    sizes = [len(prompt_segments(engine, "q", [p])[1]) for p in passages[:200]]
    template = prompt_segments(engine, "q", passages[:1])[0]
    per_doc = kv_bytes_per_token(engine) * float(np.mean(sizes))
    device_bytes = int(kv_bytes_per_token(engine) * len(template) + device_docs * per_doc)
    early = SpeculativePrefill(early_fraction=EARLY_FRACTION).early_lists(nprobe)
    rows = []
    for s in zipf:
        # the no-cache capacity on these very requests (the arrival rate does not change which
        # passages they are about): sets the arrival rate for every policy
        probe = request_stream(passages, warmup + requests, s, rate=1.0, seed=seed)
        retrieve(probe, rag_index, embedder, nprobe, early)
        interleaved([served(engine, probe[:10], None, reorder=False)])  # untimed: a cold engine's first prefills run slower
        capacity = interleaved([served(engine, probe, None, reorder=False)])[0]["capacity_rps"]
        for load in loads:
            stream = request_stream(passages, warmup + requests, s, rate=load * capacity, seed=seed)
            retrieve(stream, rag_index, embedder, nprobe, early)
            warm, stream = stream[:warmup], stream[warmup:]
            configurations, runs = [], []
            for policy in policies:
                for reorder in (False, True) if policy != "none" else (False,):
                    for speculate in speculative:
                        doc_cache = None
                        if policy != "none":
                            doc_cache = DocumentKVCache(engine, policy, device_bytes, int(host_docs * per_doc), profile, template=template)
                        speculation = SpeculativePrefill(early_fraction=EARLY_FRACTION) if speculate else None
                        configurations.append(({"policy": policy, "reorder": reorder, "speculative": speculate, "zipf_s": s}, speculation))
                        runs.append(served(engine, stream, doc_cache, reorder, speculation, warm))
            offered = load * capacity
            for (row, speculation), measured in zip(configurations, interleaved(runs)):
                extra = {"speculation": speculation.stats} if speculation is not None else {}
                rows.append(
                    {
                        **row,
                        **measured,
                        "load": load,
                        "offered_rps": round(offered, 3),
                        "utilization": round(offered / measured["capacity_rps"], 3),
                        "warmup_requests": warmup,
                        **extra,
                    }
                )
    return rows


def interleaved(runs: list[Generator[None, None, dict]]) -> list[dict]:
    """Run :func:`served` configurations together, one request each in turn, so that every one of
    them meets the same machine: its speed drifts by 10% and more within minutes, which would
    otherwise land on whichever configuration ran then."""
    results: list[dict | None] = [None] * len(runs)
    active = list(range(len(runs)))
    with tqdm(desc="requests", leave=False) as progress:
        while active:
            for n in list(active):
                try:
                    next(runs[n])
                except StopIteration as done:
                    results[n] = done.value
                    active.remove(n)
                progress.update()
    return results


def comparisons(rows: list[dict]) -> list[str]:
    """Each cached row against the no-cache row of its (zipf s, load, speculative): TTFT p50 and
    mean (a cache makes TTFT bimodal: once more than half the requests find all their documents
    cached, the p50 is a full hit's and says little of the others), and capacity; and its hit
    rate against LRU's with the same reorder and speculation. The no-cache row's own utilization
    says how near saturation the comparison was made."""

    def find(row: dict, **changes) -> dict | None:
        wanted = {**{key: row[key] for key in ("zipf_s", "load", "reorder", "speculative")}, **changes}
        return next((r for r in rows if all(r[key] == value for key, value in wanted.items())), None)

    lines = []
    for row in rows:
        none = find(row, policy="none", reorder=False)
        if row["policy"] == "none" or none is None:
            continue
        lru = find(row, policy="lru")
        vs_lru = f", hit rate {row['hit_rate'] / lru['hit_rate']:.2f}x LRU's" if lru and lru is not row and lru["hit_rate"] else ""
        flags = "".join((" +reorder" if row["reorder"] else "", " +speculative" if row["speculative"] else ""))
        lines.append(
            f"s={row['zipf_s']} load={row['load']} (no cache at utilization {none['utilization']}) {row['policy']}{flags}: "
            f"TTFT p50 {none['ttft_p50_ms'] / row['ttft_p50_ms']:.2f}x lower "
            f"(mean {none['ttft_mean_ms'] / row['ttft_mean_ms']:.2f}x) than no cache, capacity {row['capacity_rps'] / none['capacity_rps']:.2f}x{vs_lru}"
        )
    return lines
