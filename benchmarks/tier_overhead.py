"""What the disaggregated retrieval tier costs: batches through the coordinator vs in process.

GloVe-50 (IVF1024,PQ25), batches of 16 queries at nprobe 16, sent one after another. The peer is
the in-process search of the same index (coarse search + Numba scan, one process); the tier runs
the coarse search in the client, then coordinator -> S retrieval nodes -> merge on loopback TCP
(``chameleon cluster up``), with the coordinator either its own process (``coordinator process``)
or driven inline by the client's own calls (``inline coordinator``,
``ClusterSearcher.open(..., embedded=True)``). The three take turns batch by batch (in a rotating
order), so that each sees the same load from whatever else runs on the machine. Reports p50/p99
per batch, QPS and the added p50 latency.

    python benchmarks/tier_overhead.py [--index runs/glove-50] [--batches 500]
"""

from __future__ import annotations

import argparse
import os
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
WARM_UP = 20


def time_interleaved(searches: dict, queries, batches: int) -> dict[str, np.ndarray]:
    """Milliseconds per batch of each search, the searches taking turns on every batch."""
    names = list(searches)
    ms = {name: [] for name in names}
    for n in range(WARM_UP + batches):
        start = (n * BATCH) % (len(queries) - BATCH)
        for name in names[n % len(names) :] + names[: n % len(names)]:  # nobody always goes first
            started = time.perf_counter()
            searches[name](queries[start : start + BATCH])
            if n >= WARM_UP:
                ms[name].append((time.perf_counter() - started) * 1e3)
    return {name: np.array(times) for name, times in ms.items()}


def summary(name: str, ms: np.ndarray, base_p50: float | None) -> str:
    p50, p99 = np.percentile(ms, 50), np.percentile(ms, 99)
    extra = f"  +{p50 - base_p50:.3f} ms p50 ({p50 / base_p50:.2f}x)" if base_p50 else ""
    return f"  {name:<20} p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  {BATCH * 1000 / ms.mean():9,.0f} QPS{extra}"


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
    print(
        f"batches of {BATCH} queries, nprobe {NPROBE}, k 10, {args.batches} batches, {time.strftime('%Y-%m-%d')}, "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"
    )
    for nshards in [int(s) for s in args.shards.split(",")]:
        with tempfile.TemporaryDirectory() as state:
            cluster.up(args.index, nshards, state)
            process, inline = cluster.ClusterSearcher.open(state), cluster.ClusterSearcher.open(state, embedded=True)
            try:
                ms = time_interleaved(
                    {
                        "in process": lambda q: local.search(q, 10, NPROBE),
                        "coordinator process": lambda q: process.search(q, 10, NPROBE),
                        "inline coordinator": lambda q: inline.search(q, 10, NPROBE),
                    },
                    queries,
                    args.batches,
                )
            finally:
                process.close()
                inline.close()
                cluster.down(state)
        base_p50 = float(np.percentile(ms["in process"], 50))
        print(f"{nshards} shard(s), load average {os.getloadavg()[0]:.1f} after")
        for name, times in ms.items():
            print(summary(name, times, None if name == "in process" else base_p50))


if __name__ == "__main__":
    main()
