"""A build in parts past one process's memory: train once, encode row ranges in parallel
processes, join; then search the result through the retrieval tier.

Writes a seeded synthetic vector set (a Gaussian mixture, float32) to a memory-mapped .npy file,
then runs the three commands a cluster would run as Jobs — `chameleon index train`, N x
`chameleon index encode --part I/N` at once, `chameleon index join` — and records each one's wall
time and peak memory (what each prints). The peer, in the same run: `chameleon index build` in
one process on a prefix of the same file (--peer-n rows), its peak memory per vector against the
parts'. Then a local cluster of the joined index (2 shards) answers held-out queries, and recall@10
is measured against exact search over every vector (computed a chunk at a time).

    python benchmarks/build_parts.py [--n 50000000] [--dim 32] [--nlist 4096] [--m 16] [--parts 2] \\
        [--peer-n 5000000] [--work runs/build-parts] [--json runs/build-parts.json]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from chameleon import cluster

CHUNK = 1 << 20
CLUSTERS = 1024


def write_vectors(path: Path, n: int, dim: int, seed: int) -> np.ndarray:
    """``n`` seeded vectors around ``CLUSTERS`` centres, written a chunk at a time; 200 more as queries."""
    centres = np.random.default_rng(seed).normal(size=(CLUSTERS, dim)).astype(np.float32) * 4

    def sample(count: int, rng) -> np.ndarray:
        return centres[rng.integers(0, CLUSTERS, count)] + rng.normal(size=(count, dim)).astype(np.float32)

    if not path.is_file() or np.load(path, mmap_mode="r").shape != (n, dim):
        rng = np.random.default_rng(seed + 1)
        out = np.lib.format.open_memmap(path.with_suffix(".tmp.npy"), mode="w+", dtype=np.float32, shape=(n, dim))
        for start in range(0, n, CHUNK):
            out[start : start + CHUNK] = sample(min(CHUNK, n - start), rng)
        out.flush()
        del out  # unmapped: this process keeps none of it
        path.with_suffix(".tmp.npy").replace(path)
    return sample(200, np.random.default_rng(seed + 2))


def exact_top10(path: Path, queries: np.ndarray) -> np.ndarray:
    base = np.load(path, mmap_mode="r")
    best_d = np.full((len(queries), 10), np.inf, dtype=np.float32)
    best_i = np.zeros((len(queries), 10), dtype=np.int64)
    for start in range(0, base.shape[0], 4 * CHUNK):
        d, i = faiss.knn(queries, np.ascontiguousarray(base[start : start + 4 * CHUNK]), 10)
        d, i = np.concatenate([best_d, d], axis=1), np.concatenate([best_i, i + start], axis=1)
        keep = np.argsort(d, axis=1)[:, :10]
        best_d, best_i = np.take_along_axis(d, keep, axis=1), np.take_along_axis(i, keep, axis=1)
    return best_i


def peak_mib(stderr: str) -> int:
    """The peak memory a `chameleon index` command prints."""
    return int(re.search(r"peak memory ([\d,]+) MiB", stderr).group(1).replace(",", ""))


def run(*args) -> dict:
    """A `chameleon` command; its wall time and the peak memory it reports."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "chameleon", *map(str, args)], capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr)
    return {"seconds": round(time.perf_counter() - started, 1), "peak_mib": peak_mib(done.stderr)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000_000)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--nlist", type=int, default=4096)
    parser.add_argument("--m", type=int, default=16)
    parser.add_argument("--parts", type=int, default=2)
    parser.add_argument("--peer-n", type=int, default=5_000_000)
    parser.add_argument("--work", type=Path, default=Path("runs/build-parts"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    vectors = work / f"synthetic-{args.n}x{args.dim}.npy"
    started = time.perf_counter()
    queries = write_vectors(vectors, args.n, args.dim, seed=0)
    report = {"date": time.strftime("%Y-%m-%d"), "n": args.n, "dim": args.dim, "nlist": args.nlist, "m": args.m, "parts": args.parts}
    report["generate_s"] = round(time.perf_counter() - started, 1)
    print(report, flush=True)
    for name in ("trained", "index", *(f"part-{i}" for i in range(args.parts))):
        shutil.rmtree(work / name, ignore_errors=True)

    index_args = ["--nlist", args.nlist, "--m", args.m]
    report["train"] = run("index", "train", "--vectors", vectors, "--out", work / "trained", *index_args)
    print("train", report["train"], flush=True)
    started = time.perf_counter()
    encoders = [
        subprocess.Popen(
            [sys.executable, "-m", "chameleon", "index", "encode", "--trained", work / "trained", "--vectors", vectors]
            + ["--part", f"{i}/{args.parts}", "--out", work / f"part-{i}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(args.parts)
    ]
    peaks = []
    for encoder in encoders:
        err = encoder.communicate()[1]
        if encoder.returncode:
            raise SystemExit(err)
        peaks.append(peak_mib(err))
    report["encode"] = {"seconds": round(time.perf_counter() - started, 1), "peak_mib": peaks}
    print("encode", report["encode"], flush=True)
    report["join"] = run("index", "join", *(work / f"part-{i}" for i in range(args.parts)), "--shards", 2, "--out", work / "index")
    print("join", report["join"], flush=True)

    with tempfile.TemporaryDirectory() as tmp:  # the peer: one process, the whole build in memory
        np.save(Path(tmp) / "prefix.npy", np.load(vectors, mmap_mode="r")[: args.peer_n])
        peer = run("index", "build", "--vectors", Path(tmp) / "prefix.npy", "--out", Path(tmp) / "index", *index_args)
    report["peer_one_process"] = {"n": args.peer_n, **peer}
    per_vector = {
        "parts_encode": max(peaks) * 2**20 / (args.n / args.parts),
        "one_process": peer["peak_mib"] * 2**20 / args.peer_n,
    }
    report["peak_bytes_per_vector"] = {k: round(v, 1) for k, v in per_vector.items()}
    print("peer", report["peer_one_process"], report["peak_bytes_per_vector"], flush=True)

    truth = exact_top10(vectors, queries)
    rows = []
    with tempfile.TemporaryDirectory() as state:
        cluster.up(work / "index", 2, state, threads=1, die_with_parent=True)
        try:
            searcher = cluster.ClusterSearcher.open(state)
            for nprobe in (8, 32, 128):
                searcher.search(queries[:5], 10, nprobe)
                latencies, found = [], []
                for query in queries:
                    t = time.perf_counter()
                    found.append(searcher.search(query[None], 10, nprobe).ids[0])
                    latencies.append(time.perf_counter() - t)
                recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)]))
                rows.append({"nprobe": nprobe, "recall@10": round(recall, 4), "p50_ms": round(float(np.median(latencies)) * 1e3, 2)})
                print(rows[-1], flush=True)
            searcher.close()
        finally:
            cluster.down(state)
    report["tier_2_shards"] = rows
    print(json.dumps(report, indent=1))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
