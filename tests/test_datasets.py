from pathlib import Path

import h5py
import numpy as np
import pytest
from faiss.contrib import vecs_io

from retriever.datasets import (
    GLOVE_QUERIES,
    exact_knn,
    glove50,
    load_dataset,
    read_npy,
    read_vecs,
    read_vectors,
)
from retriever.errors import InvalidInput, NotFound
from tests.helpers import write_ann_hdf5


def test_fvecs_and_ivecs_written_by_faiss(tmp_path, rng):
    floats = rng.normal(size=(37, 12)).astype(np.float32)
    ints = rng.integers(0, 1000, size=(37, 5)).astype(np.int32)
    vecs_io.fvecs_write(str(tmp_path / "x.fvecs"), floats)
    vecs_io.ivecs_write(str(tmp_path / "gt.ivecs"), ints)
    np.testing.assert_array_equal(read_vecs(tmp_path / "x.fvecs"), floats)
    np.testing.assert_array_equal(read_vectors(tmp_path / "x.fvecs"), floats)
    np.testing.assert_array_equal(read_vecs(tmp_path / "gt.ivecs"), ints)


def test_bvecs_as_faiss_reads_them(tmp_path, rng):
    data = rng.integers(0, 256, size=(20, 16)).astype(np.uint8)
    rows = np.hstack([np.full((20, 4), 0, np.uint8), data])
    rows[:, :4] = np.frombuffer(np.int32(16).tobytes(), np.uint8)
    (tmp_path / "x.bvecs").write_bytes(rows.tobytes())
    ours = read_vecs(tmp_path / "x.bvecs")
    np.testing.assert_array_equal(ours, data)
    np.testing.assert_array_equal(ours, vecs_io.bvecs_mmap(str(tmp_path / "x.bvecs")))


def test_vecs_errors(tmp_path, rng):
    path = tmp_path / "x.fvecs"
    vecs_io.fvecs_write(str(path), rng.normal(size=(10, 8)).astype(np.float32))
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])
    with pytest.raises(InvalidInput, match="truncated"):
        read_vecs(path)
    path.write_bytes(b"")
    with pytest.raises(InvalidInput, match="empty or truncated"):
        read_vecs(path)
    broken = bytearray(whole)
    broken[36 * 3 : 36 * 3 + 4] = np.int32(9).tobytes()  # row 3 claims another dimension
    path.write_bytes(bytes(broken))
    with pytest.raises(InvalidInput, match="row 3 has dimension 9"):
        read_vecs(path)
    with pytest.raises(NotFound, match="does not exist"):
        read_vecs(tmp_path / "missing.fvecs")
    with pytest.raises(InvalidInput, match="unsupported vector file"):
        read_vectors(tmp_path / "x.csv")


def test_npy_errors(tmp_path):
    np.save(tmp_path / "one_d.npy", np.zeros(5, np.float32))
    with pytest.raises(InvalidInput, match="2-D array"):
        read_npy(tmp_path / "one_d.npy")
    np.save(tmp_path / "ok.npy", np.zeros((100, 8), np.float32))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "ok.npy").read_bytes()[:-50])
    with pytest.raises(InvalidInput, match="truncated"):
        read_npy(tmp_path / "cut.npy")
    (tmp_path / "empty.npy").write_bytes(b"")
    with pytest.raises(InvalidInput, match="not a readable .npy"):
        read_npy(tmp_path / "empty.npy")


def test_ann_benchmarks_hdf5(tmp_path, rng):
    train = rng.normal(size=(500, 10)).astype(np.float32)
    test = rng.normal(size=(20, 10)).astype(np.float32)
    neighbors = exact_knn(train, test, 100, "cos").astype(np.int32)
    write_ann_hdf5(tmp_path / "tiny-angular.hdf5", train, test, neighbors, "angular")
    dataset = load_dataset(str(tmp_path / "tiny-angular.hdf5"))
    assert dataset.metric == "cos" and dataset.name == "tiny-angular"
    np.testing.assert_array_equal(dataset.base, train)
    np.testing.assert_array_equal(dataset.ground_truth(10), neighbors[:, :10])
    np.testing.assert_array_equal(read_vectors(tmp_path / "tiny-angular.hdf5"), train)
    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_dataset("train", data=train)
    with pytest.raises(InvalidInput, match="lacks the dataset"):
        load_dataset(str(tmp_path / "bad.hdf5"))
    (tmp_path / "junk.hdf5").write_bytes(b"not hdf5 at all")
    with pytest.raises(InvalidInput, match="not a readable HDF5"):
        load_dataset(str(tmp_path / "junk.hdf5"))


def test_exact_knn_matches_brute_force(rng):
    base = rng.normal(size=(300, 6)).astype(np.float32)
    queries = rng.normal(size=(7, 6)).astype(np.float32)
    distances = ((queries[:, None, :] - base[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(exact_knn(base, queries, 5, "l2"), np.argsort(distances, axis=1)[:, :5])


def test_ground_truth_is_cached_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path))
    dataset = load_dataset("synthetic")
    dataset.ground_truth_cache = tmp_path / "gt.npy"
    first = dataset.ground_truth(10)
    assert (tmp_path / "gt.npy").is_file()
    dataset._ground_truth = None
    np.testing.assert_array_equal(dataset.ground_truth(10), first)
    (tmp_path / "gt.npy").write_bytes(b"garbage")  # a damaged cache is recomputed, not trusted
    dataset._ground_truth = None
    np.testing.assert_array_equal(dataset.ground_truth(10), first)
    with pytest.raises(InvalidInput, match="between 1 and 100"):
        dataset.ground_truth(101)


def test_unknown_dataset():
    with pytest.raises(InvalidInput, match="unknown dataset"):
        load_dataset("sift-1b")


@pytest.mark.integration
def test_glove50_is_the_real_data():
    dataset = glove50()
    assert dataset.metric == "cos"
    assert dataset.base.shape == (400_000 - GLOVE_QUERIES, 50)
    assert dataset.queries.shape == (GLOVE_QUERIES, 50)
    again = glove50()
    np.testing.assert_array_equal(dataset.queries, again.queries)  # the held-out set is fixed
    assert not np.isin(dataset.queries[:50].view("V200"), dataset.base[:2000].view("V200")).any()


def test_an_empty_cache_variable_means_the_default_not_the_current_directory(monkeypatch, tmp_path):
    from retriever.datasets import cache_dir

    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.setenv("CHAMELEON_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "chameleon"
