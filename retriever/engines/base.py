"""Scan engines: given prepared queries and the lists each one probes, return the top-k.

Every engine searches one set of inverted lists (a whole index or one shard) and answers
``search(queries, list_ids, k) -> (distances, ids)`` in faiss's conventions: squared L2
distances ascending, or inner products descending; id -1 (and an infinite distance) where fewer
than k candidates exist. Coarse keys are computed by the kernel from the engine's own centroids, so a
retrieval node needs only the query vectors and list ids.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex
from retriever.vectors import as_query_matrix, id_range

# faiss's own limit for precomputed L2 tables (IndexIVFPQ::precomputed_table_max_bytes).
PRECOMPUTED_TABLE_MAX_BYTES = 2 << 30
# Batches that scan fewer codes than this (~2 ms on one core) run on the calling thread: waking a
# thread pool costs more than it saves, and its idle workers would take cores other processes need.
PARALLEL_MIN_CODES = 1 << 18
# Results are (nq, k) arrays; a larger k is a mistake, not a query.
MAX_K = 1 << 16


@njit(cache=True, nogil=True)
def _codes_in(list_ids, list_sizes):
    """Codes in the lists ``list_ids`` (-1: none) in one pass (four NumPy calls cost ~5 µs)."""
    total = 0
    for list_id in list_ids:
        if list_id >= 0:
            total += list_sizes[list_id]
    return total


class ScanEngine:
    """Common validation; subclasses implement ``search_checked`` on checked, prepared inputs."""

    name = "base"
    # Engines on a device (an FPGA card, or its emulation) take a ``mode`` among these; CPU engines take no options.
    device_modes: tuple[str, ...] = ()
    device_modes_help = ""

    def __init__(self, index: IVFPQIndex):
        self.params = index.params
        self.centroids = np.ascontiguousarray(index.centroids, dtype=np.float32)
        self.codebooks = np.ascontiguousarray(index.codebooks, dtype=np.float32)
        self.lists = index.whole()
        self._list_sizes = self.lists.list_sizes()

    @property
    def ntotal(self) -> int:
        return self.lists.ntotal

    def check(self, queries, list_ids, k) -> tuple[np.ndarray, np.ndarray, int]:
        """Validated (queries float32, list_ids int64, k), or :class:`InvalidInput` saying what is wrong."""
        queries = np.ascontiguousarray(as_query_matrix(queries, self.params.dim), dtype=np.float32)
        list_ids = np.asarray(list_ids)
        if list_ids.ndim != 2 or list_ids.shape[0] != queries.shape[0] or list_ids.shape[1] < 1:
            raise InvalidInput(f"list ids must have shape ({queries.shape[0]}, nprobe), got {list_ids.shape}")
        if list_ids.dtype.kind not in "iu":
            raise InvalidInput(f"list ids must be integers, got dtype {list_ids.dtype}")
        list_ids = np.ascontiguousarray(list_ids, dtype=np.int64)
        low, high = id_range(list_ids)  # not empty: at least one query and one probe
        if low < -1 or high >= self.params.nlist:
            raise InvalidInput(f"list ids must lie in [-1, {self.params.nlist}), got {low}..{high}")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise InvalidInput(f"k must be an integer between 1 and {MAX_K}, got {k!r}")
        return queries, list_ids, int(k)

    def codes_to_scan(self, list_ids: np.ndarray) -> int:
        """How many codes a search over checked ``list_ids`` reads (its cost, near enough)."""
        return _codes_in(np.ascontiguousarray(list_ids, dtype=np.int64).reshape(-1), self._list_sizes)

    def in_parallel(self, queries: np.ndarray, list_ids: np.ndarray) -> bool:
        """Whether a checked batch is worth Numba's thread pool (see :data:`PARALLEL_MIN_CODES`)."""
        return queries.shape[0] > 1 and numba.get_num_threads() > 1 and self.codes_to_scan(list_ids) >= PARALLEL_MIN_CODES

    def warm_up(self) -> None:
        """Run the search paths once for each kind of input they get, so that a server reports
        ready only when it answers at full speed: Numba compiles (or loads) a kernel per argument
        types, and a read-only array is another type than a writable one (a node's requests
        arrive read-only, straight from the wire; an in-process search's queries are writable)."""
        for queries, list_ids in warm_up_inputs(self.centroids, 1):
            self.search(queries, list_ids, 1)

    def search(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of already prepared (float32, normalised for cos) ``queries`` over ``list_ids``."""
        return self.search_checked(*self.check(queries, list_ids, k))

    def search_checked(self, queries, list_ids, k):
        """``search`` on what :meth:`check` returned (a node checks each request as it arrives, then scans them in a batch)."""
        raise NotImplementedError


def warm_up_inputs(centroids: np.ndarray, rows: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(queries, list_ids) of ``rows`` rows probing list 0, writable and read-only: the inputs an
    engine's ``warm_up`` runs its kernels on."""
    pairs = []
    for writable in (True, False):
        queries, list_ids = np.array(centroids[:rows], dtype=np.float32), np.zeros((rows, 1), np.int64)
        queries.setflags(write=writable)
        list_ids.setflags(write=writable)
        pairs.append((queries, list_ids))
    return pairs


def l2_list_terms(params, centroids: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """(nlist, m, ksub) float32 ``|y_jc|^2 + 2 <centroid_j, y_jc>``: the list's part of every L2 table."""
    norms = np.einsum("jcd,jcd->jc", codebooks, codebooks)
    cross = np.einsum("ljd,jcd->ljc", centroids.reshape(params.nlist, params.m, params.dsub), codebooks)
    return np.ascontiguousarray(norms[None] + 2 * cross, dtype=np.float32)
