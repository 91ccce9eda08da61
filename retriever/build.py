"""Train and fill an IVF-PQ index: faiss k-means and PQ training on a seeded sample, residual
encoding. In one process (``build_index``) or in parts: train once (``train_quantizers``), encode
row ranges in as many processes as there are parts (``encode_part``, reading memory-mapped files a
chunk at a time), then join them (``join_parts``, a shard at a time)."""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
from tqdm.auto import tqdm

from retriever.coarse import CoarseQuantizer
from retriever.errors import InvalidInput
from retriever.index import InvertedLists, IVFPQIndex, IVFPQParams, gather_shard, index_writer, load_index, split_shards
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
    trained = train_quantizers(vectors, params, train_size, seed)
    assignment, codes = encode_vectors(vectors, params, trained.centroids, trained.codebooks, progress)
    lists = InvertedLists.from_assignment(assignment, np.asarray(ids, dtype=np.int64), codes, params.nlist)
    info = {**trained.build_info, "build_seconds": round(time.perf_counter() - started, 3)}
    return IVFPQIndex(params, trained.centroids, trained.codebooks, split_shards(lists, nshards), info)


def train_quantizers(vectors: np.ndarray, params: IVFPQParams, train_size: int | None = None, seed: int = 1234) -> IVFPQIndex:
    """An index of no vectors whose quantizers (k-means centroids, PQ codebooks) are trained on a
    seeded sample of ``vectors``: the first step of a build in parts. ``vectors`` may be
    memory-mapped: only the sample's rows are read."""
    n = _rows_of(vectors, params.dim)
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
    rows = np.sort(rng.choice(n, train_size, replace=False))
    sample = prepare_vectors(as_query_matrix(vectors[rows], params.dim, what="training vectors"), params.metric)
    centroids = train_coarse(sample, params, seed)
    sample_assignment = CoarseQuantizer(centroids, params.metric, device="cpu").search(sample, 1)[0][:, 0]
    codebooks = train_pq(sample - centroids[sample_assignment], params, seed)
    empty = InvertedLists(
        np.zeros(params.nlist + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), np.zeros((0, params.code_size), np.uint8)
    )
    return IVFPQIndex(params, centroids, codebooks, [empty], {"seed": seed, "train_size": train_size, "trained_on": n})


def encode_part(trained: IVFPQIndex, vectors: np.ndarray, part: int, parts: int, progress: bool = False) -> IVFPQIndex:
    """Part ``part`` of ``parts`` of a build: its share of the rows of ``vectors`` (memory-mapped:
    read a chunk at a time) encoded with ``trained``'s quantizers, as a one-shard index whose ids
    are the row numbers. :func:`join_parts` puts the parts together."""
    n = _rows_of(vectors, trained.params.dim)
    if trained.ntotal:
        raise InvalidInput("encode with the quantizers of `index train` (an index of no vectors), not with a filled index")
    if not 0 <= part < parts <= n:
        raise InvalidInput(f"part must be in [0, parts) and parts at most the {n} rows, got part {part} of {parts}")
    start, stop = part * n // parts, (part + 1) * n // parts
    assignment, codes = encode_vectors(vectors, trained.params, trained.centroids, trained.codebooks, progress, (start, stop))
    lists = InvertedLists.from_assignment(assignment, np.arange(start, stop, dtype=np.int64), codes, trained.params.nlist)
    info = {**trained.build_info, "part": {"rows": [start, stop], "of": n, "trained": _quantizer_digest(trained)}}
    return IVFPQIndex(trained.params, trained.centroids, trained.codebooks, [lists], info)


def join_parts(parts: list[str | os.PathLike], nshards: int, out: str | os.PathLike, force: bool = False) -> Path:
    """The parts of a build (:func:`encode_part`, in any order) joined into one index of
    ``nshards`` shards at ``out``, written a shard at a time (memory: one output shard). The parts
    must share their quantizers and cover every row once; the result equals ``build_index`` of
    all the rows with those quantizers, array for array."""
    loaded = [load_index(path) for path in parts]
    if not loaded:
        raise InvalidInput("no parts to join")
    infos = [index.build_info.get("part") for index in loaded]
    if any(info is None for info in infos):
        raise InvalidInput("only the parts `index encode` writes can be joined")
    if len({info["trained"] for info in infos}) != 1 or len({index.params for index in loaded}) != 1:
        raise InvalidInput("the parts were encoded with different quantizers (every part needs the same `index train` output)")
    order = sorted(range(len(loaded)), key=lambda i: infos[i]["rows"][0])
    loaded, infos = [loaded[i] for i in order], [infos[i] for i in order]
    covered = 0
    for info in infos:
        start, stop = info["rows"]
        if start != covered:
            what = f"rows {covered}-{start - 1} are in no part" if start > covered else f"rows {start}-{covered - 1} are in two parts"
            raise InvalidInput(f"the parts do not cover the vectors once: {what}")
        covered = stop
    if covered != infos[0]["of"]:
        raise InvalidInput(f"the parts do not cover the vectors once: rows {covered}-{infos[0]['of'] - 1} are in no part")
    lists = [index.shards[0] for index in loaded]
    first = loaded[0]
    info = {key: value for key, value in first.build_info.items() if key != "part"}
    with index_writer(out, first.params, first.centroids, first.codebooks, {**info, "joined_parts": len(loaded)}, force) as write_shard:
        for shard in range(nshards):
            write_shard(gather_shard(lists, shard, nshards))
    return Path(out)


def _rows_of(vectors, dim: int) -> int:
    if getattr(vectors, "ndim", None) != 2 or vectors.shape[1] != dim:
        raise InvalidInput(f"database vectors must have shape (n, {dim}), got {getattr(vectors, 'shape', None)}")
    return int(vectors.shape[0])


def _quantizer_digest(index: IVFPQIndex) -> str:
    digest = hashlib.sha256(np.ascontiguousarray(index.centroids).tobytes())
    digest.update(np.ascontiguousarray(index.codebooks).tobytes())
    return digest.hexdigest()[:16]


def encode_vectors(
    vectors: np.ndarray,
    params: IVFPQParams,
    centroids: np.ndarray,
    codebooks: np.ndarray,
    progress: bool = False,
    rows: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's list (its nearest centroid) and the PQ code of its residual, with trained
    quantizers, for every row of ``vectors`` or the ``rows`` (start, stop) of it, read a chunk at a
    time. For ``cos`` the vectors are L2-normalised first."""
    quantizer = CoarseQuantizer(centroids, params.metric, device="cpu")
    pq = _faiss_pq(params, codebooks)
    first, stop = rows or (0, vectors.shape[0])
    assignment = np.empty(stop - first, dtype=np.int64)
    codes = np.empty((stop - first, params.code_size), dtype=np.uint8)
    for start in tqdm(range(first, stop, ENCODE_CHUNK), desc="encode", unit="chunk", disable=not progress):
        end = min(start + ENCODE_CHUNK, stop)
        chunk = prepare_vectors(as_query_matrix(vectors[start:end], params.dim, "database vectors", start), params.metric)
        done = slice(start - first, end - first)
        assignment[done] = quantizer.search(chunk, 1)[0][:, 0]
        codes[done] = pq.compute_codes(chunk - centroids[assignment[done]])
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
