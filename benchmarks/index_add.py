"""Growing an index with ``index add`` vs building it again, on GloVe-50 (IVF1024,PQ25, cosine).

An index is built on 90% of the 390K database vectors, and the other 10% are added to it,
encoded with the quantizers trained on the 90%. The peer builds the index on all of them from
scratch, k-means and PQ training included, as ``index build`` does. Two choices of the 10%:
- ``random``: a seeded random tenth, from the same distribution as the rest;
- ``rarest``: the last tenth of GloVe's rows, its rarest words (GloVe lists words by frequency),
  which the first build's quantizers never saw (a mild drift).

Reports the seconds of the addition and of the rebuild, and recall@10 of both at a few nprobe
over the 10,000 held-out queries (exact ground truth on all 390K).

    python benchmarks/index_add.py [--nprobe 8,16,64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numba
import numpy as np

from chameleon.bench.recall import recall_at_k
from retriever import Searcher, build_index
from retriever.build import add_vectors
from retriever.datasets import glove50
from retriever.index import IVFPQParams

PARAMS = IVFPQParams("cos", 50, 1024, 25)
SEED = 1234


def recalls(index, queries, truth, nprobes: list[int]) -> list[float]:
    searcher = Searcher(index, device="cpu")
    return [recall_at_k(searcher.search(queries, 10, nprobe).ids, truth) for nprobe in nprobes]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nprobe", default="8,16,64")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    nprobes = [int(x) for x in args.nprobe.split(",")]
    numba.set_num_threads(args.threads)
    dataset = glove50()
    n = dataset.base.shape[0]
    truth = dataset.ground_truth(10)
    print(f"GloVe-50, {n:,} vectors, IVF1024,PQ25 (cos), {args.threads} threads, {time.strftime('%Y-%m-%d %H:%M')}")

    started = time.perf_counter()
    rebuilt = build_index(dataset.base, PARAMS, seed=SEED)
    rebuild_s = time.perf_counter() - started
    rebuilt_recall = recalls(rebuilt, dataset.queries, truth, nprobes)

    splits = {
        "random": np.sort(np.random.default_rng(SEED).choice(n, n // 10, replace=False)),
        "rarest": np.arange(n - n // 10, n),
    }
    header = "  ".join(f"{f'recall np{p} (diff)':>18}" for p in nprobes)
    print(
        f"{'added tenth':<12} {'add (s)':>8} {'rebuild (s)':>11} {'ratio':>6}  {header}  (rebuild: {'  '.join(f'{r:.4f}' for r in rebuilt_recall)})"
    )
    for name, added in splits.items():
        kept = np.setdiff1d(np.arange(n), added)
        first = build_index(dataset.base[kept], PARAMS, ids=kept, seed=SEED)
        started = time.perf_counter()
        grown = add_vectors(first, dataset.base[added], ids=added)
        add_s = time.perf_counter() - started
        grown_recall = recalls(grown, dataset.queries, truth, nprobes)
        cells = "  ".join(f"{f'{ours:.4f} ({ours - theirs:+.4f})':>18}" for ours, theirs in zip(grown_recall, rebuilt_recall))
        print(f"{name:<12} {add_s:8.2f} {rebuild_s:11.2f} {rebuild_s / add_s:5.1f}x  {cells}")


if __name__ == "__main__":
    main()
