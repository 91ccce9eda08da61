"""A build in parts (train once, encode row ranges anywhere, join): the same index as a build in
one process, array for array; vector files read memory-mapped; parts that do not fit refused."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from retriever.build import build_index, encode_part, join_parts, train_quantizers
from retriever.datasets import VectorFile, read_vecs, read_vectors
from retriever.errors import InvalidInput
from retriever.index import InvertedLists, IVFPQParams, gather_shard, load_index, save_index, split_shards
from tests.helpers import assert_same_index, chameleon

PARAMS = IVFPQParams("l2", 32, nlist=64, m=8)


def write_fvecs(path, vectors):
    rows = np.empty((len(vectors), 1 + vectors.shape[1]), dtype=np.float32)
    rows[:, 0] = np.array([vectors.shape[1]], dtype=np.int32).view(np.float32)[0]
    rows[:, 1:] = vectors
    rows.tofile(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, small_data):
    """``small_data``'s vectors in a .npy file, trained once and encoded in three parts."""
    root = tmp_path_factory.mktemp("parts")
    np.save(root / "base.npy", small_data.base)
    vectors = VectorFile(root / "base.npy")
    trained = train_quantizers(vectors, PARAMS, train_size=10_000, seed=7)
    paths = []
    for part in range(3):
        paths.append(save_index(encode_part(trained, vectors, part, 3), root / f"part-{part}"))
    return root, trained, paths


def test_parts_joined_equal_one_build(tmp_path, parts, small_data):
    root, _, paths = parts
    whole = build_index(small_data.base, PARAMS, train_size=10_000, nshards=2, seed=7)
    join_parts(list(reversed(paths)), 2, tmp_path / "joined")  # any order
    joined = load_index(tmp_path / "joined", verify=True)
    assert_same_index(joined, whole)
    assert joined.build_info["joined_parts"] == 3


def test_parts_that_do_not_cover_the_rows_once_are_refused(tmp_path, parts, small_data):
    root, trained, paths = parts
    with pytest.raises(InvalidInput, match="rows 6666-13332 are in no part"):
        join_parts([paths[0], paths[2]], 1, tmp_path / "gap")
    with pytest.raises(InvalidInput, match="rows 13333-19999 are in no part"):
        join_parts(paths[:2], 1, tmp_path / "short")
    with pytest.raises(InvalidInput, match="in two parts"):
        join_parts([*paths, paths[1]], 1, tmp_path / "twice")
    other = train_quantizers(read_vectors(root / "base.npy"), PARAMS, train_size=10_000, seed=8)
    save_index(encode_part(other, read_vectors(root / "base.npy"), 1, 3), tmp_path / "other-1")
    with pytest.raises(InvalidInput, match="different quantizers"):
        join_parts([paths[0], tmp_path / "other-1", paths[2]], 1, tmp_path / "mixed")
    save_index(build_index(small_data.base, PARAMS, train_size=10_000, seed=7), tmp_path / "whole")
    with pytest.raises(InvalidInput, match="only the parts"):
        join_parts([tmp_path / "whole"], 1, tmp_path / "not-parts")
    with pytest.raises(InvalidInput, match="quantizers of `index train`"):
        encode_part(load_index(tmp_path / "whole"), small_data.base, 0, 2)
    with pytest.raises(InvalidInput, match="part must be in"):
        encode_part(trained, small_data.base, 3, 3)
    assert not any(p.name.startswith(("gap", "short", "twice", "mixed", "not-parts")) for p in tmp_path.iterdir())


def test_a_bad_row_fails_its_part_with_the_rows_named(small_data):
    trained = train_quantizers(small_data.base, PARAMS, train_size=10_000, seed=7)
    vectors = small_data.base.copy()
    vectors[15_000, 3] = np.nan
    encode_part(trained, vectors, 0, 2)  # rows 0-9999 are fine
    with pytest.raises(InvalidInput, match=r"database vectors contain NaN or inf \(first at row 15000\)"):
        encode_part(trained, vectors, 1, 2)
    with pytest.raises(InvalidInput, match=r"shape \(n, 32\)"):
        encode_part(trained, vectors[:, :16], 0, 2)


def test_a_vector_file_is_read_a_range_at_a_time(tmp_path, small_data):
    np.save(tmp_path / "base.npy", small_data.base[:1000])
    write_fvecs(tmp_path / "base.fvecs", small_data.base[:1000])
    for name in ("base.npy", "base.fvecs"):
        vectors = VectorFile(tmp_path / name)
        assert vectors.shape == (1000, 32) and len(vectors) == 1000
        np.testing.assert_array_equal(vectors[100:250], small_data.base[100:250])
        np.testing.assert_array_equal(vectors[990:5000], small_data.base[990:1000])
        np.testing.assert_array_equal(vectors[np.array([0, 7, 999])], small_data.base[[0, 7, 999]])
        with pytest.raises(InvalidInput, match="row numbers"):
            vectors[np.array([1000])]
        with pytest.raises(InvalidInput, match="one range at a time"):
            vectors[::2]
    raw = bytearray((tmp_path / "base.fvecs").read_bytes())
    raw[33 * 4 * 700 : 33 * 4 * 700 + 4] = np.int32(31).tobytes()
    (tmp_path / "broken.fvecs").write_bytes(bytes(raw))
    broken = VectorFile(tmp_path / "broken.fvecs")
    broken[:500]  # the rows before the bad one read fine
    with pytest.raises(InvalidInput, match="row 700 has dimension 31"):
        broken[600:800]
    (tmp_path / "short.fvecs").write_bytes(bytes(raw[:-3]))
    with pytest.raises(InvalidInput, match="truncated"):
        VectorFile(tmp_path / "short.fvecs")
    (tmp_path / "x.hdf5").touch()
    with pytest.raises(InvalidInput, match=".npy, .fvecs or .bvecs"):
        VectorFile(tmp_path / "x.hdf5")


def test_vecs_files_are_memory_mapped(tmp_path, small_data):
    write_fvecs(tmp_path / "base.fvecs", small_data.base[:1000])
    vectors = read_vecs(tmp_path / "base.fvecs")
    assert not vectors.flags.owndata and vectors.base is not None
    np.testing.assert_array_equal(vectors, small_data.base[:1000])
    broken = tmp_path / "broken.fvecs"
    raw = bytearray((tmp_path / "base.fvecs").read_bytes())
    raw[33 * 4 * 500 : 33 * 4 * 500 + 4] = np.int32(31).tobytes()
    broken.write_bytes(bytes(raw))
    with pytest.raises(InvalidInput, match="row 500 has dimension 31"):
        read_vecs(broken)


@settings(deadline=None, max_examples=30)
@given(
    sizes=st.lists(st.integers(0, 40), min_size=3, max_size=3), cut=st.integers(1, 4), nshards=st.integers(1, 5), seed=st.integers(0, 99)
)
def test_gathering_a_shard_from_parts_equals_splitting_the_whole(sizes, cut, nshards, seed):
    rng = np.random.default_rng(seed)
    n = sum(sizes)
    assignment = np.repeat(np.arange(3), sizes)
    ids, codes = np.arange(n, dtype=np.int64), rng.integers(0, 255, (n, 2), dtype=np.uint8)
    whole = InvertedLists.from_assignment(assignment, ids, codes, 3)
    bounds = np.linspace(0, n, cut + 1).astype(int)  # rows in consecutive parts, as encode does
    parts = [InvertedLists.from_assignment(assignment[a:b], ids[a:b], codes[a:b], 3) for a, b in zip(bounds, bounds[1:])]
    for shard, expected in enumerate(split_shards(whole, nshards)):
        got = gather_shard(parts, shard, nshards)
        for name in ("offsets", "ids", "codes"):
            np.testing.assert_array_equal(getattr(got, name), getattr(expected, name))


def test_the_command_line_builds_in_parallel_parts(tmp_path, small_data):
    import subprocess
    import sys

    write_fvecs(tmp_path / "base.fvecs", small_data.base)
    common = ["--nlist", 64, "--m", 8, "--train-size", 10_000, "--seed", 7]
    trained = chameleon("index", "train", "--vectors", tmp_path / "base.fvecs", "--out", tmp_path / "trained", *common)
    assert "peak memory" in trained.stderr
    encoders = [
        subprocess.Popen(
            [sys.executable, "-m", "chameleon", "index", "encode", "--trained", tmp_path / "trained", "--vectors", tmp_path / "base.fvecs"]
            + ["--part", f"{part}/3", "--out", tmp_path / f"part-{part}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for part in range(3)
    ]
    for encoder in encoders:
        assert encoder.wait(timeout=300) == 0, encoder.stderr.read()
    chameleon("index", "join", *(tmp_path / f"part-{p}" for p in (2, 0, 1)), "--shards", 2, "--out", tmp_path / "index")
    whole = build_index(small_data.base, PARAMS, train_size=10_000, nshards=2, seed=7)
    assert_same_index(load_index(tmp_path / "index", verify=True), whole)
    refused = chameleon(
        "index",
        "encode",
        "--trained",
        tmp_path / "trained",
        "--vectors",
        tmp_path / "base.fvecs",
        "--part",
        "x",
        "--out",
        tmp_path / "p",
        expect=2,
    )
    assert "--part takes I/N" in refused.stderr
    refused = chameleon("index", "join", tmp_path / "part-0", "--out", tmp_path / "partial", expect=2)
    assert "in no part" in refused.stderr
