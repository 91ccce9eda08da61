"""Checks and conversions every vector takes before it reaches a quantizer or a scan engine."""

from __future__ import annotations

import numpy as np

from retriever.errors import RetrieverError


def as_query_matrix(vectors, dim: int, what: str = "queries") -> np.ndarray:
    """Return ``vectors`` as a (n, dim) float array, or raise a clear error for wrong shapes or NaN/inf."""
    array = np.asarray(vectors)
    if array.ndim == 1 and array.shape[0] == dim:
        array = array[None, :]
    if array.ndim != 2 or array.shape[1] != dim:
        raise RetrieverError(f"{what} must have shape (n, {dim}), got {array.shape}")
    if array.shape[0] == 0:
        raise RetrieverError(f"{what} are empty")
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise RetrieverError(f"{what} must be numeric, got dtype {array.dtype}")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise RetrieverError(f"{what} contain NaN or inf (first at row {bad})")
    return array


def prepare_vectors(vectors: np.ndarray, metric: str) -> np.ndarray:
    """Contiguous float32, L2-normalised for ``cos``."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cos":
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        if np.any(norms == 0):
            raise RetrieverError(f"the cos metric cannot use a zero vector (row {int(np.flatnonzero(norms == 0)[0])})")
        out = out / norms
    return out
