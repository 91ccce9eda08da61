"""``faiss``: faiss's ``IndexIVFPQ`` over our own quantizers and codes, the reference the kernels are tested against."""

from __future__ import annotations

import faiss
import numpy as np

from retriever.engines.base import ScanEngine
from retriever.index import IVFPQIndex
from retriever.kernels.adc import coarse_keys


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
