"""``numba``: the Numba ADC kernel (:mod:`retriever.kernels.adc`) over a shard's 8-bit (or unpacked) codes."""

from __future__ import annotations

import numpy as np

from retriever.engines.base import PRECOMPUTED_TABLE_MAX_BYTES, ScanEngine, l2_list_terms, warm_up_inputs
from retriever.index import IVFPQIndex, unpack_codes
from retriever.kernels.adc import scan_ivfpq, scan_ivfpq_serial


class NumbaEngine(ScanEngine):
    """Our CPU engine: the Numba ADC kernel of :mod:`retriever.kernels.adc`."""

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
        for queries, list_ids in warm_up_inputs(self.centroids, 2):  # the parallel kernel too
            self._kernel(scan_ivfpq, queries, list_ids, 1)

    def _kernel(self, kernel, queries, list_ids, k):
        return kernel(
            queries,
            list_ids,
            self.centroids,
            self.codebooks_t,
            self.list_terms,
            self.offsets,
            self.ids,
            self.codes,
            k,
            self.params.inner_product,
        )

    def search_checked(self, queries, list_ids, k):
        keys, ids = self._kernel(scan_ivfpq if self.in_parallel(queries, list_ids) else scan_ivfpq_serial, queries, list_ids, k)
        return (-keys if self.params.inner_product else keys), ids
