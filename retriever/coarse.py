"""Coarse search: which ``nprobe`` inverted lists each query visits.

Shared by every tier. On a CUDA host with torch installed the centroids live on the GPU and the
search is one matrix product plus top-k. On a CPU a Numba kernel does it, in the thread pool the
scan kernels use: faiss's flat index has its own OpenMP runtime, whose idle workers spin on the
cores the scan needs next (and the scan's on the cores faiss needs), and for the few queries of a
served request its per-pair path costs twice this kernel's. A query's scores are summed in one
fixed order, so its lists are the same whether it is searched alone or in a batch. The kernels
release the GIL, as faiss's search did: a server's other threads go on meanwhile.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit, prange

from retriever.errors import InvalidInput, Unsupported

DEVICES = ("auto", "cpu", "cuda")
CHUNK_QUERIES = 64  # rows a thread takes at a time; batches of at most two chunks run on the calling thread


@njit(cache=True, inline="always")
def _keep_best(scores, nprobe, out_ids, out_scores, row):
    """The ``nprobe`` highest of ``scores`` into row ``row`` of the outputs, best first, ties by
    smaller list id (a sorted buffer: after the first lists nearly every score fails the first test)."""
    held = 0
    worst_kept = -np.inf  # a local, not the buffer's last slot: the test stays in a register
    for j in range(scores.shape[0]):
        s = scores[j]
        if s <= worst_kept:
            continue
        pos = held if held < nprobe else nprobe - 1
        while pos > 0 and out_scores[row, pos - 1] < s:
            out_scores[row, pos] = out_scores[row, pos - 1]
            out_ids[row, pos] = out_ids[row, pos - 1]
            pos -= 1
        out_scores[row, pos] = s
        out_ids[row, pos] = j
        if held < nprobe:
            held += 1
        if held == nprobe:
            worst_kept = out_scores[row, nprobe - 1]


@njit(cache=True)
def _coarse_rows(queries, centroids_t, centroid_norms, l2, nprobe, out_ids, out_scores, first, last):
    """Rows ``first:last``: scores ``<q, c>`` (ip) or ``-|q - c|^2`` (l2) to every centroid, kept best first."""
    nlist = centroids_t.shape[1]
    scores = np.empty(nlist, np.float32)
    for row in range(first, last):
        scores[:] = 0.0
        for d in range(queries.shape[1]):
            value = queries[row, d]
            for j in range(nlist):  # contiguous in j: vectorised
                scores[j] += value * centroids_t[d, j]
        if l2:
            query_norm = np.float32(0.0)
            for d in range(queries.shape[1]):
                query_norm += queries[row, d] * queries[row, d]
            for j in range(nlist):
                scores[j] = 2 * scores[j] - centroid_norms[j] - query_norm
        _keep_best(scores, nprobe, out_ids, out_scores, row)


@njit(cache=True, nogil=True)
def _coarse_serial(queries, centroids_t, centroid_norms, l2, nprobe):
    ids = np.empty((queries.shape[0], nprobe), np.int64)
    scores = np.empty((queries.shape[0], nprobe), np.float32)
    _coarse_rows(queries, centroids_t, centroid_norms, l2, nprobe, ids, scores, 0, queries.shape[0])
    return ids, scores


@njit(cache=True, nogil=True, parallel=True)
def _coarse_parallel(queries, centroids_t, centroid_norms, l2, nprobe):
    nq = queries.shape[0]
    ids = np.empty((nq, nprobe), np.int64)
    scores = np.empty((nq, nprobe), np.float32)
    for chunk in prange((nq + CHUNK_QUERIES - 1) // CHUNK_QUERIES):
        first = chunk * CHUNK_QUERIES
        _coarse_rows(queries, centroids_t, centroid_norms, l2, nprobe, ids, scores, first, min(nq, first + CHUNK_QUERIES))
    return ids, scores


def nearest_centroids(queries: np.ndarray, centroids_t: np.ndarray, centroid_norms: np.ndarray, metric: str, nprobe: int):
    """(list_ids int64, scores float32), both (nq, nprobe), best first (ties: smaller list id):
    inner products for ``ip``/``cos``, squared L2 distances for ``l2``. ``centroids_t`` is the
    (dim, nlist) float32 transpose of the centroids, ``centroid_norms`` their squared norms."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    l2 = metric == "l2"
    parallel = queries.shape[0] > 2 * CHUNK_QUERIES and numba.get_num_threads() > 1
    ids, scores = (_coarse_parallel if parallel else _coarse_serial)(queries, centroids_t, centroid_norms, l2, nprobe)
    return ids, (0.0 - scores if l2 else scores)  # 0 - x, not -x: a distance of zero stays +0


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


class CoarseQuantizer:
    """Nearest centroids of prepared (float32, normalised for cos) queries.

    ``search`` returns (list_ids, scores), both (nq, nprobe), best first: squared L2 distances for
    ``l2``, inner products for ``ip``/``cos``.
    """

    def __init__(self, centroids: np.ndarray, metric: str, device: str = "auto"):
        if device not in DEVICES:
            raise InvalidInput(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "cuda" and not cuda_available():
            raise Unsupported("device 'cuda' was asked for, but torch with CUDA is not available here")
        self.metric = metric
        self.nlist, self.dim = centroids.shape
        self.device = "cuda" if device == "cuda" or (device == "auto" and cuda_available()) else "cpu"
        if self.device == "cuda":
            import torch

            self._centroids = torch.as_tensor(np.asarray(centroids, dtype=np.float32), device="cuda")
            self._centroid_norms = (self._centroids * self._centroids).sum(dim=1)
        else:
            centroids = np.asarray(centroids, dtype=np.float32)
            self._centroids_t = np.ascontiguousarray(centroids.T)
            self._centroid_norms = np.einsum("ij,ij->i", centroids, centroids)

    def search(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= self.nlist:
            raise InvalidInput(f"nprobe must be between 1 and nlist={self.nlist}, got {nprobe!r}")
        if self.device == "cuda":
            return self._search_cuda(queries, int(nprobe))
        return nearest_centroids(queries, self._centroids_t, self._centroid_norms, self.metric, int(nprobe))

    def _search_cuda(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        q = torch.as_tensor(queries, device="cuda")
        products = q @ self._centroids.T
        if self.metric == "l2":
            distances = (q * q).sum(dim=1, keepdim=True) + self._centroid_norms[None, :] - 2 * products
            scores, list_ids = torch.topk(distances, nprobe, dim=1, largest=False)
        else:
            scores, list_ids = torch.topk(products, nprobe, dim=1, largest=True)
        return list_ids.cpu().numpy().astype(np.int64), scores.cpu().numpy()
