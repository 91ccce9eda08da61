"""The coordinator: fans each search out to every shard, merges the global top-k, fails over.

It learns its nodes from sources it follows while it serves (:mod:`coordinator.membership`: DNS
names, announcement directories, fixed addresses); each node's INFO says which shard of which
shard layout of which index version it holds. A search names its version (or gets the
coordinator's own) and goes to one layout of it, the newest with a live node for every shard, so
a re-sharded layout takes over once it is whole, and two versions can be served side by side
while a new one rolls out, never mixed in one answer.

Clients send SEARCH with query vectors and their list ids (the coarse search stays with the
queries). For every client request each shard gets one sub-request, sent to its live replica with
the fewest sub-requests in flight (at most ``max_inflight`` per node; more wait in that node's
queue; of equally loaded replicas, the one sent to longest ago). A sub-request that times out, or
that a node refuses (shutting down, overloaded, internal error), is sent to another replica of
its shard; a node that times out or misses heartbeats is taken out of rotation until it answers
a heartbeat again. When a shard has no replica left the answer is ``partial`` with the missing
shards listed, or an ``unavailable`` ERROR when ``on_missing="fail"``, but never a hang. Malformed input (a node's ``bad_request``) goes back to the
client as it is.

:class:`Coordinator` is that logic as a state machine (a client's SEARCH in, a node's message in,
the heartbeat and expiry tick) that hands its answers to a reply sink. Two fronts drive it:
:meth:`Coordinator.serve`, its own process (``chameleon node coordinator``): one event loop (no
threads) over a ROUTER socket for clients and one DEALER socket per retrieval node; and
:class:`InlineCoordinator`, inside a client process and driven by the client's own calls: a search
then crosses the network once (to the nodes and back) instead of twice, with no thread hand-off.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import signal
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import zmq

from coordinator.client import RepliesByRid, result_of_reply
from coordinator.membership import RESOLVE_INTERVAL, Membership
from retriever.errors import InvalidInput, Timeout
from retriever.index import content_fingerprint, content_now, read_manifest
from retriever.search import SearchResult, merge_topk
from retriever.wire import protocol
from retriever.wire.protocol import Message, ProtocolError
from retriever.wire.security import CurveKeys, secure_client
from retriever.wire.transport import bind_router, receive_all

NODE_FAILURE_CODES = ("shutting_down", "overloaded", "internal", "unavailable")
TURN_MS = 10  # the longest one turn of the loop waits for messages before heartbeats and expiries are due again


@dataclass
class ClusterConfig:
    """What a coordinator serves: the index version a search that names none goes to, named by its
    metric and content fingerprint (in whatever shard layouts its nodes hold), and the sources that
    list its nodes (:mod:`coordinator.membership`). Nodes of other versions with the same metric
    serve the searches that name their version: while a new version rolls out, clients of the old
    and of the new one search through the same coordinators, each only its own version's nodes.
    ``index_dir``: where that version is read again while it serves (a deployment's link to its
    current version), so the coordinator's own version follows the deployment's."""

    metric: str
    content: str
    sources: list[str]
    index_dir: Path | None = None

    @classmethod
    def of_index(cls, index_dir: str | os.PathLike, sources: list[str]) -> ClusterConfig:
        """The version in ``index_dir`` (any of its layouts), its nodes listed by ``sources``."""
        manifest = read_manifest(index_dir)
        return cls(manifest["metric"], content_fingerprint(manifest), list(sources), Path(index_dir))

    def follow_index(self) -> None:
        """Take the version ``index_dir`` holds now as this coordinator's own; one that cannot be
        read now (being replaced) leaves it as it was."""
        content = content_now(self.index_dir) if self.index_dir is not None else None
        if content is not None:
            self.content = content


@dataclass
class _Node:
    endpoint: str
    socket: zmq.Socket
    shard: int | None = None  # what its INFO says: its shard ...
    nshards: int = 0  # ... of a layout of this many shards ...
    layout: str | None = None  # ... with this fingerprint, of the index version with this content fingerprint
    content: str | None = None
    alive: bool = False
    listed: bool = True  # a source lists it; once none does it is a last resort until it stops answering
    last_seen: float = 0.0
    last_sent: float = 0.0
    inflight: int = 0
    waiting: deque = field(default_factory=deque)
    info: dict = field(default_factory=dict)
    answered: int = 0  # sub-requests this node answered with a RESULT ...
    answer_s: float = 0.0  # ... and the seconds they took, send to answer (for latency metrics)


@dataclass
class _Job:
    envelope: list | None  # the client's routing envelope; None for the caller of an InlineCoordinator
    rid: int
    k: int
    message: Message
    content: str  # the index version this search is of ...
    layout: str  # ... the shard layout it goes to ...
    nshards: int  # ... and its number of shards
    results: dict = field(default_factory=dict)  # shard -> (distances, ids)
    early_results: dict = field(default_factory=dict)  # shard -> (distances, ids) after its first lists
    early_sent: bool = False
    missing: set = field(default_factory=set)
    error: Message | None = None
    answered: bool = False
    layouts_tried: set = field(default_factory=set)


@dataclass
class _Sub:
    job: _Job
    shard: int
    node: _Node | None = None
    sent: float = 0.0
    deadline: float = 0.0
    tried: set = field(default_factory=set)


class Coordinator:
    """The coordinator's state machine. A front drives it: :meth:`connect` (with the reply sink its
    answers go to), :meth:`start` for each client SEARCH, and :meth:`tick` and :meth:`poll` in turns."""

    def __init__(
        self,
        config: ClusterConfig,
        timeout: float = 2.0,
        on_missing: str = "partial",
        max_inflight: int = 8,
        heartbeat_interval: float = 0.25,
        keys: CurveKeys | None = None,
        resolve_interval: float = RESOLVE_INTERVAL,
    ):
        if on_missing not in ("partial", "fail"):
            raise InvalidInput(f"on_missing must be 'partial' or 'fail', got {on_missing!r}")
        self.config = config
        self.timeout = timeout
        self.on_missing = on_missing
        self.max_inflight = max_inflight
        self.heartbeat_interval = heartbeat_interval
        self.keys = keys
        self.membership = Membership(config.sources, resolve_interval)
        self.endpoint: str | None = None
        # A plain flag, not a threading.Event: drain() runs as a SIGTERM handler, and a second
        # SIGTERM landing inside Event.set() would wait forever on the lock the first one holds
        # (a killed parent sends one per thread it loses, through PR_SET_PDEATHSIG).
        self._draining = False
        self._sub_ids = itertools.count(1)
        self._subs: dict[int, _Sub] = {}
        self._jobs = 0
        self._nodes: dict[str, _Node] = {}  # endpoint -> node
        self._listed: frozenset[str] = frozenset()  # the membership's endpoints the nodes follow
        self._context: zmq.Context | None = None
        self._layouts: dict[str, tuple[str, int]] = {}  # layout -> (its version's content fingerprint, its number of shards)
        self._serving: dict[str, str] = {}  # version -> the layout its new searches go to
        self._whole_since: dict[str, float] = {}  # layout -> since when every shard has a live node
        self._searched_at: dict[str, float] = {}  # version -> when a search of it last came: who still uses an old version
        self._poller = zmq.Poller()
        self._handlers: dict[zmq.Socket, Callable] = {}  # socket -> handle(frames) for a message on it
        self._reply: Callable | None = None  # reply(message, envelope): the sink answers to clients go to
        self._next_heartbeat = 0.0
        self._next_index_look = 0.0

    @property
    def silence_limit(self) -> float:
        """Seconds without a word from a live node after which it is taken out of rotation."""
        return 4 * self.heartbeat_interval + self.timeout

    def drain(self, *_signal_args) -> None:
        self._draining = True

    def serve(self, bind: str, ready_file: str | os.PathLike | None = None) -> None:
        """Serve clients on a ROUTER socket bound to ``bind`` until drained (SIGTERM, :meth:`drain`)."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.drain)
        context = zmq.Context()
        front = authenticator = None
        try:
            self.connect(context, lambda *reply: protocol.send(front, *reply))
            # Clients come once the nodes answer (or a node's silence limit has passed): a client
            # re-sending to a coordinator restarted on the same endpoint gets a whole answer, not
            # "no live node" from one that has not heard its nodes yet.
            deadline = time.monotonic() + self.silence_limit
            while not self._draining and self._serving_layout(self.config.content) not in self._whole_since and time.monotonic() < deadline:
                self.tick(time.monotonic())
                self.poll(TURN_MS)
            front, authenticator, self.endpoint = bind_router(context, bind, self.keys, ready_file)
            self._listen(front, self._on_client)
            while not (self._draining and not self._subs):
                self.tick(time.monotonic())
                self.poll(TURN_MS)
        finally:
            if front is not None:
                front.close(linger=0)
            self.close()
            if authenticator:
                authenticator.stop()
            context.term()

    def connect(self, context: zmq.Context, reply: Callable) -> None:
        """Open a socket on ``context`` to every node the sources list, now and from now on;
        answers to clients go to ``reply(message, envelope)``."""
        self._reply = reply
        self._context = context
        self._follow_membership()
        self.membership.start()

    def close(self) -> None:
        """Stop following the sources; close the sockets to the nodes."""
        self.membership.stop()
        for node in self._nodes.values():
            node.socket.close(linger=0)

    def _follow_membership(self) -> None:
        """Connect to the nodes the sources list that are new. One that no source lists any more
        is leaving: it gets work only when no listed replica of its shard can take it, and goes
        once it no longer answers (:meth:`_forget_gone`). A node is told to stop after it is taken
        off the list (the local cluster, Kubernetes), or taken off when it stops (Compose's DNS):
        either way it answers until every coordinator sent its searches elsewhere."""
        listed = self.membership.endpoints
        if listed is self._listed:
            return
        self._listed = listed
        for endpoint in listed - self._nodes.keys():
            node = _Node(endpoint, self._connect(endpoint))
            self._nodes[endpoint] = node
            self._listen(node.socket, functools.partial(self._on_node, node))
        for node in self._nodes.values():
            node.listed = node.endpoint in listed

    def _forget_gone(self) -> None:
        for node in [n for n in self._nodes.values() if not (n.listed or n.alive or n.inflight or n.waiting)]:
            self._poller.unregister(node.socket)
            del self._handlers[node.socket]
            node.socket.close(linger=0)
            del self._nodes[node.endpoint]

    def _connect(self, endpoint: str) -> zmq.Socket:
        socket = self._context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a node that is not connected: fail over instead
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        secure_client(socket, self.keys)
        socket.connect(endpoint)
        return socket

    def _listen(self, socket: zmq.Socket, handle: Callable) -> None:
        """Have :meth:`poll` pass each message arriving on ``socket`` to ``handle(frames)``."""
        self._poller.register(socket, zmq.POLLIN)
        self._handlers[socket] = handle

    def tick(self, now: float) -> None:
        """Follow the sources, send the heartbeats when their interval has passed, then give up on
        what is overdue at ``now``."""
        self._follow_membership()
        if now >= self._next_index_look:
            self.config.follow_index()
            self._next_index_look = now + RESOLVE_INTERVAL
        if now >= self._next_heartbeat:
            self._heartbeat()
            self._next_heartbeat = now + self.heartbeat_interval
        self._expire(now)

    def poll(self, wait_ms: int) -> None:
        """Handle every message that has arrived, waiting up to ``wait_ms`` for the first."""
        for socket, _ in self._poller.poll(wait_ms):
            handle = self._handlers[socket]
            for frames in receive_all(socket):
                handle(frames)

    def discount(self, seconds: float) -> None:
        """Stop the clocks for ``seconds`` in which nobody drove this coordinator (an inline one's
        caller was away): that time counts neither as a node's silence nor against a sub-request."""
        for node in self._nodes.values():
            node.last_seen += seconds
        for sub in self._subs.values():
            sub.sent += seconds
            sub.deadline += seconds

    # -- clients ------------------------------------------------------------------------------

    def _on_client(self, frames) -> None:
        envelope, rid = frames[:1], 0
        try:
            message = protocol.decode(frames[1:])
            rid = message.rid
            if message.op == "HEARTBEAT":
                self._reply(Message("INFO", rid, {"info": self.info()}), envelope)
                return
            if message.op != "SEARCH":
                raise ProtocolError("bad_request", f"the coordinator answers SEARCH and HEARTBEAT, not {message.op}")
            if self._draining:
                raise ProtocolError("shutting_down", "the coordinator is shutting down")
        except ProtocolError as e:
            self._reply(protocol.error_reply(e.rid or rid, e.code, str(e)), envelope)
            return
        self.start(message, envelope)

    def start(self, search: Message, envelope: list | None = None) -> None:
        """Send a client's SEARCH (already checked) to every shard of the layout its index version
        is served from (the configured version's when it names none); its answers go to the reply
        sink with ``envelope``."""
        self._jobs += 1
        content = search.fields.get("content", self.config.content)
        layout = self._serving_layout(content)
        if layout is None:
            text = f"no live retrieval node serves index {content} ({len(self._nodes)} node(s) listed)"
            self._reply(protocol.error_reply(search.rid, "unavailable", text), envelope)
            return
        self._searched_at[content] = time.monotonic()  # only versions with nodes: what clients name cannot grow it
        job = _Job(envelope, search.rid, search.fields["k"], search, content, layout, self._nshards(layout))
        for shard in range(job.nshards):
            self._dispatch(_Sub(job, shard))

    def _nshards(self, layout: str) -> int:
        return self._layouts[layout][1]

    def _serving_layout(self, content: str) -> str | None:
        """The layout new searches of the version ``content`` go to. Of its layouts with a live
        node for every shard, the one whole since the latest moment: a re-sharded layout takes over
        once whole, and the old one serves until then. With none whole, the one that served before
        (partial answers), else the one with the most live shards."""
        self._update_whole()
        whole = [layout for layout in self._whole_since if self._layouts[layout][0] == content]
        if whole:
            self._serving[content] = max(whole, key=self._whole_since.__getitem__)
            return self._serving[content]
        live: dict[str, set[int]] = defaultdict(set)
        for node in self._nodes.values():
            if node.alive and node.content == content:
                live[node.layout].add(node.shard)
        before = self._serving.get(content)
        if before not in live:
            known = {n.layout for n in self._nodes.values()}  # a layout whose nodes are all down still answers: partially
            chosen = max(live, key=lambda layout: len(live[layout]), default=before if before in known else None)
            if chosen is None:  # no node of this version: nothing kept for it, whatever a client names
                self._serving.pop(content, None)
            else:
                self._serving[content] = chosen
        return self._serving.get(content)

    def _update_whole(self) -> None:
        """Bring ``_whole_since`` up to date: the layouts with a live node for every shard, each
        with the moment it became whole."""
        live: dict[str, set[int]] = defaultdict(set)
        for node in self._nodes.values():
            if node.alive:
                live[node.layout].add(node.shard)
        now = time.monotonic()
        for layout in set(live) | set(self._whole_since):
            if layout in live and len(live[layout]) == self._nshards(layout):
                self._whole_since.setdefault(layout, now)
            else:
                self._whole_since.pop(layout, None)

    def info(self) -> dict:
        """What this coordinator's INFO tells: the layout it serves the configured version from
        (``ready``: with a live node for every shard), the same for every version it has nodes of
        (``versions``, with the seconds since a search named it last: ``idle_s``, None before the
        first), its jobs, and its view of every node."""
        layout = self._serving_layout(self.config.content)
        now = time.monotonic()
        versions = {}
        for content in sorted({n.content for n in self._nodes.values() if n.content is not None}):
            served = self._serving_layout(content)
            searched = self._searched_at.get(content)
            versions[content] = {
                "fingerprint": served,
                "nshards": self._nshards(served) if served is not None else 0,
                "ready": served in self._whole_since,
                "idle_s": None if searched is None else round(now - searched, 1),
            }
        return {
            "role": "coordinator",
            "metric": self.config.metric,
            "content": self.config.content,
            "fingerprint": layout,
            "nshards": self._nshards(layout) if layout is not None else 0,
            "ready": layout in self._whole_since,
            "versions": versions,
            "jobs": self._jobs,
            "pid": os.getpid(),
            "nodes": [
                {
                    "endpoint": n.endpoint,
                    "shard": n.shard,
                    "content": n.content,
                    "fingerprint": n.layout,
                    "alive": n.alive,
                    "listed": n.listed,
                    "inflight": n.inflight,
                    "waiting": len(n.waiting),
                    "answered": n.answered,
                    "answer_s": n.answer_s,
                }
                for n in self._nodes.values()
            ],
        }

    # -- sub-requests --------------------------------------------------------------------------

    def _dispatch(self, sub: _Sub) -> None:
        """Send ``sub`` to the best untried live replica of its shard, or mark the shard missing."""
        while True:
            candidates = [
                n
                for n in self._nodes.values()
                if n.alive and n.shard == sub.shard and n.layout == sub.job.layout and id(n) not in sub.tried
            ]
            if not candidates:
                sub.job.missing.add(sub.shard)
                self._settle(sub.job)
                return
            # the least loaded; of equals, the one sent to longest ago: a light load still reaches every replica
            node = min(candidates, key=lambda n: (not n.listed, n.inflight + len(n.waiting), n.last_sent))
            sub.tried.add(id(node))
            sub.node = node
            if node.inflight >= self.max_inflight:
                node.waiting.append(sub)
                return
            if self._send(node, sub):
                return
            node.alive = False

    def _send(self, node: _Node, sub: _Sub) -> bool:
        sub_id = next(self._sub_ids)
        queries, list_ids = sub.job.message.arrays
        try:
            request = protocol.search_request(sub_id, queries, list_ids, sub.job.k, sub.job.message.fields.get("early"), sub.job.content)
            protocol.send(node.socket, request, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        sub.sent = node.last_sent = time.monotonic()
        sub.deadline = sub.sent + self.timeout
        node.inflight += 1
        self._subs[sub_id] = sub
        return True

    def _on_node(self, node: _Node, frames) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError:
            return  # a node speaking garbage: its sub-requests will time out and fail over
        if message.op == "INFO":
            self._on_info(node, message.fields["info"])
            return
        if message.op == "RESULT" and message.fields.get("early"):  # the final answer follows
            sub = self._subs.get(message.rid)
            if sub is not None:
                sub.job.early_results[sub.shard] = (message.arrays[0], message.arrays[1])
                self._settle_early(sub.job)
            return
        sub = self._subs.pop(message.rid, None)
        if sub is None:
            return  # the answer to a sub-request that already timed out
        node.inflight -= 1
        node.last_seen = time.monotonic()
        if message.op == "RESULT":
            node.answered += 1
            node.answer_s += node.last_seen - sub.sent
            sub.job.results[sub.shard] = (message.arrays[0], message.arrays[1])
            self._settle(sub.job)
        elif message.op == "ERROR" and message.fields["code"] in NODE_FAILURE_CODES:
            if message.fields["code"] == "shutting_down":
                node.alive = False
            self._dispatch(sub)
        else:  # the request itself is bad: tell the client
            sub.job.error = message if message.op == "ERROR" else protocol.error_reply(0, "internal", f"node sent {message.op}")
            self._settle(sub.job)
        self._pump(node)

    def _on_info(self, node: _Node, info: dict) -> None:
        """A node's INFO: which shard of which layout of which version it serves. A node of this
        coordinator's metric is taken into rotation, for the searches of its version; one that now
        serves another shard, layout or version (a new process at the same address) gives back the
        work waiting for it."""
        shard, nshards, layout, content = info.get("shard"), info.get("nshards"), info.get("fingerprint"), info.get("content")
        ours = (
            info.get("metric") == self.config.metric
            and not info.get("draining")
            and all(isinstance(name, str) for name in (layout, content))
            and all(isinstance(n, int) and not isinstance(n, bool) for n in (shard, nshards))
            and 0 <= shard < nshards
        )
        if ours:
            self._layouts.setdefault(layout, (content, nshards))
            ours = self._layouts[layout] == (content, nshards)  # a layout's fingerprint names both
        if (node.shard, node.nshards, node.layout, node.content) != (shard, nshards, layout, content):
            rerouted, node.waiting = list(node.waiting), deque()
            node.shard, node.nshards, node.layout, node.content = (shard, nshards, layout, content) if ours else (None, 0, None, None)
            for sub in rerouted:
                self._dispatch(sub)
        node.alive, node.info = ours, info
        node.last_seen = time.monotonic()
        self._pump(node)

    def _pump(self, node: _Node) -> None:
        """Send what waits for ``node`` while it has room, or re-route it if the node is gone."""
        while node.waiting and (node.inflight < self.max_inflight or not node.alive):
            sub = node.waiting.popleft()
            if not node.alive or not self._send(node, sub):
                self._dispatch(sub)

    def _expire(self, now: float) -> None:
        for node in self._nodes.values():
            if node.alive and now - node.last_seen > self.silence_limit:
                node.alive = False
                self._pump(node)
        expired = [(sub_id, sub) for sub_id, sub in self._subs.items() if sub.deadline <= now]
        for sub_id, sub in expired:
            del self._subs[sub_id]
            sub.node.inflight -= 1
            sub.node.alive = False
            self._pump(sub.node)
            self._dispatch(sub)
        self._forget_gone()

    def _heartbeat(self) -> None:
        for node in self._nodes.values():
            try:
                protocol.send(node.socket, Message("HEARTBEAT", 0), flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected
                node.alive = False

    # -- answers -------------------------------------------------------------------------------

    def _settle_early(self, job: _Job) -> None:
        """Send the early answer of a SEARCH with ``early`` once every shard has sent its early
        result (a node sends it before its final one) or is known to be missing."""
        if "early" not in job.message.fields or job.early_sent or job.answered or job.error is not None:
            return
        found = job.early_results
        if not found or len(found) + len(job.missing - set(found)) < job.nshards:
            return
        distances, ids = self._merged(found, job.k)
        self._reply(protocol.result_reply(job.rid, distances, ids, sorted(job.missing - set(found)), early=True), job.envelope)
        job.early_sent = True

    def _settle(self, job: _Job) -> None:
        """Answer the client once every shard has a result or is known to be missing (the early
        answer, when asked for, always goes first)."""
        self._settle_early(job)
        if len(job.results) + len(job.missing) < job.nshards and job.error is None:
            return
        if job.answered:
            return  # an error arrived before the other shards
        if job.missing and job.error is None and self._retry_elsewhere(job):
            return
        if job.error is not None:
            reply = protocol.error_reply(job.rid, job.error.fields["code"], job.error.fields["message"])
        elif job.missing and (self.on_missing == "fail" or not job.results):
            reply = protocol.error_reply(job.rid, "unavailable", f"no live replica for shard(s) {sorted(job.missing)}")
        else:
            distances, ids = self._merged(job.results, job.k)
            reply = protocol.result_reply(job.rid, distances, ids, sorted(job.missing))
        self._reply(reply, job.envelope)
        job.answered = True

    def _retry_elsewhere(self, job: _Job) -> bool:
        """Send ``job`` again, whole, to another layout of its version with a live node for every
        shard, if there is one: while a re-shard switches layouts, the new layout's nodes may all
        be lost to a shard at once (starting nodes slowed by the others' warm-up), and the old one
        still answers. Returns whether it was sent."""
        self._update_whole()
        job.layouts_tried.add(job.layout)
        others = [layout for layout in self._whole_since if self._layouts[layout][0] == job.content and layout not in job.layouts_tried]
        if not others:
            return False
        job.layout = max(others, key=self._whole_since.__getitem__)
        job.nshards, job.results, job.missing, job.early_results = self._nshards(job.layout), {}, set(), {}
        for shard in range(job.nshards):
            self._dispatch(_Sub(job, shard))
        return True

    def _merged(self, parts: dict, k: int) -> tuple:
        """The global top-``k`` of the shards' (distances, ids) in ``parts`` (shard -> answer)."""
        ordered = [parts[shard] for shard in sorted(parts)]
        if len(ordered) == 1 and ordered[0][1].shape[1] == k:  # a node's top-k is in merge order: merging would copy it
            return ordered[0]
        return merge_topk([p[0] for p in ordered], [p[1] for p in ordered], k, self.config.metric)


class InlineCoordinator(RepliesByRid):
    """A :class:`Coordinator` driven by its one client on the client's own thread, with the search
    interface of :class:`~coordinator.client.RetrievalClient` (and, like it, one thread at a time).

    :meth:`send_search` sends the sub-requests to the nodes, and :meth:`search_result` polls the
    nodes until that answer is settled, handling whatever else arrives (other requests' answers,
    heartbeats' INFO) and sending the heartbeats that are due: no thread, no socket and no encoding
    between client and coordinator. Nothing listens between calls, so the time the caller spends
    away is taken off the coordinator's clocks (:meth:`Coordinator.discount`): a node is judged
    silent only over time in which somebody listened. ``timeout``: seconds a call waits for an answer.
    """

    def __init__(self, coordinator: Coordinator, timeout: float = 10.0):
        super().__init__()
        self.coordinator = coordinator
        self.timeout = timeout
        self._context = zmq.Context()
        self._rids = itertools.count(1)
        coordinator.connect(self._context, self._reply_sink)
        self._driven_at = time.monotonic()

    def close(self) -> None:
        self.coordinator.close()
        self._context.term()

    def search(self, queries: np.ndarray, list_ids: np.ndarray, k: int, content: str | None = None) -> SearchResult:
        return self.search_result(self.send_search(queries, list_ids, k, content=content))

    def send_search(self, queries: np.ndarray, list_ids: np.ndarray, k: int, early: int | None = None, content: str | None = None) -> int:
        """Start a SEARCH (its sub-requests leave now); ``search_result(rid)`` waits for it. With
        ``early``, an early answer after the first ``early`` probed lists also comes:
        ``search_result(rid, early=True)``. ``content``: the index version searched (the
        coordinator's own when None)."""
        search = protocol.search_request(next(self._rids), queries, list_ids, k, early, content)
        self._outstanding.add(search.rid)
        self._catch_up()
        try:
            protocol.check(search)
        except ProtocolError as e:
            self._keep(protocol.error_reply(search.rid, e.code, str(e)))
        else:
            self.coordinator.start(search)
        return search.rid

    def search_result(self, rid: int, early: bool = False) -> SearchResult:
        """The answer to the SEARCH ``rid`` (see :meth:`RetrievalClient.receive` for ``early``);
        an ERROR raised as :class:`RemoteError`, no answer within ``timeout`` as InvalidInput."""
        self._check_outstanding(rid)
        deadline = time.monotonic() + self.timeout
        try:
            while not self._has_reply(rid, early):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Timeout(f"no answer from the retrieval nodes within {self.timeout:g} s")
                self._drive(min(TURN_MS, math.ceil(left * 1000)))
        except Exception:
            self._close_request(rid)
            raise
        return result_of_reply(self._take_reply(rid, early))

    def info(self) -> dict:
        """The coordinator's INFO map, after handling what the nodes sent meanwhile."""
        self._drive(0)
        return self.coordinator.info()

    def _drive(self, wait_ms: int) -> None:
        """One turn of the coordinator's loop on this thread, waiting up to ``wait_ms`` for messages."""
        self._catch_up()
        self.coordinator.poll(wait_ms)
        self._driven_at = time.monotonic()

    def _catch_up(self) -> None:
        """Take the time since the last turn off the coordinator's clocks if the caller was away,
        then send the heartbeats and give up on what is due now."""
        now = time.monotonic()
        away = now - self._driven_at
        # A shorter pause is a busy caller's rhythm: the silence limit leaves room for it.
        if away > self.coordinator.heartbeat_interval:
            self.coordinator.discount(away)
        self.coordinator.tick(now)
        self._driven_at = now

    def _reply_sink(self, reply: Message, _envelope: None) -> None:
        """Where the coordinator's answers go: they stay Python objects, kept for the rid that waits."""
        self._keep(reply)
