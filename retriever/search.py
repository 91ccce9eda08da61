"""In-process search (coarse quantizer + scan engine) and the exact top-k merge of shard results."""

from __future__ import annotations

import numpy as np

from retriever.coarse import CoarseQuantizer
from retriever.engines import MAX_K, make_scan_engine
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex
from retriever.vectors import as_query_matrix, prepare_vectors


def merge_topk(distances: list[np.ndarray], ids: list[np.ndarray], k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k of per-shard results, with the scan engines' tie-break (score, then smaller id).

    Each shard's (distances, ids) is (nq, k_s) in faiss conventions; id -1 marks an empty slot.
    """
    all_d = np.concatenate(distances, axis=1)
    all_i = np.concatenate(ids, axis=1)
    keys = -all_d if metric != "l2" else all_d
    keys = np.where(all_i < 0, np.inf, keys)
    tie = np.where(all_i < 0, np.iinfo(np.int64).max, all_i)
    order = np.lexsort((tie, keys), axis=1)[:, :k]
    merged_d = np.take_along_axis(all_d, order, axis=1)
    merged_i = np.take_along_axis(all_i, order, axis=1)
    if merged_d.shape[1] < k:  # fewer candidates than k across all shards
        pad = k - merged_d.shape[1]
        empty = np.inf if metric == "l2" else -np.inf
        merged_d = np.pad(merged_d, ((0, 0), (0, pad)), constant_values=empty)
        merged_i = np.pad(merged_i, ((0, 0), (0, pad)), constant_values=-1)
    return merged_d, merged_i


def split_probes(list_ids: np.ndarray, early: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``early`` probed lists of every query and the rest: two scans whose results,
    merged with :func:`merge_topk`, are the scan of all of them (each list is in exactly one)."""
    if not 1 <= early < list_ids.shape[1]:
        raise InvalidInput(f"early must be between 1 and nprobe - 1 = {list_ids.shape[1] - 1}, got {early}")
    return np.ascontiguousarray(list_ids[:, :early]), np.ascontiguousarray(list_ids[:, early:])


class StagedScan:
    """A scan in two stages, in this process: :meth:`early` scans the first ``early`` probed lists
    of every query (the nearest centroids come first) and answers with their top-k; :meth:`final`
    scans the rest and answers the whole scan's top-k. The retrieval tier's SEARCH with ``early``
    answers the same two results (``chameleon.cluster.ClusterSearcher.scan_staged``)."""

    def __init__(self, engine, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int):
        self.engine, self.queries, self.k = engine, queries, k
        self._first, self._rest = split_probes(list_ids, early)
        self._early: tuple[np.ndarray, np.ndarray] | None = None

    def early(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(distances, ids, partial) over the first lists."""
        if self._early is None:
            self._early = self.engine.search(self.queries, self._first, self.k)
        return *self._early, False

    def final(self) -> tuple[np.ndarray, np.ndarray, bool]:
        """(distances, ids, partial) over every probed list."""
        first_d, first_i, _ = self.early()
        rest_d, rest_i = self.engine.search(self.queries, self._rest, self.k)
        return *merge_topk([first_d, rest_d], [first_i, rest_i], self.k, self.engine.params.metric), False


class Searcher:
    """Search a whole index in this process: prepare queries, coarse search, scan.

    ``quantizer`` and :meth:`scan` are the two steps on their own, the same as a cluster
    searcher's (``chameleon.cluster.ClusterSearcher``), so a caller can time or route them.
    """

    def __init__(self, index: IVFPQIndex, engine: str = "numba", device: str = "auto", **engine_options):
        self.params = index.params
        self.ntotal = index.ntotal
        self.quantizer = CoarseQuantizer(index.centroids, index.params.metric, device=device)
        self.engine = make_scan_engine(engine, index, **engine_options)

    def search(self, queries, k: int, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        most = min(self.ntotal, MAX_K)
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= most:
            raise InvalidInput(f"k must be between 1 and {most} (the indexed vectors, at most {MAX_K}), got {k!r}")
        queries = prepare_vectors(as_query_matrix(queries, self.params.dim), self.params.metric)
        list_ids, _ = self.quantizer.search(queries, nprobe)
        return self.engine.search_checked(queries, list_ids, int(k))  # all three made here: the engine's check would repeat ours

    def submit(self, queries, k: int, nprobe: int):
        """``search`` as a function that returns its (distances, ids): the same interface as a
        cluster searcher, whose search runs elsewhere meanwhile; here it runs now."""
        result = self.search(queries, k, nprobe)
        return lambda: result

    def scan(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """(distances, ids, partial) of prepared ``queries`` over ``list_ids``; never partial in process."""
        distances, ids = self.engine.search(queries, list_ids, k)
        return distances, ids, False

    def scan_staged(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int) -> StagedScan:
        """``scan`` in two stages: an early top-k after the first ``early`` lists, then the final one."""
        return StagedScan(self.engine, queries, list_ids, k, early)
