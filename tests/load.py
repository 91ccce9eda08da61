"""A bounded search load on a retrieval tier, as a process of its own (on a host of its own in the
multi-host test): ``python -m tests.load COORDINATOR INDEX QUERIES OUT [--stop-file F] [--seconds S]``.

It searches through the coordinator, one query batch after another, until ``--stop-file`` exists
or ``--seconds`` pass, and compares every answer with the same search run in this process on the
whole index. ``OUT`` gets a JSON summary: how many searches were whole and right, and each one
that was partial (with its missing shards and how long it took), wrong or failed, with the time
(``time.time()``) it started.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from coordinator.client import RetrievalClient
from retriever.coarse import CoarseQuantizer
from retriever.errors import ChameleonError
from retriever.files import write_json_atomic
from retriever.index import content_fingerprint, load_index, read_manifest
from retriever.search import Searcher
from retriever.vectors import prepare_vectors

K, NPROBE, BATCH = 10, 8, 10


def run(coordinator: str, index_dir: Path, queries: np.ndarray, stop_file: Path | None, seconds: float) -> dict:
    index = load_index(index_dir)
    queries = prepare_vectors(queries, index.params.metric)
    list_ids = CoarseQuantizer(index.centroids, index.params.metric, device="cpu").search(queries, NPROBE)[0]
    expected = Searcher(index).search(queries, K, NPROBE).ids
    content = content_fingerprint(read_manifest(index_dir))  # named in each search: only that version's nodes answer
    summary = {"searches": 0, "whole": 0, "partial": [], "wrong": [], "failed": []}
    deadline = time.monotonic() + seconds
    with RetrievalClient(coordinator, timeout=10.0) as client:
        while time.monotonic() < deadline and not (stop_file and stop_file.exists()):
            first = BATCH * summary["searches"] % len(queries)
            rows = slice(first, first + BATCH)
            at = time.time()
            summary["searches"] += 1
            try:
                result = client.search(queries[rows], list_ids[rows], K, content=content)
            except ChameleonError as e:
                summary["failed"].append([at, str(e)])
                continue
            if result.partial:
                summary["partial"].append([at, result.missing, time.time() - at])
            elif not np.array_equal(result.ids, expected[rows]):
                summary["wrong"].append(at)
            else:
                summary["whole"] += 1
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("coordinator")
    parser.add_argument("index", type=Path)
    parser.add_argument("queries", type=Path, help=".npy file of query vectors")
    parser.add_argument("out", type=Path)
    parser.add_argument("--stop-file", type=Path)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    write_json_atomic(args.out, run(args.coordinator, args.index, np.load(args.queries), args.stop_file, args.seconds))


if __name__ == "__main__":
    main()
