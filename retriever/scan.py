"""The CPU scan kernel: asymmetric-distance (ADC) scan of PQ codes with a per-query top-k heap.

Scores are kept as keys to *minimise*: squared L2 distance, or the negated inner product. For
each query the kernel builds the query's lookup table once (``alpha * <q_j, y_jc>`` for every
sub-quantizer j and code c), and for each probed list

* inner product: ``key = -<q, centroid> + sum_j lut[j, code_j]`` (the table does not depend on
  the list),
* L2: ``key = |q - centroid|^2 + sum_j (term[list, j, code_j] + lut[j, code_j])`` with
  ``term[list, j, c] = |y_jc|^2 + 2 <centroid_j, y_jc>``, the same decomposition faiss uses for
  its precomputed tables. When that table would be too large the per-list table is computed
  from the residual instead.

Ties are broken by id (smaller first), so results are deterministic whatever the list order.
Queries run in parallel (``prange``); the thread count is Numba's (``numba.set_num_threads``).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

EMPTY_ID = np.iinfo(np.int64).max


@njit(cache=True, inline="always")
def _worse(d1, i1, d2, i2):
    return d1 > d2 or (d1 == d2 and i1 > i2)


@njit(cache=True)
def _replace_top(heap_d, heap_i, d, i):
    """Max-heap (worst on top) of fixed size: put (d, i) in place of the top and sift down."""
    k = heap_d.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and _worse(heap_d[child + 1], heap_i[child + 1], heap_d[child], heap_i[child]):
            child += 1
        if not _worse(heap_d[child], heap_i[child], d, i):
            break
        heap_d[pos] = heap_d[child]
        heap_i[pos] = heap_i[child]
        pos = child
    heap_d[pos] = d
    heap_i[pos] = i


@njit(cache=True)
def _drain_sorted(heap_d, heap_i, out_d, out_i):
    """Empty the heap into ``out`` best first; empty slots become id -1."""
    for last in range(heap_d.shape[0] - 1, -1, -1):
        out_d[last] = heap_d[0]
        out_i[last] = -1 if heap_i[0] == EMPTY_ID else heap_i[0]
        d, i = heap_d[last], heap_i[last]
        _replace_top(heap_d[:last], heap_i[:last], d, i)


@njit(cache=True)
def _query_lut(q, codebooks, alpha, lut):
    m, ksub, dsub = codebooks.shape
    for j in range(m):
        for c in range(ksub):
            s = np.float32(0.0)
            for t in range(dsub):
                s += q[j * dsub + t] * codebooks[j, c, t]
            lut[j, c] = alpha * s


@njit(cache=True)
def _residual_table(q, centroid, codebooks, table):
    m, ksub, dsub = codebooks.shape
    for j in range(m):
        for c in range(ksub):
            s = np.float32(0.0)
            for t in range(dsub):
                diff = q[j * dsub + t] - centroid[j * dsub + t] - codebooks[j, c, t]
                s += diff * diff
            table[j, c] = s


@njit(cache=True)
def _scan_list(table, codes, ids, start, end, coarse, heap_d, heap_i):
    m = codes.shape[1]
    for r in range(start, end):
        acc = np.float32(0.0)
        for j in range(m):
            acc += table[j, codes[r, j]]
        d = coarse + acc
        if d < heap_d[0] or (d == heap_d[0] and ids[r] < heap_i[0]):
            _replace_top(heap_d, heap_i, d, ids[r])


@njit(parallel=True, cache=True)
def scan_ivfpq(queries, list_ids, coarse, centroids, codebooks, list_terms, offsets, ids, codes, k, inner_product):
    """Top-k keys and ids of every query over its probed lists.

    queries (nq, d) float32; list_ids (nq, nprobe) int64, -1 = skip; coarse (nq, nprobe) float32
    coarse keys (|q-c|^2 or -<q,c>; unused by the residual-table path); list_terms (nlist, m, ksub) float32 for L2, or with a zero
    first axis to compute residual tables per list. Returns (keys (nq, k) float32 ascending,
    ids (nq, k) int64, -1 where fewer than k candidates were seen).
    """
    nq = queries.shape[0]
    nprobe = list_ids.shape[1]
    m, ksub, _ = codebooks.shape
    out_d = np.empty((nq, k), np.float32)
    out_i = np.empty((nq, k), np.int64)
    alpha = np.float32(-1.0) if inner_product else np.float32(-2.0)
    precomputed = list_terms.shape[0] > 0
    for qi in prange(nq):
        q = queries[qi]
        lut = np.empty((m, ksub), np.float32)
        table = np.empty((m, ksub), np.float32)
        if inner_product or precomputed:
            _query_lut(q, codebooks, alpha, lut)
        heap_d = np.full(k, np.inf, np.float32)
        heap_i = np.full(k, EMPTY_ID, np.int64)
        for p in range(nprobe):
            lst = list_ids[qi, p]
            if lst < 0 or offsets[lst] == offsets[lst + 1]:
                continue
            if inner_product:
                _scan_list(lut, codes, ids, offsets[lst], offsets[lst + 1], coarse[qi, p], heap_d, heap_i)
                continue
            if precomputed:
                for j in range(m):
                    for c in range(ksub):
                        table[j, c] = list_terms[lst, j, c] + lut[j, c]
                base = coarse[qi, p]
            else:
                _residual_table(q, centroids[lst], codebooks, table)
                base = np.float32(0.0)
            _scan_list(table, codes, ids, offsets[lst], offsets[lst + 1], base, heap_d, heap_i)
        _drain_sorted(heap_d, heap_i, out_d[qi], out_i[qi])
    return out_d, out_i
