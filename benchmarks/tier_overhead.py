"""What the disaggregated retrieval tier costs: batches through the coordinator vs in process.

GloVe-50 (IVF1024,PQ25), batches of 16 queries at nprobe 16, sent one after another. The peer is
the in-process search of the same index (coarse search + Numba scan, one process); the tier runs
the coarse search in the client, then coordinator -> S retrieval nodes -> merge, on loopback TCP
(``chameleon cluster up``). Reports p50/p99 per batch, QPS and the added p50 latency.

    python benchmarks/tier_overhead.py [--index runs/glove-50] [--batches 500]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import faiss
import numba
import numpy as np

from chameleon import cluster
from retriever import Searcher, build_index, load_index, save_index
from retriever.datasets import glove50
from retriever.index import IVFPQParams

BATCH = 16
NPROBE = 16


def time_batches(search, queries, batches: int) -> np.ndarray:
    for start in range(0, 20 * BATCH, BATCH):  # warm-up
        search(queries[start : start + BATCH])
    seconds = []
    for n in range(batches):
        start = (n * BATCH) % (len(queries) - BATCH)
        started = time.perf_counter()
        search(queries[start : start + BATCH])
        seconds.append(time.perf_counter() - started)
    return np.array(seconds) * 1e3


def summary(name: str, ms: np.ndarray, base_p50: float | None) -> str:
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    extra = f"  +{p50 - base_p50:.3f} ms p50 ({p50 / base_p50:.2f}x)" if base_p50 else ""
    return f"{name:<22} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  {BATCH * 1000 / ms.mean():9,.0f} QPS{extra}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("runs/glove-50"))
    parser.add_argument("--batches", type=int, default=500)
    parser.add_argument("--shards", default="1,2,4")
    args = parser.parse_args()

    dataset = glove50()
    if not (args.index / "manifest.json").is_file():
        save_index(build_index(dataset.base, IVFPQParams("cos", 50, 1024, 25)), args.index)
    queries = dataset.queries
    # The client (and the in-process peer) use one core: on this 2-core box the other is the tier's,
    # and faiss's idle OpenMP workers would spin on it.
    numba.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    local = Searcher(load_index(args.index), device="cpu")
    base = time_batches(lambda q: local.search(q, 10, NPROBE), queries, args.batches)
    print(f"batches of {BATCH} queries, nprobe {NPROBE}, k 10, {args.batches} batches, {time.strftime('%Y-%m-%d')}")
    print(summary("in process", base, None))
    base_p50 = float(np.percentile(base, 50))
    for nshards in [int(s) for s in args.shards.split(",")]:
        with tempfile.TemporaryDirectory() as state:
            cluster.up(args.index, nshards, state)
            searcher = cluster.ClusterSearcher.open(state)
            try:
                tier = time_batches(lambda q: searcher.search(q, 10, NPROBE), queries, args.batches)
            finally:
                searcher.close()
                cluster.down(state)
        print(summary(f"coordinator, {nshards} shard(s)", tier, base_p50))


if __name__ == "__main__":
    main()
