"""The knowledge-tree cache policy (hand-computed examples, invariants under random traffic) and the
prefill profile it costs requests with."""

import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.kv_cache import DEVICE, HOST, POLICIES, CacheAwareQueue, KnowledgeTree
from coordinator.prefill_profile import PrefillProfile, measure
from retriever.errors import RetrieverError

# T(cached, new) in seconds on a small grid; requests below land on grid points or midpoints.
PROFILE = PrefillProfile(cached=[0, 100, 300], new=[10, 100], table=[[0.010, 0.050], [0.012, 0.060], [0.020, 0.100]])


def test_profile_interpolates_bilinearly_and_round_trips(tmp_path):
    assert PROFILE.seconds(100, 10) == pytest.approx(0.012)
    assert PROFILE.seconds(100, 55) == pytest.approx(0.036)
    assert PROFILE.seconds(200, 10) == pytest.approx(0.016)
    assert PROFILE.seconds(200, 55) == pytest.approx((0.036 + 0.060) / 2)
    assert PROFILE.seconds(0, 190) == pytest.approx(0.090)  # linear past the new-token grid
    assert PROFILE.seconds(900, 10) == pytest.approx(0.020)  # the last cached row past the grid
    assert PROFILE.seconds(50, 0) == 0.0
    PROFILE.save(tmp_path / "p.json")
    assert PrefillProfile.load(tmp_path / "p.json") == PROFILE
    (tmp_path / "bad.json").write_text(json.dumps({"format": "chameleon-prefill-profile", "cached": [0], "new": [1, 2], "table": [[1]]}))
    with pytest.raises(RetrieverError, match="table"):
        PrefillProfile.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(RetrieverError, match="not a prefill profile"):
        PrefillProfile.load(tmp_path / "junk.json")
    with pytest.raises(RetrieverError, match="increasing"):
        PrefillProfile([0, 0], [1, 2], [[1, 2], [1, 2]])


def test_profile_prefill_command_measures_a_real_engine(tiny_model, tmp_path):
    out = tmp_path / "profile.json"
    command = [sys.executable, "-m", "chameleon", "profile", "prefill", "--out", out, "--model", tiny_model, "--cached", "0,64", "--new", "8,32", "--repeats", "1"]
    subprocess.run(list(map(str, command)), check=True, capture_output=True)
    profile = PrefillProfile.load(out)
    assert (profile.cached, profile.new) == ([0, 64], [8, 32]) and min(min(row) for row in profile.table) > 0
    assert profile.model == "tiny-llama" and profile.seconds(32, 16) > 0
    bad = subprocess.run(list(map(str, [*command[:-6], "--cached", "64,0", "--new", "8,32"])), capture_output=True, text=True)
    assert bad.returncode == 2 and "increasing" in bad.stderr


def test_measure_refuses_grids_past_the_context_window(tiny_model):
    from chameleon.llm import TorchEngine

    with pytest.raises(RetrieverError, match="context window"):
        measure(TorchEngine(tiny_model), cached=[0, 1000], new=[8, 100])


def test_pgdsf_priorities_and_clock_by_hand():
    tree = KnowledgeTree("pgdsf", device_bytes=250, host_bytes=0, bytes_per_token=1, template_tokens=100, profile=PROFILE)
    first = tree.access([("a", 90)], question_tokens=10)  # cached 100, new 100: T = 0.060
    assert (first.cached_tokens, first.computed_tokens, [n.doc for n in first.inserted]) == (100, 100, ["a"])
    a = first.inserted[0]
    assert a.priority == pytest.approx(0.060 / 100)
    b = tree.access([("b", 45)], question_tokens=10).inserted[0]  # cached 100, new 55: T = 0.036
    assert b.priority == pytest.approx(0.036 / 55)
    hit = tree.access([("a", 90)], question_tokens=10)  # a hit adds frequency, not cost
    assert (hit.cached_tokens, hit.device_hits) == (190, [a]) and a.priority == pytest.approx(2 * 0.0006)
    third = tree.access([("c", 40)], question_tokens=10)  # 235 + 40 > 250: b has the lowest priority
    assert third.dropped == [(b, DEVICE)] and "b" not in tree.root.children
    assert tree.clock[DEVICE] == pytest.approx(0.036 / 55)
    c = third.inserted[0]  # cached 100, new 50: T = 0.012 + (40/90) 0.048
    assert c.priority == pytest.approx(0.036 / 55 + (0.012 + 40 / 90 * 0.048) / 50)
    assert tree.used[DEVICE] == 100 + 90 + 40


def test_gdsf_costs_a_node_alone_and_lru_lfu_order_by_recency_and_frequency():
    gdsf = KnowledgeTree("gdsf", 1000, 0, 1, 10, PROFILE)
    assert gdsf.access([("a", 100)]).inserted[0].priority == pytest.approx(0.050 / 100)  # T(0, 100) / 100
    lru = KnowledgeTree("lru", 10 + 60, 0, 1, 10)
    lfu = KnowledgeTree("lfu", 10 + 60, 0, 1, 10)
    for tree in (lru, lfu):
        for doc in ["x", "x", "y", "z"]:  # x twice, then y and z: full (60 tokens)
            tree.access([(doc, 20)])
    assert lru.access([("w", 20)]).dropped[0][0].path == ("x",)  # least recent
    assert lfu.access([("w", 20)]).dropped[0][0].path == ("y",)  # least frequent, then least recent


def test_only_leaves_are_evicted():
    tree = KnowledgeTree("gdsf", device_bytes=10 + 110 + 10, host_bytes=0, bytes_per_token=1, template_tokens=10, profile=PROFILE)
    path = tree.access([("a", 100), ("b", 10)]).inserted  # a: 0.0005 per token, b: 0.001: a is cheaper
    assert [n.path for n in path] == [("a",), ("a", "b")] and path[0].priority < path[1].priority
    assert tree.access([("c", 20)]).dropped == [(path[1], DEVICE)]  # b, the leaf, though a ranks lower
    assert tree.access([("d", 20)]).dropped == [(path[0], DEVICE)]  # now a is a leaf


def test_swap_out_happens_once_and_host_hits_come_back():
    tree = KnowledgeTree("lru", device_bytes=10 + 20, host_bytes=100, bytes_per_token=1, template_tokens=10)
    a = tree.access([("a", 20)]).inserted[0]
    second = tree.access([("b", 20)])
    b = second.inserted[0]
    assert second.swapped_out == [a] and a.tier == HOST and tree.used == {DEVICE: 30, HOST: 20}
    third = tree.access([("a", 20)])
    assert third.host_hits == [a] and third.cached_tokens == 30 and third.swapped_out == [b]
    assert a.on_device and a.on_host  # the host copy stays
    fourth = tree.access([("b", 20)])
    assert fourth.host_hits == [b] and fourth.swapped_out == [] and a.tier == HOST  # no second copy
    assert tree.used == {DEVICE: 30, HOST: 40}


def test_a_parent_the_host_cannot_take_goes_with_its_subtree():
    tree = KnowledgeTree("lru", device_bytes=10 + 50, host_bytes=25, bytes_per_token=1, template_tokens=10)
    a, b = tree.access([("a", 30), ("b", 20)]).inserted
    tree.access([("c", 20)])  # b (leaf) to the host
    assert b.tier == HOST and a.tier == DEVICE
    out = tree.access([("d", 30)])  # a (30) must leave the device; the host (25) cannot take it: a and b go
    assert {(n.doc, tier) for n, tier in out.dropped} == {("b", HOST), ("a", DEVICE)}
    assert tree.match(["a", "b"]) == [] and tree.used[HOST] == 0


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    device=st.integers(10 + 40, 10 + 400),
    host=st.integers(0, 300),
    requests=st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4, unique=True), min_size=1, max_size=40),
)
def test_invariants_hold_under_random_traffic(policy, device, host, requests):
    sizes = {f"d{n}": 10 + 7 * n for n in range(10)}
    tree = KnowledgeTree(policy, device, host, 1, 10, PROFILE)
    rank = {DEVICE: 2, HOST: 1, None: 0}
    for docs in requests:
        request = [(f"d{n}", sizes[f"d{n}"]) for n in docs]
        access = tree.access(request, question_tokens=5)
        assert access.cached_tokens + access.computed_tokens == 10 + sum(t for _, t in request) + 5
        nodes = tree.nodes()
        assert tree.root.on_device and all(n.tier is not None for n in nodes)
        for tier in (DEVICE, HOST):
            resident = [n for n in nodes if (n.on_device if tier == DEVICE else n.on_host)]
            assert tree.used[tier] == sum(n.tokens for n in resident) <= tree.budget[tier]
        for node in nodes:
            for child in node.children.values():
                assert rank[node.tier] >= rank[child.tier] and child.parent is node


def test_reordering_prefers_cached_work_without_starving_anyone():
    tree = KnowledgeTree("lru", 10_000, 0, 1, 10)
    tree.access([("hot", 200)])
    queue = CacheAwareQueue(lambda request: tree.reuse_ratio(request[1], 10), window=2)
    queue.push(("cold", [("x", 200)]))
    for n in range(3):
        queue.push((f"hot-{n}", [("hot", 200)]))
    assert tree.reuse_ratio([("hot", 200)], 10) == 210 / 10 and tree.reuse_ratio([("x", 200)], 10) == 10 / 210
    assert [queue.pop()[0] for _ in range(4)] == ["hot-0", "hot-1", "cold", "hot-2"]  # cold passed over twice at most
    with pytest.raises(IndexError):
        queue.pop()
    fifo = CacheAwareQueue(lambda request: 0.0)
    for n in range(5):
        fifo.push(n)
    assert [fifo.pop(), fifo.pop()] == [0, 1] and fifo.drain() == [2, 3, 4] and len(fifo) == 0


def test_bad_configurations_are_refused():
    with pytest.raises(RetrieverError, match="one of"):
        KnowledgeTree("fifo", 100, 0, 1, 10)
    with pytest.raises(RetrieverError, match="profile"):
        KnowledgeTree("pgdsf", 100, 0, 1, 10)
    with pytest.raises(RetrieverError, match="template"):
        KnowledgeTree("lru", 5, 0, 1, 10)
    with pytest.raises(RetrieverError, match="distinct"):
        KnowledgeTree("lru", 100, 0, 1, 10).access([("a", 5), ("a", 5)])


def test_bench_kvcache_rows(facts_index, tiny_model, tmp_path):
    from chameleon.bench_kvcache import ROW_KEYS

    out = tmp_path / "kv.json"
    command = ["bench", "kvcache", "--json", out, "--index", facts_index, "--model", tiny_model, "--requests", 20,
               "--zipf", "1.1", "--policies", "none,lru,pgdsf", "--device-docs", 8, "--host-docs", 8]  # fmt: skip
    subprocess.run([sys.executable, "-m", "chameleon", *map(str, command)], check=True, capture_output=True)
    rows = json.loads(out.read_text())
    assert [(r["policy"], r["reorder"]) for r in rows] == [("none", False), ("lru", False), ("lru", True), ("pgdsf", False), ("pgdsf", True)]
    assert all(tuple(r) == ROW_KEYS and r["speculative"] is False and r["zipf_s"] == 1.1 for r in rows)
    assert rows[0]["hit_rate"] == 0 and all(0 < r["hit_rate"] < 1 for r in rows[1:])
    assert all(r["ttft_p50_ms"] <= r["ttft_p99_ms"] and r["throughput_rps"] > 0 for r in rows)
    bad = subprocess.run([sys.executable, "-m", "chameleon", *map(str, command), "--policies", "fifo"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--policies" in bad.stderr
