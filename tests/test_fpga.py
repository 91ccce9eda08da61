"""The FPGA path without a card: the HLS kernel's C simulation, the emulated engine against the
Numba engine, the bank layout, the node and the CLI, the performance and miss models."""

import json
import os
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon import cluster
from fpga.config import KernelConfig
from fpga.engine import FpgaEngine
from fpga.golden import write_golden
from fpga.layout import pack_banks
from fpga.model import estimate_cycles, miss_probability
from retriever.coarse import CoarseQuantizer
from retriever.engines import NumbaEngine, make_scan_engine
from retriever.errors import InvalidInput
from retriever.index import InvertedLists, save_index
from retriever.search import Searcher
from retriever.vectors import prepare_vectors
from tests.helpers import chameleon

HLS = Path(__file__).resolve().parent.parent / "hls"


def probes(index, queries, nprobe):
    queries = prepare_vectors(queries, index.params.metric)
    return queries, CoarseQuantizer(index.centroids, index.params.metric, device="cpu").search(queries, nprobe)[0]


# -- the kernel in C simulation ---------------------------------------------------------------


def test_csim_passes_on_the_committed_golden_data():
    result = subprocess.run(["make", "-s", "-C", str(HLS), "csim", f"BUILD={HLS / 'build'}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "csim passed" in result.stdout and "0 of 240 results differ" in result.stdout


def test_csim_passes_on_fresh_golden_data_and_fails_on_a_wrong_answer(tmp_path):
    golden = write_golden(tmp_path / "golden", seed=11)
    command = ["make", "-s", "-C", str(HLS), "csim", f"GOLDEN={golden}", f"BUILD={tmp_path / 'build'}"]
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    expected = np.fromfile(golden / "l2" / "expected_ids.bin", dtype=np.int64)
    expected[[3, 4]] = expected[[4, 3]]  # two neighbours swapped: the testbench must notice
    expected.tofile(golden / "l2" / "expected_ids.bin")
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode != 0 and "2 of 240 results differ" in result.stdout


# -- the bank layout ----------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=8), banks=st.sampled_from([1, 2, 4]), lanes=st.integers(1, 5))
def test_pack_banks_places_every_vector_once_in_whole_lines(sizes, banks, lanes):
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = int(offsets[-1])
    lists = InvertedLists(offsets, np.arange(100, 100 + n, dtype=np.int64), np.arange(n * 3, dtype=np.uint8).reshape(n, 3))
    banked = pack_banks(lists, banks, lanes)
    rows = np.diff(banked.list_rows)
    assert (rows % lanes == 0).all() and (rows * banks >= np.array(sizes)).all() and (rows * banks < np.array(sizes) + banks * lanes).all()
    for list_id, size in enumerate(sizes):
        start = banked.list_rows[list_id]
        for i in range(size):
            bank, row = i % banks, start + i // banks
            assert banked.ids[bank, row] == lists.ids[offsets[list_id] + i]
            np.testing.assert_array_equal(banked.codes[bank, row], lists.codes[offsets[list_id] + i])
    assert (banked.ids >= 0).sum() == n  # everything else is padding


# -- the emulated engine against the Numba engine -----------------------------------------------


@pytest.fixture(scope="module")
def shard(small_index):
    """Shard 1 of 2 of the small index (each metric)."""
    return small_index.resharded(2).shard(1)


def test_emulated_kernel_equals_numba_bit_for_bit(shard, small_data):
    queries, list_ids = probes(shard, small_data.queries, 8)
    fpga = FpgaEngine(shard, mode="emu", k=20)
    distances, ids = fpga.search(queries, list_ids, 20)
    reference = NumbaEngine(shard, residual_tables=True).search(queries, list_ids, 20)
    np.testing.assert_array_equal(ids, reference[1])
    np.testing.assert_array_equal(distances, reference[0])
    # The default Numba engine's L2 tables round differently; the answers are the same, ties aside.
    default = NumbaEngine(shard).search(queries, list_ids, 20)
    assert (ids == default[1]).mean() > 0.99
    np.testing.assert_allclose(distances, default[0], rtol=1e-4, atol=1e-4)


def test_emulated_kernel_with_fewer_results_than_k_and_skipped_lists(shard, small_data):
    queries, list_ids = probes(shard, small_data.queries[:20], 2)
    list_ids[:, 1] = -1
    list_ids[0, 0] = -1  # query 0 probes nothing
    distances, ids = FpgaEngine(shard, mode="emu", k=300).search(queries, list_ids, 300)  # one list holds ~160
    reference = NumbaEngine(shard, residual_tables=True).search(queries, list_ids, 300)
    np.testing.assert_array_equal(ids, reference[1])
    np.testing.assert_array_equal(distances, reference[0])
    assert (ids[0] == -1).all() and np.isinf(distances[0]).all() and (ids[1:] == -1).any(axis=1).mean() > 0.5


def test_emulated_kernel_answers_threads_at_once(l2_index, small_data):
    queries, list_ids = probes(l2_index, small_data.queries, 4)
    fpga = FpgaEngine(l2_index, mode="emu", k=10)
    expected = fpga.search(queries, list_ids, 10)[1]
    results = [None] * 4

    def search(slot):
        results[slot] = fpga.search(queries, list_ids, 10)[1]

    threads = [threading.Thread(target=search, args=(slot,)) for slot in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all((r == expected).all() for r in results)


def test_short_level1_queues_lose_neighbours_as_the_model_says(l2_index, small_data):
    queries, list_ids = probes(l2_index, small_data.queries, 16)
    exact = FpgaEngine(l2_index, mode="emu", k=10, banks=1).search(queries, list_ids, 10)[1]
    short = FpgaEngine(l2_index, mode="emu", k=10, banks=1, l1=2)
    approximate = short.search(queries, list_ids, 10)[1]
    kept = sum(len(np.intersect1d(a, e)) for a, e in zip(approximate, exact)) / exact.size
    predicted = miss_probability(10, 2, short.config.pes)
    assert 0 < 1 - kept and abs((1 - kept) - predicted) < 0.05


def test_fpga_engine_rejects_what_it_cannot_do(shard, small_data, tmp_path):
    queries, list_ids = probes(shard, small_data.queries[:4], 2)
    engine = FpgaEngine(shard, mode="emu", k=10)
    with pytest.raises(InvalidInput, match="at most K=10"):
        engine.search(queries, list_ids, 11)
    with pytest.raises(InvalidInput, match="list ids"):
        engine.search(queries, list_ids + 1000, 5)
    with pytest.raises(InvalidInput, match="unknown FPGA mode"):
        FpgaEngine(shard, mode="asic")
    with pytest.raises(InvalidInput, match="needs --xclbin"):
        FpgaEngine(shard, mode="hw")
    with pytest.raises(InvalidInput, match="no FPGA bitstream"):
        FpgaEngine(shard, mode="hw", xclbin=tmp_path / "missing.xclbin")
    (tmp_path / "k.xclbin").write_bytes(b"\0")
    KernelConfig.for_index(shard.params, k=10).save(tmp_path / "k.json")
    with pytest.raises(InvalidInput, match="PYNQ"):  # pynq lives in its own environment
        FpgaEngine(shard, mode="hw", xclbin=tmp_path / "k.xclbin")
    with pytest.raises(InvalidInput, match="built for dim=64"):
        KernelConfig(64, 8).check_index(shard.params)
    with pytest.raises(InvalidInput, match="level-1 queue"):
        KernelConfig(32, 8, k=10, l1=11)
    with pytest.raises(InvalidInput, match="takes no options"):
        make_scan_engine("numba", shard, mode="emu")


@pytest.mark.skipif(
    not os.environ.get("CHAMELEON_XCLBIN"), reason="needs an FPGA card: set CHAMELEON_XCLBIN to a bitstream built for D=32, m=8"
)
def test_card_equals_the_emulation(shard, small_data):
    queries, list_ids = probes(shard, small_data.queries, 8)
    card = FpgaEngine(shard, mode="hw", xclbin=os.environ["CHAMELEON_XCLBIN"])
    emulated = FpgaEngine(shard, mode="emu", k=card.config.k, banks=card.config.banks, l1=card.config.l1)
    k = min(10, card.config.k)
    for got, expected in zip(card.search(queries, list_ids, k), emulated.search(queries, list_ids, k)):
        np.testing.assert_array_equal(got, expected)


# -- nodes and the CLI --------------------------------------------------------------------------


def test_emulated_fpga_nodes_serve_the_in_process_answers_through_the_coordinator(l2_index, small_data, tmp_path):
    index_dir = save_index(l2_index, tmp_path / "index")
    reference = Searcher(l2_index, engine="numba", device="cpu").search(small_data.queries, 10, 8)
    cluster.up(index_dir, 2, tmp_path / "state", engine="fpga", fpga_mode="emu", threads=1)
    try:
        assert all("vectors, fpga)" in Path(n["log"]).read_text() for n in cluster.read_state(tmp_path / "state")["nodes"])
        searcher = cluster.ClusterSearcher.open(tmp_path / "state")
        result = searcher.search(small_data.queries, 10, 8)
        searcher.close()
        assert not result.partial
        # The nodes build L2 tables from residuals, the in-process Numba engine from precomputed terms.
        assert (result.ids == reference.ids).mean() > 0.99
        np.testing.assert_allclose(result.distances, reference.distances, rtol=1e-4, atol=1e-4)
        exact = Searcher(l2_index, engine="fpga", device="cpu", mode="emu").search(small_data.queries, 10, 8)
        np.testing.assert_array_equal(result.ids, exact.ids)
    finally:
        cluster.down(tmp_path / "state")


def test_cli_fpga_options_and_bench(tmp_path, tiny_hdf5):
    index = tmp_path / "idx"
    chameleon("index", "build", "--dataset", tiny_hdf5, "--out", index, "--nlist", 16, "--m", 8)
    node = ("node", "retrieval", "--index", index, "--shard", 0, "--bind", "tcp://127.0.0.1:*")
    assert "needs --fpga-mode" in chameleon(*node, "--engine", "fpga", expect=2).stderr
    assert "go with the fpga engine" in chameleon(*node, "--fpga-mode", "emu", expect=2).stderr
    assert (
        "no FPGA bitstream"
        in chameleon(*node, "--scan-engine", "fpga", "--fpga-mode", "hw", "--xclbin", index / "x.xclbin", expect=2).stderr
    )
    # The launcher hands the bitstream to its nodes: the one that fails says why.
    up = ("cluster", "up", "--index", index, "--shards", 1, "--state-dir", tmp_path / "state")
    assert "go with the fpga engine" in chameleon(*up, "--xclbin", index / "x.xclbin", expect=2).stderr
    assert "no FPGA bitstream" in chameleon(*up, "--engine", "fpga", "--fpga-mode", "hw", "--xclbin", index / "x.xclbin", expect=2).stderr

    rows = tmp_path / "recall.json"
    chameleon(
        "bench",
        "recall",
        "--dataset",
        tiny_hdf5,
        "--index",
        index,
        "--engines",
        "numba,fpga-emu",
        "--nprobe",
        "2,8",
        "--queries",
        30,
        "--json",
        rows,
    )
    by = {(r["engine"], r["nprobe"]): r["recall"] for r in json.loads(rows.read_text())}
    assert all(abs(by[("fpga-emu", n)] - by[("numba", n)]) <= 0.01 for n in (2, 8))

    out = tmp_path / "model.json"
    printed = chameleon(
        "bench", "fpga-model", "--dataset", tiny_hdf5, "--index", index, "--nprobe", "1,4", "--l1", "1,10", "--queries", 40, "--json", out
    ).stdout
    result = json.loads(out.read_text())
    assert "PEs on 4 banks" in printed and [r["nprobe"] for r in result["rows"]] == [1, 4]
    slow, fast = result["rows"]
    assert fast["fpga_cycles_per_query"] > slow["fpga_cycles_per_query"] and slow["fpga_qps"] > fast["fpga_qps"] > 0
    model = ("bench", "fpga-model", "--dataset", tiny_hdf5, "--index", index, "--queries", 5)
    assert "banks must be one of" in chameleon(*model, "--banks", 3, expect=2).stderr
    assert "between 1 and k=10" in chameleon(*model, "--l1", "11", expect=2).stderr
    assert "clock must be" in chameleon(*model, "--clock-mhz", 0, expect=2).stderr
    misses = {r["l1"]: r for r in result["level1_misses"]}
    assert misses[10]["measured_miss"] == 0 == misses[10]["model_miss"] and misses[1]["measured_miss"] > 0


# -- the models ---------------------------------------------------------------------------------


def test_miss_probability_by_hand():
    # k=2 over 2 PEs with 1-entry queues: the best is never lost, the second shares the best's PE half the time.
    assert miss_probability(2, 1, 2) == pytest.approx(0.25)
    assert miss_probability(3, 1, 2) == pytest.approx((0 + 0.5 + 0.75) / 3)
    assert miss_probability(100, 100, 16) == 0
    assert miss_probability(100, 10, 16) < miss_probability(100, 5, 16) < miss_probability(100, 5, 4)


def test_cycle_estimate_by_hand():
    config = KernelConfig(dim=16, m=4, k=10, banks=2, pes=4, l1=10)
    fill = 8 + 4 + 2  # read latency + m adds + queue
    table = 4 * 256 / 16
    prepare = 16 + table  # L2: residual + table
    lines = np.array([[10, 0, 100, 5]])  # three probed lists, one skipped
    estimate = estimate_cycles(config, lines, inner_product=False, batch=1)
    scans = [10 + fill, 100 + fill, 5 + fill]
    assert estimate.scan_cycles == sum(scans)
    # list 1 is prepared up front; list 2 during list 1's scan (longer than it: the rest shows), list 3 during list 2's
    assert estimate.prepare_cycles == prepare + (prepare - scans[0])
    assert estimate.other_cycles == 16 + 4 * 10 + 10 + 16 * 256 / 16
    assert estimate.cycles_per_query == estimate.prepare_cycles + estimate.scan_cycles + estimate.other_cycles
    assert not estimate.bandwidth_bound
    assert estimate_cycles(config, lines, inner_product=False, clock_mhz=1000, bank_gbps=0.1).bandwidth_bound
    ip = estimate_cycles(config, lines, inner_product=True, batch=1)  # one table per query, a 16-cycle dot product per list
    assert ip.prepare_cycles == table + 16
    assert estimate_cycles(config, np.zeros((1, 3)), inner_product=False).prepare_cycles == 0
