"""The retrieval tier as separate processes on loopback: nodes, coordinator, failover, security."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chameleon import cluster
from coordinator.client import RemoteError, RetrievalClient
from coordinator.router import Coordinator, InlineCoordinator
from retriever.coarse import CoarseQuantizer
from retriever.errors import InvalidInput, Timeout
from retriever.index import load_index, save_index
from retriever.search import Searcher
from retriever.vectors import prepare_vectors
from retriever.wire import protocol
from retriever.wire.security import CurveKeys, generate_keys
from tests.helpers import same_up_to_ties


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, l2_index):
    return save_index(l2_index, tmp_path_factory.mktemp("tier") / "index")


@pytest.fixture(scope="module")
def reference(index_dir, small_data):
    """In-process answers on the whole index: what the tier must reproduce exactly."""
    searcher = Searcher(load_index(index_dir))
    return searcher.search(small_data.queries, 10, 8)


def start_node(index_dir, tmp_path, shard=0, bind="tcp://127.0.0.1:*", keys=None):
    ready = tmp_path / f"node-{shard}-{time.monotonic_ns()}.json"
    command = [
        sys.executable,
        "-m",
        "chameleon",
        "node",
        "retrieval",
        "--index",
        str(index_dir),
        "--shard",
        str(shard),
        "--bind",
        bind,
        "--threads",
        "1",
        "--ready-file",
        str(ready),
    ]
    if keys:
        command += ["--keys", str(keys)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 120
    while not ready.is_file():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "node did not start"
        time.sleep(0.05)
    return process, json.loads(ready.read_text())["endpoint"]


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def probe(index_dir, queries, nprobe=8):
    index = load_index(index_dir, shard=0)
    queries = prepare_vectors(queries, index.params.metric)
    return queries, CoarseQuantizer(index.centroids, index.params.metric, device="cpu").search(queries, nprobe)[0]


# -- a single node --------------------------------------------------------------------------------

fields = st.dictionaries(
    st.sampled_from(["v", "op", "rid", "arrays", "k", "early", "content", "info", "code", "message", "zz"]),
    st.one_of(
        st.integers(-(2**63), 2**64 - 1),
        st.text(max_size=6),
        st.none(),
        st.booleans(),
        st.sampled_from(protocol.OPS),
        st.lists(st.tuples(st.sampled_from(["float32", "int64", "bool"]), st.lists(st.integers(-1, 2**40), max_size=3)), max_size=3),
    ),
)
valid_shapes = st.tuples(st.integers(1, 4), st.sampled_from([31, 32, 33]), st.integers(1, 3))


@st.composite
def hostile_messages(draw):
    kind = draw(st.sampled_from(["garbage", "header", "search"]))
    if kind == "garbage":
        return draw(st.lists(st.binary(max_size=200), min_size=1, max_size=5))
    if kind == "header":
        return [msgpack.packb(draw(fields)), *draw(st.lists(st.binary(max_size=64), max_size=3))]
    nq, dim, nprobe = draw(valid_shapes)  # plausible SEARCHes with wrong dims, NaN, bad list ids or k
    queries = np.full((nq, dim), draw(st.sampled_from([0.5, np.nan, np.inf])), np.float32)
    list_ids = np.full((nq, nprobe), draw(st.sampled_from([-2, 0, 63, 64, 10**6])), np.int64)
    k = draw(st.sampled_from([0, 1, 10, 2**16 + 1]))
    header = {"v": 1, "op": "SEARCH", "rid": 1, "arrays": [["float32", [nq, dim]], ["int64", [nq, nprobe]]], "k": k}
    early = draw(st.sampled_from([None, 0, 1, 2, 3]))  # None: no early answer asked for
    if early is not None:
        header["early"] = early
    return [msgpack.packb(header), queries.tobytes(), list_ids.tobytes()]


def test_node_survives_thousands_of_malformed_messages(index_dir, tmp_path):
    process, endpoint = start_node(index_dir, tmp_path)
    context = zmq.Context()
    socket = context.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    replies = {"ERROR": 0, "RESULT": 0, "INFO": 0}
    try:
        rss_before = rss_kib(process.pid)

        @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(frames=hostile_messages())
        def throw(frames):
            socket.send_multipart(frames)
            assert socket.poll(5000), "the node stopped answering"
            reply = protocol.decode(socket.recv_multipart())
            replies[reply.op] += 1
            if reply.fields.get("early"):  # the final answer follows
                assert socket.poll(5000), "the node sent an early answer and no final one"
                assert protocol.decode(socket.recv_multipart()).op in ("RESULT", "ERROR")

        throw()
        with RetrievalClient(endpoint, timeout=5) as client:
            assert client.info()["shard"] == 0  # still up and answering
            with pytest.raises(RemoteError, match="bad_request"):
                client.search(np.zeros((1, 31), np.float32), np.zeros((1, 1), np.int64), 5)
        assert process.poll() is None
        assert replies["ERROR"] > 1500, replies
        assert rss_kib(process.pid) - rss_before < 64 * 1024, "memory grew"
    finally:
        socket.close()
        context.term()
        process.kill()
        process.wait()


def test_heartbeats_are_answered_while_a_batch_is_scanned(index_dir, tmp_path, small_data):
    process, endpoint = start_node(index_dir, tmp_path)
    queries, list_ids = probe(index_dir, np.tile(small_data.queries, (40, 1)), nprobe=64)  # 8,000 queries, every list
    try:
        with RetrievalClient(endpoint, timeout=60) as searcher, RetrievalClient(endpoint, timeout=60) as watcher:
            protocol.send(searcher._socket, protocol.search_request(1, queries, list_ids, 10))
            time.sleep(0.05)
            info = watcher.info()
            assert searcher._socket.poll(0) == 0, "the scan finished before the heartbeat: make it longer"
            assert info["shard"] == 0
            assert searcher._socket.poll(60_000)
            assert protocol.decode(searcher._socket.recv_multipart()).op == "RESULT"
    finally:
        process.kill()
        process.wait()


def test_a_node_refuses_a_search_of_another_index_version(index_dir, tmp_path, small_data):
    """A coordinator may send a search there before it hears that the address now serves another
    version: the node answers ``unavailable`` (which fails over), never another version's ids."""
    process, endpoint = start_node(index_dir, tmp_path)
    queries, list_ids = probe(index_dir, small_data.queries[:3])
    try:
        with RetrievalClient(endpoint, timeout=60) as client:
            own = client.info()["content"]
            with pytest.raises(RemoteError, match=f"serves index {own}, not feedface") as refused:
                client.search(queries, list_ids, 10, content="feedface")
            assert refused.value.code == "unavailable"
            np.testing.assert_array_equal(client.search(queries, list_ids, 10, content=own).ids, client.search(queries, list_ids, 10).ids)
    finally:
        process.kill()
        process.wait()


def test_a_batch_answers_early_and_whole_searches_together(index_dir, tmp_path, small_data):
    process, endpoint = start_node(index_dir, tmp_path)
    busy_queries, busy_lists = probe(index_dir, np.tile(small_data.queries, (20, 1)), nprobe=64)
    queries, list_ids = probe(index_dir, small_data.queries)
    local = Searcher(load_index(index_dir, shard=0))
    try:
        with RetrievalClient(endpoint, timeout=60) as client:
            busy = client.send_search(busy_queries, busy_lists, 10)  # the next two wait for it, then share a batch
            staged = client.send_search(queries, list_ids, 10, early=2)
            whole = client.send_search(queries[:7], list_ids[:7, :5], 3)
            early = client.search_result(staged, early=True)
            np.testing.assert_array_equal(early.ids, local.scan_staged(queries, list_ids, 10, early=2).early().ids)
            np.testing.assert_array_equal(client.search_result(staged).ids, local.scan(queries, list_ids, 10).ids)
            np.testing.assert_array_equal(client.search_result(whole).ids, local.scan(queries[:7], list_ids[:7, :5], 3).ids)
            assert client.search_result(busy).ids.shape == (4000, 10)
            with pytest.raises(RemoteError, match="early must be"):
                client.search_result(client.send_search(queries, list_ids, 10, early=8))
            info = client.info()
            assert info["batches"] >= 2 and info["queries"] == 4000 + 200 + 7
    finally:
        process.kill()
        process.wait()


def test_sigterm_drains_in_flight_work(index_dir, tmp_path, small_data):
    process, endpoint = start_node(index_dir, tmp_path)
    queries, list_ids = probe(index_dir, np.tile(small_data.queries, (20, 1)), nprobe=64)  # 4,000 queries, all lists
    with RetrievalClient(endpoint, timeout=60) as client:
        request = protocol.search_request(1, queries, list_ids, 10)
        protocol.send(client._socket, request)
        time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert client._socket.poll(60_000)
        reply = protocol.decode(client._socket.recv_multipart())
        assert reply.op == "RESULT" and reply.arrays[1].shape == (4000, 10)
    assert process.wait(timeout=30) == 0


def test_a_burst_of_sigterms_drains_and_exits(index_dir, tmp_path):
    """A killed parent sends its children one SIGTERM per thread it loses (PR_SET_PDEATHSIG): the
    handler runs again while it is still running, and must not wait on anything the first took."""
    state = cluster.up(index_dir, 1, tmp_path / "state")
    processes = [state["coordinator"]["pid"], *(node["pid"] for node in state["nodes"])]
    try:
        for _ in range(300):
            for pid in processes:
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(cluster._is_ours(pid) for pid in processes):
            time.sleep(0.05)
        assert not [pid for pid in processes if cluster._is_ours(pid)], "a process is still up after the burst"
    finally:
        cluster.down(tmp_path / "state")


# -- clusters -------------------------------------------------------------------------------------


@pytest.mark.parametrize("nshards, embedded", [(1, False), (2, False), (4, False), (1, True), (2, True)])
def test_cluster_answers_equal_the_in_process_search(index_dir, tmp_path, small_data, reference, nshards, embedded):
    cluster.up(index_dir, nshards, tmp_path / "state")
    try:
        threads = set(threading.enumerate())
        searcher = cluster.ClusterSearcher.open(tmp_path / "state", embedded=embedded)
        try:
            # embedded: the coordinator runs in this process, on the caller's thread (a thread of its
            # own only re-reads the nodes' announcements)
            assert (searcher.client.info()["pid"] == os.getpid()) == embedded
            assert [t.name for t in set(threading.enumerate()) - threads] == (["membership"] if embedded else [])
            result = searcher.search(small_data.queries, 10, 8)
            queries, list_ids = probe(index_dir, small_data.queries)
            staged = searcher.scan_staged(queries, list_ids, 10, early=1)
            tier_early, tier_final = staged.early(), staged.final()
        finally:
            searcher.close()
        np.testing.assert_array_equal(result.ids, reference.ids)
        np.testing.assert_array_equal(result.distances, reference.distances)
        assert not result.partial
        # the early answer is the top-k of every query's first list, as the in-process staged scan finds it
        local = Searcher(load_index(index_dir)).scan_staged(queries, list_ids, 10, early=1)
        np.testing.assert_array_equal(tier_early.ids, local.early().ids)
        np.testing.assert_array_equal(tier_early.distances, local.early().distances)
        np.testing.assert_array_equal(tier_final.ids, reference.ids)
        np.testing.assert_array_equal(tier_final.distances, reference.distances)
        assert (tier_early.ids != tier_final.ids).any() and not tier_early.partial and not tier_final.partial
    finally:
        cluster.down(tmp_path / "state")


def test_a_changed_index_is_sharded_again_even_with_as_many_vectors(index_dir, tmp_path, small_data):
    from retriever.build import add_vectors, remove_ids

    changed = tmp_path / "changed"
    save_index(load_index(index_dir), changed)
    cluster.up(changed, 2, tmp_path / "state")  # the re-sharded copy is made once per version ...
    cluster.down(tmp_path / "state")
    index = load_index(changed)
    # ... and a version with the same quantizers and vector count is another version
    queries = small_data.queries[:100]
    save_index(add_vectors(remove_ids(index, np.arange(len(queries))), queries), changed, force=True)
    assert load_index(changed).ntotal == index.ntotal
    cluster.up(changed, 2, tmp_path / "state")
    try:
        searcher = cluster.ClusterSearcher.open(tmp_path / "state", embedded=True)
        try:
            result = searcher.search(queries, 10, 8)
        finally:
            searcher.close()
        expected = Searcher(load_index(changed)).search(queries, 10, 8)
        np.testing.assert_array_equal(result.ids, expected.ids)
        assert (result.ids[:, 0] >= index.ntotal).all()  # each query finds itself, one of the new vectors
    finally:
        cluster.down(tmp_path / "state")


def run_queries(searcher, queries, kill_at, kill, batch=20):
    """2,000 queries in batches; ``kill()`` runs before batch ``kill_at``. Returns (results, seconds) per batch."""
    out = []
    for n, start in enumerate(range(0, len(queries), batch)):
        if n == kill_at:
            kill()
        started = time.monotonic()
        out.append((searcher.search(queries[start : start + batch], 10, 8), time.monotonic() - started))
    return out


def test_node_killed_mid_run_with_two_replicas_fails_no_query(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=2, timeout=1.0)
    try:
        searcher = cluster.ClusterSearcher.open(tmp_path / "state")
        queries = np.tile(small_data.queries, (10, 1))
        victim = state["nodes"][0]
        results = run_queries(searcher, queries, kill_at=30, kill=lambda: os.kill(victim["pid"], signal.SIGKILL))
        searcher.close()
        view = cluster.status(tmp_path / "state")["view"]["nodes"]
        # the kill landed; its replica took over
        assert alive_in_state_order(view, state) == [n is not victim for n in state["nodes"]]
        assert not any(r.partial for r, _ in results)
        ids = np.concatenate([r.ids for r, _ in results])
        np.testing.assert_array_equal(ids, np.tile(reference.ids, (10, 1)))
    finally:
        cluster.down(tmp_path / "state")


def test_node_killed_with_one_replica_gives_partial_answers_then_whole_again(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=1, timeout=1.0)
    try:
        searcher = cluster.ClusterSearcher.open(tmp_path / "state")
        queries = np.tile(small_data.queries, (10, 1))
        victim = state["nodes"][1]
        results = run_queries(searcher, queries, kill_at=30, kill=lambda: os.kill(victim["pid"], signal.SIGKILL))
        assert all(seconds < 1.0 + 2.0 for _, seconds in results)  # the coordinator's timeout, plus slack
        assert not any(r.partial for r, _ in results[:30])
        assert all(r.partial and r.missing == [1] for r, _ in results[30:])
        shard0 = set(load_index(state["index"], shard=0).shards[0].ids.tolist())
        assert all(set(r.ids[r.ids >= 0].tolist()) <= shard0 for r, _ in results[30:])

        restarted, _ = start_node(state["index"], tmp_path, shard=1, bind=victim["endpoint"])
        try:
            deadline = time.monotonic() + 30
            while alive_in_state_order(cluster.status(tmp_path / "state")["view"]["nodes"], state)[1] is False:
                assert time.monotonic() < deadline, "the coordinator never saw the node come back"
                time.sleep(0.1)
            whole = searcher.search(small_data.queries, 10, 8)
            assert not whole.partial
            np.testing.assert_array_equal(whole.ids, reference.ids)
        finally:
            restarted.kill()
            searcher.close()
    finally:
        cluster.down(tmp_path / "state")


def test_cluster_up_leaves_a_keeper_that_restarts_what_dies_and_follows_scale(index_dir, tmp_path, small_data, reference):
    state_dir = tmp_path / "state"
    state = cluster.up(index_dir, 2, state_dir, replicas=1, keep=True)
    processes = [state["keeper"], state["coordinator"], *state["nodes"]]

    def entry(name: str) -> dict:
        now = cluster.read_state(state_dir)
        return now["coordinator"] if name == "coordinator" else next(n for n in now["nodes"] if n["name"] == name)

    def restarted(name: str, times: int) -> dict:
        deadline = time.monotonic() + 60
        while (e := entry(name)).get("restarts", 0) < times or e["supervision"] != "running":
            assert time.monotonic() < deadline, e
            time.sleep(0.1)
        return e

    def whole_answers() -> None:
        deadline = time.monotonic() + 30
        searcher = cluster.ClusterSearcher.open(state_dir)
        try:
            while (result := searcher.search(small_data.queries, 10, 8)).partial:
                assert time.monotonic() < deadline, "never whole again"
                time.sleep(0.2)
        finally:
            searcher.close()
        np.testing.assert_array_equal(result.ids, reference.ids)

    try:
        # a node the keeper did not start (up() did, in this process): it sees that it ended, not how
        os.kill(state["nodes"][1]["pid"], signal.SIGKILL)
        back = restarted("node-1-0-of-2", 1)
        assert back["cause"] == "exited (its exit status went to the process that started it)"
        whole_answers()
        # the coordinator comes back on its endpoint
        os.kill(state["coordinator"]["pid"], signal.SIGKILL)
        assert restarted("coordinator", 1)["endpoint"] == state["coordinator"]["endpoint"]
        whole_answers()
        # nodes that scale adds are kept as well; the ones it retires are let go (not restarted)
        cluster.scale(state_dir, replicas=2)
        added = entry("node-0-1-of-2")
        processes += [added]
        os.kill(added["pid"], signal.SIGKILL)
        restarted("node-0-1-of-2", 1)
        retired = entry("node-0-1-of-2")
        processes += cluster.read_state(state_dir)["nodes"]
        cluster.scale(state_dir, replicas=1)
        time.sleep(3 * cluster.RESOLVE_INTERVAL)
        assert [n["name"] for n in cluster.read_state(state_dir)["nodes"]] == ["node-0-0-of-2", "node-1-0-of-2"]
        assert not cluster._is_ours(retired["pid"])  # stopped by scale, not restarted
        whole_answers()
        report = cluster.status(state_dir)
        assert report["keeper"]["running"] and report["coordinator"]["restarts"] == 1
    finally:
        processes += [cluster.read_state(state_dir)["coordinator"], *cluster.read_state(state_dir)["nodes"]]
        cluster.down(state_dir)
    # down stopped the keeper first: nothing came back
    time.sleep(1.0)
    assert [p["pid"] for p in processes if cluster._is_ours(p["pid"])] == []


def test_embedded_coordinator_gives_partial_answers_when_a_node_dies(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=1, timeout=1.0)
    try:
        searcher = cluster.ClusterSearcher.open(tmp_path / "state", embedded=True)
        assert searcher.client.coordinator.timeout == 1.0  # the options the coordinator process got
        victim = state["nodes"][1]
        results = run_queries(searcher, np.tile(small_data.queries, (2, 1)), kill_at=5, kill=lambda: os.kill(victim["pid"], signal.SIGKILL))
        searcher.close()
        assert all(seconds < 1.0 + 2.0 for _, seconds in results)  # the coordinator's timeout, plus slack
        assert not any(r.partial for r, _ in results[:5])
        np.testing.assert_array_equal(np.concatenate([r.ids for r, _ in results[:5]]), reference.ids[:100])
        assert all(r.partial and r.missing == [1] for r, _ in results[5:])
        shard0 = set(load_index(state["index"], shard=0).shards[0].ids.tolist())
        assert all(set(r.ids[r.ids >= 0].tolist()) <= shard0 for r, _ in results[5:])
    finally:
        cluster.down(tmp_path / "state")


def inline_coordinator(state, timeout):
    """An InlineCoordinator for the nodes of ``state`` with short heartbeats (a silence limit of
    0.2 s + ``timeout``), once it sees every node alive."""
    coordinator = Coordinator(cluster.cluster_config(state), timeout=timeout, heartbeat_interval=0.05)
    inline = InlineCoordinator(coordinator, timeout=10)
    deadline = time.monotonic() + 10
    while not all(n["alive"] for n in inline.info()["nodes"]):
        assert time.monotonic() < deadline, "the nodes never answered a heartbeat"
        time.sleep(0.01)
    return inline


def test_inline_coordinator_keeps_nodes_in_rotation_while_the_caller_is_idle(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state")
    inline = inline_coordinator(state, timeout=0.3)
    try:
        queries, list_ids = probe(index_dir, small_data.queries)
        assert not inline.search(queries, list_ids, 10).partial
        time.sleep(2 * inline.coordinator.silence_limit)  # nobody listens: no heartbeat goes out, no INFO comes in
        result = inline.search(queries, list_ids, 10)
        assert not result.partial
        np.testing.assert_array_equal(result.ids, reference.ids)
        np.testing.assert_array_equal(result.distances, reference.distances)
        assert all(n["alive"] for n in inline.info()["nodes"])
    finally:
        inline.close()
        cluster.down(tmp_path / "state")


def test_inline_coordinator_answers_outstanding_requests_in_any_order(index_dir, tmp_path, small_data):
    state = cluster.up(index_dir, 2, tmp_path / "state")
    inline = inline_coordinator(state, timeout=2.0)
    local = Searcher(load_index(index_dir))
    queries, list_ids = probe(index_dir, small_data.queries)
    try:
        requests = [
            (queries[:50], list_ids[:50], 10),
            (queries[50:120], list_ids[50:120, :4], 5),
            (queries, list_ids, 10),
            (queries[:1], list_ids[:1], 1),
        ]
        rids = [inline.send_search(*request) for request in requests]
        staged = inline.send_search(queries, list_ids, 10, early=2)
        for n in [2, 0, 3, 1]:
            result = inline.search_result(rids[n])
            expected = local.scan(*requests[n])
            np.testing.assert_array_equal(result.ids, expected.ids)
            np.testing.assert_array_equal(result.distances, expected.distances)
        local_staged = local.scan_staged(queries, list_ids, 10, early=2)
        np.testing.assert_array_equal(inline.search_result(staged, early=True).ids, local_staged.early().ids)
        np.testing.assert_array_equal(inline.search_result(staged).ids, local_staged.final().ids)
        with pytest.raises(InvalidInput, match="no request"):
            inline.search_result(rids[0])  # answered already
        with pytest.raises(RemoteError, match="early must be"):  # checked here, as the coordinator process does
            inline.search_result(inline.send_search(queries, list_ids, 10, early=8))
        with pytest.raises(RemoteError, match="bad_request"):  # checked by the nodes
            inline.search(queries, np.full_like(list_ids, 10**6), 10)
    finally:
        inline.close()
        cluster.down(tmp_path / "state")


def alive_in_state_order(view: list[dict], state: dict) -> list[bool | None]:
    """Whether the coordinator whose INFO lists ``view`` sees each node of the cluster ``state`` alive."""
    alive = {n["endpoint"]: n["alive"] for n in view}
    return [alive.get(n["endpoint"]) for n in state["nodes"]]


def search_after_an_idle_death(inline, replicas, queries, list_ids):
    """Search (whole), SIGKILL the one of a shard's ``replicas`` the next search goes to (the one
    that answered least) and stay away for twice the silence limit, then search again: that answer,
    which must come within the sub-request timeout (0.5 s) plus slack, and the victim."""
    assert not inline.search(queries, list_ids, 10).partial
    answered = {n["endpoint"]: n["answered"] for n in inline.info()["nodes"]}
    victim = min(replicas, key=lambda n: answered[n["endpoint"]])
    os.kill(victim["pid"], signal.SIGKILL)
    time.sleep(2 * inline.coordinator.silence_limit)
    started = time.monotonic()
    result = inline.search(queries, list_ids, 10)
    assert time.monotonic() - started < 0.5 + 1.0
    return result, victim


def test_inline_coordinator_fails_over_from_a_node_killed_while_the_caller_is_idle(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=2)
    inline = inline_coordinator(state, timeout=0.5)
    queries, list_ids = probe(index_dir, small_data.queries)
    try:
        result, victim = search_after_an_idle_death(inline, state["nodes"][:2], queries, list_ids)
        assert not result.partial
        np.testing.assert_array_equal(result.ids, reference.ids)
        alive = alive_in_state_order(inline.info()["nodes"], state)
        assert alive == [n is not victim for n in state["nodes"]]
    finally:
        inline.close()
        cluster.down(tmp_path / "state")


def test_inline_coordinator_answers_partial_after_an_idle_death_then_whole_after_a_restart(index_dir, tmp_path, small_data, reference):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=1)
    inline = inline_coordinator(state, timeout=0.5)
    queries, list_ids = probe(index_dir, small_data.queries)
    try:
        result, victim = search_after_an_idle_death(inline, state["nodes"][1:], queries, list_ids)
        assert result.partial and result.missing == [1]
        shard0 = set(load_index(state["index"], shard=0).shards[0].ids.tolist())
        assert set(result.ids[result.ids >= 0].tolist()) <= shard0

        restarted, _ = start_node(state["index"], tmp_path, shard=1, bind=victim["endpoint"])
        try:
            deadline = time.monotonic() + 30
            while (result := inline.search(queries, list_ids, 10)).partial:  # until a heartbeat brings the node back
                assert time.monotonic() < deadline, "the restarted node was never used again"
                time.sleep(0.05)
            np.testing.assert_array_equal(result.ids, reference.ids)
        finally:
            restarted.kill()
            restarted.wait()
    finally:
        inline.close()
        cluster.down(tmp_path / "state")


def test_on_missing_fail_reports_unavailable(index_dir, tmp_path, small_data):
    state = cluster.up(index_dir, 2, tmp_path / "state", replicas=1, timeout=0.5, on_missing="fail")
    try:
        os.kill(state["nodes"][0]["pid"], signal.SIGKILL)
        searcher = cluster.ClusterSearcher.open(tmp_path / "state", timeout=10)
        with pytest.raises(RemoteError, match=r"unavailable: no live replica for shard\(s\) \[0\]"):
            searcher.search(small_data.queries[:5], 10, 8)
        searcher.close()
    finally:
        cluster.down(tmp_path / "state")


def test_curve_keys_keep_strangers_out(index_dir, tmp_path, small_data, reference):
    keys = generate_keys(tmp_path / "keys")
    with pytest.raises(InvalidInput, match="already holds files"):
        generate_keys(tmp_path / "keys")
    state = cluster.up(index_dir, 2, tmp_path / "state", keys_dir=keys)
    try:
        endpoint = state["coordinator"]["endpoint"]
        with RetrievalClient(endpoint, timeout=1.5) as stranger, pytest.raises(Timeout, match="no answer"):
            stranger.info()
        other = generate_keys(tmp_path / "other-keys")  # right protocol, wrong keys
        with (
            RetrievalClient(endpoint, keys=CurveKeys.load(other), timeout=1.5) as impostor,
            pytest.raises(Timeout, match="no answer"),
        ):
            impostor.info()
        with RetrievalClient(state["nodes"][0]["endpoint"], timeout=1.5) as stranger, pytest.raises(Timeout, match="no answer"):
            stranger.info()  # nodes are closed to strangers too
        searcher = cluster.ClusterSearcher.open(tmp_path / "state")
        result = searcher.search(small_data.queries, 10, 8)
        searcher.close()
        np.testing.assert_array_equal(result.ids, reference.ids)
        embedded = cluster.ClusterSearcher.open(tmp_path / "state", embedded=True)  # speaks CURVE to the nodes too
        result = embedded.search(small_data.queries, 10, 8)
        embedded.close()
        np.testing.assert_array_equal(result.ids, reference.ids)
    finally:
        cluster.down(tmp_path / "state")


def test_cluster_command_line(index_dir, tmp_path, small_data):
    def chameleon(*args, expect=0):
        result = subprocess.run([sys.executable, "-m", "chameleon", *map(str, args)], capture_output=True, text=True, timeout=300)
        assert result.returncode == expect, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        return result

    state = tmp_path / "state"
    endpoint = chameleon("cluster", "up", "--index", index_dir, "--shards", 3, "--replicas", 1, "--state-dir", state).stdout.strip()
    try:
        assert endpoint.startswith("tcp://127.0.0.1:")
        assert "already up" in chameleon("cluster", "up", "--index", index_dir, "--shards", 3, "--state-dir", state, expect=2).stderr
        status = chameleon("cluster", "status", "--state-dir", state).stdout
        assert status.count("coordinator sees it alive") == 3
        np.save(tmp_path / "q.npy", small_data.queries)
        chameleon("search", "--cluster", state, "--queries", tmp_path / "q.npy", "--k", 7, "--nprobe", 4, "--out", tmp_path / "c.npz")
        chameleon("search", "--index", index_dir, "--queries", tmp_path / "q.npy", "--k", 7, "--nprobe", 4, "--out", tmp_path / "i.npz")
        through_cluster, in_process = np.load(tmp_path / "c.npz"), np.load(tmp_path / "i.npz")
        np.testing.assert_array_equal(through_cluster["ids"], in_process["ids"])
        np.testing.assert_array_equal(through_cluster["distances"], in_process["distances"])
        assert through_cluster["partial"].shape == (200,) and not through_cluster["partial"].any()
        chameleon(
            "search",
            "--cluster",
            state,
            "--embedded",
            "--queries",
            tmp_path / "q.npy",
            "--k",
            7,
            "--nprobe",
            4,
            "--out",
            tmp_path / "e.npz",
        )
        np.testing.assert_array_equal(np.load(tmp_path / "e.npz")["ids"], in_process["ids"])
        chameleon(
            "search",
            "--index",
            index_dir,
            "--scan-engine",
            "faiss",
            "--queries",
            tmp_path / "q.npy",
            "--k",
            7,
            "--nprobe",
            4,
            "--out",
            tmp_path / "f.npz",
        )
        assert same_up_to_ties(
            np.load(tmp_path / "f.npz")["distances"], np.load(tmp_path / "f.npz")["ids"], in_process["distances"], in_process["ids"]
        ).all()
        assert (
            "go with --index"
            in chameleon(
                "search", "--cluster", state, "--engine", "faiss", "--queries", tmp_path / "q.npy", "--out", tmp_path / "x.npz", expect=2
            ).stderr
        )
        assert (
            "4-bit PQ codes"
            in chameleon(
                "search",
                "--index",
                index_dir,
                "--engine",
                "numba-fastscan",
                "--queries",
                tmp_path / "q.npy",
                "--out",
                tmp_path / "x.npz",
                expect=2,
            ).stderr
        )
        taken = chameleon("node", "retrieval", "--index", index_dir, "--shard", 0, "--bind", endpoint, expect=2).stderr
        assert f"cannot bind {endpoint}" in taken
        # probes for health checks: the coordinator is ready with every shard live; a node answers
        assert json.loads(chameleon("node", "probe", endpoint).stdout)["ready"] is True
        node = cluster.read_state(state)["nodes"][0]["endpoint"]
        assert json.loads(chameleon("node", "probe", node).stdout)["role"] == "retrieval"
        assert "no answer" in chameleon("node", "probe", "tcp://127.0.0.1:1", "--timeout", 0.2, expect=3).stderr
        # scaling from the command line: one more replica per shard, then one shard fewer
        scaled = chameleon("cluster", "scale", "--state-dir", state, "--replicas", 2).stdout
        assert "3 shard(s) x 2 replica(s)" in scaled and scaled.count("node shard") == 6
        scaled = chameleon("cluster", "scale", "--state-dir", state, "--shards", 2, "--replicas", 1).stdout
        assert "2 shard(s) x 1 replica(s)" in scaled and scaled.count("node shard") == 2
        assert json.loads(chameleon("node", "probe", endpoint).stdout)["nshards"] == 2
        assert "say --replicas" in chameleon("cluster", "scale", "--state-dir", state, expect=2).stderr
        np.save(tmp_path / "bad.npy", small_data.queries[:, :30])
        assert (
            "shape (n, 32)"
            in chameleon("search", "--cluster", state, "--queries", tmp_path / "bad.npy", "--out", tmp_path / "x.npz", expect=2).stderr
        )
    finally:
        pids = [p["pid"] for p in [cluster.read_state(state)["coordinator"], *cluster.read_state(state)["nodes"]]]
        chameleon("cluster", "down", "--state-dir", state)
    assert not any(Path(f"/proc/{pid}").exists() and b"chameleon" in Path(f"/proc/{pid}/cmdline").read_bytes() for pid in pids)
    assert "no cluster is up" in chameleon("cluster", "status", "--state-dir", state, expect=2).stderr


# The inference tier's stack: a retrieval node's or a coordinator's process must never import it
# (they install without it: the base package, no `serve` extra).
INFERENCE_STACK = ("torch", "transformers", "tokenizers", "safetensors", "accelerate", "gguf", "fastapi", "uvicorn", "starlette")
BLOCKER = """
import importlib.abc, os, sys

REPORT = os.environ["CHAMELEON_TEST_IMPORT_REPORT"]
with open(REPORT, "a") as report:
    report.write(f"started {{os.getpid()}}\\n")


class InferenceStackBlocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            with open(REPORT, "a") as report:
                report.write(f"imported {{name}}\\n")
            raise ImportError(f"{{name}} is not installed on a retrieval node")
        return None


sys.meta_path.insert(0, InferenceStackBlocked())
"""


def test_the_retrieval_tier_runs_without_the_inference_stack(index_dir, tmp_path, small_data, reference, monkeypatch):
    """Nodes and the coordinator, started by the same commands a slim host or image runs
    (``chameleon node …``), start, search and merge with torch, transformers and FastAPI missing."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=set(INFERENCE_STACK)))
    report = tmp_path / "imports.txt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("CHAMELEON_TEST_IMPORT_REPORT", str(report))
    cluster.up(index_dir, 2, tmp_path / "state")
    try:
        searcher = cluster.ClusterSearcher.open(tmp_path / "state")
        try:
            result = searcher.search(small_data.queries, 10, 8)
        finally:
            searcher.close()
        np.testing.assert_array_equal(result.ids, reference.ids)
        assert not result.partial
    finally:
        cluster.down(tmp_path / "state")
    lines = report.read_text().splitlines()
    assert len([line for line in lines if line.startswith("started")]) >= 3  # two nodes and the coordinator ran blocked
    assert [line for line in lines if line.startswith("imported")] == []
