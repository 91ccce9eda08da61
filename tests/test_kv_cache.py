"""The knowledge-tree cache policy (hand-computed examples, invariants under random traffic) and the
prefill profile it costs requests with."""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chameleon.engines.prefill_timing import measure
from coordinator.kv_cache import DEVICE, HOST, POLICIES, CacheAwareQueue, KnowledgeTree
from coordinator.prefill_profile import PrefillProfile
from retriever.errors import InvalidInput

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
    with pytest.raises(InvalidInput, match="table"):
        PrefillProfile.load(tmp_path / "bad.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(InvalidInput, match="not a prefill profile"):
        PrefillProfile.load(tmp_path / "junk.json")
    with pytest.raises(InvalidInput, match="increasing"):
        PrefillProfile([0, 0], [1, 2], [[1, 2], [1, 2]])


def test_profile_prefill_command_measures_a_real_engine(tiny_model, tmp_path):
    out = tmp_path / "profile.json"
    command = [
        sys.executable,
        "-m",
        "chameleon",
        "profile",
        "prefill",
        "--out",
        out,
        "--model",
        tiny_model,
        "--cached",
        "0,64",
        "--new",
        "8,32",
        "--repeats",
        "1",
    ]
    subprocess.run(list(map(str, command)), check=True, capture_output=True)
    profile = PrefillProfile.load(out)
    assert (profile.cached, profile.new) == ([0, 64], [8, 32]) and min(min(row) for row in profile.table) > 0
    assert profile.model == "tiny-llama" and profile.seconds(32, 16) > 0
    bad = subprocess.run(list(map(str, [*command[:-6], "--cached", "64,0", "--new", "8,32"])), capture_output=True, text=True)
    assert bad.returncode == 2 and "increasing" in bad.stderr


def test_measure_refuses_grids_past_the_context_window(tiny_model):
    from chameleon.engines.torch_engine import TorchEngine

    with pytest.raises(InvalidInput, match="context window"):
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
    for docs in requests:
        request = [(f"d{n}", sizes[f"d{n}"]) for n in docs]
        access = tree.access(request, question_tokens=5)
        assert access.cached_tokens + access.computed_tokens == 10 + sum(t for _, t in request) + 5
        assert_invariants(tree)


def assert_invariants(tree: KnowledgeTree, within_budget: bool = True) -> None:
    """Root on the device, every node resident, parents in a tier at least as fast as their children,
    used bytes the sum over the resident nodes (within budget unless a document changed size), and
    each tier's maintained leaves exactly those a walk of the tree finds, each with a heap entry."""
    nodes = tree.nodes()
    assert tree.root.on_device and all(n.tier is not None for n in nodes)
    for tier in (DEVICE, HOST):
        resident = [n for n in nodes if (n.on_device if tier == DEVICE else n.on_host)]
        assert tree.used[tier] == sum(n.tokens for n in resident) * tree.bytes_per_token
        assert tree.used[tier] <= tree.budget[tier] or not within_budget
        live = tree._live[tier]
        assert set(live) == set(walked_leaves(tree, tier))
        assert {id(entry) for entry in live.values()} <= {id(entry) for entry in tree._heaps[tier]}
        assert all(entry[0] == node.priority for node, entry in live.items())
    rank = {DEVICE: 2, HOST: 1, None: 0}
    for node in nodes:
        for child in node.children.values():
            assert rank[node.tier] >= rank[child.tier] and child.parent is node


def walked_leaves(tree: KnowledgeTree, tier: str) -> list:
    """What may leave ``tier``, by definition: on the device with no child there (not the root);
    host-only with no resident child."""
    if tier == DEVICE:
        return [n for n in tree.nodes() if n.on_device and n is not tree.root and not any(c.on_device for c in n.children.values())]
    return [n for n in tree.nodes() if n.tier == HOST and not any(c.tier for c in n.children.values())]


class WalkingTree(KnowledgeTree):
    """The reference: each victim found by a walk of the whole tree (as before the leaf heaps), same tie-break."""

    def _victim(self, tier, pinned):
        leaves = [n for n in walked_leaves(self, tier) if id(n) not in pinned]
        return min(leaves, key=lambda n: (n.priority, n.seq), default=None)


def by_path(access) -> tuple:
    """An ``Access`` with nodes named by their paths, comparable across trees."""
    nodes = (access.device_hits, access.host_hits, access.inserted, access.swapped_out)
    paths = ([n.path for n in each] for each in nodes)
    return (access.cached_tokens, access.computed_tokens, *paths, [(n.path, tier) for n, tier in access.dropped])


def residency(tree: KnowledgeTree) -> tuple:
    """Where every node's KV is and at what priority, by path; the used bytes and the clocks."""
    return {n.path: (n.on_device, n.on_host, n.priority) for n in tree.nodes()}, tree.used, tree.clock


@settings(max_examples=300, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    device=st.integers(10 + 1, 10 + 200),
    host=st.one_of(st.just(0), st.integers(1, 200)),
    stable_sizes=st.booleans(),
    steps=st.lists(
        st.tuples(
            st.lists(st.tuples(st.integers(0, 7), st.integers(1, 40)), min_size=1, max_size=5, unique_by=lambda d: d[0]),
            st.one_of(st.none(), st.integers(0, 4)),
        ),
        min_size=5,
        max_size=60,
    ),
)
def test_leaf_heaps_evict_what_a_walk_of_the_tree_would(policy, device, host, stable_sizes, steps):
    """Random request streams through the tree and through the walking reference: the same hits,
    admissions, swap-outs and drops, and the same residency, after every request. Documents keep
    their first size, or (``stable_sizes`` false) are re-drawn each request. Some requests are
    followed by the engine evicting one node of their path (``forget``)."""
    tree, reference = KnowledgeTree(policy, device, host, 1, 10, PROFILE), WalkingTree(policy, device, host, 1, 10, PROFILE)
    sizes = {}
    for drawn, forget in steps:
        request = [(f"d{n}", sizes.setdefault(n, tokens) if stable_sizes else tokens) for n, tokens in drawn]
        assert by_path(tree.access(request, 5)) == by_path(reference.access(request, 5))
        for each in (tree, reference):
            path = each.match([doc for doc, _ in request])
            if forget is not None and forget < len(path):
                each.forget(path[forget])
        assert residency(tree) == residency(reference)
        assert_invariants(tree, within_budget=stable_sizes)


def test_a_pinned_leaf_passed_over_stays_evictable():
    # white-box: requests re-prioritise the leaves they pin, which would hide an entry lost here
    tree = KnowledgeTree("lru", 10_000, 0, 1, 10)
    x, y = (tree.access([(doc, 10)]).inserted[0] for doc in "xy")
    assert tree._victim(DEVICE, {id(x)}) is y  # x, the least recent, is pinned
    assert tree._victim(DEVICE, set()) is x  # and still in the heap


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
    with pytest.raises(InvalidInput, match="one of"):
        KnowledgeTree("fifo", 100, 0, 1, 10)
    with pytest.raises(InvalidInput, match="profile"):
        KnowledgeTree("pgdsf", 100, 0, 1, 10)
    with pytest.raises(InvalidInput, match="template"):
        KnowledgeTree("lru", 5, 0, 1, 10)
    with pytest.raises(InvalidInput, match="distinct"):
        KnowledgeTree("lru", 100, 0, 1, 10).access([("a", 5), ("a", 5)])


def test_bench_kvcache_rows(facts_index, tiny_model, tmp_path):
    from chameleon.bench.kvcache import ROW_KEYS

    out = tmp_path / "kv.json"
    command = [
        "bench",
        "kvcache",
        "--json",
        out,
        "--index",
        facts_index,
        "--model",
        tiny_model,
        "--requests",
        20,
        "--zipf",
        "1.1",
        "--policies",
        "none,lru,pgdsf",
        "--device-docs",
        8,
        "--host-docs",
        8,
        "--nprobe",
        4,
        "--warmup",
        10,
    ]
    shown = subprocess.run(
        [sys.executable, "-m", "chameleon", *map(str, command), "--load", "0.5,1.5"], check=True, capture_output=True, text=True
    )
    rows = json.loads(out.read_text())
    configurations = [
        (load, policy, reorder, speculative)
        for load in (0.5, 1.5)
        for policy, reorder in [("none", False), ("lru", False), ("lru", True), ("pgdsf", False), ("pgdsf", True)]
        for speculative in (False, True)
    ]
    assert [(r["load"], r["policy"], r["reorder"], r["speculative"]) for r in rows] == configurations
    assert all(tuple(r)[: len(ROW_KEYS)] == ROW_KEYS and r["zipf_s"] == 1.1 and r["warmup_requests"] == 10 for r in rows)
    assert all(r["speculation"]["started"] + r["speculation"]["declined"] >= 1 for r in rows if r["speculative"])
    assert all(r["hit_rate"] == 0 for r in rows if r["policy"] == "none") and all(
        0 < r["hit_rate"] < 1 for r in rows if r["policy"] != "none"
    )
    assert all(
        r["ttft_p50_ms"] <= r["ttft_p99_ms"]
        and 0 < r["ttft_mean_ms"] <= r["ttft_p99_ms"]
        and r["throughput_rps"] > 0
        and r["capacity_rps"] > 0
        for r in rows
    )
    (light,), (heavy,) = {r["offered_rps"] for r in rows[:10]}, {r["offered_rps"] for r in rows[10:]}  # one rate per load, for every policy
    assert heavy == pytest.approx(3 * light, rel=0.01)
    assert all(r["utilization"] == pytest.approx(r["offered_rps"] / r["capacity_rps"], abs=0.01) for r in rows)
    assert (
        shown.stdout.count("than no cache") == 16
        and "s=1.1 load=1.5 (no cache at utilization" in shown.stdout
        and " pgdsf +reorder +speculative: " in shown.stdout
    )
    for option, value in (("--policies", "fifo"), ("--speculative", "maybe"), ("--nprobe", "1"), ("--warmup", "-1"), ("--load", "0")):
        bad = subprocess.run([sys.executable, "-m", "chameleon", *map(str, command), option, value], capture_output=True, text=True)
        assert bad.returncode == 2 and option.lstrip("-") in bad.stderr, bad.stderr


def test_request_stream_drift_draws_a_new_hot_set():
    from chameleon.bench.kvcache import request_stream
    from chameleon.rag.corpus import Passage

    passages = [Passage(i, f"d{i}", f"t{i}", "s", f"text {i}") for i in range(500)]
    steady = request_stream(passages, 400, 1.1, rate=2.0, seed=3)
    drifting = request_stream(passages, 400, 1.1, rate=2.0, seed=3, drift=200)
    assert [r.about.id for r in drifting[:200]] == [r.about.id for r in steady[:200]]  # the same until the first drift

    def top(requests) -> set[int]:
        ids, counts = np.unique([r.about.id for r in requests], return_counts=True)
        return set(ids[np.argsort(-counts)[:5]].tolist())

    assert top(steady[200:]) & top(steady[:200]) and not top(drifting[200:]) & top(drifting[:200])
    assert [r.arrival for r in drifting] == [r.arrival for r in steady]


def canonical_tree() -> KnowledgeTree:
    """root → a → {b, c → d} and root → e, all on the device, 10 tokens each."""
    tree = KnowledgeTree("lru", device_bytes=1000, host_bytes=0, bytes_per_token=1, template_tokens=10)
    for docs in (["a", "b"], ["a", "c", "d"], ["e"]):
        tree.access([(doc, 10) for doc in docs])
    return tree


def test_canonical_order_puts_the_resident_path_first_then_retrieval_order():
    tree = canonical_tree()
    before = [(n.path, n.tier, n.frequency, n.last_access, n.priority) for n in tree.nodes()]
    assert tree.canonical_order(["x", "d", "c", "a"]) == [3, 2, 1, 0]  # a, c, d, then x
    assert tree.canonical_order(["c", "b", "a", "y"]) == [2, 0, 1, 3]  # under a, c ranks before b; then b, y as retrieved
    assert tree.canonical_order(["e", "a", "b"]) == [0, 1, 2]  # greedy: e ranks first, though a → b holds more
    assert tree.canonical_order(["d", "y", "b"]) == [0, 1, 2]  # nothing resident starts at the root: retrieval order
    assert tree.canonical_order(["a", "a", "c"]) == [0, 2, 1]  # a repeated: still a permutation
    assert tree.canonical_order([]) == []
    assert [(n.path, n.tier, n.frequency, n.last_access, n.priority) for n in tree.nodes()] == before  # no side effects


def test_canonical_order_follows_host_copies_and_forgets_nothing_it_dropped():
    tree = KnowledgeTree("lru", device_bytes=10 + 20, host_bytes=20, bytes_per_token=1, template_tokens=10)
    a = tree.access([("a", 20)]).inserted[0]
    tree.access([("b", 20)])  # a to the host
    assert a.tier == HOST and tree.canonical_order(["x", "a"]) == [1, 0]  # a host copy is reusable too
    tree.access([("c", 20)])  # b to the host, a dropped: the host is full
    assert tree.canonical_order(["x", "a", "b"]) == [2, 0, 1]


def test_forget_removes_a_subtree_from_every_tier():
    tree = KnowledgeTree("lru", device_bytes=10 + 30, host_bytes=100, bytes_per_token=1, template_tokens=10)
    a, b = tree.access([("a", 10), ("b", 10)]).inserted
    c = tree.access([("a", 10), ("c", 10)]).inserted[0]
    d = tree.access([("d", 10)]).inserted[0]  # b, the least recent leaf, to the host
    assert b.tier == HOST and tree.used == {DEVICE: 40, HOST: 10}
    tree.forget(a)
    assert tree.root.children == {"d": d} and tree.used == {DEVICE: 20, HOST: 0}
    assert_invariants(tree)
    tree.forget(c)  # already gone with a: nothing to do
    assert tree.used == {DEVICE: 20, HOST: 0}
    refill = tree.access([("a", 10), ("c", 10), ("e", 10)])  # what the tree forgot is admitted afresh
    assert refill.cached_tokens == 10 and [n.path for n in refill.inserted] == [("a",), ("a", "c"), ("a", "c", "e")]
    assert_invariants(tree)
    with pytest.raises(InvalidInput, match="template"):
        tree.forget(tree.root)


def test_a_document_admitted_again_keeps_the_counts_it_had():
    tree = KnowledgeTree("lfu", device_bytes=10 + 20, host_bytes=0, bytes_per_token=1, template_tokens=10)
    for docs in (["a"], ["a"], ["b"], ["c"]):  # c evicts b, the least used
        tree.access([(doc, 10) for doc in docs])
    assert set(tree.root.children) == {"a", "c"}
    tree.access([("b", 10)])  # evicts c; b comes back with its one earlier use
    assert tree.root.children["b"].frequency == 2
    dropped = tree.access([("d", 10)]).dropped  # a and b both used twice: the older use goes
    assert [(n.doc, tier) for n, tier in dropped] == [("a", "device")]
    assert tree._history[("a",)][0] == 2 and ("b",) not in tree._history


def test_the_history_of_departed_documents_is_bounded(monkeypatch):
    import coordinator.kv_cache as kv_cache

    monkeypatch.setattr(kv_cache, "HISTORY_LIMIT", 3)
    tree = KnowledgeTree("lru", device_bytes=10 + 10, host_bytes=0, bytes_per_token=1, template_tokens=10)
    for doc in "abcdef":
        tree.access([(doc, 10)])
    assert list(tree._history) == [("c",), ("d",), ("e",)]  # room for one document: a..e left in turn, a and b forgotten
