"""Refinement: re-rank a scan's candidates by exact distances to the stored full vectors.

A PQ scan ranks by approximate distances; asking it for ``F * k`` candidates and keeping the k
nearest by the true vectors (faiss's ``IndexRefineFlat``, "RFlat") buys recall for the cost of
``F * k`` exact distances per query. Candidate ids are rows of ``vectors``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from retriever.errors import InvalidInput
from retriever.kernels.common import EMPTY_ID, drain_sorted, dynamic_schedule, offer, prefetch
from retriever.vectors import as_query_matrix, id_range

# Below this many candidate distances a batch runs on the calling thread (see engines.PARALLEL_MIN_CODES).
PARALLEL_MIN_CANDIDATES = 1 << 14
CHUNK_QUERIES = 64  # queries sharing one set of scratch buffers
LINE_FLOATS = 16  # float32 values in a 64-byte cache line


@njit(cache=True, fastmath=True)  # reassociation lets the sum vectorise
def _dot(q, v):
    total = np.float32(0.0)
    for t in range(q.shape[0]):
        total += q[t] * v[t]
    return total


@njit(cache=True, fastmath=True)
def _squared_distance(q, v):
    total = np.float32(0.0)
    for t in range(q.shape[0]):
        diff = q[t] - v[t]
        total += diff * diff
    return total


@njit(cache=True, nogil=True)
def _rerank_chunk(queries, vectors, candidates, inner_product, first, last, out_d, out_i):
    k = out_d.shape[1]
    keys = np.empty(candidates.shape[1], np.float32)
    heap_d, heap_i = np.empty(k, np.float32), np.empty(k, np.int64)
    flat = vectors.reshape(vectors.size)
    for qi in range(first, last):
        if qi + 1 < last:  # the next query's rows travel from memory while this one's are scored
            for j in range(candidates.shape[1]):
                row = max(candidates[qi + 1, j], 0) * vectors.shape[1]
                for at in range(row, row + vectors.shape[1], LINE_FLOATS):
                    prefetch(flat, at)
                prefetch(flat, row + vectors.shape[1] - 1)
        # Every distance first, then the heap: a loop of independent loads keeps many cache misses
        # in flight, where the heap's branches in between would drain the pipeline at each one.
        if inner_product:  # one loop per metric: a test inside the loop keeps it from vectorising
            for j in range(candidates.shape[1]):
                keys[j] = -_dot(queries[qi], vectors[max(candidates[qi, j], 0)])
        else:
            for j in range(candidates.shape[1]):
                keys[j] = _squared_distance(queries[qi], vectors[max(candidates[qi, j], 0)])
        heap_d[:] = np.inf
        heap_i[:] = EMPTY_ID
        for j in range(candidates.shape[1]):
            if candidates[qi, j] >= 0:
                offer(heap_d, heap_i, keys[j], candidates[qi, j])
        drain_sorted(heap_d, heap_i, out_d[qi], out_i[qi])


@njit(parallel=True, cache=True, nogil=True)
def _rerank_parallel(queries, vectors, candidates, k, inner_product):
    nq = queries.shape[0]
    out_d = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    for chunk in prange((nq + CHUNK_QUERIES - 1) // CHUNK_QUERIES):
        first = chunk * CHUNK_QUERIES
        _rerank_chunk(queries, vectors, candidates, inner_product, first, min(nq, first + CHUNK_QUERIES), out_d, out_i)
    return out_d, out_i


@njit(cache=True, nogil=True)
def _rerank_serial(queries, vectors, candidates, k, inner_product):
    out_d = np.empty((queries.shape[0], k), np.float32)
    out_i = np.empty((queries.shape[0], k), np.int64)
    _rerank_chunk(queries, vectors, candidates, inner_product, 0, queries.shape[0], out_d, out_i)
    return out_d, out_i


def rerank_exact(queries, vectors: np.ndarray, candidates, k: int, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of each query's ``candidates`` (ids = rows of ``vectors``, -1 = none) by exact distance.

    ``queries`` and ``vectors`` are prepared alike (float32, normalised for cos). Results follow the
    engines' conventions: squared L2 ascending, or inner products descending; ties by smaller id;
    id -1 where fewer than k candidates were given.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(as_query_matrix(queries, vectors.shape[1]), dtype=np.float32)
    candidates = np.ascontiguousarray(candidates, dtype=np.int64)
    if candidates.ndim != 2 or candidates.shape[0] != queries.shape[0]:
        raise InvalidInput(f"candidates must have shape ({queries.shape[0]}, n), got {candidates.shape}")
    low, high = id_range(candidates) if candidates.size else (0, 0)
    if low < -1 or high >= vectors.shape[0]:
        raise InvalidInput(f"candidate ids must lie in [-1, {vectors.shape[0]}), got {low}..{high}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise InvalidInput(f"k must be a positive integer, got {k!r}")
    inner_product = metric != "l2"
    parallel = numba.get_num_threads() > 1 and candidates.size >= PARALLEL_MIN_CANDIDATES
    if parallel:
        with dynamic_schedule():
            keys, ids = _rerank_parallel(queries, vectors, candidates, int(k), inner_product)
    else:
        keys, ids = _rerank_serial(queries, vectors, candidates, int(k), inner_product)
    return (-keys if inner_product else keys), ids
