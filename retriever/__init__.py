"""Retrieval tier: the IVF-PQ index format, its builder, coarse search and the scan engines.

Knows nothing about LLMs. Numpy in, numpy out::

    index = build_index(vectors, IVFPQParams("cos", dim=50, nlist=1024, m=25))
    save_index(index, "glove.ivfpq")
    result = Searcher(load_index("glove.ivfpq")).search(queries, k=10, nprobe=16)  # result.distances, result.ids
"""

from retriever.build import build_index
from retriever.coarse import CoarseQuantizer
from retriever.engines import FaissEngine, NumbaEngine, make_scan_engine
from retriever.errors import InvalidInput
from retriever.index import InvertedLists, IVFPQIndex, IVFPQParams, load_index, save_index, verify_index
from retriever.search import Retrieval, Searcher, SearchResult, merge_topk

__all__ = [
    "build_index",
    "CoarseQuantizer",
    "FaissEngine",
    "NumbaEngine",
    "make_scan_engine",
    "InvalidInput",
    "IVFPQIndex",
    "IVFPQParams",
    "InvertedLists",
    "load_index",
    "save_index",
    "verify_index",
    "Retrieval",
    "Searcher",
    "SearchResult",
    "merge_topk",
]
