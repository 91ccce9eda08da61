"""Scan engines: given prepared queries and the lists each one probes, return the top-k.

Every engine searches one set of inverted lists (a whole index or one shard) and answers
``search(queries, list_ids, k) -> (distances, ids)`` in faiss's conventions: squared L2
distances ascending, or inner products descending; id -1 (and an infinite distance) where fewer
than k candidates exist. Coarse keys are computed by the kernel from the engine's own centroids, so a
retrieval node needs only the query vectors and list ids.
"""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numba
import numpy as np
from numba import njit

from retriever.errors import RetrieverError
from retriever.index import IVFPQIndex, unpack_codes
from retriever.scan import coarse_keys, scan_ivfpq, scan_ivfpq_serial
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
        """Validated (queries float32, list_ids int64, k), or :class:`RetrieverError` saying what is wrong."""
        queries = np.ascontiguousarray(as_query_matrix(queries, self.params.dim), dtype=np.float32)
        list_ids = np.asarray(list_ids)
        if list_ids.ndim != 2 or list_ids.shape[0] != queries.shape[0] or list_ids.shape[1] < 1:
            raise RetrieverError(f"list ids must have shape ({queries.shape[0]}, nprobe), got {list_ids.shape}")
        if list_ids.dtype.kind not in "iu":
            raise RetrieverError(f"list ids must be integers, got dtype {list_ids.dtype}")
        list_ids = np.ascontiguousarray(list_ids, dtype=np.int64)
        low, high = id_range(list_ids)  # not empty: at least one query and one probe
        if low < -1 or high >= self.params.nlist:
            raise RetrieverError(f"list ids must lie in [-1, {self.params.nlist}), got {low}..{high}")
        if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
            raise RetrieverError(f"k must be an integer between 1 and {MAX_K}, got {k!r}")
        return queries, list_ids, int(k)

    def codes_to_scan(self, list_ids: np.ndarray) -> int:
        """How many codes a search over checked ``list_ids`` reads (its cost, near enough)."""
        return _codes_in(np.ascontiguousarray(list_ids, dtype=np.int64).reshape(-1), self._list_sizes)

    def warm_up(self) -> None:
        """Run the search paths once (Numba compiles or loads its kernels on first use), so that a
        server reports ready only when it answers at full speed."""
        self.search(self.centroids[:1], np.zeros((1, 1), np.int64), 1)

    def search(self, queries: np.ndarray, list_ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of already prepared (float32, normalised for cos) ``queries`` over ``list_ids``."""
        return self.search_checked(*self.check(queries, list_ids, k))

    def search_checked(self, queries, list_ids, k):
        """``search`` on what :meth:`check` returned (a node checks each request as it arrives, then scans them in a batch)."""
        raise NotImplementedError


def l2_list_terms(params, centroids: np.ndarray, codebooks: np.ndarray) -> np.ndarray:
    """(nlist, m, ksub) float32 ``|y_jc|^2 + 2 <centroid_j, y_jc>``: the list's part of every L2 table."""
    norms = np.einsum("jcd,jcd->jc", codebooks, codebooks)
    cross = np.einsum("ljd,jcd->ljc", centroids.reshape(params.nlist, params.m, params.dsub), codebooks)
    return np.ascontiguousarray(norms[None] + 2 * cross, dtype=np.float32)


class NumbaEngine(ScanEngine):
    """Our CPU engine: the Numba ADC kernel of :mod:`retriever.scan`."""

    name = "numba"

    def __init__(self, index: IVFPQIndex, residual_tables: bool = False):
        """``residual_tables``: build every L2 table from the query's residual, as the FPGA kernel
        does, instead of from the precomputed per-list terms (same results up to rounding)."""
        super().__init__(index)
        p = self.params
        self.offsets = np.ascontiguousarray(self.lists.offsets, dtype=np.int64)
        self.ids = np.ascontiguousarray(self.lists.ids, dtype=np.int64)
        self.codes = np.ascontiguousarray(unpack_codes(self.lists.codes, p.m, p.nbits))  # one code per byte
        self.codebooks_t = np.ascontiguousarray(self.codebooks.transpose(0, 2, 1))
        table_bytes = p.nlist * p.m * p.ksub * 4
        if p.metric == "l2" and table_bytes <= PRECOMPUTED_TABLE_MAX_BYTES and not residual_tables:
            self.list_terms = l2_list_terms(p, self.centroids, self.codebooks)
        else:
            self.list_terms = np.zeros((0, p.m, p.ksub), dtype=np.float32)

    def warm_up(self) -> None:
        super().warm_up()
        self._kernel(scan_ivfpq, self.centroids[:2], np.zeros((2, 1), np.int64), 1)  # the parallel kernel too

    def _kernel(self, kernel, queries, list_ids, k):
        return kernel(
            queries, list_ids, self.centroids, self.codebooks_t, self.list_terms,
            self.offsets, self.ids, self.codes, k, self.params.inner_product,
        )  # fmt: skip

    def search_checked(self, queries, list_ids, k):
        parallel = queries.shape[0] > 1 and numba.get_num_threads() > 1 and self.codes_to_scan(list_ids) >= PARALLEL_MIN_CODES
        keys, ids = self._kernel(scan_ivfpq if parallel else scan_ivfpq_serial, queries, list_ids, k)
        return (-keys if self.params.inner_product else keys), ids


class FaissEngine(ScanEngine):
    """faiss's ``IndexIVFPQ`` filled with *our* centroids, codebooks and codes.

    It scans exactly the same codes as :class:`NumbaEngine`, so the two can be compared code for
    code; it is the reference the Numba kernel is tested against.
    """

    name = "faiss"

    def __init__(self, index: IVFPQIndex):
        super().__init__(index)
        self.index = to_faiss_ivfpq(index)

    def search_checked(self, queries, list_ids, k):
        coarse = coarse_keys(queries, self.centroids, list_ids, self.params.inner_product)
        if self.params.inner_product:
            coarse = -coarse  # faiss wants <q, c> itself
        self.index.nprobe = list_ids.shape[1]
        return self.index.search_preassigned(queries, k, list_ids, coarse)


def to_faiss_ivfpq(index: IVFPQIndex) -> faiss.IndexIVFPQ:
    """An ``IndexIVFPQ`` holding our quantizers and codes (no retraining, no re-encoding)."""
    p = index.params
    faiss_metric = faiss.METRIC_L2 if p.metric == "l2" else faiss.METRIC_INNER_PRODUCT
    quantizer = faiss.IndexFlatL2(p.dim) if p.metric == "l2" else faiss.IndexFlatIP(p.dim)
    quantizer.add(np.ascontiguousarray(index.centroids, dtype=np.float32))
    ivf = faiss.IndexIVFPQ(quantizer, p.dim, p.nlist, p.m, p.nbits, faiss_metric)
    ivf.own_fields = True
    quantizer.this.disown()
    faiss.copy_array_to_vector(np.ascontiguousarray(index.codebooks, dtype=np.float32).ravel(), ivf.pq.centroids)
    ivf.pq.sync_transposed_centroids()
    ivf.is_trained = True
    ivf.precompute_table()
    lists = index.whole()
    ids = np.ascontiguousarray(lists.ids, dtype=np.int64)
    codes = np.ascontiguousarray(lists.codes, dtype=np.uint8)
    for list_id in np.flatnonzero(lists.list_sizes()):
        start, end = int(lists.offsets[list_id]), int(lists.offsets[list_id + 1])
        ivf.invlists.add_entries(int(list_id), end - start, faiss.swig_ptr(ids[start:end]), faiss.swig_ptr(codes[start:end]))
    ivf.ntotal = lists.ntotal
    return ivf


from retriever.fastscan import FastScanEngine  # noqa: E402  (it builds on ScanEngine above)

ENGINES = {engine.name: engine for engine in (NumbaEngine, FaissEngine, FastScanEngine)}


ENGINE_NAMES = (*ENGINES, "fpga")


def engine_options(name: str, fpga_mode: str | None = None, xclbin: str | os.PathLike | None = None) -> dict:
    """The options :func:`make_engine` takes for engine ``name`` from the command line's
    ``--fpga-mode`` and ``--xclbin``, which go with the ``fpga`` engine only (which needs a mode)."""
    if name not in ENGINE_NAMES:
        raise RetrieverError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_NAMES)}")
    if name != "fpga":
        if fpga_mode is not None or xclbin is not None:
            raise RetrieverError("--fpga-mode and --xclbin go with the fpga engine")
        return {}
    if fpga_mode is None:
        raise RetrieverError("the fpga engine needs --fpga-mode hw (an Alveo card through PYNQ) or emu (the kernel on this CPU)")
    return {"mode": fpga_mode, **({"xclbin": str(Path(xclbin).resolve())} if xclbin is not None else {})}


def make_engine(name: str, index: IVFPQIndex, **options) -> ScanEngine:
    """The engine ``name`` over ``index``; ``options`` go to its constructor (``fpga``: mode, xclbin, ...)."""
    if name == "fpga":
        from fpga.engine import FpgaEngine  # fpga/ builds on this module

        return FpgaEngine(index, **options)
    if name not in ENGINES:
        raise RetrieverError(f"unknown engine {name!r}; choose from {', '.join(ENGINE_NAMES)}")
    if options:
        raise RetrieverError(f"the {name} engine takes no options, got {', '.join(options)}")
    return ENGINES[name](index)
