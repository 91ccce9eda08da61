"""Hit rate of each replacement policy over long request streams: the knowledge tree alone.

Served in arrival order, a stream's hit rate (prompt tokens whose KV is reused / prompt tokens)
depends on the policy and the stream only, not on timing, so it can be measured over thousands of
requests without running the LLM for each (`chameleon bench kvcache` runs it, and affords ~100
requests a row on a CPU). The streams are that benchmark's: each request is about a Zipf-popular
python-docs passage, its documents the real top-k (k 2..5) of a search with that passage's
embedding, in retrieval order; with ``--drift N`` popularity is drawn again every N requests
(the hot documents change). GDSF and PGDSF cost prefill with the built-in model's profile
(``--profile``, saved by ``chameleon profile prefill``, or a quick one measured at the start).
Budgets are in average passages, as in the benchmark. As there, the first ``--warmup`` requests
of a stream fill the cache and are not counted. The peer is LRU on the same stream; "ceiling"
is a cache that never evicts.

    python benchmarks/kv_policy_hit_rates.py [--requests 1000] [--warmup 100] [--seeds 5] [--zipf 0.8,1.1] [--drift N] [--profile P.json]
"""

from __future__ import annotations

import argparse

import numpy as np

from chameleon.bench.kvcache import request_stream, retrieve
from chameleon.engines.prefill_timing import measure_quick
from chameleon.engines.torch_engine import TorchEngine
from chameleon.rag.corpus import RagIndex, builtin_rag_index
from chameleon.rag.embedder import Embedder
from chameleon.rag.pipeline import prompt_segments
from coordinator.kv_cache import POLICIES, KnowledgeTree
from coordinator.prefill_profile import PrefillProfile


def replay(policy: str, requests: list, device_tokens: int, host_tokens: int, template: int, profile, warmup: int) -> tuple[float, float]:
    """(hit rate, prefill time saved) of ``requests`` ((doc id, tokens) lists and question tokens)
    in order, after the first ``warmup``: reused / prompt tokens, and 1 - prefill time / prefill
    time without a cache, by the profile (what GDSF and PGDSF weigh, where LRU and LFU count requests)."""
    tree = KnowledgeTree(policy, device_tokens, host_tokens, 1, template, profile)
    for docs, question in requests[:warmup]:
        tree.access(docs, question)
    reused = total = seconds = uncached_seconds = 0
    for docs, question in requests[warmup:]:
        access = tree.access(docs, question)
        prompt = template + sum(tokens for _, tokens in docs) + question
        reused, total = reused + access.cached_tokens, total + prompt
        seconds += profile.seconds(access.cached_tokens, prompt - access.cached_tokens)
        uncached_seconds += profile.seconds(0, prompt)
    return reused / total, 1 - seconds / uncached_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--zipf", default="0.8,1.1")
    parser.add_argument("--drift", type=int, default=0, help="draw popularity again every this many requests (0: never)")
    parser.add_argument("--device-docs", type=int, default=32)
    parser.add_argument("--host-docs", type=int, default=64)
    parser.add_argument("--nprobe", type=int, default=8)
    parser.add_argument("--profile", help="prefill profile JSON (default: measure a quick one now)")
    args = parser.parse_args()

    engine = TorchEngine()
    profile = PrefillProfile.load(args.profile) if args.profile else measure_quick(engine)
    embedder = Embedder()
    rag_index = RagIndex(builtin_rag_index(embedder), embedder.fingerprint)
    drift = f", popularity drawn again every {args.drift} requests" if args.drift else ", stationary popularity"
    print(
        f"{args.requests} requests a stream after {args.warmup} to warm up{drift}, budgets {args.device_docs} / {args.host_docs} average passages"
    )
    print("hit rate / prefill time saved, per policy")
    names = (*POLICIES, "ceiling")
    print(f"{'zipf s':>6} {'seed':>4}  " + "  ".join(f"{name:>13}" for name in names) + "   pgdsf / lru")
    for s in map(float, args.zipf.split(",")):
        ratios = []
        for seed in range(args.seeds):
            stream = request_stream(rag_index.passages, args.warmup + args.requests, s, rate=1.0, seed=seed, drift=args.drift)
            retrieve(stream, rag_index, embedder, args.nprobe, early=args.nprobe // 2)
            segments = [prompt_segments(engine, r.question, r.passages) for r in stream]
            requests = [([(p.key, len(x)) for p, x in zip(r.passages, seg[1:-1])], len(seg[-1])) for r, seg in zip(stream, segments)]
            template = len(segments[0][0])
            per_doc = float(np.mean([tokens for docs, _ in requests for _, tokens in docs]))
            device, host = int(template + args.device_docs * per_doc), int(args.host_docs * per_doc)
            results = {policy: replay(policy, requests, device, host, template, profile, args.warmup) for policy in POLICIES}
            results["ceiling"] = replay("lru", requests, 1 << 40, 0, template, profile, args.warmup)
            ratios.append(results["pgdsf"][0] / results["lru"][0])
            cells = "  ".join(f"{results[name][0]:6.4f}/{results[name][1]:6.4f}" for name in names)
            print(f"{s:>6} {seed:>4}  {cells}   {ratios[-1]:.3f}", flush=True)
        print(
            f"zipf {s}: pgdsf / lru hit rate over {args.seeds} streams: min {min(ratios):.3f}, mean {np.mean(ratios):.3f}, max {max(ratios):.3f}"
        )


if __name__ == "__main__":
    main()
