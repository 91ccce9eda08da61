"""Nodes that join and leave a serving tier: the coordinator's sources, scaling the local cluster
under a bounded load, and versions that must not be merged."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from chameleon import cluster
from coordinator.client import RemoteUnavailable, RetrievalClient
from coordinator.membership import Membership, NodeSource
from coordinator.router import ClusterConfig, Coordinator, InlineCoordinator
from retriever.build import add_vectors
from retriever.errors import InvalidInput
from retriever.index import content_fingerprint, index_fingerprint, load_index, read_manifest, save_index, save_layout
from retriever.search import Searcher
from tests.helpers import wait_for
from tests.test_tier import probe, start_node


@pytest.fixture(scope="module")
def index_dir(tmp_path_factory, l2_index):
    return save_index(l2_index, tmp_path_factory.mktemp("membership") / "index")


# -- sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec", ["http://x:1", "retrieval:5555", "dns://retrieval", "tcp://:5555", "dir://", "dns://a:1/path", "tcp://a:x"]
)
def test_a_malformed_source_is_refused(spec):
    with pytest.raises(InvalidInput):
        NodeSource(spec)


def test_sources_list_endpoints():
    assert NodeSource("tcp://10.0.0.7:5555").endpoints() == {"tcp://10.0.0.7:5555"}
    # a name stands for every address it resolves to (here the machine's own, from /etc/hosts)
    assert "tcp://127.0.0.1:5555" in NodeSource("dns://localhost:5555").endpoints()


def test_a_directory_lists_its_announcements_and_skips_anything_else(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"endpoint": "tcp://127.0.0.1:7001", "pid": 1}))
    (tmp_path / "b.json").write_text('{"endpoint": "tcp://127.0.0.1:70')  # being written
    (tmp_path / "c.json").write_text(json.dumps(["tcp://127.0.0.1:7003"]))
    (tmp_path / "d.json").write_text(json.dumps({"endpoint": "ipc:///tmp/x"}))
    (tmp_path / "e.txt").write_text(json.dumps({"endpoint": "tcp://127.0.0.1:7005"}))
    assert NodeSource(f"dir://{tmp_path}").endpoints() == {"tcp://127.0.0.1:7001"}
    assert NodeSource(f"dir://{tmp_path / 'missing'}").endpoints() == frozenset()


def test_membership_follows_a_directory_while_it_runs(tmp_path):
    membership = Membership([f"dir://{tmp_path}", "tcp://127.0.0.1:7000"], interval=0.02)
    assert membership.endpoints == {"tcp://127.0.0.1:7000"}
    membership.start()
    try:
        (tmp_path / "n.json").write_text(json.dumps({"endpoint": "tcp://127.0.0.1:7001"}))
        wait_for(lambda: membership.endpoints == {"tcp://127.0.0.1:7000", "tcp://127.0.0.1:7001"}, 10, interval=0.02)
        (tmp_path / "n.json").unlink()
        wait_for(lambda: membership.endpoints == {"tcp://127.0.0.1:7000"}, 10, interval=0.02)
    finally:
        membership.stop()
    with pytest.raises(InvalidInput, match="at least one"):
        Membership([])


# -- a serving tier -------------------------------------------------------------------------------


def test_a_coordinator_without_nodes_says_so(index_dir, tmp_path):
    inline = InlineCoordinator(Coordinator(ClusterConfig.of_index(index_dir, [f"dir://{tmp_path}"])), timeout=5)
    try:
        with pytest.raises(RemoteUnavailable, match="no live retrieval node serves index"):
            inline.search(np.zeros((1, 32), np.float32), np.zeros((1, 1), np.int64), 1)
        info = inline.info()
        assert (info["ready"], info["nshards"], info["nodes"]) == (False, 0, [])
    finally:
        inline.close()


def start_load(index_dir, coordinator, queries, work):
    """``tests.load`` in a process of its own, until ``stop_load``."""
    np.save(work / "queries.npy", queries)
    command = [sys.executable, "-m", "tests.load", coordinator, index_dir, work / "queries.npy", work / "load.json"]
    return subprocess.Popen([*map(str, command), "--stop-file", str(work / "stop"), "--seconds", "300"])


def stop_load(process, work) -> dict:
    (work / "stop").touch()
    assert process.wait(timeout=60) == 0
    return json.loads((work / "load.json").read_text())


def answered_by(client) -> dict:
    """endpoint -> sub-requests the coordinator got answers to."""
    return {n["endpoint"]: n["answered"] for n in client.info()["nodes"]}


def test_scaling_replicas_and_shards_while_searches_run_fails_none(index_dir, tmp_path, small_data):
    state_dir = tmp_path / "state"
    state = cluster.up(index_dir, 2, state_dir, replicas=1, threads=1)
    try:
        load = start_load(index_dir, state["coordinator"]["endpoint"], small_data.queries, tmp_path)
        with RetrievalClient(state["coordinator"]["endpoint"]) as client:
            wait_for(lambda: sum(answered_by(client).values()) > 20, 10, interval=0.02)
            grown = cluster.scale(state_dir, replicas=2)
            fresh = {n["endpoint"] for n in grown["nodes"]} - {n["endpoint"] for n in state["nodes"]}
            assert len(fresh) == 2 and len(grown["nodes"]) == 4
            # the new replicas take searches within seconds
            wait_for(lambda: all(answered_by(client).get(e, 0) > 0 for e in fresh), 10, interval=0.02)
            shrunk = cluster.scale(state_dir, replicas=1)
            assert sorted(n["replica"] for n in shrunk["nodes"]) == [0, 0]
            wait_for(lambda: len(client.info()["nodes"]) == 2, 10, interval=0.02)
            resharded = cluster.scale(state_dir, shards=3)
            info = client.info()
            assert info["nshards"] == 3 and info["ready"]
            assert info["fingerprint"] == index_fingerprint(read_manifest(resharded["index"]))
            assert info["content"] == content_fingerprint(read_manifest(index_dir))
            wait_for(lambda: sum(answered_by(client).values()) > 20 and len(client.info()["nodes"]) == 3, 10, interval=0.02)
        summary = stop_load(load, tmp_path)
        assert cluster.status(state_dir)["view"]["nshards"] == 3
        assert [n["running"] for n in cluster.status(state_dir)["nodes"]] == [True] * 3
    finally:
        cluster.down(state_dir)
    assert summary["searches"] > 50
    assert summary["failed"] == [] and summary["partial"] == [] and summary["wrong"] == []
    assert summary["whole"] == summary["searches"]


def test_a_search_the_new_layout_loses_is_answered_by_the_old_one_while_both_run(index_dir, tmp_path, small_data):
    """During a re-shard, when every replica of the new layout misses a search's deadline (nodes
    slowed by the others' warm-up), the coordinator sends it to the old layout: whole, not failed."""
    state_dir = tmp_path / "state"
    state = cluster.up(index_dir, 1, state_dir, threads=1, timeout=0.5)
    layout = save_layout(index_dir, 2, tmp_path / "layout-2")
    new = [start_node(layout, state_dir / cluster.NODES_DIR, shard=shard)[0] for shard in (0, 1)]
    try:
        with RetrievalClient(state["coordinator"]["endpoint"]) as client:
            wait_for(lambda: client.info()["nshards"] == 2, 10, interval=0.02)  # the newer layout serves
        for node in new:
            os.kill(node.pid, signal.SIGSTOP)  # running, but answering nothing
        searcher = cluster.ClusterSearcher.connect(state["coordinator"]["endpoint"], index_dir, timeout=10)
        try:
            result = searcher.search(small_data.queries, 10, 8)
        finally:
            searcher.close()
        assert not result.partial
        np.testing.assert_array_equal(result.ids, Searcher(load_index(index_dir)).search(small_data.queries, 10, 8).ids)
    finally:
        for node in new:
            node.kill()
            node.wait()
        cluster.down(state_dir)


def process_gone(pid: int) -> bool:
    try:
        return b"chameleon" not in Path(f"/proc/{pid}/cmdline").read_bytes()  # a zombie's is empty
    except OSError:
        return True


def test_scaling_replaces_nodes_whose_process_died(index_dir, tmp_path):
    state = cluster.up(index_dir, 1, tmp_path / "state", replicas=2, threads=1)
    try:
        dead = state["nodes"][0]
        os.kill(dead["pid"], signal.SIGKILL)
        wait_for(lambda: process_gone(dead["pid"]), 10, interval=0.02)
        healed = cluster.scale(tmp_path / "state", replicas=2)
        assert dead["endpoint"] not in {n["endpoint"] for n in healed["nodes"]}
        assert [n["running"] for n in cluster.status(tmp_path / "state")["nodes"]] == [True, True]
        with RetrievalClient(state["coordinator"]["endpoint"]) as client:
            wait_for(lambda: {n["endpoint"] for n in client.info()["nodes"]} == {n["endpoint"] for n in healed["nodes"]}, 10, interval=0.02)
            assert all(n["alive"] for n in client.info()["nodes"])
    finally:
        cluster.down(tmp_path / "state")


def test_a_node_of_another_index_version_serves_only_the_searches_that_name_its_version(index_dir, tmp_path, small_data):
    """Two versions under one coordinator, as while a new one rolls out: a search goes to the nodes
    of the version it names (the coordinator's own when it names none), never to the other's."""
    other = add_vectors(load_index(index_dir), small_data.queries[:5], np.arange(10**6, 10**6 + 5))
    other_dir = save_index(other, tmp_path / "other")
    ours, theirs = (content_fingerprint(read_manifest(d)) for d in (index_dir, other_dir))
    assert ours != theirs
    state = cluster.up(index_dir, 1, tmp_path / "state", threads=1)
    stranger = None
    try:
        # it announces itself where the cluster's nodes do, as shard 0 of a one-shard index
        stranger, endpoint = start_node(other_dir, tmp_path / "state" / cluster.NODES_DIR)
        queries, list_ids = probe(index_dir, small_data.queries[:5])
        with RetrievalClient(state["coordinator"]["endpoint"]) as client:
            wait_for(lambda: client.info()["versions"].get(theirs, {}).get("ready"), 10, interval=0.02)
            info = client.info()
            assert info["content"] == ours and info["versions"][ours]["ready"]
            view = {n["endpoint"]: n for n in info["nodes"]}
            assert view[endpoint]["alive"] and view[endpoint]["content"] == theirs and view[endpoint]["shard"] == 0

            for content in (None, ours):
                before = answered_by(client)[endpoint]
                result = client.search(queries, list_ids, 10, content=content)
                assert answered_by(client)[endpoint] == before
                np.testing.assert_array_equal(result.ids, Searcher(load_index(index_dir)).scan(queries, list_ids, 10).ids)
            # the other version's answers, with the vectors it added, come only from its node
            assert client.info()["versions"][theirs]["idle_s"] is None  # nobody searched it yet
            before = answered_by(client)[endpoint]
            result = client.search(queries, list_ids, 10, content=theirs)
            assert answered_by(client)[endpoint] == before + 1
            assert 0 <= client.info()["versions"][theirs]["idle_s"] < 5
            np.testing.assert_array_equal(result.ids, Searcher(other).scan(queries, list_ids, 10).ids)
            assert (result.ids >= 10**6).any()
            with pytest.raises(RemoteUnavailable, match="no live retrieval node serves index feedface"):
                client.search(queries, list_ids, 10, content="feedface")
        # a coordinator's own version (for searches that name none) is the one its --index holds
        # now: a deployment's link to its current version, moved while it serves
        link = tmp_path / "current"
        link.symlink_to(index_dir)
        inline = InlineCoordinator(
            Coordinator(ClusterConfig.of_index(link, [f"dir://{tmp_path / 'state' / cluster.NODES_DIR}"])), timeout=10
        )
        try:
            wait_for(lambda: inline.info()["ready"] and inline.info()["versions"].get(theirs, {}).get("ready"), 10, interval=0.02)
            moved = tmp_path / "current.new"
            moved.symlink_to(other_dir)
            moved.replace(link)
            wait_for(lambda: inline.info()["content"] == theirs, 10, interval=0.02)
            np.testing.assert_array_equal(inline.search(queries, list_ids, 10).ids, Searcher(other).scan(queries, list_ids, 10).ids)
        finally:
            inline.close()
    finally:
        if stranger is not None:
            stranger.send_signal(signal.SIGTERM)
            stranger.wait(timeout=30)
        cluster.down(tmp_path / "state")


def test_processes_started_before_their_index_wait_for_it(index_dir, tmp_path):
    """As in a deployment whose index job still runs: the coordinator and a node wait for the
    index to appear, then serve; one that waits in vain says what is missing."""
    later = tmp_path / "later"
    ready = tmp_path / "coordinator.json"
    command = ["node", "coordinator", "--index", later, "--nodes", f"dir://{tmp_path / 'nodes'}", "--bind", "tcp://127.0.0.1:*"]
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "chameleon", *map(str, command), "--ready-file", str(ready), "--wait-for-index", "120"]
    )
    node = subprocess.Popen([sys.executable, "-m", "chameleon", "node", "retrieval", "--index", str(later), "--shard", "0",
                             "--bind", "tcp://127.0.0.1:*", "--ready-file", str(tmp_path / "nodes" / "n.json"), "--wait-for-index", "120"])  # fmt: skip
    try:
        time.sleep(1.0)
        assert coordinator.poll() is None and node.poll() is None and not ready.exists()
        shutil.copytree(index_dir, tmp_path / "copy")
        (tmp_path / "copy").rename(later)  # appears whole, as the index job's atomic write
        wait_for(ready.is_file, 60, interval=0.02)
        with RetrievalClient(json.loads(ready.read_text())["endpoint"]) as client:
            wait_for(lambda: client.info()["ready"], 60, interval=0.02)
    finally:
        for process in (coordinator, node):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    command[command.index(later)] = tmp_path / "never"
    missing = subprocess.run(
        [sys.executable, "-m", "chameleon", *map(str, command), "--wait-for-index", "0.3"], capture_output=True, text=True
    )
    assert missing.returncode == 2 and "does not exist (waited 0.3 s)" in missing.stderr


def test_a_coordinator_finds_its_nodes_by_name(index_dir, tmp_path, small_data):
    """The DNS way (a Compose service, a Kubernetes headless Service): the coordinator is given a
    name and a port, and takes every node behind the name; here the name is localhost."""
    node, endpoint = start_node(index_dir, tmp_path, bind="tcp://127.0.0.1:0")
    port = endpoint.rsplit(":", 1)[1]
    ready = tmp_path / "coordinator.json"
    command = ["node", "coordinator", "--index", index_dir, "--nodes", f"dns://localhost:{port}", "--bind", "tcp://127.0.0.1:*"]
    coordinator = subprocess.Popen([sys.executable, "-m", "chameleon", *map(str, command), "--ready-file", str(ready)])
    try:
        wait_for(ready.is_file, 60, interval=0.02)
        with RetrievalClient(json.loads(ready.read_text())["endpoint"]) as client:
            wait_for(lambda: client.info()["ready"], 10, interval=0.02)
            assert {n["endpoint"] for n in client.info()["nodes"] if n["alive"]} == {f"tcp://127.0.0.1:{port}"}
    finally:
        for process in (coordinator, node):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
