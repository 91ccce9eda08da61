"""Train and fill an IVF-PQ index: faiss k-means and PQ training on a seeded sample, residual encoding."""

from __future__ import annotations

import time
import warnings

import faiss
import numpy as np
from tqdm.auto import tqdm

from retriever.coarse import CoarseQuantizer
from retriever.errors import InvalidInput
from retriever.index import InvertedLists, IVFPQIndex, IVFPQParams, split_shards
from retriever.vectors import as_query_matrix, prepare_vectors

ENCODE_CHUNK = 65536
KMEANS_ITERATIONS = 20
PQ_ITERATIONS = 25
PQ_MIN_POINTS_PER_CODE = 39  # faiss's ClusteringParameters.min_points_per_centroid


def default_train_size(ntotal: int, nlist: int) -> int:
    """Enough points for k-means to see ~100 per centroid and PQ ~400 per code, capped by the data."""
    return int(min(ntotal, max(100 * nlist, 100_000)))


def build_index(
    vectors: np.ndarray,
    params: IVFPQParams,
    ids: np.ndarray | None = None,
    train_size: int | None = None,
    nshards: int = 1,
    seed: int = 1234,
    progress: bool = False,
) -> IVFPQIndex:
    """Train on a seeded sample of ``vectors``, encode all of them, return an index of ``nshards`` shards.

    ``ids`` defaults to the row numbers. For ``cos`` the vectors are L2-normalised first.
    """
    started = time.perf_counter()
    vectors = as_query_matrix(vectors, params.dim, what="database vectors")
    n = vectors.shape[0]
    if ids is None:
        ids = np.arange(n, dtype=np.int64)
    elif np.shape(ids) != (n,):
        raise InvalidInput(f"ids must have shape ({n},), got {np.shape(ids)}")
    if params.nlist > n:
        raise InvalidInput(f"nlist={params.nlist} is larger than the number of vectors ({n})")
    if n < params.ksub:
        raise InvalidInput(f"PQ with nbits={params.nbits} needs at least {params.ksub} training vectors, got {n}")
    train_size = default_train_size(n, params.nlist) if train_size is None else train_size
    if not params.nlist <= train_size <= n or train_size < params.ksub:
        raise InvalidInput(
            f"train size must be between max(nlist, 2**nbits)={max(params.nlist, params.ksub)} and the number of vectors {n}, got {train_size}"
        )

    rng = np.random.default_rng(seed)
    sample = prepare_vectors(vectors[np.sort(rng.choice(n, train_size, replace=False))], params.metric)
    centroids = train_coarse(sample, params, seed)
    sample_assignment = CoarseQuantizer(centroids, params.metric, device="cpu").search(sample, 1)[0][:, 0]
    codebooks = train_pq(sample - centroids[sample_assignment], params, seed)

    assignment, codes = encode_vectors(vectors, params, centroids, codebooks, progress)
    lists = InvertedLists.from_assignment(assignment, np.asarray(ids, dtype=np.int64), codes, params.nlist)
    info = {"seed": seed, "train_size": train_size, "build_seconds": round(time.perf_counter() - started, 3)}
    return IVFPQIndex(params, centroids, codebooks, split_shards(lists, nshards), info)


def encode_vectors(
    vectors: np.ndarray, params: IVFPQParams, centroids: np.ndarray, codebooks: np.ndarray, progress: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's list (its nearest centroid) and the PQ code of its residual, with trained
    quantizers. For ``cos`` the vectors are L2-normalised first."""
    quantizer = CoarseQuantizer(centroids, params.metric, device="cpu")
    pq = _faiss_pq(params, codebooks)
    n = vectors.shape[0]
    assignment = np.empty(n, dtype=np.int64)
    codes = np.empty((n, params.code_size), dtype=np.uint8)
    for start in tqdm(range(0, n, ENCODE_CHUNK), desc="encode", unit="chunk", disable=not progress):
        chunk = prepare_vectors(vectors[start : start + ENCODE_CHUNK], params.metric)
        rows = slice(start, start + len(chunk))
        assignment[rows] = quantizer.search(chunk, 1)[0][:, 0]
        codes[rows] = pq.compute_codes(chunk - centroids[assignment[rows]])
    return assignment, codes


def add_vectors(index: IVFPQIndex, vectors: np.ndarray, ids: np.ndarray | None = None, progress: bool = False) -> IVFPQIndex:
    """``index`` with ``vectors`` added, encoded with its trained quantizers (no retraining), and
    every list split again into the same number of balanced shards.

    ``ids`` defaults to the ids after the largest in the index; ids already in it are refused. An
    entry added to a list comes after the ones it held. The quantizers were trained on the first
    vectors: if the added ones come from elsewhere, recall drops, and a rebuild trains again.
    """
    vectors = as_query_matrix(vectors, index.params.dim, what="vectors to add")
    whole = index.whole()
    n = vectors.shape[0]
    if ids is None:
        first = int(whole.ids.max()) + 1 if whole.ntotal else 0
        ids = np.arange(first, first + n, dtype=np.int64)
    elif np.shape(ids) != (n,) or np.asarray(ids).dtype.kind not in "iu":
        raise InvalidInput(f"ids must be {n} integers, got shape {np.shape(ids)} and dtype {np.asarray(ids).dtype}")
    ids = np.asarray(ids, dtype=np.int64)
    if np.unique(ids).shape[0] != n:
        raise InvalidInput("the ids to add repeat themselves")
    taken = np.intersect1d(ids, whole.ids)
    if taken.size:
        raise InvalidInput(f"{taken.size} of the ids to add are in the index already (the first: {int(taken[0])})")
    assignment, codes = encode_vectors(vectors, index.params, index.centroids, index.codebooks, progress)
    lists = InvertedLists.from_assignment(
        np.concatenate([whole.assignment(), assignment]),
        np.concatenate([whole.ids, ids]),
        np.concatenate([whole.codes, codes]),
        index.params.nlist,
    )
    info = {**_new_version(index.build_info), "added": int(index.build_info.get("added", 0)) + n}
    return IVFPQIndex(index.params, index.centroids, index.codebooks, split_shards(lists, index.nshards), info)


def train_coarse(sample: np.ndarray, params: IVFPQParams, seed: int) -> np.ndarray:
    kmeans = faiss.Kmeans(params.dim, params.nlist, niter=KMEANS_ITERATIONS, seed=seed, spherical=params.metric == "cos", verbose=False)
    kmeans.train(sample)
    return np.ascontiguousarray(kmeans.centroids, dtype=np.float32)


def train_pq(residuals: np.ndarray, params: IVFPQParams, seed: int) -> np.ndarray:
    pq = faiss.ProductQuantizer(params.dim, params.m, params.nbits)
    recommended = PQ_MIN_POINTS_PER_CODE * params.ksub
    if len(residuals) < recommended:
        # faiss would print this once per sub-quantizer; say it once.
        warnings.warn(
            f"training PQ on {len(residuals)} vectors, fewer than the {recommended} faiss recommends: recall may suffer", stacklevel=2
        )
    pq.cp.min_points_per_centroid = 1
    pq.cp.seed = seed
    pq.cp.niter = PQ_ITERATIONS
    pq.train(np.ascontiguousarray(residuals, dtype=np.float32))
    return faiss.vector_to_array(pq.centroids).reshape(params.m, params.ksub, params.dsub).copy()


def _faiss_pq(params: IVFPQParams, codebooks: np.ndarray) -> faiss.ProductQuantizer:
    pq = faiss.ProductQuantizer(params.dim, params.m, params.nbits)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks, dtype=np.float32).ravel(), pq.centroids)
    return pq


def remove_ids(index: IVFPQIndex, ids: np.ndarray, renumber: bool = False) -> IVFPQIndex:
    """``index`` without the entries whose ids are in ``ids``, every list split again into the same
    number of balanced shards. Ids not in the index are refused, and so is removing every entry.

    With ``renumber`` the remaining ids become their ranks among themselves (0, 1, …, in the order
    of the old ids): a passage index's ids are positions in its document store, which closes up.
    """
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InvalidInput(f"the ids to remove must be a list of integers, got shape {ids.shape} and dtype {ids.dtype}")
    whole = index.whole()
    missing = np.setdiff1d(ids, whole.ids)
    if missing.size:
        raise InvalidInput(f"{missing.size} of the ids to remove are not in the index (the first: {int(missing[0])})")
    keep = ~np.isin(whole.ids, ids)
    if not keep.any():
        raise InvalidInput("that would remove every vector: build a new index instead")
    kept_ids = whole.ids[keep]
    if renumber:
        kept_ids = np.searchsorted(np.sort(kept_ids), kept_ids)
    lists = InvertedLists.from_assignment(whole.assignment()[keep], kept_ids, whole.codes[keep], index.params.nlist)
    info = {**_new_version(index.build_info), "removed": int(index.build_info.get("removed", 0)) + int(np.unique(ids).size)}
    return IVFPQIndex(index.params, index.centroids, index.codebooks, split_shards(lists, index.nshards), info)


def _new_version(build_info: dict) -> dict:
    """The build information of a version made from another by adding or removing vectors: no
    longer a re-sharded copy of the version it came from."""
    return {key: value for key, value in build_info.items() if key != "resharded_from"}
