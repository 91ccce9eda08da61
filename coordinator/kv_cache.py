"""RAGCache-style knowledge tree: which retrieved documents' KV to keep, in which tier, and what to evict.

The root is the prompt template (system prompt); a node is a document *after* the documents on
its path, because a document's KV depends on everything before it. A request that retrieves the
ordered documents d1..dk reuses the KV of the longest resident path root → d1 → … and computes
the rest, which is then admitted. This module is the policy only and engine-agnostic: every
``Access`` says which nodes to copy where, and each node has a ``handle`` for the engine's KV. An
engine that evicts KV on its own (vLLM) tells the tree with ``forget``; ``canonical_order`` says
in which order to put a request's documents to reuse the most of the tree.

Tiers: ``device`` (GPU memory; on a CPU host a bounded hot pool) and ``host``, each with a byte
budget. Invariants: a parent sits in a tier at least as fast as its children; only leaves of a
tier are evicted from it; a node evicted from the device is copied to the host once and keeps
that copy (a later device eviction just drops the device copy); the root never leaves the device.

Replacement policies, as priorities (the lowest is evicted):
  lru    last access                    lfu   (frequency, last access)
  gdsf   clock + frequency × cost / size, cost = T(0, size), the node computed from scratch
  pgdsf  clock + frequency × mean over the requests that missed on the node of T(cached_i, new_i) / new_i
where T is the measured prefill profile and each tier has its own clock, raised to the priority
of what that tier evicts (so what stays ages relative to newcomers). Ties: of two leaves with equal
priorities the node created earlier (the lower ``Node.seq``, i.e. first admitted earlier) is evicted
first.

Counts outlive residency: a node that leaves the tree leaves its frequency and miss costs behind
(for the last :data:`HISTORY_LIMIT` paths), and the node is born with them when its path is
admitted again, so a popular document evicted in a burst of others is not ranked as a newcomer
(on 1,000-request Zipf streams this raised LFU's, GDSF's and PGDSF's hit rates by 3-20%).

Each tier keeps its evictable leaves as they change (a node's leafness changes only when it or a
child enters or leaves a tier, which the counts of device and resident children tell in O(1)), in a
heap by (priority, seq) with lazy invalidation: an eviction costs O(log nodes), not a walk of the tree.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from coordinator.prefill_profile import PrefillProfile
from retriever.errors import InvalidInput

DEVICE, HOST = "device", "host"
POLICIES = ("lru", "lfu", "gdsf", "pgdsf")
HISTORY_LIMIT = 1 << 16  # paths whose counts are remembered after they leave the tree
_NODE_SEQ = itertools.count()  # creation order: the tie-break between equal priorities


@dataclass(eq=False)
class Node:
    doc: str | None  # None for the root
    tokens: int
    parent: Node | None = None
    children: dict[str, Node] = field(default_factory=dict)
    on_device: bool = False
    on_host: bool = False
    frequency: int = 0
    last_access: int = 0
    miss_cost_per_token: float = 0.0  # sum over the requests that missed on this node
    misses: int = 0
    priority: float | tuple | None = None  # None until the end of the request that created it
    handle: object = None  # the engine's KV for this node's tokens
    seq: int = field(default_factory=_NODE_SEQ.__next__)
    device_children: int = 0  # children on the device, kept by the tree (its leaf bookkeeping)
    resident_children: int = 0  # children in either tier, likewise

    @property
    def tier(self) -> str | None:
        return DEVICE if self.on_device else HOST if self.on_host else None

    @property
    def path(self) -> tuple[str, ...]:
        docs, node = [], self
        while node.parent is not None:
            docs.append(node.doc)
            node = node.parent
        return tuple(reversed(docs))


@dataclass
class Access:
    """What one request found and what the engine must do for it."""

    cached_tokens: int  # template + documents whose KV is reused
    computed_tokens: int  # documents + question prefilled now
    device_hits: list[Node]
    host_hits: list[Node]  # copy host -> device before use (they are now on the device)
    inserted: list[Node]  # keep the KV computed now for these (on the device)
    swapped_out: list[Node] = field(default_factory=list)  # copy device -> host, then drop the device copy
    dropped: list[tuple[Node, str]] = field(default_factory=list)  # (node, tier): free that copy, the node is gone


class KnowledgeTree:
    def __init__(
        self,
        policy: str,
        device_bytes: int,
        host_bytes: int,
        bytes_per_token: int,
        template_tokens: int,
        profile: PrefillProfile | None = None,
    ):
        if policy not in POLICIES:
            raise InvalidInput(f"the cache policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if policy in ("gdsf", "pgdsf") and profile is None:
            raise InvalidInput(f"{policy} needs a prefill profile (`chameleon profile prefill`)")
        if bytes_per_token <= 0 or device_bytes < template_tokens * bytes_per_token or host_bytes < 0:
            raise InvalidInput("the device budget must at least hold the prompt template, and budgets are non-negative")
        self.policy, self.profile = policy, profile
        self.budget = {DEVICE: device_bytes, HOST: host_bytes}
        self.used = {DEVICE: template_tokens * bytes_per_token, HOST: 0}
        self.clock = {DEVICE: 0.0, HOST: 0.0}
        self.bytes_per_token = bytes_per_token
        self.root = Node(None, template_tokens, on_device=True)
        self._ticks = 0
        self._history: dict[tuple[str, ...], tuple[int, float, int]] = {}  # path -> counts of nodes that left
        # per tier: the evictable leaves, each with its newest heap entry; older entries are stale
        self._live: dict[str, dict[Node, tuple]] = {DEVICE: {}, HOST: {}}
        self._heaps: dict[str, list[tuple]] = {DEVICE: [], HOST: []}

    # -- lookups ------------------------------------------------------------------------------

    def match(self, docs: Sequence[str]) -> list[Node]:
        """The resident nodes of the longest cached prefix of ``docs`` (no side effects)."""
        matched, node = [], self.root
        for doc in docs:
            node = node.children.get(doc)
            if node is None or node.tier is None:
                break
            matched.append(node)
        return matched

    def cached_tokens(self, docs: Sequence[str]) -> int:
        return self.root.tokens + sum(n.tokens for n in self.match(docs))

    def reuse_ratio(self, docs: Sequence[tuple[str, int]], question_tokens: int) -> float:
        """Cached / computed prompt tokens of a request, as the tree stands now (for reordering)."""
        cached = self.cached_tokens([doc for doc, _ in docs])
        return cached / max(self.root.tokens + sum(t for _, t in docs) + question_tokens - cached, 1)

    def nodes(self) -> list[Node]:
        found, stack = [], [self.root]
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(node.children.values())
        return found

    def canonical_order(self, docs: Sequence[str]) -> list[int]:
        """Positions of ``docs`` in the order that reuses the most of the tree: first the resident
        path a greedy walk from the root finds among them (at each node, of the resident children
        among ``docs``, the one ranked first in ``docs``, so top-ranked documents stay early), then
        the others in their own order. A permutation of ``range(len(docs))``; no side effects."""
        rank: dict[str, int] = {}
        for position, doc in enumerate(docs):
            rank.setdefault(doc, position)
        path, node = [], self.root
        while steps := [rank[doc] for doc, child in node.children.items() if doc in rank and child.tier is not None]:
            path.append(min(steps))
            node = node.children[docs[path[-1]]]
        on_path = set(path)
        return path + [position for position in range(len(docs)) if position not in on_path]

    # -- what the engine evicted on its own -----------------------------------------------------

    def forget(self, node: Node) -> None:
        """Remove ``node`` and its subtree from every tier: their KV is gone without the tree's say
        (an engine with its own block manager, as vLLM). A node no longer in the tree is left alone."""
        if node is self.root:
            raise InvalidInput("the prompt template's node cannot be forgotten")
        if not self._attached(node):
            return
        for child in list(node.children.values()):
            self.forget(child)
        self.used[DEVICE] -= self._bytes(node) * node.on_device
        self.used[HOST] -= self._bytes(node) * node.on_host
        self._move(node, False, False)
        del node.parent.children[node.doc]

    def _attached(self, node: Node) -> bool:
        """Whether ``node`` is still in the tree: evictions unlink a node from its parent and leave it be."""
        while node.parent is not None:
            if node.parent.children.get(node.doc) is not node:
                return False
            node = node.parent
        return node is self.root

    # -- one request ----------------------------------------------------------------------------

    def access(self, docs: Sequence[tuple[str, int]], question_tokens: int = 0) -> Access:
        """Serve one request whose prompt is template + ``docs`` ((id, tokens) in prompt order) + question."""
        if len({doc for doc, _ in docs}) != len(docs) or any(tokens <= 0 for _, tokens in docs):
            raise InvalidInput("a request's documents must be distinct, each with at least one token")
        self._ticks += 1
        matched = self.match([doc for doc, _ in docs])
        pinned = {id(self.root), *(id(n) for n in matched)}
        access = Access(0, 0, [], [], [])
        usable = []
        for node in matched:  # host hits come back to the device, parents first, while they fit
            if node.on_device or self._make_room(DEVICE, node.tokens, pinned, access):
                if not node.on_device:
                    self._move(node, True, node.on_host)
                    self.used[DEVICE] += self._bytes(node)
                    access.host_hits.append(node)
                else:
                    access.device_hits.append(node)
                usable.append(node)
            else:
                break
        parent = usable[-1] if usable else self.root
        missing = docs[len(usable) :]
        access.cached_tokens = self.root.tokens + sum(n.tokens for n in usable)
        access.computed_tokens = sum(tokens for _, tokens in missing) + question_tokens
        cost_per_token = self._cost(access.cached_tokens, access.computed_tokens) / max(access.computed_tokens, 1)
        for doc, tokens in missing:
            node = parent.children.get(doc)
            if node is None:
                node = Node(doc, tokens, parent)
                node.frequency, node.miss_cost_per_token, node.misses = self._history.get(node.path, (0, 0.0, 0))
            pinned.add(id(node))
            if not self._make_room(DEVICE, tokens, pinned, access):
                break  # too big for the device with this request's path pinned: computed, not kept
            parent.children[doc] = node  # attached before it moves: the move counts it in its parent
            self._history.pop(node.path, None)
            self._move(node, True, node.on_host)
            self.used[DEVICE] += self._bytes(node)
            access.inserted.append(node)
            node.miss_cost_per_token += cost_per_token
            node.misses += 1
            parent = node
        for node in [*usable, *access.inserted]:
            node.frequency += 1
            node.last_access = self._ticks
            node.priority = self._priority(node, DEVICE)
            self._refresh(node)
        return access

    # -- eviction -------------------------------------------------------------------------------

    def _make_room(self, tier: str, tokens: int, pinned: set[int], access: Access) -> bool:
        """Evict leaves of ``tier`` (lowest priority first, never ``pinned``) until ``tokens`` fit."""
        need = tokens * self.bytes_per_token
        if need > self.budget[tier]:
            return False
        while self.used[tier] + need > self.budget[tier]:
            victim = self._victim(tier, pinned)
            if victim is None:
                return False
            self.clock[tier] = max(self.clock[tier], victim.priority) if self.policy in ("gdsf", "pgdsf") else 0.0
            if tier == DEVICE:
                self._leave_device(victim, pinned, access)
            else:
                self._drop(victim, HOST, access)
        return True

    def _victim(self, tier: str, pinned: set[int]) -> Node | None:
        """The leaf of ``tier`` to evict: the lowest (priority, seq) not ``pinned``; None if there is none.

        Its entry leaves the heap but stays live: the caller moves it out of the tier, which drops it.
        """
        heap, live = self._heaps[tier], self._live[tier]
        skipped, victim = [], None
        while heap and victim is None:
            entry = heapq.heappop(heap)
            if live.get(entry[-1]) is not entry:
                continue  # stale: the node left the leaves or was pushed again with a new priority
            if id(entry[-1]) in pinned:
                skipped.append(entry)  # this request's path: a leaf still, for later requests
            else:
                victim = entry[-1]
        for entry in skipped:
            heapq.heappush(heap, entry)
        return victim

    def _move(self, node: Node, on_device: bool, on_host: bool) -> None:
        """Put ``node`` (attached to its parent) in these tiers; update its parent's child counts and both leaf entries."""
        parent = node.parent
        parent.device_children += on_device - node.on_device
        parent.resident_children += (on_device or on_host) - (node.tier is not None)
        node.on_device, node.on_host = on_device, on_host
        if node.tier is None:
            self._remember(node)
        self._refresh(node)
        self._refresh(parent)

    def _remember(self, node: Node) -> None:
        """Keep the counts of a node that leaves the tree, for when its path is admitted again
        (the most recent :data:`HISTORY_LIMIT` paths)."""
        path = node.path
        self._history.pop(path, None)  # re-inserted last: the oldest entry goes first
        self._history[path] = (node.frequency, node.miss_cost_per_token, node.misses)
        if len(self._history) > HISTORY_LIMIT:
            del self._history[next(iter(self._history))]

    def _refresh(self, node: Node) -> None:
        """Make each tier's leaf entry of ``node`` match what it is now: absent, or a leaf at its current priority."""
        device_leaf = node.on_device and not node.device_children and node is not self.root  # no child on the device
        host_leaf = node.on_host and not node.on_device and not node.resident_children  # host-only, no resident child
        for tier, is_leaf in ((DEVICE, device_leaf), (HOST, host_leaf)):
            live = self._live[tier]
            if not is_leaf or node.priority is None:  # None: pinned by its request, which then sets it
                live.pop(node, None)
            elif node not in live or live[node][0] != node.priority:
                self._push(tier, node)

    def _push(self, tier: str, node: Node) -> None:
        """A new heap entry for ``node`` in ``tier``; its older entries become stale."""
        # (priority, seq) is unique per node, so comparisons never reach the node itself
        entry = (node.priority, node.seq, node)
        live, heap = self._live[tier], self._heaps[tier]
        live[node] = entry
        if len(heap) > 2 * len(live) + 64:  # mostly stale: rebuild from the live entries (amortised O(1) a push)
            heap[:] = live.values()
            heapq.heapify(heap)
        else:
            heapq.heappush(heap, entry)

    def _leave_device(self, node: Node, pinned: set[int], access: Access) -> None:
        if not node.on_host:  # swap out once: the host copy is made now and kept
            if self._make_room(HOST, node.tokens, pinned | {id(node)}, access):
                self._move(node, True, True)
                self.used[HOST] += self._bytes(node)
                access.swapped_out.append(node)
            else:
                for child in list(node.children.values()):  # the host cannot take it: its subtree goes too
                    self._drop_subtree(child, access)
        self.used[DEVICE] -= self._bytes(node)
        if node.on_host:
            node.priority = self._priority(node, HOST)  # before the move, so that its host entry has it
        self._move(node, False, node.on_host)
        if not node.on_host:
            access.dropped.append((node, DEVICE))
            del node.parent.children[node.doc]

    def _drop(self, node: Node, tier: str, access: Access) -> None:
        self._move(node, False, False)
        self.used[HOST] -= self._bytes(node)
        access.dropped.append((node, tier))
        del node.parent.children[node.doc]

    def _drop_subtree(self, node: Node, access: Access) -> None:
        for child in list(node.children.values()):
            self._drop_subtree(child, access)
        if node.on_host:
            self._drop(node, HOST, access)

    # -- costs ----------------------------------------------------------------------------------

    def _bytes(self, node: Node) -> int:
        return node.tokens * self.bytes_per_token

    def _cost(self, cached: int, new: int) -> float:
        return self.profile.seconds(cached, new) if self.profile is not None else float(new)

    def _priority(self, node: Node, tier: str) -> float | tuple:
        if self.policy == "lru":
            return node.last_access
        if self.policy == "lfu":
            return (node.frequency, node.last_access)
        if self.policy == "gdsf" or not node.misses:
            per_token = self._cost(0, node.tokens) / node.tokens
        else:
            per_token = node.miss_cost_per_token / node.misses
        return self.clock[tier] + node.frequency * per_token


class CacheAwareQueue:
    """Waiting requests, served by ``ratio(request)`` (cached length / computed length: most reuse
    per unit of work first; read at pop time, as the cache changes while they wait), the oldest on
    ties; a request passed over ``window`` times is served next, so nothing waits for more than
    ``window`` later arrivals. With a constant ratio it is a FIFO queue."""

    def __init__(self, ratio: Callable[[object], float], window: int = 8):
        if window < 1:
            raise InvalidInput(f"the reordering window must be at least 1, got {window}")
        self.ratio, self.window = ratio, window
        self._waiting: list[list] = []  # [request, times passed over], in arrival order

    def __len__(self) -> int:
        return len(self._waiting)

    def push(self, request) -> None:
        self._waiting.append([request, 0])

    def pop(self):
        if not self._waiting:
            raise IndexError("no request is waiting")
        starved = [entry for entry in self._waiting if entry[1] >= self.window]
        chosen = starved[0] if starved else max(self._waiting, key=lambda entry: self.ratio(entry[0]))  # max: the oldest of equals
        position = self._waiting.index(chosen)
        for earlier in self._waiting[:position]:
            earlier[1] += 1
        del self._waiting[position]
        return chosen[0]

    def drain(self) -> list:
        """Every waiting request, oldest first; the queue is then empty."""
        requests, self._waiting = [entry[0] for entry in self._waiting], []
        return requests
