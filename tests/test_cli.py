"""The ``chameleon`` command end to end, as a user runs it (subprocesses)."""

import json

import numpy as np
import pytest
from faiss.contrib import vecs_io

from chameleon.bench.recall import ROW_KEYS
from retriever.index import load_index
from tests.helpers import chameleon


def test_build_info_bench(tmp_path, tiny_hdf5):
    out = tmp_path / "idx"
    built = chameleon("index", "build", "--dataset", tiny_hdf5, "--out", out, "--nlist", 32, "--m", 8, "--shards", 2)
    assert "wrote" in built.stderr
    index = load_index(out, verify=True)
    assert index.nshards == 2 and index.ntotal == 8000 and index.params.metric == "l2"

    info = chameleon("index", "info", out, "--verify").stdout
    assert "IVF32,PQ8x8" in info and "8,000" in info and "checksums  ok" in info and "list sizes" in info

    rows_path, plot_path = tmp_path / "rows.json", tmp_path / "plot.png"
    bench = chameleon(
        "bench",
        "recall",
        "--dataset",
        tiny_hdf5,
        "--index",
        out,
        "--engines",
        "numba,faiss-ivfpq,faiss-fastscan",
        "--nprobe",
        "1,4,32",
        "--k",
        10,
        "--threads",
        "1,2",
        "--queries",
        50,
        "--json",
        rows_path,
        "--plot",
        plot_path,
    )
    rows = json.loads(rows_path.read_text())
    assert len(rows) == 3 * 2 * 3
    assert all(tuple(row) == ROW_KEYS for row in rows)
    assert all(0 <= row["recall"] <= 1 and row["qps"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] for row in rows)
    by = {(r["engine"], r["threads"], r["nprobe"]): r for r in rows}
    assert by[("numba", 1, 32)]["recall"] > by[("numba", 1, 1)]["recall"]
    assert abs(by[("numba", 1, 32)]["recall"] - by[("faiss-ivfpq", 1, 32)]["recall"]) <= 0.01
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "numba / faiss-ivfpq QPS" in bench.stdout


def test_build_from_vector_files(tmp_path, small_data):
    vecs_io.fvecs_write(str(tmp_path / "x.fvecs"), small_data.base[:5000])
    chameleon("index", "build", "--vectors", tmp_path / "x.fvecs", "--out", tmp_path / "a", "--nlist", 16, "--m", 4, "--metric", "cos")
    assert load_index(tmp_path / "a").params.metric == "cos"
    np.save(tmp_path / "x.npy", small_data.base[:5000])
    chameleon("index", "build", "--vectors", tmp_path / "x.npy", "--out", tmp_path / "b", "--nlist", 16, "--m", 4)
    assert load_index(tmp_path / "b").ntotal == 5000


def test_index_add_extends_a_vector_index_in_place(tmp_path, small_data):
    np.save(tmp_path / "first.npy", small_data.base[:5000])
    np.save(tmp_path / "more.npy", small_data.base[5000:6000])
    chameleon("index", "build", "--vectors", tmp_path / "first.npy", "--out", tmp_path / "idx", "--nlist", 16, "--m", 4, "--shards", 2)
    out = chameleon("index", "add", "--index", tmp_path / "idx", "--vectors", tmp_path / "more.npy")
    assert "added 1,000 vectors" in out.stderr + out.stdout
    index = load_index(tmp_path / "idx", verify=True)
    assert index.ntotal == 6000 and index.nshards == 2 and index.build_info["added"] == 1000
    assert sorted(index.whole().ids.tolist()) == list(range(6000))
    bad = small_data.base[:10].copy()
    bad[4, 2] = np.nan
    np.save(tmp_path / "bad.npy", bad)
    assert "NaN" in error_of("index", "add", "--index", tmp_path / "idx", "--vectors", tmp_path / "bad.npy")
    assert "exactly one of --vectors and --corpus" in error_of("index", "add", "--index", tmp_path / "idx")
    assert "add vectors with --vectors" in error_of("index", "add", "--index", tmp_path / "idx", "--corpus", "python-docs")
    assert "neither a vector index" in error_of("index", "add", "--index", tmp_path, "--vectors", tmp_path / "more.npy")
    assert load_index(tmp_path / "idx", verify=True).ntotal == 6000  # the refused additions changed nothing
    chameleon("index", "remove", "--index", tmp_path / "idx", "--ids", "5998,5999")
    np.save(tmp_path / "gone.npy", np.arange(10))
    chameleon("index", "remove", "--index", tmp_path / "idx", "--ids-file", tmp_path / "gone.npy")
    assert sorted(load_index(tmp_path / "idx", verify=True).whole().ids.tolist()) == list(range(10, 5998))
    assert "not in the index" in error_of("index", "remove", "--index", tmp_path / "idx", "--ids", "3")
    assert "comma-separated list of integers" in error_of("index", "remove", "--index", tmp_path / "idx", "--ids", "a,b")
    assert "remove vectors with --ids" in error_of("index", "remove", "--index", tmp_path / "idx", "--doc-id", "x")
    assert "exactly one of" in error_of("index", "remove", "--index", tmp_path / "idx")
    assert load_index(tmp_path / "idx").ntotal == 5988


def error_of(*args):
    return chameleon(*args, expect=2).stderr


def test_bad_input_exits_cleanly(tmp_path, small_data, tiny_hdf5):
    x = tmp_path / "x.npy"
    np.save(x, small_data.base[:3000])
    build = ("index", "build", "--vectors", x, "--nlist", 16, "--m", 8)

    assert "already exists" in error_of(*build, "--out", tmp_path)
    assert "must divide the dimension" in error_of(*build[:-1], 5, "--out", tmp_path / "o1")
    assert "larger than the number of vectors" in error_of(
        "index", "build", "--vectors", x, "--nlist", 5000, "--m", 8, "--out", tmp_path / "o2"
    )

    nan = small_data.base[:3000].copy()
    nan[17, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    assert "NaN or inf (first at row 17)" in error_of(
        "index", "build", "--vectors", tmp_path / "nan.npy", "--nlist", 16, "--m", 8, "--out", tmp_path / "o3"
    )

    (tmp_path / "empty.fvecs").write_bytes(b"")
    assert "empty or truncated" in error_of(
        "index", "build", "--vectors", tmp_path / "empty.fvecs", "--nlist", 16, "--m", 8, "--out", tmp_path / "o4"
    )
    vecs_io.fvecs_write(str(tmp_path / "cut.fvecs"), small_data.base[:100])
    (tmp_path / "cut.fvecs").write_bytes((tmp_path / "cut.fvecs").read_bytes()[:-7])
    assert "truncated" in error_of("index", "build", "--vectors", tmp_path / "cut.fvecs", "--nlist", 16, "--m", 8, "--out", tmp_path / "o5")
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 6))  # nothing half-written

    idx = tmp_path / "idx"
    chameleon("index", "build", "--dataset", tiny_hdf5, "--out", idx, "--nlist", 16, "--m", 8)
    bench = ("bench", "recall", "--dataset", tiny_hdf5, "--index", idx, "--queries", 10)
    assert "nprobe must be between 1 and nlist=16" in error_of(*bench, "--nprobe", "4,17")
    assert "k must be between 1" in error_of(*bench, "--k", 0)
    assert "unknown engine" in error_of(*bench, "--engines", "numba,warp-drive")
    assert "threads must be between 1" in error_of(*bench, "--threads", 999)
    assert "comma-separated list of integers" in error_of(*bench, "--nprobe", "four")
    chameleon(*build, "--out", tmp_path / "other")
    assert "the index has dimension 32, the dataset glove-50 has 50" in error_of("bench", "recall", "--dataset", "glove-50", "--index", idx)
    assert "the index holds 3000 vectors" in error_of("bench", "recall", "--dataset", tiny_hdf5, "--index", tmp_path / "other")

    codes = idx / "shard-000" / "codes.npy"
    data = bytearray(codes.read_bytes())
    data[-1] ^= 0xFF
    codes.write_bytes(bytes(data))
    assert "corrupt" in error_of("index", "info", idx, "--verify")
    assert "not an index directory" in error_of("index", "info", tmp_path)


@pytest.mark.integration
def test_glove50_numba_agrees_with_faiss(tmp_path):
    """The real built-in data: our engine returns faiss's answers on the same codes."""
    from retriever.coarse import CoarseQuantizer
    from retriever.datasets import glove50
    from retriever.engines import FaissEngine, NumbaEngine
    from retriever.vectors import prepare_vectors
    from tests.helpers import same_up_to_ties

    out = tmp_path / "glove"
    chameleon("index", "build", "--dataset", "glove-50", "--out", out, "--nlist", 256, "--m", 10, "--train-size", 30000)
    rows_path = tmp_path / "rows.json"
    chameleon("bench", "recall", "--dataset", "glove-50", "--index", out, "--nprobe", "8", "--queries", 1000, "--json", rows_path)
    rows = {r["engine"]: r for r in json.loads(rows_path.read_text())}
    assert rows["numba"]["recall"] > 0.5
    assert abs(rows["numba"]["recall"] - rows["faiss-ivfpq"]["recall"]) <= 0.002

    index = load_index(out)
    queries = prepare_vectors(glove50().queries[:2000], "cos")
    list_ids, _ = CoarseQuantizer(index.centroids, "cos", device="cpu").search(queries, 8)
    nd, ni = NumbaEngine(index).search(queries, list_ids, 10)
    fd, fi = FaissEngine(index).search(queries, list_ids, 10)
    assert same_up_to_ties(nd, ni, fd, fi).mean() >= 0.999


def test_a_server_that_does_not_answer_is_exit_code_3_and_a_bad_command_2():
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    unreachable = chameleon("ask", "What is a list?", "--server", f"http://127.0.0.1:{port}", expect=3)
    assert "cannot reach the server" in unreachable.stderr
    assert "give exactly one of --index and --cluster" in chameleon("search", "--queries", "q.npy", "--out", "r.npz", expect=2).stderr
