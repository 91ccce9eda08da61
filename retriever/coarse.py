"""Coarse search: which ``nprobe`` inverted lists each query visits.

Shared by every tier. On a CUDA host with torch installed the centroids live on the GPU and the
search is one matrix product plus top-k; elsewhere faiss's BLAS-backed flat index does it.
"""

from __future__ import annotations

import faiss
import numpy as np

from retriever.errors import RetrieverError

DEVICES = ("auto", "cpu", "cuda")


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
            raise RetrieverError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
        if device == "cuda" and not cuda_available():
            raise RetrieverError("device 'cuda' was asked for, but torch with CUDA is not available here")
        self.metric = metric
        self.nlist, self.dim = centroids.shape
        self.device = "cuda" if device == "cuda" or (device == "auto" and cuda_available()) else "cpu"
        if self.device == "cuda":
            import torch

            self._centroids = torch.as_tensor(np.asarray(centroids, dtype=np.float32), device="cuda")
            self._centroid_norms = (self._centroids * self._centroids).sum(dim=1)
        else:
            self._index = faiss.IndexFlatL2(self.dim) if metric == "l2" else faiss.IndexFlatIP(self.dim)
            self._index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def search(self, queries: np.ndarray, nprobe: int) -> tuple[np.ndarray, np.ndarray]:
        if not isinstance(nprobe, (int, np.integer)) or not 1 <= nprobe <= self.nlist:
            raise RetrieverError(f"nprobe must be between 1 and nlist={self.nlist}, got {nprobe!r}")
        if self.device == "cuda":
            return self._search_cuda(queries, int(nprobe))
        scores, list_ids = self._index.search(queries, int(nprobe))
        return list_ids.astype(np.int64, copy=False), scores

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
