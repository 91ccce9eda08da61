"""Search: the one interface for retrieval (:class:`Retrieval`, answering :class:`SearchResult`),
its in-process implementation (:class:`Searcher`: coarse quantizer + scan engine), and the exact
top-k merge of shard results. ``chameleon.cluster.ClusterSearcher`` answers the same interface
through the retrieval tier, so the RAG pipeline, kNN-LM and the server take either.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from retriever.coarse import CoarseQuantizer
from retriever.engines import MAX_K, make_scan_engine
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex
from retriever.vectors import as_query_matrix, prepare_vectors


@dataclass
class SearchResult:
    """The top-k of a batch of queries: (nq, k) ``distances`` and ``ids`` in faiss's conventions
    (id -1 for an empty slot); ``partial`` when shards did not answer (their numbers in
    ``missing``), which only a search through the tier can be."""

    distances: np.ndarray
    ids: np.ndarray
    partial: bool = False
    missing: list[int] = field(default_factory=list)


class StagedResult(Protocol):
    """A scan in two stages: the top-k over the first probed lists, then over all of them."""

    def early(self) -> SearchResult: ...

    def final(self) -> SearchResult: ...


class Retrieval(Protocol):
    """What searches an index: in this process (:class:`Searcher`) or through the retrieval tier
    (``chameleon.cluster.ClusterSearcher``). ``search`` takes raw query vectors; ``quantizer``
    (the coarse search) and ``scan`` (prepared queries and their probed lists) are its two steps
    on their own, so a caller can time them or scan in two stages (``scan_staged``); ``submit``
    starts a search and returns a function that waits for its result."""

    quantizer: CoarseQuantizer

    def search(self, queries, k: int, nprobe: int) -> SearchResult: ...

    def submit(self, queries, k: int, nprobe: int) -> Callable[[], SearchResult]: ...

    def scan(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> SearchResult: ...

    def scan_staged(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int) -> StagedResult: ...


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
        self._early: SearchResult | None = None

    def early(self) -> SearchResult:
        """The top-k over the first lists."""
        if self._early is None:
            self._early = SearchResult(*self.engine.search(self.queries, self._first, self.k))
        return self._early

    def final(self) -> SearchResult:
        """The top-k over every probed list."""
        first = self.early()
        rest_d, rest_i = self.engine.search(self.queries, self._rest, self.k)
        return SearchResult(*merge_topk([first.distances, rest_d], [first.ids, rest_i], self.k, self.engine.params.metric))


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

    def search(self, queries, k: int, nprobe: int) -> SearchResult:
        most = min(self.ntotal, MAX_K)
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= most:
            raise InvalidInput(f"k must be between 1 and {most} (the indexed vectors, at most {MAX_K}), got {k!r}")
        queries = prepare_vectors(as_query_matrix(queries, self.params.dim), self.params.metric)
        list_ids, _ = self.quantizer.search(queries, nprobe)
        # queries, list ids and k all made here: the engine's check would repeat ours
        return SearchResult(*self.engine.search_checked(queries, list_ids, int(k)))

    def submit(self, queries, k: int, nprobe: int) -> Callable[[], SearchResult]:
        """``search`` as a function that returns its result: the same interface as a cluster
        searcher, whose search runs elsewhere meanwhile; here it runs now."""
        result = self.search(queries, k, nprobe)
        return lambda: result

    def scan(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> SearchResult:
        """The top-k of prepared ``queries`` over ``list_ids``; never partial in process."""
        return SearchResult(*self.engine.search(queries, list_ids, k))

    def scan_staged(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int) -> StagedScan:
        """``scan`` in two stages: an early top-k after the first ``early`` lists, then the final one."""
        return StagedScan(self.engine, queries, list_ids, k, early)
