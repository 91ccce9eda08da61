"""What an eviction costs in the knowledge tree: its leaf heaps against a walk of the whole tree.

A tree holding ``--docs`` documents on the device and as many on the host (both tiers full) serves
requests of ``--k`` distinct documents drawn Zipf-like from a pool ten times that size, so that
most requests admit documents and evict as many from each tier. The peer, measured in the same run
on a copy of the same warm tree and the same requests, finds each victim by walking every node (as
the tree did before its leaf heaps; it still pays their upkeep), with the same tie-break. The two
must make the same decisions, which the script checks request by request. Each pass serves all the
requests on a fresh copy of the warm tree (gc collected first); the fastest of ``--repeats`` counts.

    python benchmarks/kv_tree_eviction.py [--docs 5000] [--requests 500] [--repeats 3] [--policy pgdsf] [--k 4]
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's packages, run from anywhere

from coordinator.kv_cache import DEVICE, HOST, POLICIES, KnowledgeTree
from coordinator.prefill_profile import PrefillProfile

TEMPLATE = 100
# T(cached, new): 0.1 ms per new token, cached tokens a tenth as dear (a made-up, plausible shape)
PROFILE = PrefillProfile(cached=[0, 8192], new=[1, 8192], table=[[1e-4, 0.8192], [0.0820, 0.9011]])


class WalkingTree(KnowledgeTree):
    """Victims by a walk over every node for every eviction, same (priority, seq) tie-break."""

    def _victim(self, tier, pinned):
        if tier == DEVICE:
            leaves = (n for n in self.nodes() if n.on_device and n is not self.root and not any(c.on_device for c in n.children.values()))
        else:
            leaves = (n for n in self.nodes() if n.tier == HOST and not any(c.tier for c in n.children.values()))
        return min((n for n in leaves if id(n) not in pinned), key=lambda n: (n.priority, n.seq), default=None)


def requests(pool: int, k: int, seed: int):
    """Endless requests of ``k`` distinct documents, Zipf-like (s = 0.9) over ``pool`` documents of 50-150 tokens."""
    rng = random.Random(seed)
    sizes = [rng.randint(50, 150) for _ in range(pool)]
    weights = list(itertools.accumulate(1 / (rank + 1) ** 0.9 for rank in range(pool)))
    while True:
        docs = dict.fromkeys(rng.choices(range(pool), cum_weights=weights, k=2 * k))  # distinct, in drawn order
        yield [(f"doc{n}", sizes[n]) for n in list(docs)[:k]]


def by_path(access) -> tuple:
    """An ``Access`` with nodes named by their paths, comparable across trees."""
    nodes = (access.device_hits, access.host_hits, access.inserted, access.swapped_out)
    return (*([n.path for n in each] for each in nodes), [(n.path, tier) for n, tier in access.dropped])


def warm_tree(args) -> tuple[KnowledgeTree, list, int]:
    """A tree with both tiers full after churn, the requests to time next, and how many warmed it."""
    budget = args.docs * 100
    tree = KnowledgeTree(args.policy, TEMPLATE + budget, budget, 1, TEMPLATE, PROFILE)
    stream = requests(10 * args.docs, args.k, args.seed)
    warm_up = 0
    while tree.used[HOST] < 0.95 * budget or warm_up < 2 * args.docs // args.k:
        tree.access(next(stream), 32)
        warm_up += 1
    return tree, list(itertools.islice(stream, args.requests)), warm_up


def timed_pass(tree: KnowledgeTree, timed: list) -> tuple[float, list]:
    """Seconds to serve ``timed`` on ``tree``, and what each access decided."""
    gc.collect()
    started = time.perf_counter()
    accesses = [tree.access(request, 32) for request in timed]
    return time.perf_counter() - started, [by_path(access) for access in accesses]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000, help="documents each tier holds (100 tokens each on average)")
    parser.add_argument("--requests", type=int, default=500, help="requests timed, on each tree")
    parser.add_argument("--repeats", type=int, default=3, help="passes on fresh copies of the warm tree; the fastest counts")
    parser.add_argument("--policy", choices=POLICIES, default="pgdsf")
    parser.add_argument("--k", type=int, default=4, help="documents a request")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tree, timed, warm_up = warm_tree(args)
    resident = {tier: sum(n.on_device if tier == DEVICE else n.on_host for n in tree.nodes()) for tier in (DEVICE, HOST)}
    seconds, decided = {"heaps": [], "walk": []}, []
    for _ in range(args.repeats):
        for name, passes in seconds.items():  # one tree after the other: interleaved, the walk would evict the other's cache lines
            copied = copy.deepcopy(tree)
            copied.__class__ = WalkingTree if name == "walk" else KnowledgeTree
            elapsed, outcomes = timed_pass(copied, timed)
            passes.append(elapsed)
            decided.append(outcomes)
    if any(outcomes != decided[0] for outcomes in decided):
        raise SystemExit("the two trees decided differently")
    evicted = sum(len(outcome[3]) + len(outcome[4]) for outcome in decided[0])

    print(
        f"policy {args.policy}: {resident[DEVICE] - 1} documents on the device, {resident[HOST]} on the host after {warm_up} warm-up requests"
    )
    print(
        f"{args.requests} requests of {args.k} documents, {evicted / args.requests:.1f} swap-outs and drops a request; best of {args.repeats} passes"
    )
    for name, passes in seconds.items():
        print(
            f"  {name:5s} {min(passes) / args.requests * 1e6:10.1f} µs an access (passes: {', '.join(f'{s / args.requests * 1e6:.0f}' for s in passes)})"
        )
    print(f"  walk / heaps: {min(seconds['walk']) / min(seconds['heaps']):.0f}x")


if __name__ == "__main__":
    main()
