"""The coarse quantizer's Numba kernel vs faiss's flat index, alone and inside a whole search.

GloVe-50's 1,024 centroids (the ``runs/glove-50`` index), cosine. Two measurements, each taking
turns with its peer in one process:

1. The coarse search alone, for batches of 1, 16 and 10,000 queries at 1 and 2 threads: our
   ``retriever.coarse.nearest_centroids`` against ``faiss.IndexFlatIP`` on the same centroids
   (the CPU coarse quantizer before 2026-11-23). Best of a few repeats, microseconds per batch.
2. A whole 4-bit fast-scan search of the 10,000 queries (coarse search, ``numba-fastscan`` scan of
   the top 30, exact re-rank to 10: the ``bench recall --refine 3`` pipeline) with either coarse
   quantizer, at 1 and 2 threads: two OpenMP runtimes (faiss's and Numba's) hand the cores to each
   other there, which the numbers of the first part do not show.

    python benchmarks/coarse_quantizer.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import faiss
import numba
import numpy as np

from retriever import Searcher, build_index, load_index, save_index
from retriever.coarse import CoarseQuantizer
from retriever.datasets import glove50
from retriever.index import IVFPQParams
from retriever.kernels.refine import rerank_exact
from retriever.vectors import prepare_vectors


def best_us(search, repeats: int) -> float:
    search()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        search()
        best = min(best, time.perf_counter() - started)
    return best * 1e6


def faiss_flat(centroids: np.ndarray):
    flat = faiss.IndexFlatIP(centroids.shape[1])
    flat.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return lambda queries, nprobe: flat.search(queries, nprobe)[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("runs/glove-50"))
    parser.add_argument("--index-4bit", type=Path, default=Path("runs/glove-50-4bit"))
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    dataset = glove50()
    for path, params in ((args.index, IVFPQParams("cos", 50, 1024, 25)), (args.index_4bit, IVFPQParams("cos", 50, 1024, 50, nbits=4))):
        if not (path / "manifest.json").is_file():
            save_index(build_index(dataset.base, params), path)
    queries = prepare_vectors(dataset.queries, "cos")
    index = load_index(args.index)
    ours = CoarseQuantizer(index.centroids, "cos", device="cpu")
    peer = faiss_flat(index.centroids)
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    print("coarse search alone (µs per batch, best of repeats)")
    for threads in (1, 2):
        numba.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        for nq in (1, 16, len(queries)):
            for nprobe in (8, 16):
                batch = queries[:nq]
                same = (np.sort(ours.search(batch, nprobe)[0]) == np.sort(peer(batch, nprobe))).all(axis=1).mean()
                repeats = args.repeats if nq > 100 else 100 * args.repeats
                mine, theirs = best_us(lambda: ours.search(batch, nprobe), repeats), best_us(lambda: peer(batch, nprobe), repeats)
                print(
                    f"  {threads} thread(s) {nq:6} queries nprobe {nprobe:2}: numba {mine:9.1f}  faiss {theirs:9.1f}  faiss/numba {theirs / mine:5.2f}x  same lists {same:.4f}"
                )

    print("whole numba-fastscan search of 10,000 queries, refine 3 (QPS, best of repeats, quantizers alternating)")
    index_4bit = load_index(args.index_4bit)
    searcher = Searcher(index_4bit, engine="numba-fastscan", device="cpu")
    base = prepare_vectors(dataset.base, "cos")
    quantizers = {"numba": lambda q, nprobe: searcher.quantizer.search(q, nprobe)[0], "faiss": faiss_flat(index_4bit.centroids)}

    def whole(coarse, nprobe):
        candidates = searcher.engine.search(queries, coarse(queries, nprobe), 30)[1]
        return rerank_exact(queries, base, candidates, 10, "cos")

    for threads in (1, 2):
        numba.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        for nprobe in (8, 16, 32):
            best = {name: float("inf") for name in quantizers}
            for coarse in quantizers.values():
                whole(coarse, nprobe)
            for _ in range(args.repeats):
                for name, coarse in quantizers.items():
                    started = time.perf_counter()
                    whole(coarse, nprobe)
                    best[name] = min(best[name], time.perf_counter() - started)
            qps = {name: len(queries) / seconds for name, seconds in best.items()}
            print(
                f"  {threads} thread(s) nprobe {nprobe:2}: numba coarse {qps['numba']:9,.0f} QPS  faiss coarse {qps['faiss']:9,.0f} QPS  "
                f"ratio {qps['numba'] / qps['faiss']:5.2f}x"
            )


if __name__ == "__main__":
    main()
