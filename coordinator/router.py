"""The coordinator: fans each search out to every shard, merges the global top-k, fails over.

One event loop (no threads) polls the front ROUTER socket, where clients send SEARCH with query
vectors and their list ids (the coarse search stays with the queries), and one DEALER socket per
retrieval node. For every client request each shard gets one sub-request, sent to its live
replica with the fewest sub-requests in flight (at most ``max_inflight`` per node; more wait in
that node's queue). A sub-request that times out, or that a node refuses (shutting down,
overloaded, internal error), is sent to another replica of its shard; a node that times out or
misses heartbeats is taken out of rotation until it answers a heartbeat again. When a shard has
no replica left the answer is ``partial`` with the missing shards listed, or an ``unavailable``
ERROR when ``on_missing="fail"``, but never a hang. Malformed input (a node's ``bad_request``)
goes back to the client as it is.

The coordinator runs as its own process (``chameleon node coordinator``) or, the same loop
embedded in a client process, on a thread of it (:class:`EmbeddedCoordinator`): a search then
crosses the network once (to the nodes and back) instead of twice.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from coordinator import protocol
from coordinator.protocol import Message, ProtocolError
from coordinator.security import CurveKeys, secure_client
from coordinator.transport import bind_router, receive_all
from retriever.errors import RetrieverError
from retriever.search import merge_topk

NODE_FAILURE_CODES = ("shutting_down", "overloaded", "internal", "unavailable")


@dataclass
class ClusterConfig:
    """What the coordinator serves: the shards' nodes and the index build they must all hold."""

    metric: str
    nshards: int
    fingerprint: str
    nodes: list[dict]  # {"shard": int, "endpoint": str}

    @classmethod
    def load(cls, path: str | os.PathLike) -> ClusterConfig:
        try:
            data = json.loads(Path(path).read_text())
            config = cls(data["metric"], int(data["nshards"]), data["fingerprint"], list(data["nodes"]))
        except FileNotFoundError:
            raise RetrieverError(f"{path} does not exist") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise RetrieverError(f"{path} is not a cluster configuration: {e}") from None
        config.check()
        return config

    def check(self) -> None:
        shards = {n.get("shard") for n in self.nodes}
        if shards != set(range(self.nshards)):
            raise RetrieverError(f"the nodes cover shards {sorted(shards, key=str)}, not 0..{self.nshards - 1}")


@dataclass
class _Node:
    shard: int
    endpoint: str
    socket: zmq.Socket
    alive: bool = False
    last_seen: float = 0.0
    inflight: int = 0
    waiting: deque = field(default_factory=deque)
    info: dict = field(default_factory=dict)
    answered: int = 0  # sub-requests this node answered with a RESULT ...
    answer_s: float = 0.0  # ... and the seconds they took, send to answer (for latency metrics)


@dataclass
class _Job:
    envelope: list
    rid: int
    k: int
    message: Message
    results: dict = field(default_factory=dict)  # shard -> (distances, ids)
    early_results: dict = field(default_factory=dict)  # shard -> (distances, ids) after its first lists
    early_sent: bool = False
    missing: set = field(default_factory=set)
    error: Message | None = None


@dataclass
class _Sub:
    job: _Job
    shard: int
    node: _Node | None = None
    sent: float = 0.0
    deadline: float = 0.0
    tried: set = field(default_factory=set)


class Coordinator:
    def __init__(
        self,
        config: ClusterConfig,
        timeout: float = 2.0,
        on_missing: str = "partial",
        max_inflight: int = 8,
        heartbeat_interval: float = 0.25,
        keys: CurveKeys | None = None,
    ):
        if on_missing not in ("partial", "fail"):
            raise RetrieverError(f"on_missing must be 'partial' or 'fail', got {on_missing!r}")
        self.config = config
        self.timeout = timeout
        self.on_missing = on_missing
        self.max_inflight = max_inflight
        self.heartbeat_interval = heartbeat_interval
        self.keys = keys
        self.endpoint: str | None = None
        self._draining = threading.Event()
        self._sub_ids = itertools.count(1)
        self._subs: dict[int, _Sub] = {}
        self._jobs = 0

    @property
    def silence_limit(self) -> float:
        """Seconds without a word from a live node after which it is taken out of rotation."""
        return 4 * self.heartbeat_interval + self.timeout

    def drain(self, *_signal_args) -> None:
        self._draining.set()

    def serve(
        self,
        bind: str,
        ready_file: str | os.PathLike | None = None,
        stop: threading.Event | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        """Serve until drained (SIGTERM, :meth:`drain`) or ``stop`` is set. With ``context`` (shared
        with this process's clients, as an ``inproc://`` front needs) it is used and left open."""
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self.drain)
        own_context = context is None
        context = context or zmq.Context()
        nodes = [self._connect(context, spec) for spec in self.config.nodes]
        # An inproc front never leaves this process, and ZeroMQ applies no security mechanism to inproc.
        front_keys = None if bind.startswith("inproc://") else self.keys
        front, authenticator, self.endpoint = bind_router(context, bind, front_keys, ready_file)
        try:
            self._loop(front, nodes, stop or threading.Event())
        finally:
            for socket in [front] + [n.socket for n in nodes]:
                socket.close(linger=0)
            if authenticator:
                authenticator.stop()
            if own_context:
                context.term()

    def _connect(self, context: zmq.Context, spec: dict) -> _Node:
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a node that is not connected: fail over instead
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        socket.setsockopt(zmq.MAXMSGSIZE, protocol.MAX_MESSAGE_BYTES)
        secure_client(socket, self.keys)
        socket.connect(spec["endpoint"])
        return _Node(int(spec["shard"]), spec["endpoint"], socket)

    def _loop(self, front, nodes: list[_Node], stop) -> None:
        poller = zmq.Poller()
        poller.register(front, zmq.POLLIN)
        by_socket = {}
        for node in nodes:
            poller.register(node.socket, zmq.POLLIN)
            by_socket[node.socket] = node
        next_heartbeat = 0.0
        while not stop.is_set():
            if self._draining.is_set() and not self._subs:
                return
            now = time.monotonic()
            if now >= next_heartbeat:
                self._heartbeat(nodes)
                next_heartbeat = now + self.heartbeat_interval
            self._expire(front, nodes, now)
            for socket, _ in poller.poll(timeout=10):
                for frames in receive_all(socket):
                    if socket is front:
                        self._on_client(front, nodes, frames)
                    else:
                        self._on_node(front, nodes, by_socket[socket], frames)

    # -- clients ------------------------------------------------------------------------------

    def _on_client(self, front, nodes, frames) -> None:
        envelope, rid = frames[:1], 0
        try:
            message = protocol.decode(frames[1:])
            rid = message.rid
            if message.op == "HEARTBEAT":
                protocol.send(front, Message("INFO", rid, {"info": self._info(nodes)}), envelope)
                return
            if message.op != "SEARCH":
                raise ProtocolError("bad_request", f"the coordinator answers SEARCH and HEARTBEAT, not {message.op}")
            if self._draining.is_set():
                raise ProtocolError("shutting_down", "the coordinator is shutting down")
        except ProtocolError as e:
            protocol.send(front, protocol.error_reply(e.rid or rid, e.code, str(e)), envelope)
            return
        self._jobs += 1
        job = _Job(envelope, rid, message.fields["k"], message)
        for shard in range(self.config.nshards):
            self._dispatch(front, nodes, _Sub(job, shard))

    def _info(self, nodes) -> dict:
        return {
            "role": "coordinator",
            "nshards": self.config.nshards,
            "fingerprint": self.config.fingerprint,
            "jobs": self._jobs,
            "pid": os.getpid(),
            "nodes": [
                {
                    "shard": n.shard, "endpoint": n.endpoint, "alive": n.alive, "inflight": n.inflight,
                    "waiting": len(n.waiting), "answered": n.answered, "answer_s": n.answer_s,
                }  # fmt: skip
                for n in nodes
            ],
        }

    # -- sub-requests --------------------------------------------------------------------------

    def _dispatch(self, front, nodes, sub: _Sub) -> None:
        """Send ``sub`` to the best untried live replica of its shard, or mark the shard missing."""
        while True:
            candidates = [n for n in nodes if n.shard == sub.shard and n.alive and id(n) not in sub.tried]
            if not candidates:
                sub.job.missing.add(sub.shard)
                self._settle(front, sub.job)
                return
            node = min(candidates, key=lambda n: n.inflight + len(n.waiting))
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
            request = protocol.search_request(sub_id, queries, list_ids, sub.job.k, sub.job.message.fields.get("early"))
            protocol.send(node.socket, request, flags=zmq.NOBLOCK)
        except zmq.Again:
            return False
        sub.sent = time.monotonic()
        sub.deadline = sub.sent + self.timeout
        node.inflight += 1
        self._subs[sub_id] = sub
        return True

    def _on_node(self, front, nodes, node: _Node, frames) -> None:
        try:
            message = protocol.decode(frames)
        except ProtocolError:
            return  # a node speaking garbage: its sub-requests will time out and fail over
        if message.op == "INFO":
            info = message.fields["info"]
            healthy = info.get("fingerprint") == self.config.fingerprint and info.get("shard") == node.shard
            node.alive, node.info = healthy, info
            node.last_seen = time.monotonic()
            self._pump(front, nodes, node)
            return
        if message.op == "RESULT" and message.fields.get("early"):  # the final answer follows
            sub = self._subs.get(message.rid)
            if sub is not None:
                sub.job.early_results[sub.shard] = (message.arrays[0], message.arrays[1])
                self._settle_early(front, sub.job)
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
            self._settle(front, sub.job)
        elif message.op == "ERROR" and message.fields["code"] in NODE_FAILURE_CODES:
            self._dispatch(front, nodes, sub)
        else:  # the request itself is bad: tell the client
            sub.job.error = message if message.op == "ERROR" else protocol.error_reply(0, "internal", f"node sent {message.op}")
            self._settle(front, sub.job)
        self._pump(front, nodes, node)

    def _pump(self, front, nodes, node: _Node) -> None:
        """Send what waits for ``node`` while it has room, or re-route it if the node is gone."""
        while node.waiting and (node.inflight < self.max_inflight or not node.alive):
            sub = node.waiting.popleft()
            if not node.alive or not self._send(node, sub):
                self._dispatch(front, nodes, sub)

    def _expire(self, front, nodes, now: float) -> None:
        for node in nodes:
            if node.alive and now - node.last_seen > self.silence_limit:
                node.alive = False
                self._pump(front, nodes, node)
        expired = [(sub_id, sub) for sub_id, sub in self._subs.items() if sub.deadline <= now]
        for sub_id, sub in expired:
            del self._subs[sub_id]
            sub.node.inflight -= 1
            sub.node.alive = False
            self._pump(front, nodes, sub.node)
            self._dispatch(front, nodes, sub)

    def _heartbeat(self, nodes) -> None:
        for node in nodes:
            try:
                protocol.send(node.socket, Message("HEARTBEAT", 0), flags=zmq.NOBLOCK)
            except zmq.Again:  # not connected
                node.alive = False

    # -- answers -------------------------------------------------------------------------------

    def _settle_early(self, front, job: _Job) -> None:
        """Send the early answer of a SEARCH with ``early`` once every shard has sent its early
        result (a node sends it before its final one) or is known to be missing."""
        if "early" not in job.message.fields or job.early_sent or job.envelope is None or job.error is not None:
            return
        found = job.early_results
        if not found or len(found) + len(job.missing - set(found)) < self.config.nshards:
            return
        distances, ids = self._merged(found, job.k)
        protocol.send(front, protocol.result_reply(job.rid, distances, ids, sorted(job.missing - set(found)), early=True), job.envelope)
        job.early_sent = True

    def _settle(self, front, job: _Job) -> None:
        """Answer the client once every shard has a result or is known to be missing (the early
        answer, when asked for, always goes first)."""
        self._settle_early(front, job)
        if len(job.results) + len(job.missing) < self.config.nshards and job.error is None:
            return
        if job.envelope is None:
            return  # already answered (an error arrived before the other shards)
        if job.error is not None:
            reply = protocol.error_reply(job.rid, job.error.fields["code"], job.error.fields["message"])
        elif job.missing and (self.on_missing == "fail" or not job.results):
            reply = protocol.error_reply(job.rid, "unavailable", f"no live replica for shard(s) {sorted(job.missing)}")
        else:
            distances, ids = self._merged(job.results, job.k)
            reply = protocol.result_reply(job.rid, distances, ids, sorted(job.missing))
        protocol.send(front, reply, job.envelope)
        job.envelope = None

    def _merged(self, parts: dict, k: int) -> tuple:
        """The global top-``k`` of the shards' (distances, ids) in ``parts`` (shard -> answer)."""
        ordered = [parts[shard] for shard in sorted(parts)]
        if len(ordered) == 1 and ordered[0][1].shape[1] == k:  # a node's top-k is in merge order: merging would copy it
            return ordered[0]
        return merge_topk([p[0] for p in ordered], [p[1] for p in ordered], k, self.config.metric)


class EmbeddedCoordinator:
    """A :class:`Coordinator` on a thread of this (the client's) process, its front an ``inproc://``
    endpoint of :attr:`context`: clients made on that context reach it without a network hop, and
    it talks to the nodes as a coordinator process does. :meth:`close` stops the thread (close the
    clients on :attr:`context` first: the context ends with it)."""

    def __init__(self, config: ClusterConfig, **options):
        self.context = zmq.Context()
        self.coordinator = Coordinator(config, **options)
        self.endpoint = f"inproc://coordinator-{id(self)}"
        self._stop = threading.Event()
        serve = {"stop": self._stop, "context": self.context}
        self.thread = threading.Thread(target=self.coordinator.serve, args=(self.endpoint,), kwargs=serve, name="coordinator", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self._stop.set()
        self.thread.join()
        self.context.term()
