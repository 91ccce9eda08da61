"""Where the scan's time goes: Numba kernel vs faiss IndexIVFPQ on the same GloVe-50 codes.

Over an nprobe sweep it fits ``seconds per query = fixed + per_code * codes scanned`` for both
engines (scan only: queries prepared and lists assigned beforehand), so the per-query cost (lookup
table, heap drain, call) and the per-code cost (m table lookups + the heap test) separate. With the
clock rate it reports cycles per sub-quantizer lookup. It also times the coarse search and the
heap's share (k=1 vs k=100).

    python benchmarks/profile_scan.py [--index runs/glove-50]

One thread only: faiss's ``search_preassigned`` leaves splitting queries across threads to
``IndexIVF.search``, so a multi-thread fit here would compare unlike things (the recall harness
compares threads end to end).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numba
import numpy as np

from retriever import CoarseQuantizer, FaissEngine, NumbaEngine, build_index, load_index, save_index
from retriever.datasets import glove50
from retriever.index import IVFPQParams
from retriever.vectors import prepare_vectors

NPROBES = (1, 2, 4, 8, 16, 32, 64)


def best_seconds(fn, repeats=5):
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def clock_hz() -> float | None:
    try:
        mhz = [float(line.split(":")[1]) for line in open("/proc/cpuinfo") if line.startswith("cpu MHz")]
    except OSError:
        return None
    return 1e6 * max(mhz) if mhz else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("runs/glove-50"))
    parser.add_argument("--queries", type=int, default=5000)
    args = parser.parse_args()

    dataset = glove50()
    if not (args.index / "manifest.json").is_file():
        save_index(build_index(dataset.base, IVFPQParams("cos", 50, 1024, 25)), args.index)
    index = load_index(args.index)
    numba.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    queries = prepare_vectors(dataset.queries[: args.queries], "cos")
    quantizer = CoarseQuantizer(index.centroids, "cos", device="cpu")
    sizes = index.whole().list_sizes()
    m = index.params.m
    engines = {"numba": NumbaEngine(index), "faiss-ivfpq": FaissEngine(index)}

    coarse_s = best_seconds(lambda: quantizer.search(queries, 16)) / len(queries)
    print(f"coarse search (1024 centroids, nprobe 16): {coarse_s * 1e6:.2f} us/query")

    fits = {}
    for name, engine in engines.items():
        codes, seconds = [], []
        for nprobe in NPROBES:
            list_ids, _ = quantizer.search(queries, nprobe)
            engine.search(queries[:64], list_ids[:64], 10)
            seconds.append(best_seconds(lambda: engine.search(queries, list_ids, 10)) / len(queries))
            codes.append(sizes[list_ids].sum(axis=1).mean())
        per_code, fixed = np.polyfit(codes, seconds, 1)
        fits[name] = (per_code, fixed)
        list_ids, _ = quantizer.search(queries, 16)
        k1 = best_seconds(lambda: engine.search(queries, list_ids, 1))
        k100 = best_seconds(lambda: engine.search(queries, list_ids, 100))
        print(
            f"{name:12s} per code {per_code * 1e9:6.2f} ns ({per_code * 1e9 / m:5.3f} ns per lookup), "
            f"fixed {fixed * 1e6:6.2f} us/query; nprobe 16: k=100 costs {k100 / k1:4.2f}x k=1"
        )
    hz = clock_hz()
    if hz:
        for name, (per_code, _) in fits.items():
            print(f"{name:12s} {per_code * hz / m:5.2f} cycles per sub-quantizer lookup at {hz / 1e9:.2f} GHz")
    ratio = fits["faiss-ivfpq"][0] / fits["numba"][0]
    print(f"per-code cost ratio faiss-ivfpq / numba: {ratio:.2f}x; fixed cost ratio: {fits['faiss-ivfpq'][1] / fits['numba'][1]:.2f}x")


if __name__ == "__main__":
    main()
