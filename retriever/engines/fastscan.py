"""``numba-fastscan``: the 4-bit SIMD fast-scan kernel (:mod:`retriever.kernels.fastscan`) and its float re-rank."""

from __future__ import annotations

import numpy as np

from retriever.engines.base import PRECOMPUTED_TABLE_MAX_BYTES, ScanEngine, l2_list_terms, warm_up_inputs
from retriever.errors import InvalidInput
from retriever.index import IVFPQIndex, unpack_codes
from retriever.kernels.common import dynamic_schedule
from retriever.kernels.fastscan import pack_blocks, scan_fastscan, scan_fastscan_serial, simd_level


class FastScanEngine(ScanEngine):
    """Our 4-bit engine: SIMD fast scan of quantized distances, then a float re-rank.

    ``simd`` picks the instruction set (``auto``, ``avx512``, ``avx2``, ``scalar``: all give the same
    answers). ``exact``: the ``numba`` engine's answers on the same codes, bit for bit, instead of
    FastScan's ranking (the k best by quantized distance, returned with their float distances). The
    codes are repacked into 32-vector blocks at load; the index on disk keeps faiss's packing.
    """

    name = "numba-fastscan"

    def __init__(self, index: IVFPQIndex, simd: str = "auto", exact: bool = False):
        super().__init__(index)
        p = self.params
        if p.nbits != 4:
            raise InvalidInput(f"the {self.name} engine scans 4-bit PQ codes (index build --nbits 4); this index has nbits={p.nbits}")
        table_bytes = p.nlist * p.m * p.ksub * 4
        if p.metric == "l2" and table_bytes > PRECOMPUTED_TABLE_MAX_BYTES:
            raise InvalidInput(
                f"the {self.name} engine needs L2 tables of {table_bytes:,} bytes, over {PRECOMPUTED_TABLE_MAX_BYTES:,}: use fewer lists or sub-quantizers"
            )
        self.simd = simd_level(simd)
        self.exact = bool(exact)
        self.offsets = np.ascontiguousarray(self.lists.offsets, dtype=np.int64)
        self.ids = np.ascontiguousarray(self.lists.ids, dtype=np.int64)
        self.packed, self.block_offsets = pack_blocks(unpack_codes(self.lists.codes, p.m, p.nbits), self.offsets)
        self.codebooks_t = np.ascontiguousarray(self.codebooks.transpose(0, 2, 1))
        if p.metric == "l2":
            self.list_terms = l2_list_terms(p, self.centroids, self.codebooks)
        else:
            self.list_terms = np.zeros((0, p.m, p.ksub), dtype=np.float32)

    def warm_up(self) -> None:
        super().warm_up()
        for queries, list_ids in warm_up_inputs(self.centroids, 2):  # the parallel kernel too
            self._kernel(scan_fastscan, queries, list_ids, 1)

    def _kernel(self, kernel, queries, list_ids, k):
        return kernel(
            self.simd,
            queries,
            list_ids,
            self.centroids,
            self.codebooks_t,
            self.list_terms,
            self.offsets,
            self.block_offsets,
            self.packed,
            self.ids,
            k,
            self.params.inner_product,
            self.exact,
        )

    def search_checked(self, queries, list_ids, k):
        if self.in_parallel(queries, list_ids):
            with dynamic_schedule():
                keys, ids = self._kernel(scan_fastscan, queries, list_ids, k)
        else:
            keys, ids = self._kernel(scan_fastscan_serial, queries, list_ids, k)
        return (-keys if self.params.inner_product else keys), ids
