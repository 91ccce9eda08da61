"""One query at a time: our engines' latency against faiss's, the two taking turns query by query.

A served request searches one query. ``bench recall`` measures that latency too, but engine after
engine, so the machine's load at the moment weighs on one of the pair; here each query goes to our
engine and to faiss's back to back (in alternating order), in one process at one thread, and the
p50/p99 of each and their ratio come from the same minutes. Pairs, on GloVe-50's first 2,000
queries at k 10:

- ``numba-fastscan`` (4-bit index, re-rank of the top 30 by exact distances) vs faiss's
  ``IVF1024,PQ50x4fs`` with ``IndexRefineFlat`` (k_factor 3): ``bench recall --refine 3``'s runners;
- ``numba`` (8-bit index) vs faiss's ``IndexIVFPQ`` on the same codes.

    python benchmarks/single_query_latency.py [--queries 2000] [--nprobe 8,16,32]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from chameleon.bench.recall import make_runner, set_threads, with_refinement
from retriever import build_index, load_index, save_index
from retriever.datasets import glove50
from retriever.index import IVFPQParams

WARM_UP = 200


def alternating_latencies(first, second, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
    """Microseconds per query of ``first.search`` and ``second.search``, the two taking turns."""
    times = ([], [])
    for n, query in enumerate(queries):
        pair = (first, second) if n % 2 else (second, first)
        for runner in pair:
            started = time.perf_counter()
            runner.search(query[None, :], 10, nprobe)
            if n >= WARM_UP:
                times[0 if runner is first else 1].append((time.perf_counter() - started) * 1e6)
    return np.array(times[0]), np.array(times[1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("runs/glove-50"))
    parser.add_argument("--index-4bit", type=Path, default=Path("runs/glove-50-4bit"))
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--nprobe", default="8,16,32")
    args = parser.parse_args()
    dataset = glove50()
    for path, params in ((args.index, IVFPQParams("cos", 50, 1024, 25)), (args.index_4bit, IVFPQParams("cos", 50, 1024, 50, nbits=4))):
        if not (path / "manifest.json").is_file():
            save_index(build_index(dataset.base, params), path)
    set_threads(1)
    pairs = []
    index_4bit, index_8bit = load_index(args.index_4bit), load_index(args.index)
    for ours, theirs, index, refine in (("numba-fastscan", "faiss-fastscan", index_4bit, 3), ("numba", "faiss-ivfpq", index_8bit, 1)):
        runners = [with_refinement(make_runner(name, index, dataset), dataset, index.params.metric, refine) for name in (ours, theirs)]
        pairs.append((ours, theirs, *runners))
    queries = dataset.queries[: WARM_UP + args.queries]
    print(
        f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, 1 thread, load average {os.getloadavg()[0]:.1f}, {args.queries} queries"
    )
    for ours, theirs, our_runner, their_runner in pairs:
        for nprobe in (int(n) for n in args.nprobe.split(",")):
            mine, peer = alternating_latencies(our_runner, their_runner, queries, nprobe)
            p50, peer_p50 = np.percentile(mine, 50), np.percentile(peer, 50)
            print(
                f"  nprobe {nprobe:2}  {ours:<15} p50 {p50:6.1f} µs  p99 {np.percentile(mine, 99):6.1f} µs   "
                f"{theirs:<15} p50 {peer_p50:6.1f} µs  p99 {np.percentile(peer, 99):6.1f} µs   p50 ratio (faiss / ours) {peer_p50 / p50:4.2f}x"
            )


if __name__ == "__main__":
    main()
