import faiss
import numba
import numpy as np
import pytest

import retriever.engines.adc as numba_engine
import retriever.engines.base as engine_base
from retriever.build import build_index
from retriever.coarse import CoarseQuantizer, cuda_available
from retriever.datasets import exact_knn
from retriever.engines import FaissEngine, NumbaEngine, make_scan_engine
from retriever.errors import InvalidInput, Unsupported
from retriever.index import IVFPQParams
from retriever.kernels.adc import scan_ivfpq
from retriever.search import Searcher
from retriever.vectors import prepare_vectors
from tests.helpers import same_up_to_ties


def probe(index, queries, nprobe):
    queries = prepare_vectors(queries, index.params.metric)
    return queries, CoarseQuantizer(index.centroids, index.params.metric, device="cpu").search(queries, nprobe)[0]


@pytest.mark.parametrize("nprobe, k", [(1, 10), (8, 10), (64, 100)])
def test_numba_matches_faiss_on_the_same_codes(small_index, small_data, nprobe, k):
    queries, list_ids = probe(small_index, small_data.queries, nprobe)
    nd, ni = NumbaEngine(small_index).search(queries, list_ids, k)
    fd, fi = FaissEngine(small_index).search(queries, list_ids, k)
    assert same_up_to_ties(nd, ni, fd, fi).all()
    assert (ni == fi).all(axis=1).mean() > 0.9  # most rows have no ties at all


def test_residual_tables_give_the_precomputed_answer(l2_index, small_data, monkeypatch):
    queries, list_ids = probe(l2_index, small_data.queries, 8)
    precomputed = NumbaEngine(l2_index)
    monkeypatch.setattr(numba_engine, "PRECOMPUTED_TABLE_MAX_BYTES", 0)
    residual = NumbaEngine(l2_index)
    assert precomputed.list_terms.shape[0] == 64 and residual.list_terms.shape[0] == 0
    pd, pi = precomputed.search(queries, list_ids, 10)
    rd, ri = residual.search(queries, list_ids, 10)
    assert same_up_to_ties(pd, pi, rd, ri, rtol=1e-4).all()


def test_results_are_sorted_and_unique(small_index, small_data):
    queries, list_ids = probe(small_index, small_data.queries, 4)
    d, i = NumbaEngine(small_index).search(queries, list_ids, 50)
    ordered = np.diff(d, axis=1) >= 0 if small_index.params.metric == "l2" else np.diff(d, axis=1) <= 0
    assert ordered.all()
    for row in i:
        found = row[row >= 0]
        assert len(np.unique(found)) == len(found)


def test_fewer_candidates_than_k_are_padded(l2_index, small_data):
    queries, list_ids = probe(l2_index, small_data.queries[:5], 1)
    sizes = l2_index.whole().list_sizes()[list_ids[:, 0]]
    k = int(sizes.max()) + 5
    d, i = NumbaEngine(l2_index).search(queries, list_ids, k)
    for row_d, row_i, size in zip(d, i, sizes):
        assert (row_i[:size] >= 0).all() and (row_i[size:] == -1).all()
        assert np.isinf(row_d[size:]).all()
    skipped = np.full_like(list_ids, -1)
    _, i = NumbaEngine(l2_index).search(queries, skipped, 3)
    assert (i == -1).all()


def test_ties_break_by_smaller_id(rng):
    base = np.repeat(rng.normal(size=(300, 8)).astype(np.float32), 4, axis=0)  # every vector 4 times
    ids = rng.permutation(len(base)).astype(np.int64)
    index = build_index(base, IVFPQParams("l2", 8, nlist=4, m=4), ids=ids, train_size=1200)
    queries, list_ids = probe(index, base[:20], 4)
    for engine in (NumbaEngine(index), FaissEngine(index)):
        d, i = engine.search(queries, list_ids, 8)
        for row_d, row_i in zip(d, i):
            for a in range(7):
                if row_d[a] == row_d[a + 1]:
                    assert row_i[a] < row_i[a + 1], engine.name


@pytest.mark.parametrize("metric", ["l2", "ip", "cos"])
def test_recall_is_as_good_as_native_faiss(small_data, metric):
    """Our trained index finds the true neighbours as well as faiss's own IVF64,PQ16 (same training size) does."""
    truth = exact_knn(small_data.base, small_data.queries, 10, metric)

    def recall(ids):
        return np.mean([len(np.intersect1d(a, b)) / 10 for a, b in zip(ids, truth)])

    index = build_index(small_data.base, IVFPQParams(metric, 32, nlist=64, m=16), train_size=10_000, seed=3)
    ours = recall(Searcher(index).search(small_data.queries, 10, 16).ids)
    base = prepare_vectors(small_data.base, metric)
    native = faiss.index_factory(32, "IVF64,PQ16", faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)
    native.do_polysemous_training = False  # polysemous codes only reorder bits; they cost 4x the training time
    native.train(base[:10_000])
    native.add(base)
    native.nprobe = 16
    theirs = recall(native.search(prepare_vectors(small_data.queries, metric), 10)[1])
    assert ours >= theirs - 0.05, (ours, theirs)
    assert ours > 0.3


@pytest.mark.parametrize(
    "queries, k, nprobe, message",
    [
        (np.zeros((3, 31), np.float32), 10, 4, r"shape \(n, 32\)"),
        (np.full((2, 32), np.nan, np.float32), 10, 4, "NaN or inf"),
        (np.full((2, 32), np.inf, np.float32), 10, 4, "NaN or inf"),
        (np.zeros((0, 32), np.float32), 10, 4, "empty"),
        (np.ones((2, 32), np.float32), 0, 4, "k must be between 1"),
        (np.ones((2, 32), np.float32), 20_001, 4, "k must be between 1"),
        (np.ones((2, 32), np.float32), 10, 65, "nprobe must be between 1 and nlist=64"),
        (np.ones((2, 32), np.float32), 10, 0, "nprobe must be between 1"),
        (np.array([["a"] * 32]), 10, 4, "must be numeric"),
        (np.ones((2, 32), bool), 10, 4, "must be numeric"),
        (np.ones((2, 32), np.complex64), 10, 4, "must be numeric"),
    ],
)
def test_bad_search_input_gets_a_clear_error(l2_index, queries, k, nprobe, message):
    with pytest.raises(InvalidInput, match=message):
        Searcher(l2_index).search(queries, k, nprobe)


def test_engine_rejects_bad_list_ids(l2_index):
    engine = NumbaEngine(l2_index)
    queries = np.ones((2, 32), np.float32)
    with pytest.raises(InvalidInput, match=r"list ids must lie in \[-1, 64\)"):
        engine.search(queries, np.array([[0, 64], [1, 2]]), 5)
    with pytest.raises(InvalidInput, match="list ids must have shape"):
        engine.search(queries, np.array([[0, 1]]), 5)
    with pytest.raises(InvalidInput, match="must be integers"):
        engine.search(queries, np.array([[0.0], [1.0]]), 5)
    for k in (0, 10**9, 2.5):
        with pytest.raises(InvalidInput, match="k must be an integer between 1 and 65536"):
            engine.search(queries, np.array([[0], [1]]), k)
    with pytest.raises(InvalidInput, match="unknown engine"):
        make_scan_engine("gpu-magic", l2_index)


def test_cos_rejects_zero_vectors(small_data):
    index = build_index(small_data.base, IVFPQParams("cos", 32, nlist=16, m=8), train_size=5000)
    with pytest.raises(InvalidInput, match="zero vector"):
        Searcher(index).search(np.zeros((1, 32), np.float32), 5, 2)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_prepared_vectors_are_contiguous_float32_and_unit_rows_for_cos(dtype):
    vectors = (np.random.default_rng(4).standard_normal((50, 7)) * 100).astype(dtype)[:, ::-1]  # not contiguous
    for metric in ("l2", "ip"):
        prepared = prepare_vectors(vectors, metric)
        assert prepared.dtype == np.float32 and prepared.flags.c_contiguous
        np.testing.assert_array_equal(prepared, vectors.astype(np.float32))
    unit = prepare_vectors(vectors, "cos")
    assert unit.dtype == np.float32 and unit.flags.c_contiguous
    np.testing.assert_allclose(unit, vectors / np.linalg.norm(vectors.astype(np.float64), axis=1, keepdims=True), rtol=1e-6, atol=1e-7)
    vectors[3] = 0
    with pytest.raises(InvalidInput, match=r"zero vector \(row 3\)"):
        prepare_vectors(vectors, "cos")


@pytest.mark.parametrize("metric", ["l2", "ip"])
@pytest.mark.parametrize("nq", [1, 16, 200])  # 200: the parallel kernel with two threads
def test_coarse_search_matches_faiss_flat_index(small_data, metric, nq):
    centroids, queries = small_data.base[:300], small_data.queries[:nq]
    flat = faiss.IndexFlatL2(small_data.dim) if metric == "l2" else faiss.IndexFlatIP(small_data.dim)
    flat.add(centroids)
    faiss_scores, faiss_ids = flat.search(queries, 16)
    ids, scores = CoarseQuantizer(centroids, metric, device="cpu").search(queries, 16)
    assert ids.dtype == np.int64 and scores.dtype == np.float32 and ids.shape == scores.shape == (nq, 16)
    assert (ids == faiss_ids).mean() > 0.99  # near-ties may round either way (faiss's BLAS differs by CPU)
    np.testing.assert_allclose(scores, faiss_scores, rtol=1e-4, atol=1e-3)
    # Exactly the best 16 by float64 scores, best first, up to rounding.
    exact = queries.astype(np.float64) @ centroids.T.astype(np.float64)
    if metric == "l2":
        exact = -((queries.astype(np.float64)[:, None, :] - centroids[None].astype(np.float64)) ** 2).sum(axis=2)
    ours = np.take_along_axis(exact, ids, axis=1)
    best = -np.sort(-exact, axis=1)[:, :16]
    np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="the parallel kernel needs two threads")
def test_coarse_search_of_a_query_does_not_depend_on_its_batch(small_data):
    numba.set_num_threads(2)
    quantizer = CoarseQuantizer(small_data.base[:500], "l2", device="cpu")
    batch_ids, batch_scores = quantizer.search(small_data.queries, 8)  # 200 queries: parallel
    for q in range(0, 200, 7):
        ids, scores = quantizer.search(small_data.queries[q : q + 1], 8)
        np.testing.assert_array_equal(ids[0], batch_ids[q])
        np.testing.assert_array_equal(scores[0], batch_scores[q])


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_coarse_search_breaks_ties_by_smaller_list_id(metric):
    centroids = np.array([[0, 1], [1, 0], [0, 1], [1, 0], [1, 0]], np.float32)
    ids, scores = CoarseQuantizer(centroids, metric, device="cpu").search(np.array([[1, 0]], np.float32), 5)
    np.testing.assert_array_equal(ids, [[1, 3, 4, 0, 2]])
    np.testing.assert_array_equal(scores, [[0, 0, 0, 2, 2]] if metric == "l2" else [[1, 1, 1, 0, 0]])
    assert not np.signbit(scores).any()  # a distance of zero is +0


@pytest.mark.skipif(not cuda_available(), reason="needs torch with CUDA")
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_cuda_coarse_search_matches_cpu(small_data, metric):
    centroids = small_data.base[:256]
    queries = small_data.queries
    cpu_ids, cpu_scores = CoarseQuantizer(centroids, metric, device="cpu").search(queries, 16)
    gpu_ids, gpu_scores = CoarseQuantizer(centroids, metric, device="cuda").search(queries, 16)
    assert (cpu_ids == gpu_ids).mean() > 0.99
    np.testing.assert_allclose(cpu_scores, gpu_scores, rtol=1e-3, atol=1e-2)


def test_cuda_request_without_cuda_is_an_error(small_data):
    if cuda_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(Unsupported, match="CUDA is not available"):
        CoarseQuantizer(small_data.base[:16], "l2", device="cuda")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="the parallel kernel needs two threads")
def test_serial_and_parallel_kernels_give_the_same_answers(small_index, small_data, monkeypatch):
    queries, list_ids = probe(small_index, small_data.queries[:40], 6)
    engine = NumbaEngine(small_index)
    parallel_calls = []

    def counting_parallel_kernel(*args):
        parallel_calls.append(1)
        return scan_ivfpq(*args)

    monkeypatch.setattr(numba_engine, "scan_ivfpq", counting_parallel_kernel)
    numba.set_num_threads(2)
    monkeypatch.setattr(engine_base, "PARALLEL_MIN_CODES", 0)
    batch_d, batch_i = engine.search(queries, list_ids, 20)
    assert parallel_calls == [1]
    monkeypatch.setattr(engine_base, "PARALLEL_MIN_CODES", 1 << 62)
    serial_d, serial_i = engine.search(queries, list_ids, 20)
    assert parallel_calls == [1]
    np.testing.assert_array_equal(serial_i, batch_i)
    np.testing.assert_array_equal(serial_d, batch_d)
    for q in range(0, 40, 3):
        d, i = engine.search(queries[q : q + 3], list_ids[q : q + 3], 20)
        np.testing.assert_array_equal(i, batch_i[q : q + 3])


def test_warm_up_compiles_the_kernels_for_the_read_only_arrays_a_node_receives(l2_index):
    """A node's requests arrive as read-only arrays (straight from the wire), which Numba compiles
    apart from writable ones: compiled on a first request instead, they cost seconds, enough for a
    coordinator to time a fresh node out (seen with containers, whose Numba cache starts empty)."""
    from retriever.kernels.adc import scan_ivfpq_serial

    NumbaEngine(l2_index).warm_up()
    for kernel in (scan_ivfpq, scan_ivfpq_serial):
        assert {signature[0].mutable for signature in kernel.signatures} == {True, False}  # the queries' array type
